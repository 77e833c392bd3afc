"""The DBA's console: plan with linted SQL, --dry-run, hooks, environments, run log, status, progress bar."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import sys
import time
from pathlib import Path

from orchestrator.console import lint
from orchestrator.engine.executor import Recorded

from .helpers import (
    ROOT,
    cli,
    make_playbook,
    orchestrator,
    query,
    real_playbook,
    seed,
    seed_chatter,
    simple_dict,
    snapshot,
    write_playbook,
)


def test_squawk_is_installed_with_the_package():
    assert lint.available(), "squawk-cli is a dependency: plan lints every statement with it"


def state_snapshot(dsn) -> dict:
    return {"public": snapshot(dsn), "_orchestrator": snapshot(dsn, "_orchestrator"),
            "schemas": query(dsn, "SELECT nspname FROM pg_namespace ORDER BY 1"),
            "state_rows": query(dsn, "SELECT to_regclass('_orchestrator.phases') IS NOT NULL")}


def test_plan_shows_every_phase_sql_locks_and_lint(dsn):
    seed_chatter(dsn, rows=100)
    before = state_snapshot(dsn)
    r = cli("plan", dsn=dsn, env={"COLUMNS": "250"})
    assert r.returncode == 0, r.stderr
    text = r.stdout
    for n, name in enumerate(["add_shadow_column", "dual_write", "backfill", "verify", "swap", "seed_rows"], 1):
        assert f"Phase {n}: {name}" in text
    assert 'ADD COLUMN IF NOT EXISTS "workflow_type_new" varchar(50)' in text
    # the reference playbook copies phase 3 (backfill_method: copy): the new column's index is built on the copy
    assert 'CREATE INDEX IF NOT EXISTS "ix_workflow_templates_workflow_type_ecnew" ON "public"."_ec_copy_' in text
    assert 'RENAME COLUMN "workflow_type_new" TO "workflow_type"' in text
    assert 'ALTER TABLE "public"."template_specs" ADD COLUMN IF NOT EXISTS "workflow_type_new"' in text
    # the version views first, in the order an app statement through a view takes its locks (view, then table)
    assert ('LOCK TABLE "chatter_v1"."workflow_templates", "chatter_v1"."template_specs", '
            '"chatter_v2"."workflow_templates", "chatter_v2"."template_specs", '
            '"public"."template_specs", "public"."workflow_templates" IN ACCESS EXCLUSIVE MODE') in text
    assert "-- lock: ACCESS EXCLUSIVE (catalog only" in text and "-- lock: SHARE UPDATE EXCLUSIVE" in text
    assert "squawk prefer-text-field" in text and "accepted:" in text
    assert "UNSAFE" not in text
    assert state_snapshot(dsn) == before  # plan touches nothing


def test_no_phase_has_a_statement_squawk_finds_unsafe(dsn):
    seed_chatter(dsn, rows=10)
    from orchestrator.run.runner import Orchestrator
    orch = Orchestrator(real_playbook(), dsn, dry_run=True)
    try:
        plans = orch.plan()
    finally:
        orch.close()
    findings = [f for pp in plans for action in ("expand", "contract", "rollback")
                for f in lint.lint(pp.phase.number, action, getattr(pp, action), orch.pb.settings)]
    assert findings, "squawk should at least report the accepted findings"
    unsafe = [(f.phase, f.action, f.rule, f.statement[:80]) for f in findings if f.unsafe]
    assert unsafe == []


def test_lint_flags_a_new_unsafe_statement():
    settings = make_playbook().settings
    unsafe = [Recorded('CREATE INDEX "i" ON "t" ("c")', "SHARE"),
              Recorded('ALTER TABLE "t" ADD CONSTRAINT "fk" FOREIGN KEY ("c") REFERENCES "u" ("id")', "x")]
    rules = {f.rule for f in lint.lint(1, "expand", unsafe, settings) if f.unsafe}
    assert "require-concurrent-index-creation" in rules
    assert "constraint-missing-not-valid" in rules or "adding-foreign-key-constraint" in rules


def test_dry_run_changes_nothing(dsn):
    seed_chatter(dsn, rows=200)
    before = state_snapshot(dsn)
    r = cli("run", "1", "--dry-run", dsn=dsn)
    assert r.returncode == 0, r.stderr
    assert 'ADD COLUMN IF NOT EXISTS "workflow_type_new"' in r.stdout
    assert state_snapshot(dsn) == before
    orch = orchestrator(real_playbook(), dsn)
    orch.run(1)
    orch.run(2)
    orch.close()
    before = state_snapshot(dsn)
    backfill_before = query(dsn, "SELECT count(*) FROM workflow_templates WHERE workflow_type_new IS NULL")
    for args in (["run", "3", "--dry-run"], ["rollback", "2", "--dry-run"], ["contract", "--dry-run"]):
        r = cli(*args, dsn=dsn)
        assert r.returncode in (0, 3), r.stderr
    assert state_snapshot(dsn) == before
    assert query(dsn, "SELECT count(*) FROM workflow_templates WHERE workflow_type_new IS NULL") == backfill_before
    assert query(dsn, "SELECT count(*) FROM _orchestrator.backfills") == [(0,)]


def hook_script(tmp_path: Path, exit_code: int = 0) -> Path:
    script = tmp_path / f"hook{exit_code}.sh"
    script.write_text("#!/bin/sh\nenv | grep '^ORCH_' | sort > \"$HOOK_DIR/$ORCH_EVENT-$ORCH_PHASE-$ORCH_ACTION\"\n"
                      f"exit {exit_code}\n")
    script.chmod(0o755)
    return script


def test_hooks_receive_the_documented_variables(dsn, tmp_path):
    seed(dsn, rows=3000)
    ok = hook_script(tmp_path)
    data = simple_dict()
    data["hooks"] = {"on_start": [str(ok)], "on_success": [str(ok)], "on_failure": [str(ok)],
                     "on_progress": [str(ok)], "progress_every_s": 1}
    data["settings"].update(batch_size=100, min_batch_size=100, max_batch_size=100, batch_pause_ms=40)
    path = write_playbook(data, tmp_path / "pb.yaml")
    env = {"HOOK_DIR": str(tmp_path)}
    for n in (1, 2, 3):
        r = cli("run", str(n), dsn=dsn, playbook_path=path, env=env)
        assert r.returncode == 0, r.stderr
    start = dict(line.split("=", 1) for line in (tmp_path / "start-1-expand").read_text().splitlines())
    assert start["ORCH_PLAYBOOK"] == "workflow_type_enum_to_varchar"
    assert start["ORCH_PHASE_NAME"] == "add_shadow_column" and start["ORCH_STATUS"] == "starting"
    assert start["ORCH_TABLE"] == "public.workflow_templates" and start["ORCH_COLUMN"] == "workflow_type"
    assert "ORCH_DATABASE" in start and "ORCH_ENV" in start
    success = dict(line.split("=", 1) for line in (tmp_path / "success-3-expand").read_text().splitlines())
    assert success["ORCH_STATUS"] == "done" and float(success["ORCH_ELAPSED_S"]) > 0
    progress = dict(line.split("=", 1) for line in (tmp_path / "progress-3-expand").read_text().splitlines())
    assert int(progress["ORCH_ROWS_DONE"]) > 0 and "ORCH_ETA_S" in progress and "ORCH_ROWS_PER_S" in progress
    # a failing phase fires on_failure with the error
    r = cli("run", "5", dsn=dsn, playbook_path=path, env=env)
    assert r.returncode == 3
    failure = dict(line.split("=", 1) for line in (tmp_path / "failure-5-expand").read_text().splitlines()) \
        if (tmp_path / "failure-5-expand").exists() else None
    assert failure is None  # refused before starting: order checks come before any hook


def test_a_failing_hook_is_logged_and_only_stops_the_run_when_asked(dsn, tmp_path):
    seed(dsn, rows=100)
    bad = hook_script(tmp_path, exit_code=7)
    data = simple_dict()
    data["hooks"] = {"on_start": [str(bad)]}
    path = write_playbook(data, tmp_path / "pb.yaml")
    r = cli("--json-logs", "run", "1", dsn=dsn, playbook_path=path, env={"HOOK_DIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert any(json.loads(line).get("event") == "hook failed" for line in r.stderr.splitlines() if line.startswith("{"))
    data["hooks"]["fail_on_error"] = True
    path = write_playbook(data, tmp_path / "pb.yaml")
    r = cli("run", "2", dsn=dsn, playbook_path=path, env={"HOOK_DIR": str(tmp_path)})
    assert r.returncode == 1 and "hook" in r.stderr and "failed" in r.stderr
    assert query(dsn, "SELECT status FROM _orchestrator.phases WHERE phase = 2") == [("failed",)]


def test_environments_select_settings_and_status_shows_them(dsn, tmp_path):
    seed(dsn, rows=500)
    data = simple_dict()
    data["environments"] = {"staging": {"settings": {"batch_size": 100, "min_batch_size": 50}},
                            "production": {"settings": {"lock_timeout_ms": 20}}}
    path = write_playbook(data, tmp_path / "pb.yaml")
    assert cli("--env", "staging", "run", "1", dsn=dsn, playbook_path=path).returncode == 0
    r = cli("--env", "qa", "run", "2", dsn=dsn, playbook_path=path)
    assert r.returncode == 2 and "no such environment" in r.stderr and "staging" in r.stderr
    r = cli("status", "--json", dsn=dsn, playbook_path=path)
    assert json.loads(r.stdout)["phases"][0]["env"] == "staging"
    data["environments"]["production"]["settings"]["batch_size"] = "big"
    path = write_playbook(data, tmp_path / "pb.yaml")
    r = cli("--env", "staging", "run", "2", dsn=dsn, playbook_path=path)
    assert r.returncode == 2 and "environments.production" in r.stderr


def test_run_log_records_every_statement_of_a_full_migration(dsn):
    seed(dsn, rows=2000)
    orch = orchestrator(make_playbook(**{"settings.batch_size": 500, "settings.min_batch_size": 500,
                                         "settings.max_batch_size": 500}), dsn)
    for n in range(1, 7):
        orch.run(n)
    orch.contract()
    orch.close()
    r = cli("log", "--json", "--limit", "1000", dsn=dsn)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    phases = {row["phase"] for row in rows}
    assert {1, 2, 3, 5} <= phases
    statements = " ".join(row["statement"] for row in rows)
    assert "ADD COLUMN IF NOT EXISTS" in statements and "RENAME COLUMN" in statements
    assert "DROP TYPE IF EXISTS" in statements
    batches = [row for row in rows if row["statement"].startswith("backfill batch")]
    assert len(batches) == 4 and all(row["outcome"] == "ok" for row in batches)
    assert all(row["seconds"] is not None for row in rows)
    assert {row["action"] for row in rows} >= {"expand", "contract"}


def test_contract_needs_confirmation_without_a_terminal(dsn):
    seed_chatter(dsn, rows=100)
    orch = orchestrator(real_playbook(), dsn)
    for n in range(1, 7):
        orch.run(n)
    orch.close()
    r = cli("contract", dsn=dsn)
    assert r.returncode == 3 and "--yes" in r.stderr
    assert query(dsn, "SELECT count(*) FROM _orchestrator.phases WHERE status = 'contracted'") == [(0,)]
    assert cli("contract", "--yes", dsn=dsn).returncode == 0


def test_progress_bar_with_eta_on_a_terminal(dsn, tmp_path):
    seed(dsn, rows=60_000)
    data = simple_dict()
    data["settings"].update(batch_size=2000, min_batch_size=2000, max_batch_size=2000, batch_pause_ms=30)
    path = write_playbook(data, tmp_path / "pb.yaml")
    for n in (1, 2):
        assert cli("run", str(n), dsn=dsn, playbook_path=path).returncode == 0
    pid, fd = pty.fork()
    if pid == 0:  # child: the CLI on a terminal
        os.chdir(ROOT)
        env = {**os.environ, "COLUMNS": "160", "TERM": "xterm"}
        os.execvpe(sys.executable, [sys.executable, "-m", "orchestrator", "--dsn", dsn, "--playbook", str(path),
                                    "run", "3"], env)
    output = b""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
    _, status = os.waitpid(pid, 0)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output.decode(errors="replace"))
    assert os.waitstatus_to_exitcode(status) == 0, text[-2000:]
    assert "backfill" in text and "ETA" in text and "rows/s" in text
    assert "phase 3: applied" in text
