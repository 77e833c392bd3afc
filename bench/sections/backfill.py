"""backfill: rows/s vs one UPDATE, longest batch, peak RSS at 100k and N rows, app p99 before/during."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from typing import Any

from bench.common import CHILD, REPO, Bench, now_rel, r, seconds_between, window
from orchestrator.run.runner import Orchestrator


def _child(bench: Bench, dsn: str) -> dict:
    """The full migration in a separate process; its own peak RSS."""
    cfg = json.dumps({"dsn": dsn, "playbook": bench.pb_data})
    p = subprocess.run([sys.executable, str(CHILD), cfg], capture_output=True, text=True, cwd=REPO,
                       timeout=bench.args.child_timeout)
    if p.returncode:
        raise RuntimeError(f"orchestrator child failed ({p.returncode}): {p.stderr.strip()[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def section_backfill(bench: Bench) -> dict:
    a = bench.args
    out: dict[str, Any] = {}
    # 1. Throughput: the orchestrator alone in its own process (which also gives its peak RSS) vs one
    #    UPDATE statement on an identical copy in the same state; ABBA rounds, so drifting load hits both.
    ours, one = [], []
    for i in range(a.backfill_rounds):
        for kind in (("ours", "one") if i % 2 == 0 else ("one", "ours")):
            dsn = bench.clone(bench.n, f"bf_{kind}_{i}")
            if kind == "ours":
                ours.append(_child(bench, dsn))
            else:
                one.append(bench.one_update(dsn))
            bench.drop(dsn)
    rates = [x["backfill"]["rows_done"] / x["seconds"]["backfill"] for x in ours]
    cpus = [x["server_cpu_s"]["backfill"] for x in ours]
    bf = ours[0]["backfill"]
    labels = list(bf["tables"])
    # Per table: each column's backfill state row (rows_done over finished_at - started_at) against its own
    # UPDATE statement; every table is backfilled in turn, so these are the table's own rates.
    per_table = {}
    for label in labels:
        o_rates = [x["backfill"]["tables"][label]["rows_done"] / max(x["backfill"]["tables"][label]["seconds"], 1e-3)
                   for x in ours]
        u_rates = [x["tables"][label]["rows_per_s"] for x in one]
        per_table[label] = {
            "rows": bf["tables"][label]["rows_done"],
            "rows_per_s": round(statistics.median(o_rates)), "rounds_rows_per_s": [round(v) for v in o_rates],
            "batches": [x["backfill"]["tables"][label]["batches"] for x in ours],
            "max_batch_ms": r(max(x["backfill"]["tables"][label]["max_batch_ms"] or 0 for x in ours)),
            "one_update_rows_per_s": round(statistics.median(u_rates)),
            "one_update_rounds_rows_per_s": u_rates,
            "ratio_vs_one_update": round(statistics.median(o_rates) / statistics.median(u_rates), 3)}
    out["orchestrator"] = {
        "rows": bf["rows_done"], "rows_per_s": round(statistics.median(rates)),
        "rounds_rows_per_s": [round(x) for x in rates], "seconds": [round(x["seconds"]["backfill"], 2) for x in ours],
        "batches": [x["backfill"]["batches"] for x in ours],
        "max_batch_ms": r(max(x["backfill"]["max_batch_ms"] for x in ours)),
        "last_batch_size": [x["backfill"]["batch_size"] for x in ours],
        "server_cpu_s": cpus, "phase_seconds": {k: round(v, 2) for k, v in ours[0]["seconds"].items()}}
    out["one_update"] = {"rows": one[0]["rows"], "rows_per_s": round(statistics.median(x["rows_per_s"] for x in one)),
                         "rounds_rows_per_s": [x["rows_per_s"] for x in one],
                         "seconds": [x["seconds"] for x in one], "server_cpu_s": [x["server_cpu_s"] for x in one],
                         "sql": one[0]["sql"]}
    out["tables"] = per_table
    out["ratio_vs_one_update"] = round(out["orchestrator"]["rows_per_s"] / out["one_update"]["rows_per_s"], 3)
    if all(c is not None for c in cpus + out["one_update"]["server_cpu_s"]):
        # rows per server-CPU-second, ours / one UPDATE: what the ratio is once other load is taken out
        out["cpu_ratio_vs_one_update"] = round(statistics.median(out["one_update"]["server_cpu_s"])
                                               / statistics.median(cpus), 3)
    # 2. Peak RSS of the orchestrator process at rss_rows and at N rows. VmHWM, not ru_maxrss: Linux carries
    #    ru_maxrss across exec, so a child's figure starts at the size of the forked benchmark process.
    def peak(x: dict) -> int:
        return x["vm_hwm_kib"] or x["ru_maxrss_kib"]

    runs = {bench.n: max(ours, key=peak)}
    if a.rss_rows != bench.n:
        dsn = bench.clone(a.rss_rows, f"child_{a.rss_rows}")
        runs[a.rss_rows] = _child(bench, dsn)
        bench.drop(dsn)
    sizes = sorted(runs)
    out["rss"] = {str(rows): {"peak_rss_mib": r(peak(runs[rows]) / 1024),
                              "ru_maxrss_mib": r(runs[rows]["ru_maxrss_kib"] / 1024)} for rows in sizes}
    out["rss_ratio"] = round(peak(runs[sizes[-1]]) / peak(runs[sizes[0]]), 3)
    # 3. Under app load: p99 before vs during
    dsn = bench.clone(bench.n, "bf_load")
    bench.run_phases(dsn, 2)
    traffic = bench.traffic(dsn)
    time.sleep(max(a.warmup, 5.0))
    orch = Orchestrator(bench.pb, dsn)
    try:
        t0 = now_rel(traffic)
        orch.run(3)
        t1 = now_rel(traffic)
        rows = orch.state.backfills()
    finally:
        orch.close()
    time.sleep(a.cooldown)
    rep = traffic.stop()
    tables = {}
    for m in bench.pb.migrations:
        row = rows[m.key]
        secs = seconds_between(row["started_at"], row["finished_at"])
        tables[m.label] = {"rows_done": row["rows_done"], "batches": row["batches"],
                           "max_batch_ms": r(row["max_batch_ms"]), "seconds": r(secs, 2),
                           "rows_per_s": round(row["rows_done"] / max(secs, 1e-3)) if secs is not None else None}
    done = sum(t["rows_done"] for t in tables.values())
    out["under_load"] = {"seconds": round(t1 - t0, 2), "rows_per_s": round(done / (t1 - t0)),
                         "batches": sum(t["batches"] for t in tables.values()),
                         "max_batch_ms": max(t["max_batch_ms"] or 0 for t in tables.values()), "tables": tables,
                         "before": window(rep, 1.0, t0), "during": window(rep, t0, t1)}
    bench.drop(dsn)
    out["longest_batch_ms"] = max(out["orchestrator"]["max_batch_ms"], out["under_load"]["max_batch_ms"])
    return out
