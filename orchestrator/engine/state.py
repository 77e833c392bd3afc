"""The orchestrator's own state, kept in the database it migrates, and the one-operator-at-a-time lock."""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from orchestrator.engine import catalog, db
from orchestrator.engine.errors import Refused
from orchestrator.engine.sqlkit import I, Q

PENDING, RUNNING, APPLIED, FAILED, CONTRACTED = "pending", "running", "applied", "failed", "contracted"


@dataclass
class PhaseRow:
    phase: int
    name: str
    status: str
    step: str | None
    started_at: Any
    finished_at: Any
    run_by: str | None
    host: str | None
    env: str | None
    error: str | None
    details: dict


class State:
    def __init__(self, source: Any, schema: str, playbook: str):
        # source is a connection, or the executor whose connection may be replaced after a reconnect
        self._source, self.schema, self.playbook = source, schema, playbook

    @property
    def conn(self) -> psycopg.Connection:
        return getattr(self._source, "conn", self._source)

    def t(self, name: str) -> sql.Identifier:
        return I(self.schema, name)

    def exists(self) -> bool:
        if not getattr(self, "_checked", False):  # an app's table named like ours is not our state
            catalog.check_state_schema(self.conn, self.schema)
            self._checked = True
        return db.scalar(self.conn, "SELECT to_regclass(%s) IS NOT NULL",
                                    (self.t("phases").as_string(self.conn),))

    def ensure(self) -> None:
        stmts = [
            Q("CREATE SCHEMA IF NOT EXISTS {}").format(I(self.schema)),
            Q("""CREATE TABLE IF NOT EXISTS {} (
                   playbook text PRIMARY KEY, fingerprint text NOT NULL, facts jsonb NOT NULL,
                   created_at timestamptz NOT NULL DEFAULT now())""").format(self.t("migrations")),
            Q("""CREATE TABLE IF NOT EXISTS {} (
                   playbook text NOT NULL, phase int NOT NULL, name text NOT NULL,
                   status text NOT NULL DEFAULT 'pending', step text,
                   started_at timestamptz, finished_at timestamptz, run_by text, host text, env text, error text,
                   details jsonb NOT NULL DEFAULT '{{}}', PRIMARY KEY (playbook, phase))""").format(self.t("phases")),
            Q("""CREATE TABLE IF NOT EXISTS {} (
                   playbook text NOT NULL, target text NOT NULL, cursor jsonb, end_key jsonb,
                   rows_done bigint NOT NULL DEFAULT 0,
                   rows_scanned bigint NOT NULL DEFAULT 0,
                   rows_estimate bigint, batches int NOT NULL DEFAULT 0, batch_size int,
                   last_batch_ms real, max_batch_ms real, started_at timestamptz, updated_at timestamptz,
                   finished_at timestamptz, PRIMARY KEY (playbook, target))""").format(self.t("backfills")),
            Q("""CREATE TABLE IF NOT EXISTS {} (
                   id bigserial PRIMARY KEY, playbook text NOT NULL, phase int, action text,
                   at timestamptz NOT NULL DEFAULT clock_timestamp(), seconds real, lock_wait_ms real, outcome text,
                   statement text NOT NULL)""").format(self.t("run_log")),
        ]
        with self.conn.transaction():
            # Two orchestrators (on different tables) may create the state schema at the same moment;
            # IF NOT EXISTS alone would make one of them fail on the catalog's unique index.
            self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key(self.schema, "\x00state"),))
            # Only what is missing: CREATE ... IF NOT EXISTS checks the CREATE privilege even when the object
            # exists, and a role granted use of an existing state schema need not have it.
            have_schema = db.scalar(self.conn, "SELECT EXISTS (SELECT FROM pg_namespace WHERE nspname = %s)",
                                               (self.schema,))
            for s, table in zip(stmts, (None, "migrations", "phases", "backfills", "run_log")):
                if table is None and have_schema:
                    continue
                if table is not None and db.scalar(self.conn, "SELECT to_regclass(%s) IS NOT NULL",
                                                              (self.t(table).as_string(self.conn),)):
                    continue
                self.conn.execute(s)

    # -- migration record -------------------------------------------------------------------------
    def migration(self) -> tuple[str, dict] | None:
        if not self.exists():
            return None
        row = self.conn.execute(Q("SELECT fingerprint, facts FROM {} WHERE playbook = %s").format(
            self.t("migrations")), (self.playbook,)).fetchone()
        return (row[0], row[1]) if row else None

    def register(self, fingerprint: str, facts: dict, phase_names: list[str]) -> None:
        with self.conn.transaction():
            self.conn.execute(Q("""INSERT INTO {} (playbook, fingerprint, facts) VALUES (%s, %s, %s)
                                   ON CONFLICT (playbook) DO NOTHING""").format(self.t("migrations")),
                              (self.playbook, fingerprint, json.dumps(facts)))
            for n, name in enumerate(phase_names, 1):
                self.conn.execute(Q("""INSERT INTO {} (playbook, phase, name) VALUES (%s, %s, %s)
                                       ON CONFLICT DO NOTHING""").format(self.t("phases")),
                                  (self.playbook, n, name))

    def forget(self) -> None:
        """Drop the record of a migration that is fully rolled back, so the playbook may be edited."""
        with self.conn.transaction():
            for t in ("migrations", "phases", "backfills"):
                self.conn.execute(Q("DELETE FROM {} WHERE playbook = %s").format(self.t(t)), (self.playbook,))

    # -- phases -----------------------------------------------------------------------------------
    def phases(self) -> dict[int, PhaseRow]:
        if not self.exists():
            return {}
        rows = self.conn.execute(Q("""SELECT phase, name, status, step, started_at, finished_at, run_by, host,
                                             env, error, details FROM {} WHERE playbook = %s ORDER BY phase""").format(
            self.t("phases")), (self.playbook,)).fetchall()
        return {r[0]: PhaseRow(*r) for r in rows}

    def set(self, phase: int, status: str, *, step: str | None = None, error: str | None = None,
            details: dict | None = None, started: bool = False, finished: bool = False,
            replace_details: bool = False, env: str | None = None) -> None:
        self.conn.execute(Q("""UPDATE {} SET status = %s, step = %s, error = %s,
                                  details = CASE WHEN %s THEN %s::jsonb ELSE details || %s::jsonb END,
                                  started_at = CASE WHEN %s THEN now() ELSE started_at END,
                                  finished_at = CASE WHEN %s THEN now() WHEN %s THEN NULL ELSE finished_at END,
                                  run_by = CASE WHEN %s THEN %s ELSE run_by END,
                                  host = CASE WHEN %s THEN %s ELSE host END,
                                  env = CASE WHEN %s THEN %s ELSE env END
                               WHERE playbook = %s AND phase = %s""").format(self.t("phases")),
                          (status, step, error, replace_details, json.dumps(details or {}, default=str),
                           json.dumps(details or {}, default=str), started, finished, started,
                           started, _who(), started, socket.gethostname(), started, env, self.playbook, phase))

    def details(self, phase: int) -> dict:
        row = self.phases().get(phase)
        return row.details if row else {}

    # -- backfill progress ------------------------------------------------------------------------
    def backfill(self, target: str) -> dict | None:
        """The backfill progress of one column (ColumnMigration.key)."""
        if not self.exists():
            return None
        cur = self.conn.cursor(row_factory=psycopg.rows.dict_row)
        return cur.execute(Q("SELECT * FROM {} WHERE playbook = %s AND target = %s").format(self.t("backfills")),
                           (self.playbook, target)).fetchone()

    def backfills(self) -> dict[str, dict]:
        """Every column's backfill progress, by ColumnMigration.key."""
        if not self.exists():
            return {}
        cur = self.conn.cursor(row_factory=psycopg.rows.dict_row)
        rows = cur.execute(Q("SELECT * FROM {} WHERE playbook = %s").format(self.t("backfills")),
                           (self.playbook,)).fetchall()
        return {r["target"]: r for r in rows}

    def log_statement(self, phase: int | None, action: str | None, statement: str, seconds: float,
                      outcome: str) -> None:
        try:
            # A statement that gave up on its lock waited exactly that long; others waited at most `seconds`.
            lock_wait_ms = seconds * 1000 if outcome == "LockNotAvailable" else None
            self.conn.execute(Q("""INSERT INTO {} (playbook, phase, action, seconds, lock_wait_ms, outcome, statement)
                                   VALUES (%s, %s, %s, %s, %s, %s, %s)""").format(self.t("run_log")),
                              (self.playbook, phase, action, seconds, lock_wait_ms, outcome, statement))
        except psycopg.Error:
            pass  # the run log is an aid for incident reviews; it must never fail a migration


    def run_log(self, phase: int | None = None, limit: int = 200) -> list[dict]:
        if not self.exists():
            return []
        cur = self.conn.cursor(row_factory=psycopg.rows.dict_row)
        return cur.execute(Q("""SELECT * FROM (SELECT id, at, phase, action, seconds, lock_wait_ms, outcome, statement
                                FROM {} WHERE playbook = %s AND (%s::int IS NULL OR phase = %s)
                                ORDER BY id DESC LIMIT %s) r ORDER BY id""").format(self.t("run_log")),
                           (self.playbook, phase, phase, limit)).fetchall()


def _who() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return str(os.getuid())


def lock_key(schema: str, table: str) -> int:
    """One advisory lock per migrated table: two operators must never drive the same table."""
    digest = hashlib.sha256(f"pg-expand-contract\x00{schema}\x00{table}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class OperatorLock:
    """Session-level advisory locks, one per table of the playbook, on a connection of their own (so reconnects
    of the work connection keep them). Taken in a fixed order; all or none."""

    def __init__(self, dsn: str, tables: list[tuple[str, str]]):
        self.dsn = dsn
        self.keys = sorted({lock_key(schema, table): f"{schema}.{table}" for schema, table in tables}.items())
        self.where = ", ".join(w for _, w in sorted(self.keys, key=lambda kv: kv[1]))
        self.conn: psycopg.Connection | None = None
        self._held: list[int] = []

    def __enter__(self) -> OperatorLock:
        self.conn = db.connect(self.dsn, role="lock")
        for key, where in self.keys:
            holder = "holder unknown"
            for _ in range(20):
                if db.scalar(self.conn, "SELECT pg_try_advisory_lock(%s)", (key,)):
                    self._held.append(key)
                    break
                holder = self._holder(self.conn, key)
                if holder != "holder unknown":
                    break
                time.sleep(0.05)  # released between the two queries (a holder exiting): try again
            else:
                holder = "holder unknown"
            if key not in self._held:
                self.__exit__()
                raise Refused(f"another orchestrator is already migrating {where}: {holder}",
                              hint="wait for it to finish (orchestrator status), or stop it")
        return self

    def __exit__(self, *exc) -> None:
        if self.conn is not None and not self.conn.closed:
            # Unlock explicitly: closing only asks the server to end the session, and the next command's
            # lock attempt could otherwise still find this session holding the lock.
            for key in self._held:
                try:
                    self.conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
                except psycopg.Error:
                    break  # a lost connection has released the locks already
            self.conn.close()
        self._held = []

    def holder(self, conn: psycopg.Connection) -> str:
        for key, _ in self.keys:
            found = self._holder(conn, key)
            if found != "holder unknown":
                return found
        return "holder unknown"

    @staticmethod
    def _holder(conn: psycopg.Connection, key: int) -> str:
        row = conn.execute("""SELECT a.pid, a.application_name, a.client_addr, a.backend_start
                              FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
                              WHERE l.locktype = 'advisory' AND l.granted
                                AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                                AND l.classid = ((%s::bigint >> 32) & 4294967295)::oid
                                AND l.objid = (%s::bigint & 4294967295)::oid AND l.objsubid = 1""",
                           (key, key)).fetchone()
        if row is None:
            return "holder unknown"
        pid, app, addr, since = row
        return f"pid {pid} ({app}) since {since:%Y-%m-%d %H:%M:%S}"

    def is_held_elsewhere(self, conn: psycopg.Connection) -> bool:
        return self.holder(conn) != "holder unknown"
