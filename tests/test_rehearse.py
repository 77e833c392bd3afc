"""Rollback rehearsal under live traffic (`orchestrator rehearse`): passes on the reference playbook on
Chatter's real schema (both tables: workflow_templates and template_specs, the app's JOIN probe between
them), refuses a rollback that would lose data in either table (and shows the fallback policy), and reports
a broken rollback as a failure, never as a success. The one-column fixture path is covered too."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import pytest
import structlog
from psycopg import sql
from typer.testing import CliRunner

from orchestrator import kinds
from orchestrator.console.cli import app
from orchestrator.engine import playbook
from orchestrator.engine.errors import BadInput
from orchestrator.engine.sqlkit import Q
from orchestrator.kinds.phases import versions
from orchestrator.kinds.phases.backfill import BackfillPhase
from orchestrator.kinds.phases.dual_write import DualWrite, drop_triggers
from orchestrator.lab import chatter
from orchestrator.lab.rehearse import Check, LockSample, Rehearsal, RehearsalResult, Step, other_policy, rehearse
from orchestrator.lab.rehearse.report import Windows, percentile, render_html, rich_table, svg_plot, write
from orchestrator.lab.traffic import StatementSample

from .helpers import REFERENCE, cli, make_playbook, query, reference_dict

HERE = Path(__file__).resolve().parent
SMALL = HERE / "playbooks" / "small_batches.yaml"  # the reference playbook (both tables) with small batches
FAST = {"settings.batch_size": 1000, "settings.min_batch_size": 100}
TEMPLATES = "workflow_templates.workflow_type"
SPECS = "template_specs.workflow_type"
BOTH = {TEMPLATES, SPECS}
BUILTINS = {"simple_chat_builtin", "rag_chat_builtin", "function_chat_builtin", "advanced_chat_builtin"}


def by_name(checks, fragment: str):
    return [c for c in checks if fragment in c["name"]] if isinstance(checks[0], dict) else \
        [c for c in checks if fragment in c.name]


# -- the whole rehearsal, through the CLI, on Chatter's real schema ------------------------------------------


def test_rehearsal_passes_on_the_reference_playbook(dsn, tmp_path):
    report = tmp_path / "rehearsal.html"
    r = cli("rehearse", "--playbook", str(REFERENCE), "--dsn", dsn, "--rows", "2000", "--writers", "2",
            "--dwell", "0.05", "--report", str(report))
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "rehearsal PASSED" in r.stdout
    assert "Rollback rehearsal" in r.stdout and "refused as designed" in r.stdout  # the table was printed
    data = json.loads(report.with_suffix(".json").read_text())
    assert data["passed"] and data["app_errors"] == 0 and data["app_statements"] > 500
    # Chatter's real schema was built: both tables, generated rows in each (template_specs: rows // 4)
    assert data["tables"] == [TEMPLATES, SPECS]
    assert data["rows_by_table"] == {TEMPLATES: 2000, SPECS: 500} and data["rows"] == 2500
    assert data["builtin_by_table"] == {TEMPLATES: 4, SPECS: 0}
    checks = data["checks"]
    assert all(c["passed"] for c in checks)
    # the rolling deploy: SQLAlchemy instances of both app versions, on asyncpg and psycopg, replaced one by one
    deploy = data["rolling_deploy"]
    assert deploy["old"]["ops"] > 0 and deploy["new"]["ops"] > 0
    assert deploy["old"]["errors"] == deploy["new"]["errors"] == 0
    assert {i.split("(")[1].rstrip(")") for i in deploy["new"]["instances"]} == {"asyncpg", "psycopg"}
    assert [c["passed"] for c in checks if c["name"].startswith("rolling deploy:")] == [True]
    assert "rolling deploy, old app" in r.stdout and "Rolling deploy" in report.read_text()
    # every phase k was run and rolled back, each rollback followed by a catalog comparison and a row check
    # of BOTH tables
    rollbacks = [s for s in data["steps"] if s["action"] == "rollback"]
    assert {s["phase"] for s in rollbacks} == set(range(1, 7))
    assert all(s["schema"] == "identical" for s in rollbacks)
    assert all(set(s["rows_by_table"]) == BOTH and s["rows_by_table"][TEMPLATES] >= 2000
               and s["rows_by_table"][SPECS] >= 500 for s in rollbacks)
    assert sum(1 for c in checks if "schema identical to the original" in c["name"]) >= 6
    for table in BOTH:
        lost = [c for c in checks if f"{table}: no row lost" in c["name"]]
        right = [c for c in checks if f"{table}: every row holds the right value" in c["name"]]
        assert len(lost) >= len(rollbacks) and len(right) >= len(rollbacks)
    # old labels before the swap, new values after it, in both tables
    assert any("enum column: old labels" in c["detail"] for c in by_name(checks, SPECS + ": every row"))
    assert any("varchar column: new values" in c["detail"] for c in by_name(checks, SPECS + ": every row"))
    # built-in rows: present after phase 6, gone once it is rolled back, checked in workflow_templates
    seeds = [c for c in checks if "built-in rows as expected" in c["name"] and TEMPLATES in c["name"]]
    assert any("4 of 4 built-in rows present" in c["detail"] for c in seeds)
    assert any("0 of 4 built-in rows present" in c["detail"] for c in seeds)
    # the new app wrote medical_chat into both tables; the refusal named the rows of both tables, a DBA fix
    # followed for each table, then the swap rolled back
    assert all(c["passed"] for c in by_name(checks, "new app wrote values with no enum label into every table"))
    refused = by_name(checks, "refused as designed")
    assert {t for c in refused for t in c["name"].rsplit("(", 1)[1].rstrip(")").split(", ")} == BOTH
    assert all(re.search(r"refused as designed, naming the rows of \S+", c["detail"])
               and re.search(r": [1-9]\d* rows, e\.g\. ids", c["detail"]) and "would lose" in c["detail"]
               for c in refused)
    fixes = {f["table"]: f for f in data["fixes"]}
    assert set(fixes) == BOTH
    assert all(f["rows"] > 0 and set(f["from"]) == {"medical_chat"} and f["to"] == "simple_chat"
               for f in fixes.values())
    # the fallback copy rewrote the rows of both tables
    (fb,) = by_name(checks, "applied the fallback label")
    assert f"{TEMPLATES}: 0" not in fb["detail"] and f"{SPECS}: 0" not in fb["detail"]
    # the JOIN probe between the two tables ran throughout without a single error
    (join,) = by_name(checks, "JOIN probe")
    assert join["passed"] and "none failed" in join["detail"]
    # then forward through the contract, every row holding the mapped value of what the app last wrote
    final = [s for s in data["steps"] if s["cycle"] == "final: forward + contract"]
    assert [s["phase"] for s in final if s["action"] == "contract"] == list(range(1, 7))
    after = by_name(checks, "after the contract")
    assert len(after) == 6 and all(c["passed"] for c in after)  # both columns and the enum type, each contract
    # then, under the same traffic, the contract undone step by step (the swap's undo, the reverse migration,
    # refused first for medical_chat, the DBA fixes both tables), rolled back to the original, forward again
    cycle = [(s["action"], s["phase"], s["outcome"]) for s in data["steps"] if s["cycle"] == "after contract"]
    ran = [c for c in cycle if c[0] == "dba fix" and c[1] == 5]
    reset = [c for c in cycle if c[0] == "dba fix" and c[1] == 1]  # the new app's is_dynamic, execution_pattern
    assert len(ran) == 2 and len(reset) == 1 and reset[0][2].endswith("values reset")
    assert [c for c in cycle if c[0] != "dba fix"] == (
        [("undo contract", 6, "contract undone"), ("undo contract (refused)", 5, "refused as designed"),
         *[("undo contract", k, "contract undone") for k in range(5, 0, -1)],
         *[("rollback", k, "rolled back") for k in range(6, 1, -1)],
         ("rollback (refused)", 1, "refused as designed"), ("rollback", 1, "rolled back"),
         *[("run", k, "applied") for k in range(1, 7)], *[("contract", k, "contracted") for k in range(1, 7)]])
    steps = {s["n"]: s for s in data["steps"]}
    mine = [c for c in checks if c["step"] and steps[c["step"]]["cycle"] == "after contract"]
    assert len(mine) > 80 and all(c["passed"] for c in mine)
    (reverse_refused,) = [c for c in mine if "(undo of contract 5) refused as designed" in c["name"]]
    assert "reverse migration would lose" in reverse_refused["detail"]
    assert reverse_refused["name"].endswith(f"({TEMPLATES}, {SPECS})")
    names = [c["name"] for c in mine]
    assert "after contract: undo contract 1: schema identical to before the contract (ignoring column order)" in names
    assert "after contract: rollback 1: schema identical to the original (ignoring column order)" in names
    assert "after contract: rollback 1 refused: no table changed" in names  # the new app's values, not dropped
    assert "after contract: contract 6: schema identical to the first contract's (ignoring column order)" in names
    assert sum(1 for n in names if n.endswith("zero app errors during the step")) == 12
    restored = [c for c in mine if c["name"].startswith(f"after contract: rollback 1: {SPECS}: every row holds")]
    assert restored and "enum column: old labels" in restored[0]["detail"]
    # and the database, looked at independently, agrees: both columns varchar, no old label left, built-ins
    for table in ("workflow_templates", "template_specs"):
        assert query(dsn, "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = %s::regclass "
                          "AND attname = 'workflow_type'", (table,)) == [("character varying(50)",)]
        count = sql.SQL("SELECT count(*) FROM {} WHERE workflow_type = ANY(%s)").format(sql.Identifier(table))
        assert query(dsn, count, (list(chatter.LABELS),)) == [(0,)]
        assert query(dsn, count, (["medical_chat"],))[0][0] > 0
    assert {r[0] for r in query(dsn, "SELECT id FROM workflow_templates WHERE is_builtin")} == BUILTINS
    assert query(dsn, "SELECT count(*) FROM pg_type WHERE typname = 'workflowtype'") == [(0,)]
    html = report.read_text()
    assert "<svg" in html and "<polyline" in html and "PASSED" in html
    assert f"<code>{TEMPLATES}</code>" in html and f"<code>{SPECS}</code>" in html
    assert "template_specs 5" in html  # rows checked per table in the steps table
    assert "<script" not in html and "http://" not in html.replace("http://www.w3.org/2000/svg", "")


# -- a rollback that would lose data is refused ------------------------------------------------------------


def test_rollback_that_would_lose_new_values_is_refused(dsn):
    """After the swap the new app writes medical_chat into both tables, which the enum cannot hold: rolling
    back the swap refuses, names the rows of both tables and changes nothing; after the DBA fixes them the
    rehearsal checks exactly that, then the swap rolls back."""
    result = rehearse(playbook.load(SMALL), dsn, rows=2000, writers=2, cycles=[5], both_policies=False,
                      final=False, dwell_s=0.05)
    assert result.passed, result.failed_checks
    assert result.tables == [TEMPLATES, SPECS] and "Chatter's schema" in result.schema_source
    refused = [c for c in result.checks if "refused as designed" in c.name]
    # one refusal names every table's rows, in the phase's order
    assert [c.name.rsplit("(", 1)[1].rstrip(")") for c in refused] == [f"{TEMPLATES}, {SPECS}"]
    assert all(c.passed and "would lose" in c.detail and "ids [" in c.detail for c in refused)
    steps = [s for s in result.steps if s.phase == 5 and s.action != "run"]
    assert [(s.action, s.outcome) for s in steps] == [
        ("rollback (refused)", "refused as designed"), ("dba fix", steps[1].outcome),
        ("dba fix", steps[2].outcome), ("rollback", "rolled back")]
    assert [s.name for s in steps if s.action == "dba fix"] == ["fix workflow_templates", "fix template_specs"]
    for step in (steps[0],):
        assert step.schema == "identical"  # nothing changed
        after_refusal = [c for c in result.checks if c.step == step.n]
        assert {c.name.split(": ")[2] for c in after_refusal if "no row lost" in c.name} == BOTH
        assert all(c.passed for c in after_refusal)
    fixes = {f["table"]: f for f in result.fixes}
    assert set(fixes) == BOTH
    assert all(f["rows"] > 0 and f["to"] == "simple_chat" and set(f["from"]) == {"medical_chat"}
               for f in fixes.values())
    # after the swap rolled back, both columns are the enum again and hold the old labels
    for table in ("workflow_templates", "template_specs"):
        assert query(dsn, "SELECT t.typname FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid "
                          "WHERE a.attrelid = %s::regclass AND a.attname = 'workflow_type'",
                     (table,)) == [("workflowtype",)]
    assert not any("JOIN probe" in c.name and not c.passed for c in result.checks)


def test_fallback_policy_is_rehearsed_too(dsn):
    """The one-column fixture path: an existing table used as it is, the fallback copy after the refusal."""
    pb = make_playbook(**FAST)
    assert other_policy(pb).rollback.unmapped == "fallback"
    assert other_policy(other_policy(pb)).rollback.unmapped == "refuse"
    assert other_policy(pb).fingerprint() != pb.fingerprint()
    # the copy's columns carry the copy's policy (the phases read it from there)
    ref = playbook.load(REFERENCE)
    assert [m.rollback.unmapped for m in ref.migrations] == ["refuse", "refuse"]
    assert [m.rollback.unmapped for m in other_policy(ref).migrations] == ["fallback", "fallback"]
    from .helpers import seed
    seed(dsn, rows=1500)  # a staging database: its table and rows are used as they are
    result = rehearse(pb, dsn, rows=99_999, writers=2, cycles=[5], final=False, dwell_s=0.05)
    assert result.passed, result.failed_checks
    assert result.rows == 1500 and any("no rows were generated" in n for n in result.notes)
    assert result.tables == [TEMPLATES] and not any("JOIN probe" in c.name for c in result.checks)
    assert [s.cycle for s in result.steps if s.action == "run" and s.phase == 1] == ["cycle 5", "cycle 5 (fallback)"]
    (fb,) = [c for c in result.checks if "applied the fallback label" in c.name]
    assert fb.passed and "'plain'" in fb.detail
    assert [c for c in result.checks if c.name == "both rollback policies exercised"][0].passed


def test_playbooks_the_rehearsal_cannot_simulate_are_bad_input(dsn):
    one = reference_dict()
    one["columns"] = one["columns"][:1]  # Chatter's workflow_templates without template_specs
    with pytest.raises(BadInput, match="template_specs"):
        Rehearsal(playbook.parse(one), dsn, rows=10, writers=1)
    # half of Chatter's tables exist (the simplified workflow_templates): neither used nor overwritten
    from .helpers import seed
    seed(dsn, rows=10)
    with pytest.raises(BadInput, match="template_specs.workflow_type: table missing"):
        rehearse(playbook.load(SMALL), dsn, rows=10, writers=1)
    assert query(dsn, "SELECT count(*) FROM workflow_templates") == [(10,)]


# -- after the contract: all the way back, then forward again -------------------------------------------------


def test_after_contract_cycle_under_fallback(dsn):
    """Under `fallback` the swap's undo (the reverse migration) is not refused: the new app keeps writing
    medical_chat, the enum copy holds the fallback label for it, and rolling back the swap rewrites those rows."""
    pb = other_policy(playbook.load(SMALL))
    assert pb.rollback.unmapped == "fallback"
    result = rehearse(pb, dsn, rows=1000, writers=2, cycles=[1], both_policies=False, dwell_s=0.05)
    assert result.passed, result.failed_checks
    cycle = [s for s in result.steps if s.cycle == "after contract"]
    assert [(s.action, s.phase) for s in cycle if s.action in ("undo contract", "rollback")] == (
        [("undo contract", k) for k in range(6, 0, -1)] + [("rollback", k) for k in range(6, 0, -1)])
    assert not any(s.action.endswith("(refused)") for s in cycle)
    (copy,) = [c for c in result.checks if "the enum copy holds the fallback label" in c.name]
    assert copy.passed and "medical_chat" not in copy.detail and "0 without 'plain'" in copy.detail
    assert not copy.detail.startswith(f"{TEMPLATES}: 0 rows")  # there were such rows to map
    (fb,) = [c for c in result.checks if c.name == "after contract: rollback 5 applied the fallback label"]
    assert fb.passed
    # the staging database is left contracted, as before
    assert query(dsn, "SELECT count(*) FROM pg_type WHERE typname = 'workflowtype'") == [(0,)]
    assert query(dsn, "SELECT DISTINCT status FROM _orchestrator.phases") == [("contracted",)]


def test_a_reverse_migration_that_misorders_the_labels_is_caught(dsn, monkeypatch):
    """The undo of the swap's contract recreates the enum type; with its labels in the wrong order every row
    still maps and parity holds, but the catalog differs from the one before the contract: the cycle fails
    there and goes no further."""
    from orchestrator.kinds.phases import old_type
    right = old_type.labels
    monkeypatch.setattr(old_type, "labels", lambda ctx: list(reversed(right(ctx))))
    result = rehearse(playbook.load(SMALL), dsn, rows=1000, writers=2, cycles=[1], both_policies=False,
                      dwell_s=0.05)
    assert not result.passed and result.stopped
    (failed,) = result.failed_checks
    assert failed.name == "after contract: undo contract 1: schema identical to before the contract (ignoring " \
                          "column order)"
    assert "enums:" in failed.detail and "'full', 'rag', 'tools', 'plain'" in failed.detail
    step = next(s for s in result.steps if not s.ok)
    assert (step.cycle, step.action, step.phase, step.schema) == ("after contract", "undo contract", 1, "differs")
    assert step is result.steps[-1]  # nothing ran after it
    assert all(s.ok for s in result.steps[:-1])


# -- broken rollbacks are caught ------------------------------------------------------------------------------


class LeavesFunctionBehind(DualWrite):
    """Test-only: drops the sync triggers but forgets their functions (the phase rolls back every table at
    once: DualWrite.rollback_all)."""

    def rollback_all(self, ctxs) -> None:
        versions.remove_views(ctxs)
        for ctx in reversed(ctxs):
            ctx.x.atomic(*drop_triggers(ctx), lock="SHARE ROW EXCLUSIVE (short)", what="drop sync triggers")
        versions.remove_tracking(ctxs)


class LosesASpec(BackfillPhase):
    """Test-only: its rollback deletes a row of template_specs (the second table) it has no business touching."""

    def rollback(self, ctx) -> None:
        super().rollback(ctx)
        if ctx.m.table.name == "template_specs":
            ctx.x.atomic(Q("DELETE FROM {} WHERE id = (SELECT min(id) FROM {})").format(ctx.table, ctx.table),
                         lock="ROW EXCLUSIVE", what="oops")


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
    saved = structlog.get_config()  # the CLI configures logging onto the runner's (then closed) stderr
    try:
        res = CliRunner().invoke(app, ["--dsn", dsn, "--playbook", str(SMALL), "rehearse", "--rows", "1000",
                                       "--writers", "2", "--phase", "2", "--dwell", "0.05", "--report", str(report)])
    finally:
        structlog.configure(**saved)
    assert res.exit_code == 1, res.output
    assert "rehearsal FAILED" in res.output and "rehearsal PASSED" not in res.output
    data = json.loads(report.with_suffix(".json").read_text())
    assert not data["passed"] and data["stopped"] and data["tables"] == [TEMPLATES, SPECS]
    failed = [c for c in data["checks"] if not c["passed"]]
    assert failed and "schema identical" in failed[0]["name"]
    # the functions of both tables' triggers were left behind, and the catalog comparison names them
    assert "functions: +" in failed[0]["detail"]
    assert "_ec_workflow_templates_workflow_type" in failed[0]["detail"]
    assert "_ec_template_specs_workflow_type" in failed[0]["detail"]
    assert not any(s["action"] == "contract" for s in data["steps"])  # stopped: nothing after a broken step
    assert "FAILED" in report.read_text()


def test_rollback_losing_a_row_of_the_second_table_is_reported_as_failure(dsn, monkeypatch):
    broken_kind(monkeypatch, 2, LosesASpec())
    result = rehearse(playbook.load(SMALL), dsn, rows=1000, writers=2, cycles=[3], dwell_s=0.05)
    assert not result.passed and result.stopped
    (lost,) = [c for c in result.failed_checks if "no row lost" in c.name]
    assert SPECS in lost.name and "1 of" in lost.detail and "rows missing" in lost.detail
    # workflow_templates was checked in the same step, and was fine
    step = next(s for s in result.steps if not s.ok)
    assert step.phase == 3 and step.action == "rollback"
    assert [c.passed for c in result.checks if c.step == step.n and f"{TEMPLATES}: no row lost" in c.name] == [True]


def test_rollback_losing_a_row_is_reported_as_failure(dsn, monkeypatch):
    broken_kind(monkeypatch, 2, LosesARow())
    result = rehearse(make_playbook(**FAST), dsn, rows=1000, writers=2, cycles=[3], dwell_s=0.05)
    assert not result.passed and result.stopped
    (lost,) = [c for c in result.failed_checks if "no row lost" in c.name]
    assert "1 of" in lost.detail and "rows missing" in lost.detail
    assert next(s for s in result.steps if not s.ok).phase == 3


def test_a_started_migration_is_not_rehearsed(dsn):
    import psycopg

    from orchestrator.run.runner import Orchestrator
    with psycopg.connect(dsn) as conn:
        chatter.create_chatter_schema(conn)
        chatter.insert_chatter_rows(conn, 100)
    pb = playbook.load(REFERENCE)
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
    r.tables = ["workflow_templates.workflow_type", "template_specs.workflow_type"]
    r.rows_by_table = {"workflow_templates.workflow_type": 8, "template_specs.workflow_type": 2}
    r.builtin_by_table = {"workflow_templates.workflow_type": 4, "template_specs.workflow_type": 0}
    r.steps[1].rows_by_table = {"workflow_templates.workflow_type": 8, "template_specs.workflow_type": 2}
    r.fixes = [{"cycle": "cycle 2", "table": "template_specs.workflow_type", "rows": 3, "from": {"medical_chat": 3},
                "to": "simple_chat", "label": "plain", "ids": ["A", "B", "C"]}]
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
    data = json.loads(path.with_suffix(".json").read_text())
    assert path.exists() and data["app_errors"] == 1
    # both tables named: in the header (with their rows), per step (rows checked per table), in the fixes
    assert data["tables"] == r.tables and data["steps"][1]["rows_by_table"] == r.steps[1].rows_by_table
    assert "workflow_templates.workflow_type (8 rows, 4 built-in rows); template_specs.workflow_type (2 rows)" in html
    assert "<code>template_specs.workflow_type</code>" in html and "workflow_templates 8 + template_specs 2" in html
    assert "3 rows of <code>template_specs.workflow_type</code>" in html
    assert "template_specs.workflow_type" in str(rich_table(r).title)


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

    from orchestrator.run.runner import Orchestrator

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
