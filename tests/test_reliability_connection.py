"""Connection loss while a statement runs: another session terminates the orchestrator's work connection
(pg_terminate_backend on backends named 'orchestrator:main...') in the middle of an index build, a backfill
batch, a verify scan and the swap. Each time the orchestrator reconnects and retries within its budget, or
fails cleanly (exit 1, one error line) and the same command completes it. At the end every row is there,
mapped, and parity has zero mismatches.

(test_reliability_crash.py also terminates the connection at exact statement boundaries of every command.)
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import psycopg
import pytest

from orchestrator.engine import executor

from .helpers import ROOT, column_values, seed
from .test_reliability_support import argv, error_line, load_playbook, orch_cli, playbook_file, table_rows

MAPPING = {"plain": "simple_chat", "rag": "rag_chat", "tools": "function_chat", "full": "advanced_chat"}


class Terminator(threading.Thread):
    """Terminates the orchestrator's work connection once, while it runs a statement matching `pattern`."""

    def __init__(self, dsn: str, pattern: str, waiting_for_lock: bool = False):
        super().__init__(daemon=True)
        self.dsn, self.pattern, self.waiting_for_lock = dsn, pattern, waiting_for_lock
        self.killed: list[str] = []
        self.stop_flag = threading.Event()

    def run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self.stop_flag.is_set() and not self.killed:
                rows = conn.execute(
                    """SELECT pid, query FROM pg_stat_activity
                       WHERE application_name LIKE 'orchestrator:main%%' AND state = 'active'
                         AND position(%s in query) > 0 AND (NOT %s OR wait_event_type = 'Lock')""",
                    (self.pattern, self.waiting_for_lock)).fetchall()
                for pid, query in rows:
                    if conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()[0]:
                        self.killed.append(query)
                time.sleep(0.002)

    def stop(self) -> list[str]:
        self.stop_flag.set()
        self.join(10)
        return self.killed


def start_cli(dsn: str, pb_path, *args: str) -> subprocess.Popen:
    import os
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORCHESTRATOR_CRASH", "DATABASE_URL"))}
    return subprocess.Popen([sys.executable, "-m", "orchestrator", "--json-logs", "--dsn", dsn, "--playbook",
                             str(pb_path), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=ROOT)


def through_lost_connection(dsn: str, pb_path, command: tuple, pattern: str, *, blocker: str | None = None,
                            position: str | None = None, attempts: int = 5) -> list[str]:
    """Run `command` while its connection is terminated mid-statement; re-run after a clean failure.

    position: first kill the command at this statement (the crash hook), so the re-run starts at the step.
    """
    hold = None
    for _ in range(attempts):  # the statement may be too quick to catch: try again from the same state
        if position:
            r = orch_cli(dsn, pb_path, *argv(command), env={executor.CRASH_AT_ENV: position})
            assert r.returncode == -9, r.stderr[-2000:]
        if blocker:
            hold = psycopg.connect(dsn, application_name="report")
            hold.execute(blocker).fetchall()
        killer = Terminator(dsn, pattern, waiting_for_lock=blocker is not None)
        killer.start()
        proc = start_cli(dsn, pb_path, *argv(command))
        if blocker:
            deadline = time.monotonic() + 20
            while not killer.killed and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            hold.rollback()
            hold.close()
        out, err = proc.communicate(timeout=180)
        killed = killer.stop()
        r = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        assert "Traceback" not in err, err[-2000:]
        if r.returncode == 1:  # a clean failure: one error line that says to re-run
            assert "re-run" in error_line(r), err[-2000:]
            again = orch_cli(dsn, pb_path, *argv(command))
            assert again.returncode == 0, again.stderr[-2000:]
        else:
            assert r.returncode == 0, err[-2000:]
        if killed:
            return killed
        # not caught this time: undo the command so the next attempt starts from the same state
        undo = ("rollback", command[1]) if command[0] == "run" else None
        assert undo is not None
        assert orch_cli(dsn, pb_path, *argv(undo)).returncode == 0
    pytest.fail(f"never caught {pattern!r} running in {attempts} attempts")


def test_connection_terminated_during_index_build_backfill_verify_and_swap(dsn, tmp_path):
    seed(dsn, rows=60_000)
    before = column_values(dsn)
    pb_path = playbook_file(tmp_path / "pb.yaml", **{
        "settings.batch_size": 5000, "settings.min_batch_size": 5000, "settings.max_batch_size": 5000,
        "settings.verify_chunk_rows": 10_000, "settings.retries": 3, "settings.lock_timeout_ms": 3000,
        # Connection loss is under test, not pacing: on a loaded 2-core machine a 5,000-row batch can take
        # longer than the playbook's 150 ms, and at min_batch_size it cannot be split further.
        "settings.max_batch_ms": 10_000})
    killed = {}
    killed["index build"] = through_lost_connection(dsn, pb_path, ("run", "1"), "CREATE INDEX CONCURRENTLY")
    assert orch_cli(dsn, pb_path, "run", "2").returncode == 0
    killed["backfill"] = through_lost_connection(dsn, pb_path, ("run", "3"), 'UPDATE "public"."workflow_templates"')
    killed["verify"] = through_lost_connection(dsn, pb_path, ("run", "4"), "count(*) FILTER")
    # The swap's statements take milliseconds: a report holding the table makes the first one wait, and it is
    # terminated while waiting for its lock.
    killed["swap"] = through_lost_connection(dsn, pb_path, ("run", "5"), "LOCK TABLE",
                                             blocker="SELECT count(*) FROM workflow_templates",
                                             position="RENAME COLUMN#1")
    assert all(killed.values()), killed
    assert orch_cli(dsn, pb_path, "run", "6").returncode == 0
    verify = orch_cli(dsn, pb_path, "verify")
    assert verify.returncode == 0 and '"mismatches": 0' in verify.stdout, verify.stdout + verify.stderr
    assert orch_cli(dsn, pb_path, *argv(("contract",))).returncode == 0
    after = column_values(dsn)
    assert len(after) == len(before) + 4  # the four seed rows, nothing lost or duplicated
    assert all(after[i] == MAPPING[v] for i, v in before.items())
    assert table_rows(dsn)[0] == len(before) + 4
    assert load_playbook(pb_path) is not None
