"""Shared pieces of the reliability tests (tests/test_reliability_*.py); this module holds no tests.

The reliability tests drive the real CLI in subprocesses against real servers and compare what they leave
behind with what a clean, uninterrupted run leaves behind. To keep that fast, the states between commands
("before run 3", "after contract", ...) are built once per module as template databases and cloned per case.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from orchestrator.engine import executor
from orchestrator.lab import server
from orchestrator.lab.seed import SeedNames
from orchestrator.lab.snapshot import schema_snapshot
from orchestrator.run.runner import Orchestrator

from .helpers import ROOT, make_playbook, playbook_dict, seed, write_playbook

CRASH_ENVS = (executor.CRASH_AT_ENV, executor.CRASH_MODE_ENV)
ROWS = 600

# Small, deterministic batches (min = max) so a clean run always executes the same statements; a small retry
# budget keeps the lock-storm cases short.
SETTINGS = {"settings.batch_size": 100, "settings.min_batch_size": 100, "settings.max_batch_size": 100,
            "settings.verify_chunk_rows": 200, "settings.retries": 3, "settings.retry_wait_initial_ms": 20,
            "settings.retry_wait_max_ms": 200, "settings.online_lock_timeout_ms": 1000}

FORWARD = [("run", "1"), ("run", "2"), ("run", "3"), ("run", "4"), ("run", "5"), ("run", "6"), ("contract",)]
BACKWARD = [("rollback", "6"), ("rollback", "5"), ("rollback", "4"), ("rollback", "3"), ("rollback", "2"),
            ("rollback", "1")]
# After the contract, `rollback N` undoes contract step N (the last first): named "undo" here, to keep each
# state of the chain apart from the ordinary rollback of the same phase.
UNDO = [("undo", "6"), ("undo", "5"), ("undo", "4"), ("undo", "3"), ("undo", "2"), ("undo", "1")]


# -- playbooks ------------------------------------------------------------------------------------------------

def playbook_file(path: Path, names: SeedNames | None = None, **overrides) -> Path:
    return write_playbook(playbook_dict(names, **overrides), path)


def load_playbook(path: Path):
    from orchestrator.engine import playbook
    return playbook.load(str(path))


# -- the CLI ----------------------------------------------------------------------------------------------------

def orch_cli(dsn: str | None, pb_path: Path | None, *args: str, env: dict | None = None,
             timeout: float = 180) -> subprocess.CompletedProcess:
    """`orchestrator [--dsn] [--playbook] args` in a subprocess, JSON logs, no inherited fault injection."""
    cmd = [sys.executable, "-m", "orchestrator", "--json-logs"]
    if dsn is not None:
        cmd += ["--dsn", dsn]
    if pb_path is not None:
        cmd += ["--playbook", str(pb_path)]
    full = {k: v for k, v in os.environ.items()
            if k not in ("DATABASE_URL", "PLAYBOOK", "PGPASSWORD", *CRASH_ENVS)}
    full.update(COLUMNS="1000", PYTHONIOENCODING="utf-8", **(env or {}))
    return subprocess.run(cmd + list(args), capture_output=True, text=True, encoding="utf-8", env=full,
                          timeout=timeout, cwd=ROOT)


def argv(command: tuple[str, ...]) -> list[str]:
    """The command line of a command: contract and rollback need --yes when not on a terminal."""
    if command[0] == "undo":
        return ["rollback", *command[1:], "--yes"]
    return [*command, "--yes"] if command[0] in ("contract", "rollback") else list(command)


def error_line(r: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    return lines[-1] if lines else ""


def status_json(dsn: str, pb_path: Path) -> dict:
    import json
    r = orch_cli(dsn, pb_path, "status", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def in_process(dsn: str, pb, command: tuple[str, ...]):
    orch = Orchestrator(pb, dsn)
    try:
        verb, *rest = command
        n = int(rest[0]) if rest else None
        return {"run": orch.run, "rollback": orch.rollback, "undo": orch.rollback}[verb](n) if verb != "contract" \
            else orch.contract(n)
    finally:
        orch.close()


# -- databases ----------------------------------------------------------------------------------------------------

def clone(admin_dsn: str, template: str, name: str | None = None) -> tuple[str, str]:
    """A new database copied from `template`: (name, dsn)."""
    name = name or f"r_{secrets.token_hex(5)}"
    for _ in range(100):
        try:
            with psycopg.connect(admin_dsn, autocommit=True) as conn:
                conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name),
                                                                              sql.Identifier(template)))
            break
        except psycopg.errors.ObjectInUse:  # a session of the previous command is still closing
            time.sleep(0.05)
    else:
        raise RuntimeError(f"template {template} stayed busy")
    return name, server._with_dbname(admin_dsn, name)


def drop(admin_dsn: str, name: str) -> None:
    server.drop_database(admin_dsn, name)


def table_rows(dsn: str, names: SeedNames = SeedNames()) -> tuple[int, str]:
    """(count, digest) of every row, all columns but the timestamps (seed rows get now())."""
    with psycopg.connect(dsn) as conn:
        return conn.execute(sql.SQL(
            "SELECT count(*), md5(coalesce(string_agg((to_jsonb(t) - 'created_at' - 'updated_at')::text, ',' "
            "ORDER BY t.id), '')) FROM {} t").format(names.table_ident)).fetchone()


def state_summary(dsn: str) -> dict:
    """What the state tables say, minus timings and counters that legitimately differ between runs."""
    with psycopg.connect(dsn) as conn:
        if conn.execute("SELECT to_regclass('_orchestrator.phases') IS NULL").fetchone()[0]:
            return {}
        phases = conn.execute("SELECT phase, status, step, error, details->'inserted' FROM _orchestrator.phases "
                              "ORDER BY phase").fetchall()
        backfill = conn.execute("SELECT rows_done, finished_at IS NOT NULL, cursor = end_key "
                                "FROM _orchestrator.backfills").fetchall()
        migrations = conn.execute("SELECT playbook, fingerprint FROM _orchestrator.migrations").fetchall()
    return {"phases": phases, "backfill": backfill, "migrations": migrations}


def outcome(dsn: str) -> dict:
    """Everything a command leaves behind that must not depend on whether it was interrupted."""
    with psycopg.connect(dsn) as conn:
        schema = schema_snapshot(conn, "public")
    return {"schema": schema, "rows": table_rows(dsn), "state": state_summary(dsn)}


def outcome_diff(expected: dict, got: dict) -> list[str]:
    from orchestrator.lab.snapshot import snapshot_diff
    out = [f"schema {d}" for d in snapshot_diff(expected["schema"], got["schema"])]
    for key in ("rows", "state"):
        if expected[key] != got[key]:
            out.append(f"{key}: expected {expected[key]!r}, got {got[key]!r}")
    return out


# -- the chain of states ------------------------------------------------------------------------------------------

@dataclass
class Chain:
    """Template databases for the state before and after every command, and each clean run's statement count."""

    admin: str
    pb_path: Path
    before: dict[tuple, str] = field(default_factory=dict)  # command -> template holding the state before it
    after: dict[tuple, str] = field(default_factory=dict)  # command -> template holding the state after it
    statements: dict[tuple, list[str]] = field(default_factory=dict)  # command -> SQL of a clean run, in order
    outcomes: dict[str, dict] = field(default_factory=dict)  # template -> outcome()

    def expected(self, command: tuple) -> dict:
        return self.outcomes[self.after[command]]

    def drop_all(self) -> None:
        for name in {*self.before.values(), *self.after.values()}:
            drop(self.admin, name)


class Recorder:
    """Stands in for the executor's fault injector: sees the same statements, records them, never fires."""

    def __init__(self):
        self.texts: list[str] = []

    def after(self, conn, query) -> None:
        self.texts.append(query if isinstance(query, str) else query.as_string(conn))


MUTATING = ("ALTER", "CREATE", "DROP", "INSERT", "UPDATE", "DELETE")


def crash_points(texts: list[str]) -> list[int]:
    """Statement numbers worth a crash: each change (killed before its commit when in a transaction) and the
    statement after it (so the change has committed)."""
    points = set()
    for i, text in enumerate(texts, 1):
        if text.lstrip().upper().startswith(MUTATING):
            points |= {i, min(i + 1, len(texts))}
    return sorted(points)


def spread(points: list[int], k: int) -> list[int]:
    """k points evenly spread over `points` (all of them when there are fewer), always with the first and last."""
    if len(points) <= k:
        return points
    return sorted({points[round(j * (len(points) - 1) / (k - 1))] for j in range(k)})


def build_chain(admin_dsn: str, pb_path: Path) -> Chain:
    """seed -> run 1 .. run 6 -> contract -> undo 6 .. undo 1, and run 6 -> rollback 6 .. rollback 1, one
    template per state."""
    chain = Chain(admin_dsn, pb_path)
    tag = secrets.token_hex(4)
    start = f"tpl_{tag}_seed"
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(start)))
    seed(server._with_dbname(admin_dsn, start), rows=ROWS)
    pb = load_playbook(pb_path)
    previous = start
    old = {k: os.environ.get(k) for k in CRASH_ENVS}
    os.environ[executor.CRASH_AT_ENV] = "record"  # the hook's counting, with a recorder in place of the injector
    try:
        for path, origin in ((FORWARD + UNDO, None), (BACKWARD, ("run", "6"))):
            if origin is not None:
                previous = chain.after[origin]
            for command in path:
                name, dsn = clone(admin_dsn, previous, f"tpl_{tag}_{'_'.join(command)}")
                executor._injector = recorder = Recorder()
                in_process(dsn, pb, command)
                chain.statements[command] = recorder.texts
                chain.before[command], chain.after[command] = previous, name
                previous = name
    finally:
        executor._injector = None
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    for name in {*chain.before.values(), *chain.after.values()}:
        chain.outcomes[name] = outcome(server._with_dbname(admin_dsn, name))
    return chain


# -- other sessions --------------------------------------------------------------------------------------------------

class Blocker:
    """Another session holding a lock on the table in an open transaction, as a report or a VACUUM would."""

    QUERIES = {
        "ACCESS SHARE": "SELECT count(*) FROM workflow_templates",  # a long report: blocks only ACCESS EXCLUSIVE
        "SHARE UPDATE EXCLUSIVE": "LOCK TABLE workflow_templates IN SHARE UPDATE EXCLUSIVE MODE",  # like VACUUM
    }

    def __init__(self, dsn: str, mode: str):
        self.conn = psycopg.connect(dsn, application_name="report")
        self.query = self.QUERIES[mode]
        self.conn.execute(sql.SQL(self.query)).fetchall() if mode == "ACCESS SHARE" else self.conn.execute(
            sql.SQL(self.query))
        self.pid = self.conn.info.backend_pid

    def release(self) -> None:
        if not self.conn.closed:
            self.conn.rollback()
            self.conn.close()


class AppWriter(threading.Thread):
    """The application: small INSERTs and UPDATEs, one per transaction, timing every statement."""

    def __init__(self, dsn: str):
        super().__init__(daemon=True)
        self.dsn, self.stop_flag, self.latencies, self.errors = dsn, threading.Event(), [], []

    def run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True, application_name="app") as conn:
            ids = [r[0] for r in conn.execute("SELECT id FROM workflow_templates ORDER BY id LIMIT 50")]
            i = 0
            while not self.stop_flag.is_set():
                i += 1
                if i % 2:
                    stmt = sql.SQL("INSERT INTO workflow_templates (id, owner_id, name) VALUES ({}, 'app', 'w')"
                                   ).format(sql.Literal(f"APP-{secrets.token_hex(8)}"))
                else:
                    stmt = sql.SQL("UPDATE workflow_templates SET name = name WHERE id = {}").format(
                        sql.Literal(ids[i % len(ids)]))
                started = time.monotonic()
                try:
                    conn.execute(stmt)
                except psycopg.Error as err:
                    self.errors.append(err)
                self.latencies.append(time.monotonic() - started)
                time.sleep(0.005)

    def stop(self) -> float:
        self.stop_flag.set()
        self.join(10)
        return max(self.latencies, default=0.0)


def advisory_locks(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND database = "
                            "(SELECT oid FROM pg_database WHERE datname = current_database())").fetchone()[0]


def password_dsn(dsn: str, user: str, password: str) -> str:
    """The test server as a postgresql:// URL for `user` with `password` (trust auth accepts any)."""
    from urllib.parse import quote
    params = conninfo_to_dict(dsn)
    return (f"postgresql://{quote(user, safe='')}:{quote(password, safe='')}@/{params['dbname']}"
            f"?host={quote(params['host'], safe='/')}")


__all__ = ["AppWriter", "BACKWARD", "Blocker", "Chain", "FORWARD", "ROWS", "SETTINGS", "advisory_locks",
           "argv", "build_chain", "clone", "crash_points", "spread", "drop", "error_line", "in_process",
           "load_playbook", "make_playbook",
           "orch_cli", "outcome", "outcome_diff", "password_dsn", "playbook_dict", "playbook_file",
           "state_summary", "status_json", "table_rows"]
