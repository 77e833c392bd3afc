"""Replay lag on a real streaming standby (issue 16): the naive rewrite vs the orchestrator with the lag throttle
off and on. The `replica` section of bench/run.py; every run works on its own identical clone, measured with the
WAL helpers of bench/sections/footprint.py.
"""

from __future__ import annotations

import statistics
import threading
import time
from contextlib import contextmanager
from typing import Any

import psycopg

from bench.common import Bench, picked
from bench.sections.footprint import MB, full_page_writes, playbook_with, prepare, run_naive, run_ours
from orchestrator.engine.backfill import Backfill
from orchestrator.lab import server

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
            runs = [r for r in runs if picked(r[0], a.replica_variants)]
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
