"""What the app's slow statements were waiting on: pg_stat_activity sampled during the orchestrator's run.

A statement that is active with no wait event is on a CPU or waiting for one (PostgreSQL cannot tell
which); one with a wait event names it (Lock, LWLock, IO, IPC...). Each sample also records what the
orchestrator's own sessions were running at that moment, so a slow app statement can be matched to the step
that slowed it. Used by bench/sections/downtime.py (issue 25: find where the longest statements went).
"""

from __future__ import annotations

import collections
import os
import threading
from dataclasses import dataclass
from typing import Callable

import psycopg
from psycopg import sql

APP_NAME = "app-traffic"


@dataclass
class Waiting:
    t: float  # the bench's clock
    age_ms: float  # how long the statement had been running
    wait: str  # "Lock:transactionid", "CPU" when active with no wait event
    query: str
    ours: str  # what the orchestrator's sessions were running then
    load1: float


class WaitSampler:
    """Polls every interval_s; keeps app statements running longer than min_ms."""

    _QUERY = sql.SQL("""
        SELECT application_name,
               (extract(epoch FROM clock_timestamp() - query_start) * 1000)::float8,
               coalesce(wait_event_type || ':' || wait_event, 'CPU'),
               left(regexp_replace(query, '\\s+', ' ', 'g'), 90)
          FROM pg_stat_activity
         WHERE datname = current_database() AND state = 'active' AND pid <> pg_backend_pid()
           AND (application_name = {app} OR application_name LIKE 'orchestrator:%%')""")

    def __init__(self, dsn: str, clock: Callable[[], float], interval_s: float = 0.05, min_ms: float = 100.0):
        self.dsn, self.clock, self.interval_s, self.min_ms = dsn, clock, interval_s, min_ms
        self.samples: list[Waiting] = []
        self.polls = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> WaitSampler:
        self._thread = threading.Thread(target=self._run, name="bench-wait-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        conn = None
        query = self._QUERY.format(app=sql.Literal(APP_NAME))
        while not self._stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.dsn, autocommit=True, application_name="bench-wait-sampler")
                rows = conn.execute(query).fetchall()
                t = self.clock()
                self.polls += 1
                ours = "; ".join(f"{q} ({w}, {age:.0f} ms)" for name, age, w, q in rows if name != APP_NAME)
                load1 = os.getloadavg()[0]
                for name, age, w, q in rows:
                    if name == APP_NAME and age is not None and age >= self.min_ms:
                        self.samples.append(Waiting(round(t, 3), round(age, 1), w, q, ours[:400], round(load1, 2)))
            except psycopg.Error:
                if conn is not None:
                    conn.close()
                conn = None
            self._stop.wait(self.interval_s)
        if conn is not None:
            conn.close()

    def summary(self, top: int = 12) -> dict:
        """Wait events of the slow app statements (one count per sample) and the longest statements seen."""
        by_wait = collections.Counter(s.wait for s in self.samples)
        # One statement is seen by several polls: keep its last (oldest-age) sighting, keyed by its start.
        last: dict[tuple[str, float], Waiting] = {}
        waits: dict[tuple[str, float], collections.Counter] = collections.defaultdict(collections.Counter)
        for s in self.samples:
            key = (s.query, round(s.t - s.age_ms / 1000, 1))
            waits[key][s.wait] += 1
            if key not in last or last[key].age_ms < s.age_ms:
                last[key] = s
        longest = sorted(last.items(), key=lambda kv: kv[1].age_ms, reverse=True)[:top]
        return {"polls": self.polls, "interval_ms": round(self.interval_s * 1000), "min_ms": self.min_ms,
                "samples": len(self.samples), "by_wait": dict(by_wait.most_common()),
                "longest": [{**vars(s), "waits_seen": dict(waits[k])} for k, s in longest]}
