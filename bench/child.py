"""The orchestrator alone in its own process, so its peak memory is measured apart from the benchmark's.

Usage (by bench/sections/backfill.py): python bench/child.py '<json: {"dsn": ..., "playbook": {...}}>'
Runs every phase and the contract, and prints one JSON line: per-phase seconds, the backfill state (every
column's row summed, and per table), and the process's peak RSS: /proc/self/status VmHWM (KiB), the figure
to use, and getrusage ru_maxrss, which Linux carries across exec (it starts at the size of the forked
parent, so it overstates a small child).
Only the orchestrator is imported here: no traffic threads, no rich tables, no benchmark data.
"""

from __future__ import annotations

import json
import resource
import sys
import time


def _vm_hwm_kib() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _backfills(pb, rows: dict) -> dict:
    """Every column's backfill state row, summed, with each column's own figures under "tables" (by label);
    its seconds are the state row's finished_at - started_at (each table is backfilled in turn)."""
    tables = {}
    for m in pb.migrations:
        row = rows.get(m.key)
        if row is None:
            continue
        secs = (row["finished_at"] - row["started_at"]).total_seconds() if row["finished_at"] else None
        tables[m.label] = {"rows_done": row["rows_done"], "batches": row["batches"],
                           "max_batch_ms": row["max_batch_ms"], "batch_size": row["batch_size"], "seconds": secs}
    return {"rows_done": sum(t["rows_done"] for t in tables.values()),
            "batches": sum(t["batches"] for t in tables.values()),
            "max_batch_ms": max((t["max_batch_ms"] or 0 for t in tables.values()), default=0),
            "batch_size": [t["batch_size"] for t in tables.values()], "tables": tables}


def main() -> None:
    cfg = json.loads(sys.argv[1])
    from procstat import postmaster_pid, server_cpu_s  # bench/ is this script's directory: on sys.path

    from orchestrator.console import logs
    from orchestrator.engine import playbook
    from orchestrator.run.runner import Orchestrator

    logs.configure(level="warning", json=True)
    pb = playbook.parse(cfg["playbook"])
    orch = Orchestrator(pb, cfg["dsn"])
    pm = postmaster_pid(orch.x.conn)
    seconds: dict[str, float] = {}
    cpu: dict[str, float | None] = {}
    backfill = None

    def timed(name, fn):
        c, t = server_cpu_s(pm), time.monotonic()
        fn()
        seconds[name] = time.monotonic() - t
        c1 = server_cpu_s(pm)
        cpu[name] = None if c is None or c1 is None else round(c1 - c, 2)

    try:
        for phase in orch.phases:
            timed(phase.name, lambda number=phase.number: orch.run(number))
            if phase.name == "backfill":
                backfill = _backfills(pb, orch.state.backfills())
        timed("contract", orch.contract)
    finally:
        orch.close()
    print(json.dumps({"seconds": seconds, "server_cpu_s": cpu, "backfill": backfill,
                      "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      "vm_hwm_kib": _vm_hwm_kib()}, default=str))


if __name__ == "__main__":
    main()
