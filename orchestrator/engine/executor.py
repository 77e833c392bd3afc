"""Runs statements the safe way: short lock_timeout, retries with backoff and jitter, reconnect on loss.

Two kinds of steps. DDL that takes a lock the app queues behind (ACCESS EXCLUSIVE, SHARE ROW EXCLUSIVE) runs
under the short `lock_timeout_ms` and is retried. Online steps take only locks the app never queues behind
(CREATE/DROP INDEX CONCURRENTLY, VALIDATE CONSTRAINT, ANALYZE, and read-only scans): they run under
`online_lock_timeout_ms` / `online_statement_timeout_ms` - the session default of the work connection - and a
lock timeout is not retried (a concurrent build would be rebuilt in a loop): the step waits once, while a side
connection watches what it waits for, so that giving up names the session that is really in the way.

In plan mode the same calls only record the SQL, so `plan` shows exactly what `run` would execute.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Sequence

import psycopg
import structlog
from psycopg import errors as pgerr
from psycopg import sql
from tenacity import RetryError, Retrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from orchestrator.engine import db
from orchestrator.engine.errors import Failure, Refused
from orchestrator.engine.playbook import Settings
from orchestrator.engine.sqlkit import L, Q, Stmt

log = structlog.get_logger()


@dataclass
class Recorded:
    sql: str
    lock: str
    transaction: int | None = None  # statements sharing a number run in one transaction
    kind: str = "tx"  # tx: in a short transaction; concurrent: outside any; note: a loop or condition, shown once
    online: bool = False  # runs under online_lock_timeout_ms / online_statement_timeout_ms (concurrent ones too)


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
    blocking_tables: list = field(default_factory=list)  # [(schema, table)]: whose lockers to name or cancel
    pause_file: Any = None  # Path: while it exists, no new DDL step starts (orchestrator pause / resume)
    _watch: Any = None  # the _WaitWatch of the online statement running or last run
    _what: str = "DDL"

    # -- connection -------------------------------------------------------------------------------
    @property
    def conn(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed or self._conn.broken:
            if self.dsn is None:
                raise RuntimeError("this executor was made without a DSN: it cannot connect")
            conn = db.connect(self.dsn)
            # Outside our short DDL transactions (which SET LOCAL their own), the work connection runs online
            # steps, scans and catalog reads: never under the app's lock_timeout or statement_timeout.
            self._online_session(conn)
            self._conn = conn
            _install_fault_injection(self._conn, self.dsn)  # test-only; a no-op unless the env var is set
        return self._conn

    def _online_session(self, conn: psycopg.Connection) -> None:
        lock_ms, stmt_ms = self._limits(online=True)
        conn.execute(Q("SET lock_timeout = {}").format(L(lock_ms)))
        conn.execute(Q("SET statement_timeout = {}").format(L(stmt_ms)))

    def close(self) -> None:
        if self._conn is not None and not self._conn.closed:
            self._conn.close()

    def render(self, stmt: sql.Composable) -> str:
        return stmt.as_string(self._conn if self._conn and not self._conn.closed else None)

    # -- retries ----------------------------------------------------------------------------------
    def retrying(self, attempts: int | None = None, online: bool = False,
                 tally: dict | None = None) -> Retrying:
        s = self.settings
        retry = _transient_online if online else db.is_transient
        return Retrying(
            stop=stop_after_attempt((attempts if attempts is not None else s.retries) + 1),
            wait=wait_exponential_jitter(initial=s.retry_wait_initial_ms / 1000, max=s.retry_wait_max_ms / 1000,
                                         jitter=s.retry_wait_initial_ms / 1000),
            retry=retry_if_exception(retry),
            before_sleep=lambda state: self._before_retry(state, tally),
            reraise=False,
        )

    def _before_retry(self, state, tally: dict | None = None) -> None:
        exc = state.outcome.exception()
        if tally is not None:
            tally["retries"] += 1
            tally["errors"][type(exc).__name__] = tally["errors"].get(type(exc).__name__, 0) + 1
        if sys.stderr.isatty():  # on a terminal, each attempt as it happens; elsewhere one summary per step
            why = (tally or {}).get("expected", {}).get(type(exc).__name__)
            if why is not None:
                log.info("retrying", attempt=state.attempt_number, why=why)
            else:
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
        if not self.blocking_tables or self._conn is None or self._conn.broken:
            return
        q = Q("""SELECT a.pid, pg_cancel_backend(a.pid) FROM pg_stat_activity a
                 WHERE a.backend_type = 'autovacuum worker' AND a.query NOT LIKE '%%to prevent wraparound%%'
                   AND EXISTS (SELECT FROM pg_locks l WHERE l.pid = a.pid AND l.granted
                               AND l.relation = ANY({}::regclass[]))""").format(self._tables_literal())
        try:
            cancelled = [pid for pid, ok in self._conn.execute(q).fetchall() if ok]
        except psycopg.Error:
            return
        if cancelled:
            log.info("cancelled autovacuum on the table so our DDL can go first", pids=cancelled)

    def with_retries(self, what: str, fn: Callable[[], Any], attempts: int | None = None,
                     online: bool = False, expected: dict[str, str] | None = None) -> Any:
        """`expected`: error class names that are part of the step's design, with what they mean (a backfill
        batch cancelled for running past max_batch_ms is split): logged as info in those words, not as a warning."""
        self._watch = None
        tally: dict[str, Any] = {"retries": 0, "errors": {}, "started": time.monotonic(), "expected": expected or {}}
        try:
            for attempt in self.retrying(attempts, online, tally):
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
        except (pgerr.LockNotAvailable, pgerr.QueryCanceled) as exc:
            if not online:
                raise
            raise self._online_gave_up(what, exc) from None
        finally:
            if tally["retries"]:  # off a terminal: one line per step instead of one per attempt
                designed = expected and set(tally["errors"]) <= set(expected)
                if designed and expected is not None:
                    log.info(f"{what} retried as designed", step=what, retries=tally["retries"],
                             why="; ".join(f"{expected[k]} (x{v})" for k, v in tally["errors"].items()))
                else:
                    log.warning("retried", step=what, retries=tally["retries"],
                                waited_s=round(time.monotonic() - tally["started"], 2),
                                errors=", ".join(f"{k} x{v}" for k, v in tally["errors"].items()))

    def _online_gave_up(self, what: str, exc: psycopg.Error) -> Refused:
        """An online step waited its whole online timeout once: name what it waited for, if still there."""
        s, watch = self.settings, self._watch
        waited = (time.monotonic() - watch.started) if watch is not None else None
        blockers = self.describe_blockers(watch=watch, older_than_s=waited)
        waits = f"; it was waiting for {watch.waiting_for}" if watch is not None and watch.waiting_for else ""
        if isinstance(exc, pgerr.LockNotAvailable):
            return Refused(f"{what}: gave up after waiting online_lock_timeout_ms={s.online_lock_timeout_ms}ms "
                           f"(once: an online step is not repeated){waits}; {blockers}; nothing of this step "
                           f"was applied (earlier steps are kept)",
                           hint="end the blocking transaction (or raise settings.online_lock_timeout_ms), then "
                                "re-run the same command")
        return Refused(f"{what}: cancelled after online_statement_timeout_ms={s.online_statement_timeout_ms}ms "
                       f"(or by another session){waits}; {blockers}; nothing of this step was applied (earlier "
                       f"steps are kept)",
                       hint="raise settings.online_statement_timeout_ms (0: no limit), then re-run the same command")

    def _tables_literal(self) -> sql.Literal:
        return L([self.render(sql.Identifier(*t)) for t in self.blocking_tables])

    def describe_blockers(self, watch: "_WaitWatch | None" = None, older_than_s: float | None = None) -> str:
        """The sessions in the way, as they are now (a session that has gone is not named).

        First those the waiting statement was seen waiting for (pg_blocking_pids, sampled while it waited,
        still in the same transaction); then sessions holding a lock on the tables; then sessions of this
        database, on ANY table and idle in transaction too, holding a snapshot or transaction older than the
        step (what CREATE/DROP INDEX CONCURRENTLY waits for), oldest first.
        """
        seen = watch.blockers() if watch is not None else {}
        older = max(older_than_s if older_than_s is not None else 1.0, 0.0)
        q = Q("""SELECT a.pid, a.state, left(a.query, 200), extract(epoch FROM now() - a.xact_start)::int,
                        a.usename, a.application_name
                 FROM pg_stat_activity a
                 WHERE a.pid <> pg_backend_pid() AND a.application_name NOT LIKE 'orchestrator:%%'
                   AND a.datname = current_database()
                   AND (EXISTS (SELECT FROM unnest(%(seen)s::int[], %(starts)s::timestamptz[]) AS s(pid, xs)
                                WHERE s.pid = a.pid AND s.xs IS NOT DISTINCT FROM a.xact_start)  -- same transaction
                        OR EXISTS (SELECT FROM pg_locks l WHERE l.pid = a.pid AND l.granted
                                   AND l.relation = ANY({}::regclass[]))
                        OR ((a.backend_xmin IS NOT NULL OR a.backend_xid IS NOT NULL)
                            AND a.xact_start <= now() - make_interval(secs => %(older)s)))
                 ORDER BY a.pid = ANY(%(seen)s) DESC, a.xact_start NULLS LAST LIMIT 3""").format(
            self._tables_literal())
        try:
            rows = self.conn.execute(q, {"seen": list(seen), "starts": list(seen.values()),
                                         "older": older}).fetchall()
        except psycopg.Error:
            return "blockers could not be listed"
        if not rows:  # each wait was behind some statement that had finished by now: a busy queue, not one session
            return ("no session holds a lock in the way now: the waits were behind short statements that came and "
                    "went (a busy lock queue)")
        return "blocked by " + "; ".join(_blocker(*row) for row in rows)

    # -- statements -------------------------------------------------------------------------------
    def _limits(self, online: bool) -> tuple[str, str]:
        s = self.settings
        if online:
            return f"{s.online_lock_timeout_ms}ms", f"{s.online_statement_timeout_ms}ms"
        return f"{s.lock_timeout_ms}ms", f"{s.statement_timeout_ms}ms"

    def _timeouts(self, cur: psycopg.Cursor, local: bool = True, online: bool = False) -> None:
        scope = Q("SET LOCAL") if local else Q("SET")
        lock_ms, stmt_ms = self._limits(online)
        cur.execute(Q("{} lock_timeout = {}").format(scope, L(lock_ms)))
        cur.execute(Q("{} statement_timeout = {}").format(scope, L(stmt_ms)))

    def _watching(self) -> "_WaitWatch":
        """Watch the running online statement from a side connection; kept for the refusal message."""
        self._watch = _WaitWatch(self.dsn, self.conn.info.backend_pid, self._what)
        return self._watch

    def _logged(self, stmt: Stmt, fn: Callable[[], Any], shown: str | None = None) -> Any:
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

    def logged(self, stmt: Stmt, fn: Callable[[], Any], params: Any = None) -> Any:
        """Run fn (which executes stmt) and record stmt in the run log; params are shown after the SQL."""
        return self._logged(stmt, fn, None if params is None else f"{self.render(stmt)}  -- params {list(params)}")

    def logged_query(self, stmt: Stmt, params: Any = None) -> list[tuple]:
        """A read of the migrated table that belongs in the run log (the verify scans), with retries."""
        return self.with_retries("query", lambda: self.logged(
            stmt, lambda: self.conn.execute(stmt, params).fetchall(), params), attempts=3)

    def atomic(self, *stmts: Stmt, lock: str, skip_if: Stmt | None = None,
               what: str = "DDL", online: bool = False) -> bool:
        """Run statements in one short transaction under lock_timeout; True when they ran.

        skip_if is a query returning true when the work is already done: that makes a re-run after a
        crash a no-op instead of an error. online=True (or `online(...)`): for statements holding only locks
        the app never queues behind (VALIDATE CONSTRAINT, ANALYZE): the online timeouts, one wait, no retry
        on a lock timeout.
        """
        if self.dry_run:
            self._tx_counter += 1
            for s in stmts:
                self.recorded.append(Recorded(self.render(s), lock, self._tx_counter if len(stmts) > 1 else None,
                                              online=online))
            return False

        self.wait_while_paused()
        self._what = what

        def attempt() -> bool:
            with self.conn.transaction():
                cur = self.conn.cursor()
                self._timeouts(cur, online=online)
                if skip_if is not None and db.scalar(cur, skip_if):
                    return False
                if not online:
                    for s in stmts:
                        self._logged(s, partial(cur.execute, s))
                    return True
                with self._watching():
                    for s in stmts:
                        self._logged(s, partial(cur.execute, s))
                return True

        return self.with_retries(what, attempt, online=online)

    def online(self, *stmts: Stmt, lock: str, skip_if: Stmt | None = None,
               what: str = "online step") -> bool:
        """atomic(..., online=True): VALIDATE CONSTRAINT, ANALYZE - never under the DDL lock_timeout."""
        return self.atomic(*stmts, lock=lock, skip_if=skip_if, what=what, online=True)

    def concurrently(self, stmt: Stmt, *, lock: str,
                     cleanup: Stmt | Callable[[], Sequence[Stmt]] | None = None,
                     skip_if: Stmt | None = None, what: str = "index build") -> bool:
        """Statements that cannot run in a transaction (CREATE/DROP/REINDEX INDEX CONCURRENTLY).

        A failed concurrent build leaves an INVALID index behind; `cleanup` removes it before the retry: one
        statement, or a function that returns the statements for what is there now (names it cannot know).
        """
        if self.dry_run:
            if cleanup is not None:  # runs before every build attempt: removes a failed build's INVALID index
                text = self.render(cleanup) if not callable(cleanup) else \
                    f"-- before each attempt: DROP INDEX CONCURRENTLY the INVALID copies a stopped {what} left"
                self.recorded.append(Recorded(text, lock, kind="concurrent", online=True))
            self.recorded.append(Recorded(self.render(stmt), lock, kind="concurrent", online=True))
            return False

        self.wait_while_paused()
        self._what = what

        def attempt() -> bool:
            # Online: it holds SHARE UPDATE EXCLUSIVE, which no app statement queues behind, and waits for old
            # snapshots and writers: one long wait (the session's online timeouts), never rebuilt in a loop.
            cur = self.conn.cursor()
            self._timeouts(cur, local=False, online=True)
            if skip_if is not None and db.scalar(cur, skip_if):
                return False
            with self._watching():
                for c in _cleanups(cleanup):
                    self._logged(c, partial(cur.execute, c))
                self._logged(stmt, lambda: cur.execute(stmt))
            return True

        try:
            return self.with_retries(what, attempt, online=True)
        except (Refused, Failure) as err:
            # The last attempt may have left an INVALID index (a build that timed out waiting for an old
            # snapshot): remove it now, so giving up leaves nothing half-applied.
            if cleanup is not None and not self._cleanup_once(cleanup):
                err.args = (f"{err.args[0]}; an INVALID index may remain (the re-run removes it)",)
            raise

    def _cleanup_once(self, cleanup) -> bool:
        try:
            cur = self.conn.cursor()
            self._timeouts(cur, local=False, online=True)
            for c in _cleanups(cleanup):
                self._logged(c, partial(cur.execute, c))
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

    def query(self, stmt: Stmt, params: Any = None) -> list[tuple]:
        """A read-only catalog or data query (parity scans too); runs in plan mode too when connected.

        Online: the work connection's session timeouts are the online ones; a lock timeout is not retried.
        """
        self._watch, self._what = None, "query"
        return self.with_retries("query", lambda: self.conn.execute(stmt, params).fetchall(), attempts=3,
                                 online=True)

    def scalar(self, stmt: Stmt, params: Any = None) -> Any:
        rows = self.query(stmt, params)
        return rows[0][0] if rows else None


def _transient_online(exc: BaseException) -> bool:
    """Online steps retry a lost connection or a deadlock, not a timeout: they already waited their fill."""
    return db.is_transient(exc) and not isinstance(exc, (pgerr.LockNotAvailable, pgerr.QueryCanceled))


class _WaitWatch:
    """While an online statement runs: every POLL_S, from a side connection, what it waits on (wait event, lock
    type) and which sessions block it (pg_blocking_pids: relation locks and the virtualxid locks that
    CREATE INDEX CONCURRENTLY takes on every older transaction). A new blocker is logged as it appears."""

    POLL_S = 0.25

    def __init__(self, dsn: str | None, pid: int, what: str):
        self.dsn, self.pid, self.what = dsn, pid, what
        self.started = time.monotonic()
        self.waiting_for: str | None = None
        self._blockers: dict[int, Any] = {}  # pid -> its xact_start, as last seen blocking us
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="orchestrator-wait-watch", daemon=True)

    def __enter__(self) -> "_WaitWatch":
        if self.dsn is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def blockers(self) -> dict[int, Any]:
        with self._lock:
            return dict(self._blockers)

    def _run(self) -> None:
        q = """SELECT w.wait_event_type, w.wait_event,
                      (SELECT l.mode || ' on ' || l.locktype || coalesce(' ' || l.relation::regclass::text, '')
                       FROM pg_locks l WHERE l.pid = w.pid AND NOT l.granted LIMIT 1),
                      b.pid, b.state, left(b.query, 200), b.xact_start
               FROM pg_stat_activity w
               CROSS JOIN LATERAL unnest(pg_blocking_pids(w.pid)) AS bp(pid)
               JOIN pg_stat_activity b ON b.pid = bp.pid
               WHERE w.pid = %s"""
        if self.dsn is None:  # never started without one (__enter__)
            return
        try:
            conn = db.connect(self.dsn, role="watch")
        except Exception:
            return
        try:
            while not self._stop.wait(self.POLL_S):
                rows = conn.execute(q, (self.pid,)).fetchall()
                if not rows:
                    continue
                event_type, event, lock = rows[0][:3]
                waiting = _waiting_phrase(event_type, event, lock)
                with self._lock:
                    new = [r for r in rows if r[3] not in self._blockers]
                    self.waiting_for = waiting
                    self._blockers = {r[3]: r[6] for r in rows}
                for r in new:
                    log.warning("online step waiting", step=self.what, waiting_for=waiting, blocker_pid=r[3],
                                blocker_state=r[4], blocker_query=" ".join((r[5] or "").split())[:200],
                                limit="online_lock_timeout_ms")
        except Exception:  # the watch is an aid for the message; it never fails the step
            pass
        finally:
            conn.close()


def _waiting_phrase(event_type: str | None, event: str | None, lock: str | None) -> str:
    if lock and lock.endswith(" on virtualxid"):
        return "older transactions to end (virtualxid lock: CREATE/DROP INDEX CONCURRENTLY waits for every " \
               "transaction whose snapshot predates its phases)"
    if lock:
        return f"a {lock}"  # e.g. a ShareUpdateExclusiveLock on relation workflow_templates
    return f"{event_type}/{event}" if event_type else "unknown"


def _blocker(pid, state, query, age, user, app) -> str:
    """One blocking session as a DBA can act on it. Sessions of other roles show no state or query to a role
    without pg_read_all_stats: say so instead of printing None and <insufficient privilege>."""
    open_for = f"transaction open {age}s" if age is not None else ""
    who = ", ".join(x for x in (f"user {user}" if user else "", f"application {app!r}" if app else "",
                                state or "", open_for) if x)
    text = " ".join((query or "").split())
    if not text or text == "<insufficient privilege>":
        text = "query not visible to this role (pg_read_all_stats shows it)"
    return f"pid {pid} ({who}): {text}" if who else f"pid {pid}: {text}"


def _cleanups(cleanup: Stmt | Callable[[], Sequence[Stmt]] | None) -> Sequence[Stmt]:
    if cleanup is None:
        return []
    return cleanup() if callable(cleanup) else [cleanup]


# -- test-only fault injection --------------------------------------------------------------------------------
# Used by tests/test_reliability_*.py and never set in production. With ORCHESTRATOR_CRASH_AT set, every
# statement on the work connection and a parallel verify's side connections (not the operator-lock connection)
# is counted, in one counter, and at the chosen one:
#   ORCHESTRATOR_CRASH_AT="N"        the Nth statement of this process
#   ORCHESTRATOR_CRASH_AT="text#k"   the kth statement whose SQL contains `text`
# right after that statement returns (inside a transaction: before its COMMIT; in autocommit: after it
# committed) the process kills itself with SIGKILL - no cleanup, no state update, like a crash or `kill -9`.
# ORCHESTRATOR_CRASH_MODE=terminate instead has the server terminate the connection that ran it, at that point
# (pg_terminate_backend from a side connection), once, and carries on: a lost connection.
CRASH_AT_ENV, CRASH_MODE_ENV = "ORCHESTRATOR_CRASH_AT", "ORCHESTRATOR_CRASH_MODE"


class _FaultInjector:
    def __init__(self, spec: str, mode: str, dsn: str):
        text, _, nth = spec.rpartition("#")
        self.text: str | None
        self.nth: int
        self.text, self.nth = (text, int(nth)) if text else (None, int(spec))
        self.mode, self.dsn, self.seen, self.fired = mode, dsn, 0, False
        self.lock = threading.Lock()  # a parallel verify's side connections count on their own threads

    def after(self, conn: psycopg.Connection, query: Any) -> None:
        if self.fired:
            return
        if self.text is not None:
            rendered = query if isinstance(query, str) else query.as_string(conn)
            if self.text not in rendered:
                return
        with self.lock:  # exactly one statement is the Nth, whichever connection ran it
            if self.fired:
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


def _install_fault_injection(conn: psycopg.Connection, dsn: str) -> None:
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
