"""Operators: two at once, and the mistakes people make at 3 a.m.

* A second orchestrator on the same playbook (or the same table) and database refuses at once, naming the
  first (its pid, from the advisory lock); a different playbook on a different table runs meanwhile.
* Out-of-order run / rollback / contract, contract before verify, a rollback not from the last contract step, a playbook
  edited between phases: exit 3, one line saying what to do instead, nothing changed.
* A wrong DSN or database: exit 2 (cannot connect, or the table is not there), nothing changed.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from orchestrator.lab import server
from orchestrator.lab.seed import SeedNames
from orchestrator.lab.snapshot import snapshot_diff

from .helpers import ROOT, seed, snapshot
from .test_reliability_support import argv, error_line, orch_cli, playbook_file, state_summary, status_json

OTHER = SeedNames(table="other_templates", enum="othertype")


def popen(dsn: str, pb_path: Path, *args: str, env: dict) -> subprocess.Popen:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("ORCHESTRATOR_CRASH", "DATABASE_URL"))}
    return subprocess.Popen([sys.executable, "-m", "orchestrator", "--json-logs", "--dsn", dsn, "--playbook",
                             str(pb_path), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**full, **env}, cwd=ROOT)


def wait_until_running(dsn: str, pb_path: Path, proc: subprocess.Popen, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        st = status_json(dsn, pb_path)
        if st["running_now"] and st["phases"][0]["status"] == "running":
            return st
        time.sleep(0.1)
    pytest.fail("the first orchestrator never started")


def test_second_operator_refused_at_once_other_table_runs_meanwhile(dsn, tmp_path):
    seed(dsn, rows=500)
    seed(dsn, OTHER, rows=500)
    pb = playbook_file(tmp_path / "pb.yaml")
    same_table = playbook_file(tmp_path / "same_table.yaml", name="another_name_same_table")
    other = playbook_file(tmp_path / "other.yaml", OTHER, name="other_migration")
    control = {"ORCHESTRATOR_CONTROL_DIR": str(tmp_path / "control")}
    assert orch_cli(dsn, pb, "pause", env=control).returncode == 0  # the first operator will wait, holding the lock
    first = popen(dsn, pb, "run", "1", env=control)
    try:
        st = wait_until_running(dsn, pb, first)
        assert st["phases"][0]["status"] == "running"  # someone holds the lock: not 'interrupted'
        before = snapshot(dsn)
        for path, args in ((pb, ("run", "1")), (pb, ("rollback", "1", "--yes")), (pb, ("contract", "--yes")),
                           (same_table, ("run", "1"))):
            started = time.monotonic()
            r = orch_cli(dsn, path, *args, env=control)
            line = error_line(r)
            assert r.returncode == 3, r.stderr[-2000:]
            assert time.monotonic() - started < 20  # at once: no waiting for the first one
            assert "another orchestrator is already migrating public.workflow_templates" in line, line
            assert f":{first.pid} " in line or f":{first.pid})" in line, (first.pid, line)  # its OS pid
            assert "->" in line  # what to do instead
        assert snapshot_diff(before, snapshot(dsn)) == []
        # a different playbook on a different table is not held up
        r = orch_cli(dsn, other, "run", "1", env=control)
        assert r.returncode == 0, r.stderr[-2000:]
        assert first.poll() is None
    finally:
        orch_cli(dsn, pb, "resume", env=control)
        out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err[-2000:]
    assert [p["status"] for p in status_json(dsn, pb)["phases"]][:1] == ["applied"]
    assert [p["status"] for p in status_json(dsn, other)["phases"]][:1] == ["applied"]


def test_two_playbooks_starting_together_on_a_fresh_database(dsn, tmp_path):
    """Both create the state schema at the same moment: neither may fail on it."""
    seed(dsn, rows=200)
    seed(dsn, OTHER, rows=200)
    pb = playbook_file(tmp_path / "pb.yaml")
    other = playbook_file(tmp_path / "other.yaml", OTHER, name="other_migration")
    procs = [popen(dsn, p, "run", "1", env={}) for p in (pb, other)]
    results = [(p.wait(timeout=120), p.communicate()[1]) for p in procs]
    assert [rc for rc, _ in results] == [0, 0], [err[-1500:] for _, err in results]


# -- mistakes ------------------------------------------------------------------------------------------------------

def refused(dsn: str, pb: Path, *args: str, code: int = 3) -> str:
    """Run a command that must be refused; nothing may change. Returns its error line."""
    schema, state = snapshot(dsn), state_summary(dsn)
    r = orch_cli(dsn, pb, *args)
    line = error_line(r)
    assert r.returncode == code, (args, r.returncode, r.stderr[-2000:])
    assert len([ln for ln in r.stderr.splitlines() if ln.startswith("error:")]) == 1
    assert snapshot_diff(schema, snapshot(dsn)) == [], args
    assert state_summary(dsn) == state, args
    return line


def ok(dsn: str, pb: Path, *command: str) -> None:
    r = orch_cli(dsn, pb, *argv(command))
    assert r.returncode == 0, (command, r.stderr[-2000:])


def test_out_of_order_commands_are_refused_with_the_command_to_run(dsn, tmp_path):
    seed(dsn, rows=300)
    pb = playbook_file(tmp_path / "pb.yaml")
    line = refused(dsn, pb, "run", "3")
    assert "needs phase 1" in line and "-> orchestrator run 1" in line, line
    line = refused(dsn, pb, "contract", "--yes")
    assert "contract needs every phase applied" in line and "-> orchestrator run 1" in line, line
    ok(dsn, pb, "run", "1")
    ok(dsn, pb, "run", "2")
    line = refused(dsn, pb, "run", "4")
    assert "needs phase 3 (backfill) applied first; it is pending" in line, line
    assert "-> orchestrator run 3" in line, line
    ok(dsn, pb, "run", "3")
    # contract before verify
    line = refused(dsn, pb, "contract", "--yes")
    assert "phase 4 (verify) is pending" in line and "-> orchestrator run 4" in line, line
    # rollback out of order: name the last applied phase, the one to roll back first
    line = refused(dsn, pb, "rollback", "1", "--yes")
    assert "-> orchestrator rollback 3" in line, line
    for n in (4, 5, 6):
        ok(dsn, pb, "run", str(n))
    line = refused(dsn, pb, "contract", "2", "--yes")
    assert "contract the phases in order" in line and "-> orchestrator contract 1" in line, line
    ok(dsn, pb, "contract", "1")
    # rollback once a contract step ran: contract steps are undone from the last one (here, 1)
    line = refused(dsn, pb, "rollback", "6", "--yes")
    assert "phase 1 (add_shadow_column) is contracted" in line and "-> orchestrator rollback 1" in line, line
    line = refused(dsn, pb, "run", "6")
    assert "partly contracted" in line and "orchestrator contract" in line and "rollback 1" in line, line
    ok(dsn, pb, "contract")


def test_playbook_edited_between_phases_is_refused(dsn, tmp_path):
    seed(dsn, rows=300)
    pb = playbook_file(tmp_path / "pb.yaml")
    ok(dsn, pb, "run", "1")
    edited = playbook_file(tmp_path / "pb.yaml", **{"mapping.full": "expert_chat"})  # same file, edited
    line = refused(dsn, edited, "run", "2")
    assert "was edited after its first phase ran" in line, line
    assert "-> restore the playbook as it was, or roll back every phase before editing it" in line, line
    line = refused(dsn, edited, "rollback", "1", "--yes")
    assert "was edited" in line, line
    playbook_file(tmp_path / "pb.yaml")  # restored: goes on
    ok(dsn, pb, "run", "2")
    ok(dsn, pb, "rollback", "2")
    ok(dsn, pb, "rollback", "1")
    playbook_file(tmp_path / "pb.yaml", **{"mapping.full": "expert_chat"})  # fully rolled back: edits are fine
    ok(dsn, pb, "run", "1")


def test_wrong_dsn_or_database(pg_server, dsn, tmp_path):
    seed(dsn, rows=100)
    pb = playbook_file(tmp_path / "pb.yaml")
    name = f"empty_{secrets.token_hex(5)}"
    staging = server.create_database(pg_server.dsn, name)
    try:
        # a database that does not exist, a host that is not there, a DSN that does not parse: exit 2
        for bad, must in ((server._with_dbname(dsn, "no_such_db"), "cannot connect"),
                          (make_conninfo(dsn, host="/nonexistent/socket/dir"), "cannot connect"),
                          ("postgresql://x:y@[bad", "DSN")):
            r = orch_cli(bad, pb, "run", "1")
            assert r.returncode == 2, (bad, r.stderr[-1500:])
            assert must in error_line(r) and "Traceback" not in r.stderr, r.stderr[-1500:]
            assert "-> check --dsn / DATABASE_URL" in error_line(r), error_line(r)
        # the right server, the wrong database (no such table there): exit 2, nothing created there
        before = snapshot(staging)
        r = orch_cli(staging, pb, "run", "1")
        assert r.returncode == 2 and "workflow_templates" in error_line(r), r.stderr[-1500:]
        assert snapshot_diff(before, snapshot(staging)) == []
        with psycopg.connect(staging) as conn:
            assert conn.execute("SELECT to_regnamespace('_orchestrator') IS NULL").fetchone()[0]
        # the wrong database with the table, where this migration has not started: refused, says what to run
        seed(staging, rows=50)
        line = refused(staging, pb, "run", "4")
        assert "needs phase 1" in line and "-> orchestrator run 1" in line, line
    finally:
        server.drop_database(pg_server.dsn, name)


def test_losing_the_lock_connection_stops_the_run(dsn, tmp_path):
    """The advisory lock lives on its own connection: if that session is terminated, the lock is gone and a
    second operator could start, so the run stops at its next statement (exit 1); the re-run completes."""
    seed(dsn, rows=300)
    pb = playbook_file(tmp_path / "pb.yaml")
    control = {"ORCHESTRATOR_CONTROL_DIR": str(tmp_path / "control")}
    assert orch_cli(dsn, pb, "pause", env=control).returncode == 0
    first = popen(dsn, pb, "run", "1", env=control)
    try:
        wait_until_running(dsn, pb, first)
        with psycopg.connect(dsn, autocommit=True) as conn:
            killed = conn.execute("SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
                                  "WHERE application_name LIKE 'orchestrator:lock:%'").fetchone()[0]
        assert killed == 1
    finally:
        orch_cli(dsn, pb, "resume", env=control)
        out, err = first.communicate(timeout=120)
    assert first.returncode == 1, err[-2000:]
    assert "lost the connection holding the operator lock" in err and "-> re-run the same command" in err, err
    assert "Traceback" not in err
    r = orch_cli(dsn, pb, "run", "1")
    assert r.returncode == 0, r.stderr[-2000:]
