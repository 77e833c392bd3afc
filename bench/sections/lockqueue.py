"""lockqueue: app latency/errors with a long reader transaction open when each DDL step starts, for a plain DDL
statement and for the orchestrator's full run."""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
from psycopg import sql

from bench.common import Bench, now_rel, per_step, step_of, window
from orchestrator.console import logs
from orchestrator.lab.traffic import TrafficReport
from orchestrator.run.runner import Orchestrator

# --------------------------------------------------------------------------------------------- blocker

class Blocker:
    """A reader holding ACCESS SHARE on the tables in an open transaction for `hold_s` (or until released)."""

    def __init__(self, dsn: str, tables: list[sql.Composable], hold_s: float):
        self.dsn, self.tables, self.hold_s = dsn, tables, hold_s
        self.held, self._stop = threading.Event(), threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="bench-blocker", daemon=True)

    def _run(self) -> None:
        try:
            with psycopg.connect(self.dsn, application_name="bench-blocker") as conn:  # not autocommit
                for table in self.tables:  # in the app's JOIN probe order: template_specs first
                    conn.execute(sql.SQL("SELECT 1 FROM {} LIMIT 1").format(table)).fetchall()
                self.held.set()
                self._stop.wait(self.hold_s)
                conn.rollback()
        except BaseException as err:  # noqa: BLE001 - reported by start()
            self.error = err
            self.held.set()

    def start(self) -> Blocker:
        self.thread.start()
        self.held.wait(30)
        if self.error:
            raise self.error
        return self

    def release(self) -> None:
        self._stop.set()
        self.thread.join(30)


def section_lockqueue(bench: Bench) -> dict:
    a = bench.args
    out: dict[str, Any] = {"blocker_s": a.blocker_seconds, "lock_timeout_ms": bench.pb.settings.lock_timeout_ms}
    # plain DDL, no lock_timeout, queued behind the reader
    dsn = bench.clone(bench.n, "lq_plain")
    traffic = bench.traffic(dsn)
    time.sleep(a.warmup)
    blocker = Blocker(dsn, bench.tables, a.blocker_seconds).start()
    t0 = now_rel(traffic)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET lock_timeout = 0")
        conn.execute(sql.SQL("ALTER TABLE {} ADD COLUMN bench_plain_ddl integer").format(bench.table))
    t1 = now_rel(traffic)
    blocker.release()
    time.sleep(a.cooldown)
    rep = traffic.stop()
    out["plain"] = {"ddl": "ALTER TABLE ... ADD COLUMN (lock_timeout = 0)", "ddl_s": round(t1 - t0, 2),
                    "during": window(rep, t0, t1)}
    bench.drop(dsn)
    # the orchestrator, a fresh reader opened before each DDL step that takes a table lock
    dsn = bench.clone(bench.n, "lq_ours")
    blocked: list[dict] = []
    retries = [0]
    traffic = bench.traffic(dsn)

    def wrap(orch: Orchestrator) -> None:
        x = orch.x
        orig_atomic, orig_conc, orig_retry = x.atomic, x.concurrently, x._before_retry

        def with_blocker(fn):
            def call(*stmts, lock: str, **kw):
                if "EXCLUSIVE" not in lock:  # functions, plain reads: no table lock to queue for
                    return fn(*stmts, lock=lock, **kw)
                b = Blocker(dsn, bench.tables, a.blocker_seconds).start()
                t = now_rel(traffic)
                try:
                    return fn(*stmts, lock=lock, **kw)
                finally:
                    blocked.append({"step": kw.get("what", "DDL"), "lock": lock, "start": t,
                                    "end": now_rel(traffic)})
                    b.release()
            return call

        def count_retry(state, *rest):
            retries[0] += 1
            return orig_retry(state, *rest)

        x.atomic, x.concurrently, x._before_retry = with_blocker(orig_atomic), with_blocker(orig_conc), count_retry

    time.sleep(a.warmup)
    logs.configure(level="error", json=False)  # the lock_timeout retries are the point here: not noise
    try:
        steps = bench.run_all(dsn, traffic, wrap=wrap)
    finally:
        logs.configure(level="warning", json=False)
    time.sleep(a.cooldown)
    rep = traffic.stop()
    t0, t1 = steps[0]["start"], steps[-1]["end"]
    during = window(rep, t0, t1)
    during["max_step"] = step_of(steps, during["max_at_s"])
    # The stall the reader can cause: statements running while a DDL step waited for its lock.
    in_ddl = TrafficReport(samples=[x for x in rep.samples if any(
        x.t <= b["end"] and x.t + x.latency_ms / 1000 >= b["start"] for b in blocked)], written={})
    worst = max(in_ddl.samples, key=lambda x: x.latency_ms, default=None)
    ddl = {**in_ddl.summary(), "max_kind": worst.kind if worst else None,
           "max_step": step_of(blocked, worst.t if worst else None)}
    ddl.pop("by_kind")
    out["ours"] = {"migration_s": round(t1 - t0, 2), "during": during, "during_ddl": ddl,
                   "ddl_steps_blocked": len(blocked), "lock_retries": retries[0],
                   "blocked_steps": [{"step": b["step"], "lock": b["lock"], "waited_s": round(b["end"] - b["start"], 2),
                                      **{k: v for k, v in window(rep, b["start"], b["end"]).items()
                                         if k in ("count", "errors", "p99", "max")}} for b in blocked],
                   "steps": per_step(rep, steps)}
    bench.drop(dsn)
    return out
