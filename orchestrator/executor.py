"""Runs statements the safe way: short lock_timeout, retries with backoff and jitter, reconnect on loss.

In plan mode the same calls only record the SQL, so `plan` shows exactly what `run` would execute.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import psycopg
import structlog
from psycopg import errors as pgerr
from psycopg import sql
from tenacity import (RetryError, Retrying, retry_if_exception, stop_after_attempt,
                      wait_exponential_jitter)

from . import db
from .errors import Failure, Refused
from .playbook import Settings
from .sqlkit import L, Q

log = structlog.get_logger()


@dataclass
class Recorded:
    sql: str
    lock: str
    transaction: int | None = None  # statements sharing a number run in one transaction
    kind: str = "tx"  # tx: in a short transaction; concurrent: outside any; note: a loop or condition, shown once


def max_lock_wait_s(s: Settings) -> float:
    """The longest a DDL step can wait for its lock before it is refused (exit 3): every attempt's
    lock_timeout plus the longest backoff sleeps between them (tenacity's exponential wait with jitter)."""
    initial, cap, jitter = s.retry_wait_initial_ms / 1000, s.retry_wait_max_ms / 1000, s.retry_wait_initial_ms / 1000
    sleeps = sum(min(initial * 2 ** k + jitter, cap) for k in range(s.retries))
    return round((s.retries + 1) * s.lock_timeout_ms / 1000 + sleeps, 2)


@dataclass
class Executor:
    dsn: str | None
    settings: Settings
    dry_run: bool = False
    recorded: list[Recorded] = field(default_factory=list)
    on_statement: Callable[[str, float, str], None] | None = None  # run log hook: (sql, seconds, outcome)
    _conn: psycopg.Connection | None = None
    _tx_counter: int = 0
    blocking_table: Any = None  # (schema, table) used to name blockers when the lock budget runs out
    pause_file: Any = None  # Path: while it exists, no new DDL step starts (orchestrator pause / resume)

    # -- connection -------------------------------------------------------------------------------
    @property
    def conn(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = db.connect(self.dsn)
            _install_fault_injection(self._conn, self.dsn)  # test-only; a no-op unless the env var is set
        return self._conn

    def close(self) -> None:
        if self._conn is not None and not self._conn.closed:
            self._conn.close()

    def render(self, stmt: sql.Composable) -> str:
        return stmt.as_string(self._conn if self._conn and not self._conn.closed else None)

    # -- retries ----------------------------------------------------------------------------------
    def retrying(self, attempts: int | None = None, tally: dict | None = None) -> Retrying:
        s = self.settings
        return Retrying(
            stop=stop_after_attempt((attempts if attempts is not None else s.retries) + 1),
            wait=wait_exponential_jitter(initial=s.retry_wait_initial_ms / 1000, max=s.retry_wait_max_ms / 1000,
                                         jitter=s.retry_wait_initial_ms / 1000),
            retry=retry_if_exception(db.is_transient),
            before_sleep=lambda state: self._before_retry(state, tally),
            reraise=False,
        )

    def _before_retry(self, state, tally: dict | None = None) -> None:
        exc = state.outcome.exception()
        if tally is not None:
            tally["retries"] += 1
            tally["errors"][type(exc).__name__] = tally["errors"].get(type(exc).__name__, 0) + 1
        if sys.stderr.isatty():  # on a terminal, each attempt as it happens; elsewhere one summary per step
            log.warning("retrying", attempt=state.attempt_number, error=type(exc).__name__,
                        reason=" ".join(str(exc).split())[:200])
        if isinstance(exc, psycopg.OperationalError) and self._conn is not None and self._conn.broken:
            self._conn = None  # reconnect on the next attempt
        elif isinstance(exc, pgerr.LockNotAvailable) and self.settings.cancel_autovacuum:
            self._cancel_autovacuum()

    def _cancel_autovacuum(self) -> None:
        """Autovacuum yields to a lock waiter only after deadlock_timeout (1 s), far beyond our lock_timeout,
        so we would retry behind it until the budget runs out. Cancel it (it comes back later by itself),
        except when it prevents wraparound. Needs superuser or pg_signal_autovacuum_worker; else a no-op."""
        if self.blocking_table is None or self._conn is None or self._conn.broken:
            return
        q = Q("""SELECT a.pid, pg_cancel_backend(a.pid) FROM pg_stat_activity a
                 WHERE a.backend_type = 'autovacuum worker' AND a.query NOT LIKE '%%to prevent wraparound%%'
                   AND EXISTS (SELECT FROM pg_locks l WHERE l.pid = a.pid AND l.granted
                               AND l.relation = to_regclass({}))""").format(
            L(self.render(sql.Identifier(*self.blocking_table))))
        try:
            cancelled = [pid for pid, ok in self._conn.execute(q).fetchall() if ok]
        except psycopg.Error:
            return
        if cancelled:
            log.info("cancelled autovacuum on the table so our DDL can go first", pids=cancelled)

    def with_retries(self, what: str, fn: Callable[[], Any], attempts: int | None = None) -> Any:
        tally = {"retries": 0, "errors": {}, "started": time.monotonic()}
        try:
            for attempt in self.retrying(attempts, tally):
                with attempt:
                    return fn()
        except RetryError as err:
            exc = err.last_attempt.exception()
            if isinstance(exc, (pgerr.LockNotAvailable, pgerr.DeadlockDetected)):
                waited = time.monotonic() - tally["started"]
                raise Refused(f"{what}: gave up after {self.settings.retries + 1} attempts in {waited:.1f}s "
                              f"(budget: at most {max_lock_wait_s(self.settings)}s), "
                              f"lock not granted within lock_timeout={self.settings.lock_timeout_ms}ms; "
                              f"{self.describe_blockers()}; nothing of this step was applied (earlier steps "
                              f"are kept)",
                              hint="end the blocking transaction, then re-run the same command") from None
            raise Failure(f"{what}: {type(exc).__name__}: {' '.join(str(exc).split())}",
                          hint="re-run the same command; completed work is kept") from None
        finally:
            if tally["retries"]:
                log.warning("retried", step=what, retries=tally["retries"],
                            waited_s=round(time.monotonic() - tally["started"], 2),
                            errors=", ".join(f"{k} x{v}" for k, v in tally["errors"].items()))

    def describe_blockers(self) -> str:
        if self.blocking_table is None:
            return "no blocker identified"
        # Sessions holding a lock on the table, and (what CREATE/DROP INDEX CONCURRENTLY waits for) sessions
        # of this database holding a snapshot for more than a second, oldest transaction first.
        q = Q("""SELECT a.pid, a.state, left(a.query, 200), a.usename, a.application_name FROM pg_stat_activity a
                 WHERE a.pid <> pg_backend_pid() AND a.application_name NOT LIKE 'orchestrator:%%'
                   AND a.datname = current_database()
                   AND (EXISTS (SELECT FROM pg_locks l WHERE l.pid = a.pid AND l.granted
                                AND l.relation = to_regclass({}))
                        OR (a.backend_xmin IS NOT NULL AND a.xact_start < now() - interval '1 second'))
                 ORDER BY a.xact_start NULLS LAST LIMIT 3""").format(
            L(self.render(sql.Identifier(*self.blocking_table))))
        try:
            rows = self.conn.execute(q).fetchall()
        except psycopg.Error:
            return "blockers could not be listed"
        if not rows:
            return "the blocker has gone"
        return "blocked by " + "; ".join(_blocker(*row) for row in rows)

    # -- statements -------------------------------------------------------------------------------
    def _timeouts(self, cur: psycopg.Cursor, local: bool = True) -> None:
        scope = Q("SET LOCAL") if local else Q("SET")
        cur.execute(Q("{} lock_timeout = {}").format(scope, L(f"{self.settings.lock_timeout_ms}ms")))
        cur.execute(Q("{} statement_timeout = {}").format(scope, L(f"{self.settings.statement_timeout_ms}ms")))

    def _logged(self, stmt: sql.Composable, fn: Callable[[], Any], shown: str | None = None) -> Any:
        text = shown or self.render(stmt)
        started = time.monotonic()
        try:
            result = fn()
        except Exception as exc:
            if self.on_statement:
                self.on_statement(text, time.monotonic() - started, type(exc).__name__)
            raise
        if self.on_statement:
            self.on_statement(text, time.monotonic() - started, "ok")
        return result

    def logged(self, stmt: sql.Composable, fn: Callable[[], Any], params: Any = None) -> Any:
        """Run fn (which executes stmt) and record stmt in the run log; params are shown after the SQL."""
        return self._logged(stmt, fn, None if params is None else f"{self.render(stmt)}  -- params {list(params)}")

    def logged_query(self, stmt: sql.Composable, params: Any = None) -> list[tuple]:
        """A read of the migrated table that belongs in the run log (the verify scans), with retries."""
        return self.with_retries("query", lambda: self.logged(
            stmt, lambda: self.conn.execute(stmt, params).fetchall(), params), attempts=3)

    def atomic(self, *stmts: sql.Composable, lock: str, skip_if: sql.Composable | None = None,
               what: str = "DDL") -> bool:
        """Run statements in one short transaction under lock_timeout; True when they ran.

        skip_if is a query returning true when the work is already done: that makes a re-run after a
        crash a no-op instead of an error.
        """
        if self.dry_run:
            self._tx_counter += 1
            for s in stmts:
                self.recorded.append(Recorded(self.render(s), lock, self._tx_counter if len(stmts) > 1 else None))
            return False

        self.wait_while_paused()

        def attempt() -> bool:
            with self.conn.transaction():
                cur = self.conn.cursor()
                self._timeouts(cur)
                if skip_if is not None and cur.execute(skip_if).fetchone()[0]:
                    return False
                for s in stmts:
                    self._logged(s, lambda s=s: cur.execute(s))
                return True

        return self.with_retries(what, attempt)

    def concurrently(self, stmt: sql.Composable, *, lock: str, cleanup: sql.Composable | None = None,
                     skip_if: sql.Composable | None = None, what: str = "index build") -> bool:
        """Statements that cannot run in a transaction (CREATE/DROP INDEX CONCURRENTLY).

        A failed concurrent build leaves an INVALID index behind; `cleanup` removes it before the retry.
        """
        if self.dry_run:
            if cleanup is not None:  # runs before every build attempt: removes a failed build's INVALID index
                self.recorded.append(Recorded(self.render(cleanup), lock, kind="concurrent"))
            self.recorded.append(Recorded(self.render(stmt), lock, kind="concurrent"))
            return False

        self.wait_while_paused()

        def attempt() -> bool:
            cur = self.conn.cursor()
            self._timeouts(cur, local=False)
            try:
                if skip_if is not None and cur.execute(skip_if).fetchone()[0]:
                    return False
                if cleanup is not None:
                    self._logged(cleanup, lambda: cur.execute(cleanup))
                self._logged(stmt, lambda: cur.execute(stmt))
                return True
            finally:
                if not self.conn.closed and not self.conn.broken:
                    cur.execute(Q("RESET lock_timeout; RESET statement_timeout"))

        try:
            return self.with_retries(what, attempt)
        except (Refused, Failure) as err:
            # The last attempt may have left an INVALID index (a build that timed out waiting for an old
            # snapshot): remove it now, so giving up leaves nothing half-applied.
            if cleanup is not None and not self._cleanup_once(cleanup):
                err.args = (f"{err.args[0]}; an INVALID index may remain (the re-run removes it)",)
            raise

    def _cleanup_once(self, cleanup: sql.Composable) -> bool:
        try:
            cur = self.conn.cursor()
            self._timeouts(cur, local=False)
            try:
                self._logged(cleanup, lambda: cur.execute(cleanup))
            finally:
                cur.execute(Q("RESET lock_timeout; RESET statement_timeout"))
            return True
        except psycopg.Error:
            return False

    def wait_while_paused(self) -> None:
        if self.pause_file is None or not self.pause_file.exists():
            return
        log.info("paused before the next step", pause_file=str(self.pause_file), resume="orchestrator resume")
        while self.pause_file.exists():
            time.sleep(0.5)
        log.info("resumed")

    def note(self, text: str, lock: str = "") -> None:
        """Plan-only: a statement that runs in a loop or under a condition, shown once."""
        if self.dry_run:
            self.recorded.append(Recorded(text, lock, kind="note"))

    def query(self, stmt: sql.Composable, params: Any = None) -> list[tuple]:
        """A read-only catalog or data query; runs in plan mode too when connected."""
        return self.with_retries("query", lambda: self.conn.execute(stmt, params).fetchall(), attempts=3)

    def scalar(self, stmt: sql.Composable, params: Any = None) -> Any:
        rows = self.query(stmt, params)
        return rows[0][0] if rows else None


def _blocker(pid, state, query, user, app) -> str:
    """One blocking session as a DBA can act on it. Sessions of other roles show no state or query to a role
    without pg_read_all_stats: say so instead of printing None and <insufficient privilege>."""
    who = ", ".join(x for x in (f"user {user}" if user else "", f"application {app!r}" if app else "",
                                state or "") if x)
    text = " ".join((query or "").split())
    if not text or text == "<insufficient privilege>":
        text = "query not visible to this role (pg_read_all_stats shows it)"
    return f"pid {pid} ({who}): {text}" if who else f"pid {pid}: {text}"


# -- test-only fault injection --------------------------------------------------------------------------------
# Used by tests/test_reliability_*.py and never set in production. With ORCHESTRATOR_CRASH_AT set, every
# statement on the work connection (not the operator-lock connection) is counted, and at the chosen one:
#   ORCHESTRATOR_CRASH_AT="N"        the Nth statement of this process
#   ORCHESTRATOR_CRASH_AT="text#k"   the kth statement whose SQL contains `text`
# right after that statement returns (inside a transaction: before its COMMIT; in autocommit: after it
# committed) the process kills itself with SIGKILL - no cleanup, no state update, like a crash or `kill -9`.
# ORCHESTRATOR_CRASH_MODE=terminate instead has the server terminate the work connection at that point
# (pg_terminate_backend from a side connection), once, and carries on: a lost connection.
CRASH_AT_ENV, CRASH_MODE_ENV = "ORCHESTRATOR_CRASH_AT", "ORCHESTRATOR_CRASH_MODE"


class _FaultInjector:
    def __init__(self, spec: str, mode: str, dsn: str | None):
        text, _, nth = spec.rpartition("#")
        self.text, self.nth = (text, int(nth)) if text else (None, int(spec))
        self.mode, self.dsn, self.seen, self.fired = mode, dsn, 0, False

    def after(self, conn: psycopg.Connection, query: Any) -> None:
        if self.fired:
            return
        if self.text is not None:
            rendered = query if isinstance(query, str) else query.as_string(conn)
            if self.text not in rendered:
                return
        self.seen += 1
        if self.seen < self.nth:
            return
        self.fired = True
        if self.mode != "terminate":
            os.kill(os.getpid(), signal.SIGKILL)
        with psycopg.connect(self.dsn, autocommit=True) as side:  # waits until the backend is gone
            side.execute("SELECT pg_terminate_backend(%s, 10000)", (conn.info.backend_pid,))


_injector: _FaultInjector | None = None


def _install_fault_injection(conn: psycopg.Connection, dsn: str | None) -> None:
    global _injector
    spec = os.environ.get(CRASH_AT_ENV)
    if not spec:
        return
    if _injector is None:  # one counter per process, across reconnects
        _injector = _FaultInjector(spec, os.environ.get(CRASH_MODE_ENV, "kill"), dsn)
    injector = _injector

    class FaultInjectingCursor(psycopg.Cursor):
        def execute(self, query, params=None, **kw):
            result = super().execute(query, params, **kw)
            injector.after(self.connection, query)
            return result

    conn.cursor_factory = FaultInjectingCursor
