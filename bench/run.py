#!/usr/bin/env python
"""Benchmark suite for the expand/contract orchestrator (issue 6, and the benchmark part of issue 3).

    python bench/run.py [--rows 2000000] [--writers 4] [--readers 1]
                        [--sections downtime,lockqueue,backfill,trigger,verify]
                        [--major 18|15] [--dsn URL] [--json bench-results/latest.json]

Not a test: it prints figures and checks them against the goals, but always exits 0 once it has run
(exit 1 only when the benchmark itself breaks). Every section works on its own fresh database cloned
from one generated template (CREATE DATABASE ... TEMPLATE), so every measurement sees identical data.

The template is Chatter's real schema (orchestrator/chatter.py: users, workflow_templates with ten
indexes, CHECKs and foreign keys, template_specs; the enum workflowtype used by both tables) with
--rows workflow_templates rows and --rows/4 template_specs rows; the playbook migrates both columns.

Sections
  downtime   app latency/errors during the naive one-statement ALTER vs the orchestrator's full run
  lockqueue  the same with a long reader transaction open when each DDL step starts
  backfill   rows/s vs one UPDATE, longest batch, peak RSS at 100k and N rows, app p99 before/during
  trigger    app throughput (pgbench) with and without the dual-write trigger
  verify     rows/s of the parity check vs a plain count(*)
  footprint  WAL and table + index size, per phase and per footprint setting, vs the naive rewrite
  replica    replay lag on a real streaming standby: naive vs orchestrator with the lag throttle off and on
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from rich.console import Console

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import DEFAULT_PLAYBOOK, Bench, machine_info  # noqa: E402
from bench.report import footprint_goals, goals, render  # noqa: E402
from bench.sections import backfill, downtime, footprint, lockqueue, replica, trigger, verify  # noqa: E402
from orchestrator.console import logs  # noqa: E402

# Each section (bench/sections/<name>.py) measures on its own clones and returns its figures; in the order run.
SECTIONS: dict[str, Callable[[Bench], dict]] = {
    "downtime": downtime.section_downtime,
    "lockqueue": lockqueue.section_lockqueue,
    "backfill": backfill.section_backfill,
    "trigger": trigger.section_trigger,
    "verify": verify.section_verify,
    "footprint": footprint.section_footprint,  # footprint and replica: issue 16
    "replica": replica.section_replica,
}


# --------------------------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=2_000_000,
                   help="workflow_templates rows (default 2M); template_specs gets rows // 4")
    p.add_argument("--writers", type=int, default=4, help="app writer connections (default 4)")
    p.add_argument("--readers", type=int, default=1, help="app reader connections (default 1)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--major", type=int, help="PostgreSQL major to start (embedded or installed binaries)")
    p.add_argument("--dsn", help="use this server (needs CREATEDB) instead of starting one")
    p.add_argument("--playbook", default=str(DEFAULT_PLAYBOOK))
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a playbook field, e.g. --set settings.target_batch_ms=50 (repeatable)")
    p.add_argument("--json", default="bench-results/latest.json", help="where to write the results")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of app traffic before each migration")
    p.add_argument("--cooldown", type=float, default=1.0, help="seconds of app traffic after each migration")
    p.add_argument("--blocker-seconds", type=float, default=6.0, help="lockqueue: reader transaction length")
    p.add_argument("--rss-rows", type=int, default=100_000, help="backfill: the small table for the RSS comparison")
    p.add_argument("--backfill-rounds", type=int, default=2, help="backfill: rounds of each side (ABBA order)")
    p.add_argument("--trigger-seconds", type=int, default=8, help="trigger: seconds per load round")
    p.add_argument("--trigger-rounds", type=int, default=6, help="trigger: rounds per side (ABBA order)")
    p.add_argument("--trigger-driver", choices=("auto", "pgbench", "python"), default="auto")
    p.add_argument("--verify-rounds", type=int, default=5)
    p.add_argument("--child-timeout", type=float, default=3600)
    p.add_argument("--footprint-variants", help="footprint: only the variants whose name contains one of these "
                                                "(comma-separated; default: all)")
    p.add_argument("--replica-variants", help="replica: only the runs whose name contains one of these "
                                              "(comma-separated; default: all)")
    p.add_argument("--replica-lag-bytes", type=int, default=16 * 1024 * 1024,
                   help="replica: max_replica_lag_bytes of the throttled run (default 16 MiB)")
    p.add_argument("--keep", action="store_true", help="keep the databases (only useful with --dsn)")
    a = p.parse_args(argv)
    a.sections = [s.strip() for s in a.sections.split(",") if s.strip()]
    bad = [s for s in a.sections if s not in SECTIONS]
    if bad:
        p.error(f"unknown section(s) {bad}; choose from {','.join(SECTIONS)}")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 140)
    logs.configure(level="warning", json=False)
    os.environ["ORCHESTRATOR_CONTROL_DIR"] = tempfile.mkdtemp(prefix="bench-control-")  # no stray pause file
    meta: dict[str, Any] = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                            "command": "python bench/run.py " + shlex.join(sys.argv[1:] if argv is None else argv),
                            "machine": machine_info(), "rows": args.rows, "writers": args.writers,
                            "readers": args.readers, "sections": args.sections}
    bench = Bench(args, console)
    meta.update(pg_version=bench.pg_version, server_kind=bench.srv.kind, pg_settings=bench.pg_settings,
                playbook_settings=bench.pb.settings.model_dump())
    results: dict[str, Any] = {}
    timings: dict[str, float] = {}
    loads: dict[str, list[float]] = {}
    out = Path(args.json)
    if not out.is_absolute():
        out = REPO / out
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    try:
        for name in args.sections:
            console.log(f"section {name} …")
            t, load0 = time.monotonic(), os.getloadavg()[0]
            results[name] = SECTIONS[name](bench)
            timings[name] = round(time.monotonic() - t, 1)
            loads[name] = [round(load0, 2), round(os.getloadavg()[0], 2)]  # 1-min load at start and end
            console.log(f"section {name} done in {timings[name]} s")
            # Long runs (10M rows) keep what they measured so far, should a later section fail or be stopped.
            partial.write_text(json.dumps({"meta": {**meta, "section_seconds": timings, "section_loadavg": loads,
                                                    "setup_seconds": bench.setup_s}, "results": results},
                                          indent=2, default=str))
    finally:
        bench.cleanup()
    meta["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    meta["section_seconds"], meta["setup_seconds"], meta["section_loadavg"] = timings, bench.setup_s, loads
    meta["table_rows"] = {str(k): v for k, v in bench.table_rows.items()}
    meta["schema"] = "Chatter (orchestrator/chatter.py): " + ", ".join(m.label for m in bench.pb.migrations)
    goal_rows = goals(results, bench.pb) + footprint_goals(results)
    render(console, results, goal_rows, meta)
    out.write_text(json.dumps({"meta": meta, "results": results, "goals": goal_rows}, indent=2, default=str))
    partial.unlink(missing_ok=True)
    console.print(f"results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
