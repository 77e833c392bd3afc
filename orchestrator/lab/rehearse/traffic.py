"""The app as the rehearsal watches it: orchestrator.lab.traffic's AppTraffic held between statements for
the row checks, and a pg_stat_activity sampler of app backends waiting on a lock."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import psycopg
from psycopg import sql

from orchestrator.engine import db
from orchestrator.lab.rehearse.model import LockSample
from orchestrator.lab.traffic import AppTraffic, StatementSample

APP_NAME = "app-traffic"  # the application_name AppTraffic connects with
PAUSE_TIMEOUT_S = 30.0


# --------------------------------------------------------------------------------------------------
# Traffic that can be held between statements, with a live view of what it wrote


class RehearsalTraffic(AppTraffic):
    """AppTraffic plus a gate: `paused()` waits until no app statement is in flight and holds every
    thread before its next one, so `written_now()` matches the database exactly while paused."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._gate = threading.Condition()
        self._held = False
        self._in_flight = 0

    @property
    def t0(self) -> float:
        return self._t0

    def now(self) -> float:
        """Seconds since start(), on the clock of the statement samples."""
        return time.monotonic() - self._t0

    def _step(self, w, vocab) -> None:  # one app statement
        with self._gate:
            while self._held and not self._stop.is_set():
                self._gate.wait(0.05)
            self._in_flight += 1
        try:
            super()._step(w, vocab)
        finally:
            with self._gate:
                self._in_flight -= 1
                self._gate.notify_all()

    @contextmanager
    def paused(self) -> Iterator[None]:
        deadline = time.monotonic() + PAUSE_TIMEOUT_S
        with self._gate:
            self._held = True
            while self._in_flight and time.monotonic() < deadline:
                self._gate.wait(0.05)
            stuck = self._in_flight
        try:
            if stuck:
                raise RuntimeError(f"{stuck} app statements still running after {PAUSE_TIMEOUT_S:.0f} s")
            yield
        finally:
            with self._gate:
                self._held = False
                self._gate.notify_all()

    def written_now(self, key: str = "written") -> dict[str, str]:
        """id -> last value the app wrote, for one table: key "written" (workflow_templates, or the fixture
        table) or "written_specs" (template_specs, Chatter mode)."""
        out: dict[str, str] = {}
        for w in self._workers:
            out.update(dict(getattr(w, key)))
        return out

    def samples_now(self) -> list[StatementSample]:
        return [s for w in self._workers for s in list(w.samples)]

    def override_written(self, rid: str, value: str, key: str = "written") -> None:
        """Someone else (the DBA, a rollback's fallback) wrote this row last: expect `value` from now on."""
        for w in self._workers:
            written = getattr(w, key)
            if rid in written:
                written[rid] = value
                return


# --------------------------------------------------------------------------------------------------
# pg_stat_activity sampler: app backends waiting on a lock


class LockSampler:
    def __init__(self, dsn: str, clock: Callable[[], float], interval_s: float = 0.02):
        self.dsn, self.clock, self.interval_s = dsn, clock, interval_s
        self.samples: list[LockSample] = []
        self.polls = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    _QUERY = sql.SQL("""
        SELECT count(*)::int,
               coalesce(max(extract(epoch FROM clock_timestamp() - query_start)) * 1000, 0)::float8,
               coalesce(string_agg(DISTINCT wait_event, ','), '')
          FROM pg_stat_activity
         WHERE datname = current_database() AND application_name = %s
           AND state = 'active' AND wait_event_type = 'Lock'""")

    def start(self) -> LockSampler:
        self._thread = threading.Thread(target=self._run, name="rehearsal-lock-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        conn = None
        while not self._stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.dsn, autocommit=True, application_name="rehearsal-sampler")
                n, wait_ms, events = db.one(conn, self._QUERY, (APP_NAME,))
                self.polls += 1
                if n:
                    self.samples.append(LockSample(self.clock(), n, wait_ms, events))
            except psycopg.Error:
                if conn is not None:
                    conn.close()
                conn = None
            self._stop.wait(self.interval_s)
        if conn is not None:
            conn.close()
