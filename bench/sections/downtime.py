"""downtime: app latency/errors during the naive one-statement ALTER vs the orchestrator's full run."""

from __future__ import annotations

import time
from typing import Any

import psycopg

from bench.common import Bench, now_rel, per_step, step_of, window
from bench.waits import WaitSampler


def section_downtime(bench: Bench) -> dict:
    a = bench.args
    out: dict[str, Any] = {}
    # (a) naive
    dsn = bench.clone(bench.n, "naive")
    stmts = bench.naive_statements()
    traffic = bench.traffic(dsn)
    time.sleep(a.warmup)
    t0 = now_rel(traffic)
    attempts: list[dict] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        out["naive_sql"] = ";\n".join(st.as_string(conn) for st in stmts)
        # The revision ALTERs workflow_templates, then template_specs; the app's JOIN probe locks them in
        # the other order, so the revision can deadlock with it. As a deploy would, run it again then.
        while True:
            ta = now_rel(traffic)
            try:
                with conn.transaction():
                    for st in stmts:
                        conn.execute(st)
                attempts.append({"start": round(ta, 3), "seconds": round(now_rel(traffic) - ta, 2), "error": None})
                break
            except psycopg.errors.DeadlockDetected as err:
                attempts.append({"start": round(ta, 3), "seconds": round(now_rel(traffic) - ta, 2),
                                 "error": " ".join(str(err).split())[:300]})
                if len(attempts) >= 5:
                    raise
    t1 = now_rel(traffic)
    traffic.use_new_app()
    time.sleep(a.cooldown)
    rep = traffic.stop()
    naive_during = window(rep, t0, t1)
    naive_during["deadlock_errors"] = sum(1 for x in rep.samples if x.error and "Deadlock" in x.error
                                         and x.t <= t1 and x.t + x.latency_ms / 1000 >= t0)
    out["naive"] = {"migration_s": round(t1 - t0, 2), "attempts": attempts, "baseline": window(rep, 1.0, t0),
                    "during": naive_during, "tables_rows": bench.table_rows[bench.n]}
    bench.drop(dsn)
    # (b) orchestrator
    dsn = bench.clone(bench.n, "ours")
    traffic = bench.traffic(dsn)
    time.sleep(a.warmup)
    sampler = WaitSampler(dsn, clock=lambda: now_rel(traffic)).start()
    try:
        steps = bench.run_all(dsn, traffic)
    finally:
        sampler.stop()
    time.sleep(a.cooldown)
    rep = traffic.stop()
    t0, t1 = steps[0]["start"], steps[-1]["end"]
    during = window(rep, t0, t1)
    during["max_step"] = step_of(steps, during["max_at_s"])
    out["ours"] = {"migration_s": round(t1 - t0, 2), "baseline": window(rep, 1.0, t0), "during": during,
                   "steps": per_step(rep, steps), "app_waits": sampler.summary()}
    for w in out["ours"]["app_waits"]["longest"]:
        w["step"] = step_of(steps, w["t"])
    # Every statement over 150 ms, to match with the wait samples (a stall the server never saw is the client's).
    out["ours"]["slow"] = [{"t": round(x.t, 3), "kind": x.kind, "ms": round(x.latency_ms, 1),
                            "step": step_of(steps, x.t)} for x in rep.samples if x.latency_ms > 150]
    bench.drop(dsn)
    out["ratio_longest_stall"] = round(out["naive"]["during"]["max"] / max(during["max"], 1e-3), 1)
    return out
