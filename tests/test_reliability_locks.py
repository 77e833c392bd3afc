"""Lock storms: another session holds a lock that conflicts with a DDL step for longer than the whole retry
budget (settings.retries: 3). For every DDL step of every phase, the contract, the rollbacks and the undo of
contract steps (the reverse migration after the contract):

* the orchestrator gives up with exit 3 and one line naming the blocking pid and its query;
* an application writing meanwhile (small INSERTs and UPDATEs) never waits longer than lock_timeout + 150 ms;
* nothing is half-applied: the schema is exactly as before that step;
* once the blocker has gone, the same command completes.

A step later in a command is reached by first killing the command right before it (the crash hook), since
every step skips work already done on a re-run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import psycopg
import pytest

from orchestrator.engine import executor
from orchestrator.lab.snapshot import snapshot_diff

from .helpers import snapshot
from .test_reliability_support import (
    SETTINGS,
    AppWriter,
    Blocker,
    argv,
    build_chain,
    clone,
    drop,
    error_line,
    in_process,
    load_playbook,
    orch_cli,
    playbook_file,
)

AS, SUE = "ACCESS SHARE", "SHARE UPDATE EXCLUSIVE"
LOCK_TIMEOUT_S = 0.050  # the reference playbook's lock_timeout_ms
MARGIN_S = 0.150


@dataclass
class Storm:
    id: str
    template: tuple  # the chain state to start from: the state before this command
    command: tuple
    blocker: str  # the lock mode the other session holds
    prefix: tuple = ()  # commands run first (in process), e.g. contract 1..4 before contract 5
    position: str | None = None  # crash the command at this statement first, so the re-run reaches the step
    step: str = ""  # the step's name as the error message gives it


CONTRACT_1_TO_4 = (("contract", "1"), ("contract", "2"), ("contract", "3"), ("contract", "4"))
STORMS = [
    Storm("run1-add-columns", ("run", "1"), ("run", "1"), AS, step="add columns"),
    Storm("run1-index-build", ("run", "1"), ("run", "1"), SUE, position="DROP INDEX CONCURRENTLY IF EXISTS#1",
          step="build index"),
    Storm("run2-triggers", ("run", "2"), ("run", "2"), SUE, position="CREATE TRIGGER#1", step="create sync triggers"),
    Storm("run5-add-check", ("run", "5"), ("run", "5"), AS, step="add NOT NULL check"),
    Storm("run5-validate", ("run", "5"), ("run", "5"), SUE, position="VALIDATE CONSTRAINT#1",
          step="validate NOT NULL check"),
    Storm("run5-swap", ("run", "5"), ("run", "5"), AS, position="RENAME COLUMN#1", step="swap columns"),
    Storm("contract1-drop-defaults", ("contract",), ("contract", "1"), AS, step="drop temporary defaults"),
    Storm("contract2-drop-triggers", ("contract",), ("contract", "2"), AS, prefix=(("contract", "1"),),
          step="drop sync triggers"),
    Storm("contract5-drop-index", ("contract",), ("contract", "5"), SUE, prefix=CONTRACT_1_TO_4, step="drop index"),
    Storm("contract5-drop-column", ("contract",), ("contract", "5"), AS, prefix=CONTRACT_1_TO_4,
          position="DROP INDEX CONCURRENTLY#1", step="drop the retired column"),
    Storm("rollback5-add-check", ("rollback", "5"), ("rollback", "5"), AS, step="add NOT NULL check on the enum"),
    Storm("rollback5-validate", ("rollback", "5"), ("rollback", "5"), SUE, position="VALIDATE CONSTRAINT#1",
          step="wait for writes in flight"),
    Storm("rollback5-swap-back", ("rollback", "5"), ("rollback", "5"), AS, position="RENAME COLUMN#1",
          step="swap columns back"),
    Storm("rollback2-drop-triggers", ("rollback", "2"), ("rollback", "2"), AS, step="drop sync triggers"),
    Storm("rollback1-drop-index", ("rollback", "1"), ("rollback", "1"), SUE, step="drop index"),
    Storm("rollback1-drop-columns", ("rollback", "1"), ("rollback", "1"), AS, position="DROP COLUMN#1",
          step="drop columns"),
    # After the contract: the undo of contract 5 (the reverse migration) and of contract 1.
    Storm("undo5-add-column", ("undo", "5"), ("undo", "5"), AS, position="ADD COLUMN#1",
          step="add the enum column"),
    Storm("undo5-triggers", ("undo", "5"), ("undo", "5"), SUE, position="CREATE TRIGGER#1",
          step="create sync triggers"),
    Storm("undo5-index-build", ("undo", "5"), ("undo", "5"), SUE, position="DROP INDEX CONCURRENTLY IF EXISTS#1",
          step="build index"),
    Storm("undo1-restore-defaults", ("undo", "1"), ("undo", "1"), AS, step="restore temporary defaults"),
]
FAST = {"run1-add-columns", "run5-swap", "rollback1-drop-index", "undo5-add-column"}


@pytest.fixture(scope="module")
def chain(pg_server, tmp_path_factory):
    pb_path = playbook_file(tmp_path_factory.mktemp("locks") / "playbook.yaml", **SETTINGS)
    built = build_chain(pg_server.dsn, pb_path)
    yield built
    built.drop_all()


@pytest.mark.parametrize("storm", [pytest.param(s, id=s.id, marks=() if s.id in FAST else pytest.mark.slow)
                                   for s in STORMS])
def test_lock_storm_gives_up_cleanly_without_stalling_the_app(chain, storm):
    name, dsn = clone(chain.admin, chain.before[storm.template])
    try:
        pb = load_playbook(chain.pb_path)
        for command in storm.prefix:
            in_process(dsn, pb, command)
        if storm.position:
            r = orch_cli(dsn, chain.pb_path, *argv(storm.command),
                         env={executor.CRASH_AT_ENV: storm.position})
            assert r.returncode == -9, r.stderr[-600:]
        before = snapshot(dsn)
        blocker = Blocker(dsn, storm.blocker)
        app = AppWriter(dsn)
        try:
            app.start()
            r = orch_cli(dsn, chain.pb_path, *argv(storm.command))
        finally:
            worst = app.stop()
            after = snapshot(dsn)
            blocker.release()
        line = error_line(r)
        assert r.returncode == 3, r.stderr[-1500:]
        assert storm.step in line, line
        assert f"pid {blocker.pid}" in line and blocker.query in line, line
        # DDL: its retry budget; an online step (SHARE UPDATE EXCLUSIVE): one wait of online_lock_timeout_ms
        assert "gave up after 4 attempts" in line or "online_lock_timeout_ms=1000ms" in line, line
        assert app.errors == [], app.errors[:3]
        assert len(app.latencies) > 10
        assert worst < LOCK_TIMEOUT_S + MARGIN_S, f"an app statement waited {worst * 1000:.0f} ms"
        assert snapshot_diff(before, after) == []
        # The blocker has gone: the same command completes.
        again = orch_cli(dsn, chain.pb_path, *argv(storm.command))
        assert again.returncode == 0, again.stderr[-1500:]
    finally:
        drop(chain.admin, name)


def test_index_build_blocked_by_an_old_snapshot_leaves_no_invalid_index(chain):
    """A REPEATABLE READ transaction on another table holds a snapshot: CREATE INDEX CONCURRENTLY builds the
    index, then times out waiting for it. Giving up must not leave the INVALID index behind."""
    name, dsn = clone(chain.admin, chain.before[("run", "1")])
    try:
        r = orch_cli(dsn, chain.pb_path, "run", "1",
                     env={executor.CRASH_AT_ENV: "DROP INDEX CONCURRENTLY IF EXISTS#1"})
        assert r.returncode == -9, r.stderr[-600:]
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE audit (id int)")
        before = snapshot(dsn)
        report = psycopg.connect(dsn, application_name="report")
        report_pid = report.info.backend_pid
        try:
            report.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            report.execute("SELECT count(*) FROM audit").fetchall()
            time.sleep(1.1)  # an old snapshot, as a long report would hold
            r = orch_cli(dsn, chain.pb_path, "run", "1")
            after = snapshot(dsn)
        finally:
            report.rollback()
            report.close()
        line = error_line(r)
        assert r.returncode == 3, r.stderr[-1500:]
        assert f"pid {report_pid}" in line, line
        assert "INVALID" not in line, line
        assert snapshot_diff(before, after) == []
        again = orch_cli(dsn, chain.pb_path, "run", "1")
        assert again.returncode == 0, again.stderr[-1500:]
    finally:
        drop(chain.admin, name)
