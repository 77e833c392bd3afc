"""The migration's footprint (issue 16): WAL written, table + index size left behind, and replay lag on a real
streaming standby, for the orchestrator (per phase, per footprint setting) against the naive rewrite.

Used by bench/run.py's `footprint` and `replica` sections; every run works on its own identical clone.

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
import statistics
import threading
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql

from orchestrator.engine import playbook
from orchestrator.engine.backfill import Backfill
from orchestrator.lab import server
from orchestrator.run.runner import Orchestrator

if TYPE_CHECKING:
    from run import Bench

MB = 1024 * 1024


def variants(n: int, compression: str) -> dict[str, dict[str, Any]]:
    """Footprint settings measured against the default, each on its own clone (keys: playbook settings)."""
    every = max(n // 20, 1000)  # about 5% of workflow_templates per VACUUM
    return {
        "default": {},
        "indexes after backfill": {"indexes_after_backfill": True},
        f"vacuum every {every:,} rows": {"vacuum_every_rows": every},
        "indexes after backfill + vacuum": {"indexes_after_backfill": True, "vacuum_every_rows": every},
        f"wal_compression {compression}": {"wal_compression": compression},
        "all three": {"indexes_after_backfill": True, "vacuum_every_rows": every, "wal_compression": compression},
        "all three + reindex on contract": {"indexes_after_backfill": True, "vacuum_every_rows": every,
                                            "wal_compression": compression, "reindex_on_contract": True},
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
            wanted = [w.strip() for w in (bench.args.footprint_variants or "").split(",") if w.strip()]
            if wanted and not any(w in name for w in wanted):
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


# --------------------------------------------------------------------------------------------- replica


class LagSampler(threading.Thread):
    """Polls pg_stat_replication on the primary every `every` s: bytes behind, replay_lag, and the time since
    the primary's WAL passed the standby's replay position (from the (time, LSN) pairs sampled here)."""

    def __init__(self, dsn: str, every: float = 0.1):
        super().__init__(daemon=True, name="bench-lag")
        self.dsn, self.every = dsn, every
        self.stop_ev = threading.Event()
        self.samples: list[tuple[float, float, float, float | None]] = []  # t, current, behind, replay_lag_ms
        self._hist: list[tuple[float, float]] = []
        self.lock = threading.Lock()
        self.marks: dict[str, float] = {}

    def run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True, application_name="bench-lag") as c:
            while not self.stop_ev.is_set():
                row = c.execute("""SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::float8,
                                          max(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn))::float8,
                                          max(extract(epoch FROM replay_lag))::float8 * 1000
                                   FROM pg_stat_replication WHERE state = 'streaming'""").fetchone()
                now = time.monotonic()
                cur, behind, lag = row[0], row[1], row[2]
                if behind is None:  # no standby streaming: nothing measured (never a zero lag)
                    with self.lock:
                        self.samples.append((now, None, None, None))
                    self.stop_ev.wait(self.every)
                    continue
                self._hist.append((now, cur))
                replay = cur - behind
                first = next((t for t, x in self._hist if x > replay), None) if behind > 0 else None
                est = (now - first) * 1000 if first is not None else 0.0
                with self.lock:
                    self.samples.append((now, behind, est, lag))
                self.stop_ev.wait(self.every)

    def behind(self) -> float:
        with self.lock:
            last = self.samples[-1][1] if self.samples else None
        return float("inf") if last is None else last

    def window(self, a: float, b: float) -> dict:
        with self.lock:
            every = [s for s in self.samples if a <= s[0] <= b]
        sel = [s for s in every if s[1] is not None]
        if len(sel) < len(every):
            raise RuntimeError(f"the standby stopped streaming during the run ({len(every) - len(sel)} of "
                               f"{len(every)} samples without it)")
        if not sel:
            return {}
        return {"max_lag_mb": round(max(s[1] for s in sel) / MB, 1),
                "p50_lag_mb": round(statistics.median(s[1] for s in sel) / MB, 2),
                "max_lag_s": round(max(s[2] for s in sel) / 1000, 2),
                "max_replay_lag_column_s": round(max((s[3] or 0) for s in sel) / 1000, 2),
                "samples": len(sel)}

    def wait_caught_up(self, timeout: float = 600) -> float:
        t = time.monotonic()
        while self.behind() > 0:
            if time.monotonic() - t > timeout:
                raise RuntimeError(f"the standby has not caught up (or is not streaming) after {timeout:.0f} s")
            time.sleep(0.05)
        return time.monotonic() - t


@contextmanager
def throttle_meter(held: list[float]):
    """Time the backfill spent in its throttle, per hold (a call that waited at least one 0.5 s step)."""
    orig = Backfill._throttle

    def timed(self):
        t = time.monotonic()
        try:
            return orig(self)
        finally:
            d = time.monotonic() - t
            if d >= 0.45:
                held.append(d)

    Backfill._throttle = timed
    try:
        yield
    finally:
        Backfill._throttle = orig


def section_replica(bench: Bench) -> dict:
    a = bench.args
    if bench.srv.bin_dir is None:
        return {"skipped": f"no binaries to start a standby of a {bench.srv.kind} server (use no --dsn)"}
    out: dict[str, Any] = {"limit_bytes": a.replica_lag_bytes, "runs": {}}
    with full_page_writes(bench):
        sb = server.start_standby(bench.srv)
        sampler = LagSampler(bench.srv.dsn)
        sampler.start()
        try:
            out["standby"] = "pg_basebackup -R -X stream, hot standby, same binaries, same machine"
            every = max(bench.n // 20, 1000)
            runs = [("naive", None), ("orchestrator, no lag throttle", {}),
                    (f"orchestrator, max_replica_lag_bytes {a.replica_lag_bytes / MB:g} MB",
                     {"max_replica_lag_bytes": a.replica_lag_bytes}),
                    (f"orchestrator, max_replica_lag_bytes {a.replica_lag_bytes / MB:g} MB, indexes after backfill "
                     f"+ vacuum every {every:,} rows",
                     {"max_replica_lag_bytes": a.replica_lag_bytes, "indexes_after_backfill": True,
                      "vacuum_every_rows": every})]
            for i, (name, settings) in enumerate(runs):
                bench.console.log(f"replica: {name} …")
                dsn = prepare(bench, f"rep_{i}")
                sampler.wait_caught_up()
                res: dict[str, Any] = {}
                held: list[float] = []
                t0 = time.monotonic()
                if settings is None:
                    res.update(run_naive(bench, dsn))
                else:
                    with throttle_meter(held):
                        r_ = run_ours(bench, playbook_with(bench, settings), dsn)
                    res.update(r_)
                    res["backfill_seconds"] = r_["phases"].get("3 backfill", {}).get("seconds")
                    res["throttle_held_s"] = round(sum(held), 1)
                    res["throttle_holds"] = len(held)
                t1 = time.monotonic()
                res["catch_up_after_s"] = round(sampler.wait_caught_up(), 2)
                res["lag"] = sampler.window(t0, t1)
                if "phases" in res:  # the throttle governs phase 3 only: the lag there, and in the others
                    res["lag_by_phase"] = {k: sampler.window(*v.pop("window")) for k, v in res["phases"].items()}
                bench.drop(dsn)
                out["runs"][name] = res
        finally:
            sampler.stop_ev.set()
            sampler.join(10)
            sb.stop()
    return out
