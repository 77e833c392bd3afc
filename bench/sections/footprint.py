"""The migration's footprint (issue 16): WAL written, table + index size left behind, and replay lag on a real
streaming standby, for the orchestrator (per phase, per footprint setting) against the naive rewrite.

The `footprint` section of bench/run.py, and the helpers bench/sections/replica.py (the `replica` section)
runs on; every run works on its own identical clone.

WAL is the difference of pg_current_wal_insert_lsn() around each step (the whole server: nothing else runs during
the section; autovacuum is off on the migrated tables, so no worker lands in one run and not another), with
full_page_writes on for the section (the benchmark's server runs with it off otherwise), after a CHECKPOINT,
so full-page images are counted as a production server writes them. Sizes are pg_table_size (heap, TOAST,
free space and visibility maps) and pg_indexes_size of the migrated tables, once the migration is done (the
contract ran / the naive transaction committed) and again after one VACUUM of each table, the one autovacuum
would run anyway (its WAL is counted as its own step).
"""

from __future__ import annotations

import copy
import time
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import sql

from bench.common import Bench, picked
from orchestrator.engine import playbook
from orchestrator.engine.backfill import Backfill
from orchestrator.run.runner import Orchestrator

MB = 1024 * 1024


def variants(n: int, compression: str) -> dict[str, dict[str, Any]]:
    """Footprint settings measured against the default, each on its own clone (keys: playbook settings)."""
    every = max(n // 20, 1000)  # about 5% of workflow_templates per VACUUM
    up = {"backfill_method": "update"}  # the in-place backfill, which the footprint settings are for
    return {
        "shipped playbook (copy)": {},
        "in-place update": up,
        "indexes after backfill": {**up, "indexes_after_backfill": True},
        f"vacuum every {every:,} rows": {**up, "vacuum_every_rows": every},
        "indexes after backfill + vacuum": {**up, "indexes_after_backfill": True, "vacuum_every_rows": every},
        f"wal_compression {compression}": {**up, "wal_compression": compression},
        "all three": {**up, "indexes_after_backfill": True, "vacuum_every_rows": every, "wal_compression": compression},
        "all three + reindex on contract": {**up, "indexes_after_backfill": True, "vacuum_every_rows": every,
                                            "wal_compression": compression, "reindex_on_contract": True},
        f"copy + wal_compression {compression}": {"wal_compression": compression},
    }


def best_compression(conn: psycopg.Connection) -> str:
    vals = conn.execute("SELECT enumvals FROM pg_settings WHERE name = 'wal_compression'").fetchone()[0] or []
    return next((m for m in ("lz4", "zstd") if m in vals), "pglz")


def lsn(conn: psycopg.Connection) -> int:
    # The insert position: pg_current_wal_lsn() (the write position) trails it by up to wal_buffers.
    return int(conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::bigint").fetchone()[0])


def checkpoints(conn: psycopg.Connection) -> int | None:
    for q in ("SELECT num_timed + num_requested FROM pg_stat_checkpointer",  # PostgreSQL 17+
              "SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter"):
        try:
            with conn.transaction():
                return int(conn.execute(q).fetchone()[0])
        except psycopg.Error:
            continue
    return None


def sizes(conn: psycopg.Connection, tables: list[sql.Composable]) -> dict:
    out: dict[str, Any] = {"tables": {}}
    for t in tables:
        name = t.as_string(conn)
        heap, idx = conn.execute(sql.SQL("SELECT pg_table_size({0}::regclass), pg_indexes_size({0}::regclass)")
                                 .format(sql.Literal(name))).fetchone()
        out["tables"][name] = {"table_mb": round(heap / MB, 1), "indexes_mb": round(idx / MB, 1)}
    out["table_mb"] = round(sum(v["table_mb"] for v in out["tables"].values()), 1)
    out["indexes_mb"] = round(sum(v["indexes_mb"] for v in out["tables"].values()), 1)
    out["total_mb"] = round(out["table_mb"] + out["indexes_mb"], 1)
    return out


@contextmanager
def full_page_writes(bench: Bench):
    """full_page_writes on for the section (what a production server writes), then as it was."""
    with psycopg.connect(bench.srv.dsn, autocommit=True) as c:
        before = c.execute("SHOW full_page_writes").fetchone()[0]
        changed = False
        if before != "on":
            try:
                c.execute("ALTER SYSTEM SET full_page_writes = on")
                c.execute("SELECT pg_reload_conf()")
                changed = True
            except psycopg.Error as err:
                bench.console.log(f"cannot turn full_page_writes on ({err}); WAL without full-page images")
    if changed:  # the reload reaches every process shortly after
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with psycopg.connect(bench.srv.dsn, autocommit=True) as c:
                if c.execute("SHOW full_page_writes").fetchone()[0] == "on":
                    break
            time.sleep(0.1)
        time.sleep(0.5)
    try:
        yield
    finally:
        if changed:
            with psycopg.connect(bench.srv.dsn, autocommit=True) as c:
                c.execute(sql.SQL("ALTER SYSTEM SET full_page_writes = {}").format(sql.Literal(before)))
                c.execute("SELECT pg_reload_conf()")


def prepare(bench: Bench, tag: str) -> str:
    """A clone with autovacuum off on the migrated tables, after a CHECKPOINT."""
    dsn = bench.clone(bench.n, tag)
    with psycopg.connect(dsn, autocommit=True) as c:
        for t in bench.tables:
            c.execute(sql.SQL("ALTER TABLE {} SET (autovacuum_enabled = off)").format(t))
        c.execute("CHECKPOINT")
    return dsn


def settle(bench: Bench, conn: psycopg.Connection, out: dict) -> None:
    """Sizes once migrated, then one VACUUM per table (what autovacuum would do next), its WAL and sizes."""
    out["size"] = sizes(conn, bench.tables)
    a = lsn(conn)
    for t in bench.tables:
        conn.execute(sql.SQL("VACUUM {}").format(t))
    out["vacuum_after_wal_mb"] = round((lsn(conn) - a) / MB, 1)
    out["size_after_vacuum"] = sizes(conn, bench.tables)


def playbook_with(bench: Bench, settings: dict) -> playbook.Playbook:
    data = copy.deepcopy(bench.pb_data)
    data.setdefault("settings", {}).update(settings)
    return playbook.parse(data)


@contextmanager
def instrumented(orch: Orchestrator, conn: psycopg.Connection, buckets: dict[str, int]):
    """WAL of the index builds (Executor.concurrently) and of the backfill's VACUUMs, wherever they run."""
    x = orch.x
    orig_conc, orig_vac = x.concurrently, Backfill.vacuum

    def conc(stmt, **kw):
        a = lsn(conn)
        try:
            return orig_conc(stmt, **kw)
        finally:
            what = kw.get("what", "")
            key = ("index rebuilds" if what.startswith("rebuild") else
                   "index builds" if "CREATE" in what or "build" in what else "index drops")
            buckets[key] = buckets.get(key, 0) + lsn(conn) - a

    def vac(self):
        a = lsn(conn)
        try:
            return orig_vac(self)
        finally:
            buckets["backfill vacuum"] = buckets.get("backfill vacuum", 0) + lsn(conn) - a
            buckets["backfill vacuum count"] = buckets.get("backfill vacuum count", 0) + 1

    x.concurrently = conc
    Backfill.vacuum = vac
    try:
        yield
    finally:
        x.concurrently = orig_conc
        Backfill.vacuum = orig_vac


def run_ours(bench: Bench, pb: playbook.Playbook, dsn: str, with_reindex: bool = False) -> dict:
    """Phases 1-6 and the contract; WAL per phase (with index builds and vacuums apart), sizes, seconds."""
    out: dict[str, Any] = {"phases": {}}
    with psycopg.connect(dsn, autocommit=True) as meter:
        ck0 = checkpoints(meter)
        start = lsn(meter)
        orch = Orchestrator(pb, dsn)
        t0 = time.monotonic()
        try:
            for phase in [*orch.phases, None]:
                buckets: dict[str, int] = {}
                a, t = lsn(meter), time.monotonic()
                with instrumented(orch, meter, buckets):
                    if phase is None:
                        orch.contract()
                    else:
                        orch.run(phase.number)
                name = "contract" if phase is None else f"{phase.number} {phase.name}"
                out["phases"][name] = {"wal_mb": round((lsn(meter) - a) / MB, 1),
                                       "seconds": round(time.monotonic() - t, 2), "window": (t, time.monotonic()),
                                       **{f"of which {k} MB" if "count" not in k else k:
                                          (round(v / MB, 1) if "count" not in k else v) for k, v in buckets.items()}}
        finally:
            orch.close()
        out["seconds"] = round(time.monotonic() - t0, 2)
        out["wal_mb"] = round((lsn(meter) - start) / MB, 1)
        ck1 = checkpoints(meter)
        out["checkpoints"] = None if ck0 is None or ck1 is None else ck1 - ck0
        # Batches cancelled at max_batch_ms wrote WAL for work that was rolled back, then split and redone.
        out["cancelled_batches"] = meter.execute(sql.SQL("SELECT count(*) FROM {} WHERE outcome = 'QueryCanceled'")
                                                 .format(sql.Identifier(pb.settings.state_schema, "run_log"))
                                                 ).fetchone()[0]
        settle(bench, meter, out)
        if with_reindex:
            reindex(bench, meter, out)
    return out


def reindex(bench: Bench, conn: psycopg.Connection, out: dict) -> None:
    """What rebuilding every index of the migrated tables afterwards (REINDEX TABLE CONCURRENTLY) would cost
    in WAL and give back in size: measured, not something the orchestrator does."""
    a = lsn(conn)
    for t in bench.tables:
        conn.execute(sql.SQL("REINDEX TABLE CONCURRENTLY {}").format(t))
    out["reindex_wal_mb"] = round((lsn(conn) - a) / MB, 1)
    out["size_after_reindex"] = sizes(conn, bench.tables)


def run_naive(bench: Bench, dsn: str, wal_compression: str | None = None) -> dict:
    out: dict[str, Any] = {"wal_compression": wal_compression}
    with psycopg.connect(dsn, autocommit=True) as conn:
        if wal_compression:
            conn.execute(sql.SQL("SET wal_compression = {}").format(sql.Literal(wal_compression)))
        ck0 = checkpoints(conn)
        a, t = lsn(conn), time.monotonic()
        with conn.transaction():
            for st in bench.naive_statements():
                conn.execute(st)
        out["seconds"] = round(time.monotonic() - t, 2)
        out["wal_mb"] = round((lsn(conn) - a) / MB, 1)
        ck1 = checkpoints(conn)
        out["checkpoints"] = None if ck0 is None or ck1 is None else ck1 - ck0
        settle(bench, conn, out)
    return out


def section_footprint(bench: Bench) -> dict:
    out: dict[str, Any] = {"rows": bench.table_rows.get(bench.n) or None, "variants": {}}
    with full_page_writes(bench):
        with psycopg.connect(bench.srv.dsn, autocommit=True) as c:
            out["full_page_writes"] = c.execute("SHOW full_page_writes").fetchone()[0]
            out["data_checksums"] = c.execute("SHOW data_checksums").fetchone()[0]
            compression = best_compression(c)
        dsn = prepare(bench, "fp_naive")
        out["rows"] = bench.table_rows[bench.n]
        out["naive"] = run_naive(bench, dsn)
        bench.drop(dsn)
        dsn = prepare(bench, "fp_naive_c")
        out["naive_compressed"] = run_naive(bench, dsn, compression)
        bench.drop(dsn)
        for i, (name, settings) in enumerate(variants(bench.n, compression).items()):
            if not picked(name, bench.args.footprint_variants):
                continue
            bench.console.log(f"footprint: {name} …")
            dsn = prepare(bench, f"fp_{i}")
            res = run_ours(bench, playbook_with(bench, settings), dsn, with_reindex=name == "all three")
            for ph in res["phases"].values():
                ph.pop("window", None)
            bench.drop(dsn)
            res["settings"] = settings
            nv = out["naive"]
            res["wal_ratio"] = round(res["wal_mb"] / max(nv["wal_mb"], 1e-3), 2)
            res["wal_ratio_vs_naive_compressed"] = round(res["wal_mb"] / max(out["naive_compressed"]["wal_mb"], 1e-3),
                                                         2)
            # Until the table is settled: the migration and the VACUUM autovacuum would run next, on both sides
            # (after the naive rewrite that VACUUM sets hint bits and the visibility map on every page: FPIs).
            res["wal_ratio_settled"] = round((res["wal_mb"] + res["vacuum_after_wal_mb"])
                                             / max(nv["wal_mb"] + nv["vacuum_after_wal_mb"], 1e-3), 2)
            res["size_ratio"] = round(res["size"]["total_mb"] / max(nv["size"]["total_mb"], 1e-3), 2)
            res["size_ratio_after_vacuum"] = round(res["size_after_vacuum"]["total_mb"]
                                                   / max(nv["size_after_vacuum"]["total_mb"], 1e-3), 2)
            out["variants"][name] = res
    return out
