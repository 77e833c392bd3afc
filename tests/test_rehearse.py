"""Rollback rehearsal under live traffic (`orchestrator rehearse`): passes on the reference playbook,
refuses a rollback that would lose data (and shows the fallback policy), and reports a broken rollback
as a failure, never as a success."""

from __future__ import annotations

import json
import shutil
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import pytest
import structlog
from typer.testing import CliRunner

from orchestrator import kinds
from orchestrator.cli import app
from orchestrator.phases.backfill import BackfillPhase
from orchestrator.phases.dual_write import DualWrite, drop_triggers
from orchestrator.rehearse import Check, LockSample, RehearsalResult, Step, other_policy, rehearse
from orchestrator.report import Windows, percentile, render_html, svg_plot, write
from orchestrator.sqlkit import Q
from orchestrator.traffic import StatementSample

from .helpers import REFERENCE, cli, make_playbook

HERE = Path(__file__).resolve().parent
FAST = {"settings.batch_size": 1000, "settings.min_batch_size": 100}


def by_name(checks, fragment: str):
    return [c for c in checks if fragment in c["name"]] if isinstance(checks[0], dict) else \
        [c for c in checks if fragment in c.name]


# -- the whole rehearsal, through the CLI ------------------------------------------------------------


def test_rehearsal_passes_on_the_reference_playbook(dsn, tmp_path):
    report = tmp_path / "rehearsal.html"
    r = cli("rehearse", "--playbook", str(REFERENCE), "--dsn", dsn, "--rows", "2000", "--writers", "2",
            "--dwell", "0.05", "--report", str(report))
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "rehearsal PASSED" in r.stdout
    assert "Rollback rehearsal" in r.stdout and "refused as designed" in r.stdout  # the table was printed
    data = json.loads(report.with_suffix(".json").read_text())
    assert data["passed"] and data["app_errors"] == 0 and data["app_statements"] > 500
    checks = data["checks"]
    assert all(c["passed"] for c in checks)
    # every phase k was run and rolled back, each rollback followed by a catalog comparison and a row check
    rollbacks = [s for s in data["steps"] if s["action"] == "rollback"]
    assert {s["phase"] for s in rollbacks} == set(range(1, 7))
    assert all(s["schema"] == "identical" and s["rows_checked"] >= 2000 for s in rollbacks)
    assert sum(1 for c in checks if "schema identical to the original" in c["name"]) >= 6
    # both rollback policies: the refusal (then a DBA fix) and the fallback copy
    (refused,) = by_name(checks, "refused as designed")
    assert "rollback refused as designed" in refused["detail"] and "rows listed" in refused["detail"]
    assert data["fixes"] and data["fixes"][0]["rows"] > 0 and "medical_chat" in data["fixes"][0]["from"]
    assert by_name(checks, "applied the fallback label")
    # then forward through the contract, every row holding the mapped value of what the app last wrote
    assert [s["phase"] for s in data["steps"] if s["action"] == "contract"] == list(range(1, 7))
    assert by_name(checks, "after the contract")[0]["passed"]
    html = report.read_text()
    assert "<svg" in html and "<polyline" in html and "PASSED" in html
    assert "<script" not in html and "http://" not in html.replace("http://www.w3.org/2000/svg", "")


# -- a rollback that would lose data is refused ------------------------------------------------------------


def test_rollback_that_would_lose_new_values_is_refused(dsn):
    """After the swap the new app writes medical_chat, which the enum cannot hold: rolling back the swap
    refuses, names the rows and changes nothing; the rehearsal checks exactly that."""
    result = rehearse(make_playbook(**FAST), dsn, rows=2000, writers=2, cycles=[5], both_policies=False,
                      final=False, dwell_s=0.05)
    assert result.passed, [c for c in result.failed_checks]
    (refused,) = [c for c in result.checks if "refused as designed" in c.name]
    assert refused.passed and "would lose" in refused.detail and "ids [" in refused.detail
    step = next(s for s in result.steps if s.action == "rollback (refused)")
    assert step.outcome == "refused as designed" and step.schema == "identical"  # nothing changed
    after_refusal = [c for c in result.checks if c.step == step.n]
    assert any("no row lost" in c.name for c in after_refusal) and all(c.passed for c in after_refusal)
    (fix,) = result.fixes
    assert fix["rows"] > 0 and fix["to"] == "simple_chat" and set(fix["from"]) == {"medical_chat"}
    # the DBA fix is what let the rollback through: the swap is rolled back afterwards
    assert [s.outcome for s in result.steps if s.phase == 5 and s.action == "rollback"] == ["rolled back"]


def test_fallback_policy_is_rehearsed_too(dsn):
    pb = make_playbook(**FAST)
    assert other_policy(pb).rollback.unmapped == "fallback"
    assert other_policy(other_policy(pb)).rollback.unmapped == "refuse"
    assert other_policy(pb).fingerprint() != pb.fingerprint()
    from .helpers import seed
    seed(dsn, rows=1500)  # a staging database: its table and rows are used as they are
    result = rehearse(pb, dsn, rows=99_999, writers=2, cycles=[5], final=False, dwell_s=0.05)
    assert result.passed, result.failed_checks
    assert result.rows == 1500 and any("no rows were generated" in n for n in result.notes)
    assert [s.cycle for s in result.steps if s.action == "run" and s.phase == 1] == ["cycle 5", "cycle 5 (fallback)"]
    (fb,) = [c for c in result.checks if "applied the fallback label" in c.name]
    assert fb.passed and "'plain'" in fb.detail
    assert [c for c in result.checks if c.name == "both rollback policies exercised"][0].passed


# -- broken rollbacks are caught ------------------------------------------------------------------------------


class LeavesFunctionBehind(DualWrite):
    """Test-only: drops the sync triggers but forgets their functions."""

    def rollback(self, ctx) -> None:
        ctx.x.atomic(*drop_triggers(ctx), lock="SHARE ROW EXCLUSIVE (short)", what="drop sync triggers")


class LosesARow(BackfillPhase):
    """Test-only: its rollback deletes a row it has no business touching."""

    def rollback(self, ctx) -> None:
        super().rollback(ctx)
        ctx.x.atomic(Q("DELETE FROM {} WHERE id = (SELECT min(id) FROM {})").format(ctx.table, ctx.table),
                     lock="ROW EXCLUSIVE", what="oops")


def broken_kind(monkeypatch, index: int, phase) -> None:
    original = kinds.KINDS["enum_to_varchar"]

    def kind():
        phases = original()
        phases[index] = phase
        return phases
    monkeypatch.setitem(kinds.KINDS, "enum_to_varchar", kind)


def test_rollback_leaving_an_object_behind_is_reported_as_failure(dsn, tmp_path, monkeypatch):
    broken_kind(monkeypatch, 1, LeavesFunctionBehind())
    report = tmp_path / "broken.html"
    pb_path = HERE / "playbooks" / "small_batches.yaml"
    saved = structlog.get_config()  # the CLI configures logging onto the runner's (then closed) stderr
    try:
        res = CliRunner().invoke(app, ["--dsn", dsn, "--playbook", str(pb_path), "rehearse", "--rows", "1000",
                                       "--writers", "2", "--phase", "2", "--dwell", "0.05", "--report", str(report)])
    finally:
        structlog.configure(**saved)
    assert res.exit_code == 1, res.output
    assert "rehearsal FAILED" in res.output and "rehearsal PASSED" not in res.output
    data = json.loads(report.with_suffix(".json").read_text())
    assert not data["passed"] and data["stopped"]
    failed = [c for c in data["checks"] if not c["passed"]]
    assert failed and "schema identical" in failed[0]["name"]
    assert "functions: +" in failed[0]["detail"] and "_ec_workflow_templates_workflow_type" in failed[0]["detail"]
    assert not any(s["action"] == "contract" for s in data["steps"])  # stopped: nothing after a broken step
    assert "FAILED" in report.read_text()


def test_rollback_losing_a_row_is_reported_as_failure(dsn, monkeypatch):
    broken_kind(monkeypatch, 2, LosesARow())
    result = rehearse(make_playbook(**FAST), dsn, rows=1000, writers=2, cycles=[3], dwell_s=0.05)
    assert not result.passed and result.stopped
    (lost,) = [c for c in result.failed_checks if "no row lost" in c.name]
    assert "1 of" in lost.detail and "rows missing" in lost.detail
    assert next(s for s in result.steps if not s.ok).phase == 3


def test_a_started_migration_is_not_rehearsed(dsn):
    from orchestrator.runner import Orchestrator

    from .helpers import seed
    seed(dsn, rows=100)
    pb = make_playbook()
    orch = Orchestrator(pb, dsn)
    try:
        orch.run(1)
    finally:
        orch.close()
    r = cli("rehearse", "--rows", "100", dsn=dsn, playbook_path=REFERENCE)
    assert r.returncode == 2 and "already started" in r.stderr


# -- the report on its own -------------------------------------------------------------------------------------


def synthetic() -> RehearsalResult:
    r = RehearsalResult(playbook="demo", playbook_source="demo.yaml", policy="refuse", database="db", server="pg",
                        rows=10, writers=2, readers=1, started_at=datetime(2025, 1, 1, tzinfo=timezone.utc),
                        finished_at=datetime(2025, 1, 1, 0, 0, 12, tzinfo=timezone.utc))
    r.steps = [Step(1, "cycle 1", "run", 1, "add_shadow_column", 0.0, 3.0, "applied"),
               Step(2, "cycle 1", "rollback", 1, "add_shadow_column", 4.0, 6.0, "rolled back", rows_checked=10,
                    schema="identical"),
               Step(3, "cycle 2 (fallback)", "rollback (refused)", 5, "swap", 7.0, 8.0, "refused as designed"),
               Step(4, "final: forward + contract", "contract", 1, "add_shadow_column", 9.0, 11.0, "contracted")]
    r.samples = [StatementSample(t / 10, "insert", 1.0 + (t % 7), None) for t in range(120)]
    r.samples.append(StatementSample(2.9, "update_col", 400.0, None))  # started in step 1, ends in the gap
    r.samples.append(StatementSample(10.0, "insert", 2.0, "boom"))
    r.lock_samples = [LockSample(3.1, 1, 120.0, "relation")]
    r.checks = [Check("x", True, "fine", 1)]
    return r


def test_window_figures():
    assert percentile([1, 2, 3, 4], 50) == 2 and percentile([1, 2, 3, 4], 99) == 4 and percentile([], 50) == 0
    w = Windows(synthetic())
    st = w.stats(3.0, 3.5)
    assert st.max == 400.0  # a statement that started before the window but was still waiting in it
    assert st.lock_waiting_polls == 1 and st.lock_wait_ms == 120.0
    assert w.stats(9.0, 11.0).errors == 1


def test_html_report_is_self_contained(tmp_path):
    r = synthetic()
    html = render_html(r)
    assert "FAILED" in html  # an app error fails the verdict
    assert "<script" not in html and "<link" not in html and "src=" not in html
    svg = svg_plot(r)
    assert svg.count("<rect") >= 5 and "cycle 1" in svg and "+1" in svg and "-5" in svg and "C1" in svg
    path = write(r, tmp_path / "sub" / "r.html")
    assert path.exists() and json.loads(path.with_suffix(".json").read_text())["app_errors"] == 1


@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")),
                    reason="no chromium to render the report with")
def test_html_report_renders_in_a_headless_browser(tmp_path):
    path = write(synthetic(), tmp_path / "r.html")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1280,900"]
    dom = subprocess.run([browser, *flags, "--dump-dom", path.as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    assert "<polyline" in dom and "<svg" in dom  # parsed as inline SVG by the browser
    png = tmp_path / "r.png"
    subprocess.run([browser, *flags, f"--screenshot={png}", path.as_uri()], capture_output=True, timeout=120)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 30_000  # a blank page compresses to a few KB


# -- a lost update the rehearsal found -----------------------------------------------------------------------------


def test_fallback_rollback_does_not_overwrite_a_concurrent_app_write(dsn):
    """Rolling back the swap under `fallback` rewrites rows with no enum label. An app write that lands on
    such a row while the rewrite waits for its row lock must win: the rewrite re-checks the row (first
    seen in a rehearsal: 'wrote rag, holds plain')."""
    import threading
    import time

    import psycopg

    from orchestrator.runner import Orchestrator

    from .helpers import query, seed
    seed(dsn, rows=200)
    pb = make_playbook(**{"rollback.unmapped": "fallback", "settings.lock_timeout_ms": 10_000})
    orch = Orchestrator(pb, dsn)
    try:
        for n in range(1, 6):
            orch.run(n)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("INSERT INTO workflow_templates (id, owner_id, name, workflow_type) "
                         "VALUES ('RACE', 'o', 'n', 'medical_chat')")
        app = psycopg.connect(dsn)
        app.execute("UPDATE workflow_templates SET workflow_type = 'rag' WHERE id = 'RACE'")  # not committed
        errors = []

        def roll_back():
            try:
                orch.rollback(5)
            except Exception as err:  # noqa: BLE001 - reported below
                errors.append(err)
        t = threading.Thread(target=roll_back)
        t.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not query(
                dsn, "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                     "AND query LIKE 'UPDATE%%'")[0][0]:
            time.sleep(0.02)
        app.commit()  # the app's write lands while the fallback rewrite waits for the row
        app.close()
        t.join(timeout=60)
        assert not errors, errors
    finally:
        orch.close()
    assert query(dsn, "SELECT workflow_type::text FROM workflow_templates WHERE id = 'RACE'") == [("rag",)]
