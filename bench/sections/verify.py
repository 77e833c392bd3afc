"""verify: rows/s of the parity check vs a plain count(*)."""

from __future__ import annotations

import json
import os
import statistics
import time

import psycopg
from psycopg import sql

from bench.common import Bench
from orchestrator.engine import parity, playbook
from orchestrator.run.runner import Orchestrator


def section_verify(bench: Bench) -> dict:
    a = bench.args
    v_load = [list(os.getloadavg())]
    dsn = bench.clone(bench.n, "verify")
    # Phases 1-2 and the shadows filled: the state phase 4 runs in. No autovacuum: a run starting after the
    # mass update (it would) lands in some rounds and not others, and its VACUUM turns count(*) into an
    # index-only scan; measured here are the tables as the backfill leaves them.
    one = bench.one_update(dsn, autovacuum=False)
    orch = Orchestrator(bench.pb, dsn)
    # The same check on the work connection alone (verify_parallelism 1: what it was before issue 16, item 5).
    one_conn = None
    if bench.pb.settings.verify_parallelism > 1:
        data = json.loads(json.dumps(bench.pb_data))
        data.setdefault("settings", {})["verify_parallelism"] = 1
        one_conn = Orchestrator(playbook.parse(data, str(a.playbook)), dsn)
    # Per table (by label): the parity check of its column (what orch.verify() and phase 4 run, one column at a
    # time) and count(*) of the table, parallel and serial.
    parity_s: dict[str, list[float]] = {}
    parity1_s: dict[str, list[float]] = {}
    count_s: dict[str, list[float]] = {}
    serial_s: dict[str, list[float]] = {}
    rows: dict[str, int] = {}
    counts: dict[str, int] = {}
    plans: dict[str, list[str]] = {}
    try:
        ctxs = orch.contexts(orch.facts(register=False))
        ctxs1 = {c.m.label: c for c in one_conn.contexts(one_conn.facts(register=False))} if one_conn else {}
        with psycopg.connect(dsn, autocommit=True) as conn, psycopg.connect(dsn, autocommit=True) as serial:
            serial.execute("SET max_parallel_workers_per_gather = 0")
            count_q = {c.m.label: sql.SQL("SELECT count(*) FROM {}").format(c.table) for c in ctxs}
            for label, q in count_q.items():
                conn.execute(q).fetchone()  # warm-up: hint bits after the mass update, cache
                plans[label] = [r_[0] for r_ in conn.execute(sql.SQL("EXPLAIN ") + q).fetchall()]
            for _ in range(a.verify_rounds):  # interleaved, so drifting machine load hits all three
                for ctx in ctxs:
                    label = ctx.m.label
                    t = time.monotonic()
                    res = parity.check(ctx, swapped=False)
                    parity_s.setdefault(label, []).append(time.monotonic() - t)
                    rows[label] = res.rows
                    if res.mismatches:
                        raise RuntimeError(f"parity check of {label} found {res.mismatches} mismatches")
                    if label in ctxs1:
                        t = time.monotonic()
                        res1 = parity.check(ctxs1[label], swapped=False)
                        parity1_s.setdefault(label, []).append(time.monotonic() - t)
                        if (res1.rows, res1.mismatches) != (res.rows, res.mismatches):
                            raise RuntimeError(f"{label}: one connection found {res1.rows} rows, "
                                               f"{res1.mismatches} mismatches; parallel {res.rows}, "
                                               f"{res.mismatches}")
                    t = time.monotonic()
                    counts[label] = conn.execute(count_q[label]).fetchone()[0]
                    count_s.setdefault(label, []).append(time.monotonic() - t)
                    t = time.monotonic()
                    serial.execute(count_q[label]).fetchone()
                    serial_s.setdefault(label, []).append(time.monotonic() - t)
        # And once through the public entry point, which must agree.
        t = time.monotonic()
        whole = orch.verify()
        verify_s = time.monotonic() - t
        bad = {k: v.mismatches for k, v in whole.items() if v.mismatches}
        if bad or {k: v.rows for k, v in whole.items()} != rows:
            raise RuntimeError(f"orch.verify() disagrees: mismatches {bad}, rows "
                               f"{ {k: v.rows for k, v in whole.items()} } vs {rows}")
    finally:
        orch.close()
        if one_conn is not None:
            one_conn.close()
    bench.drop(dsn)
    med = statistics.median
    tables = {}
    for label in rows:
        p, c, cs = med(parity_s[label]), med(count_s[label]), med(serial_s[label])
        tables[label] = {
            "rows": rows[label], "count_rows": counts[label], "parity_s": round(p, 3), "count_s": round(c, 3),
            "count_serial_s": round(cs, 3), "parity_rows_per_s": round(rows[label] / p),
            "count_rows_per_s": round(counts[label] / c), "count_serial_rows_per_s": round(counts[label] / cs),
            "ratio": round((rows[label] / p) / (counts[label] / c), 3),
            "ratio_vs_serial_count": round((rows[label] / p) / (counts[label] / cs), 3), "count_plan": plans[label],
            **({"parity_1conn_s": round(med(parity1_s[label]), 3),
                "parity_1conn_rows_per_s": round(rows[label] / med(parity1_s[label])),
                "ratio_1conn": round((rows[label] / med(parity1_s[label])) / (counts[label] / c), 3),
                "ratio_1conn_vs_serial_count": round((rows[label] / med(parity1_s[label])) / (counts[label] / cs),
                                                     3)} if label in parity1_s else {}),
            "rounds": {"parity_s": [round(x, 3) for x in parity_s[label]],
                       "parity_1conn_s": [round(x, 3) for x in parity1_s.get(label, [])],
                       "count_s": [round(x, 3) for x in count_s[label]],
                       "count_serial_s": [round(x, 3) for x in serial_s[label]]}}
    # Both tables: the sums of the per-round times (a round checks every column, like orch.verify()).
    labels = list(rows)
    per_round = {k: [sum(d[label][i] for label in labels) for i in range(a.verify_rounds)]
                 for k, d in (("parity", parity_s), ("count", count_s), ("serial", serial_s),
                              ("parity1", parity1_s)) if d}
    p, c, cs = med(per_round["parity"]), med(per_round["count"]), med(per_round["serial"])
    n_rows, n_count = sum(rows.values()), sum(counts.values())
    p1 = {}
    if "parity1" in per_round:
        x = med(per_round["parity1"])
        p1 = {"parity_1conn_s": round(x, 3), "parity_1conn_rows_per_s": round(n_rows / x),
              "ratio_1conn": round((n_rows / x) / (n_count / c), 3),
              "ratio_1conn_vs_serial_count": round((n_rows / x) / (n_count / cs), 3)}
    return {**p1, "parallelism": bench.pb.settings.verify_parallelism, "cpus": os.cpu_count(),
            "load_before_after": v_load + [list(os.getloadavg())],
            "rows": n_rows, "count_rows": n_count, "parity_s": round(p, 3), "count_s": round(c, 3),
            "count_serial_s": round(cs, 3), "parity_rows_per_s": round(n_rows / p),
            "count_rows_per_s": round(n_count / c), "count_serial_rows_per_s": round(n_count / cs),
            "ratio": round((n_rows / p) / (n_count / c), 3),
            "ratio_vs_serial_count": round((n_rows / p) / (n_count / cs), 3),
            "orch_verify_s": round(verify_s, 3), "chunk_rows": bench.pb.settings.verify_chunk_rows,
            "tables": tables, "setup_one_update_s": one["seconds"]}
