"""The complete way back (issue 14): after the contract, `rollback N` from the last phase down undoes each
contract step online (for the swap: a reverse migration that brings the enum column back), then the phases
themselves; on Chatter's real schema, both tables, under app traffic."""

from __future__ import annotations

import psycopg
import pytest

from orchestrator.engine import executor
from orchestrator.engine.errors import Refused
from orchestrator.engine.state import APPLIED, CONTRACTED
from orchestrator.lab import chatter
from orchestrator.lab.snapshot import ignoring_column_order, snapshot_diff
from orchestrator.lab.traffic import AppTraffic, TrafficReport
from orchestrator.run.runner import Orchestrator

from .helpers import query, real_playbook, reference_dict, seed_chatter, snapshot, write_playbook
from .test_real_schema import TABLES, check_rows, column_type, join_works, values
from .test_reliability_support import argv, error_line, orch_cli

ROLE = "reverse_reader"


def decorate(dsn: str) -> None:
    """What a real schema has and a careless reverse migration would lose: comments and grants on the column
    and on the type (a non-default ACL)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP OWNED BY {ROLE}") if conn.execute(
            "SELECT 1 FROM pg_roles WHERE rolname = %s", (ROLE,)).fetchone() else None
        conn.execute(f"DROP ROLE IF EXISTS {ROLE}")
        conn.execute(f"CREATE ROLE {ROLE}")
        conn.execute(f"GRANT SELECT (id, workflow_type) ON workflow_templates TO {ROLE}")
        conn.execute(f"GRANT UPDATE (workflow_type) ON template_specs TO {ROLE} WITH GRANT OPTION")
        conn.execute("COMMENT ON COLUMN workflow_templates.workflow_type IS 'how the template runs'")
        conn.execute("COMMENT ON TYPE workflowtype IS 'the four built-in workflow types'")
        conn.execute(f"GRANT USAGE ON TYPE workflowtype TO {ROLE}")


def undecorate(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP OWNED BY {ROLE}")
        conn.execute(f"DROP ROLE {ROLE}")


def phase_statuses(orch: Orchestrator) -> list[str]:
    return [r.status for _, r in sorted(orch.state.phases().items())]


def forward_through_contract(orch: Orchestrator, traffic: AppTraffic | None = None) -> None:
    for k in range(1, 7):
        assert orch.run(k) == "applied"
        if k == 5 and traffic is not None:
            traffic.use_new_app(allow_new_only=False)
    assert orch.contract(old_version_gone=True) == ["contracted"] * 6


def test_contract_then_all_the_way_back_then_forward_again_under_traffic(dsn):
    seed_chatter(dsn, rows=3000)
    decorate(dsn)
    original = {t: values(dsn, t) for t in TABLES}
    before = snapshot(dsn)
    orch = Orchestrator(real_playbook(), dsn)
    reports = []
    try:
        traffic = AppTraffic(dsn, chatter.chatter_names(), writers=2, readers=2, chatter=True, new_only_values=())
        with traffic:
            forward_through_contract(orch, traffic)
            assert query(dsn, "SELECT to_regtype('workflowtype')") == [(None,)]
            # Each contract step undone, the last first: the swap's is the reverse migration.
            for k in range(6, 0, -1):
                assert orch.rollback(k) == "contract undone"
                assert phase_statuses(orch) == [CONTRACTED] * (k - 1) + [APPLIED] * (7 - k)
                assert join_works(dsn) > 0
                if k == 5:  # the enum column is back on both tables, in step with the varchar column
                    for table in TABLES:
                        assert query(dsn, f"SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE "
                                          f"attrelid = '{table}'::regclass AND attname = 'workflow_type_old'") == [
                            ("workflowtype",)]
                    assert orch.verify()["workflow_templates.workflow_type"].mismatches == 0
            # Back where the swap left it before the contract: the ordinary rollbacks take it from here.
            for k in range(6, 0, -1):
                if k == 5:
                    traffic.use_old_app()
                assert orch.rollback(k) == "rolled back"
                assert join_works(dsn) > 0
        reports.append(traffic.stop())
        after = snapshot(dsn)
        diff = snapshot_diff(ignoring_column_order(before), ignoring_column_order(after))
        assert diff == [], diff[:8]
        # Only the position differs: the enum column is now each table's last column.
        for table in TABLES:
            assert query(dsn, f"SELECT attname FROM pg_attribute WHERE attrelid = '{table}'::regclass AND attnum > 0 "
                              f"AND NOT attisdropped ORDER BY attnum DESC LIMIT 1") == [("workflow_type",)]
        check_rows(dsn, original, reports[0], new_vocabulary=False)
        assert query(dsn, "SELECT count(*) FROM workflow_templates WHERE id LIKE '%%_builtin'") == [(0,)]
        assert query(dsn, "SELECT to_regnamespace('_orchestrator') IS NULL OR NOT EXISTS (SELECT FROM "
                          "_orchestrator.phases)") == [(True,)]

        # Forward again, through the contract, from the restored original.
        traffic = AppTraffic(dsn, chatter.chatter_names(), writers=2, readers=2, chatter=True, new_only_values=(),
                             seed=1)
        with traffic:
            forward_through_contract(orch, traffic)
        reports.append(traffic.stop())
    finally:
        orch.close()
    for report in reports:
        assert report.errors == [], report.errors[:5]
        assert report.by_kind().get("join", 0) > 0
    assert {column_type(dsn, t) for t in TABLES} == {"character varying(50)"}
    both = TrafficReport(samples=[], written={**reports[0].written, **reports[1].written},
                         written_specs={**reports[0].written_specs, **reports[1].written_specs})
    check_rows(dsn, original, both, new_vocabulary=True)
    undecorate(dsn)


def test_a_contract_step_undone_is_done_again_by_contract(dsn, tmp_path):
    """Undoable until its own contract: `contract 5` after the undo of contract 5 drops the enum column, the
    sync and the type again, and a second undo backfills from the start."""
    seed_chatter(dsn, rows=300)
    orch = Orchestrator(real_playbook(), dsn)
    try:
        forward_through_contract(orch)
        assert "way_back" not in orch.status()
        contracted = snapshot(dsn)
        assert orch.rollback(6) == "contract undone" and orch.rollback(5) == "contract undone"
        assert orch.rollback(5) == "contract already undone"  # the same command again (a crash after its commit)
        # Part-way back, status says where the way back stands, and that phase 2's sync triggers are back.
        way = orch.status()["way_back"]
        assert (way["undone"], way["contracted"], way["next"]) == ([6, 5], [4, 3, 2, 1], "orchestrator rollback 4")
        assert len(way["notes"]) == 1 and "sync triggers are back" in way["notes"][0]
        assert query(dsn, "SELECT count(*) FROM pg_trigger WHERE tgname LIKE '~ec_%'")[0][0] > 0
        shown = orch_cli(dsn, write_playbook(reference_dict(), tmp_path / "pb.yaml"), "status")
        assert shown.returncode == 0, shown.stderr
        assert "contract steps 6, 5 undone, 4, 3, 2, 1 still contracted; next: orchestrator rollback 4" in shown.stdout
        with pytest.raises(Refused, match="phase 4 first"):  # contract steps are undone from the last one
            orch.rollback(6)
        assert orch.contract(5) == ["contracted"] and orch.contract(6) == ["contracted"]
        assert snapshot(dsn) == contracted
        assert orch.rollback(6) == "contract undone" and orch.rollback(5) == "contract undone"
        assert orch.verify()["template_specs.workflow_type"].mismatches == 0
        assert query(dsn, "SELECT count(*) FROM template_specs WHERE workflow_type_old IS NULL") == [(0,)]
        for k in (4, 3, 2, 1):
            assert orch.rollback(k) == "contract undone"
        assert orch.rollback(1) == "contract already undone"
        with pytest.raises(Refused, match="phase 6 .* roll it back before phase 3"):  # out of order, not a re-run
            orch.rollback(3)
        assert orch.rollback(6) == "rolled back"
    finally:
        orch.close()


def test_a_value_without_a_label_refuses_the_reverse_migration_under_refuse(dsn):
    seed_chatter(dsn, rows=200)
    orch = Orchestrator(real_playbook(), dsn)
    try:
        forward_through_contract(orch)
        with psycopg.connect(dsn, autocommit=True) as conn:  # the new app's own vocabulary
            ids = [r[0] for r in conn.execute(
                "UPDATE template_specs SET workflow_type = 'medical_chat' WHERE id IN (SELECT id FROM template_specs "
                "ORDER BY id LIMIT 3) RETURNING id")]
        assert orch.rollback(6) == "contract undone"
        unchanged = snapshot(dsn)
        with pytest.raises(Refused) as err:
            orch.rollback(5)
        text = str(err.value)
        assert "template_specs.workflow_type: 3 rows" in text and all(i in text for i in ids), text
        assert "nothing was changed" in text
        assert snapshot(dsn) == unchanged
        assert phase_statuses(orch) == [CONTRACTED] * 5 + [APPLIED]
    finally:
        orch.close()


def test_a_value_without_a_label_becomes_the_fallback_label_under_fallback(dsn, tmp_path):
    seed_chatter(dsn, rows=200)
    data = reference_dict()
    data["rollback"]["unmapped"] = "fallback"
    data["rollback"]["fallback_label"] = "plain"
    pb_path = write_playbook(data, tmp_path / "fallback.yaml")
    from orchestrator.engine import playbook
    orch = Orchestrator(playbook.load(str(pb_path)), dsn)
    try:
        forward_through_contract(orch)
        with psycopg.connect(dsn, autocommit=True) as conn:
            (rid,) = conn.execute("UPDATE workflow_templates SET workflow_type = 'medical_chat' WHERE id = "
                                  "(SELECT min(id) FROM workflow_templates WHERE is_builtin = false) RETURNING id"
                                  ).fetchone()
        for k in range(6, 0, -1):
            assert orch.rollback(k) == "contract undone"
        for k in range(6, 0, -1):
            assert orch.rollback(k) == "rolled back"
    finally:
        orch.close()
    assert query(dsn, "SELECT workflow_type::text FROM workflow_templates WHERE id = %s", (rid,)) == [("plain",)]
    assert column_type(dsn, chatter.TEMPLATES) == "workflowtype"


def test_a_kill_in_the_middle_of_the_reverse_backfill_is_resumed_by_the_same_command(dsn, tmp_path):
    seed_chatter(dsn, rows=4000, specs=200)
    data = reference_dict()
    data["settings"].update(batch_size=300, min_batch_size=300, max_batch_size=300)
    pb_path = write_playbook(data, tmp_path / "small_batches.yaml")
    for command in [("run", str(k)) for k in range(1, 7)] + [("contract", "--old-version-gone"), ("rollback", "6")]:
        r = orch_cli(dsn, pb_path, *argv(command))
        assert r.returncode == 0, (command, r.stderr[-800:])
    # SIGKILLed right after the reverse backfill's fourth batch UPDATE of workflow_templates, before its commit.
    crash = {executor.CRASH_AT_ENV: 'SET "workflow_type_old" =#4'}
    r = orch_cli(dsn, pb_path, *argv(("rollback", "5")), env=crash)
    assert r.returncode == -9, r.stderr[-800:]
    reverse = query(dsn, "SELECT rows_done, finished_at FROM _orchestrator.backfills WHERE target LIKE '%%reverse%%'")
    assert len(reverse) == 1 and reverse[0][0] == 900 and reverse[0][1] is None, reverse  # three batches kept
    status = query(dsn, "SELECT status, step FROM _orchestrator.phases WHERE phase = 5")
    assert status == [("contracted", "uncontract")]
    r = orch_cli(dsn, pb_path, *argv(("rollback", "5")))
    assert r.returncode == 0, error_line(r) or r.stderr[-800:]
    # Resumed at the cursor: the rows of the three committed batches were not updated again.
    done = dict(query(dsn, "SELECT target, rows_done FROM _orchestrator.backfills WHERE target LIKE '%%reverse%%'"))
    templates = [v for k, v in done.items() if chatter.TEMPLATES in k]
    assert templates == [query(dsn, "SELECT count(*) FROM workflow_templates")[0][0]], done
    for table in TABLES:
        assert query(dsn, f"SELECT count(*) FROM {table} WHERE workflow_type_old IS NULL") == [(0,)]
    r = orch_cli(dsn, pb_path, "verify")
    assert r.returncode == 0, r.stdout + r.stderr
    assert query(dsn, "SELECT status FROM _orchestrator.phases ORDER BY phase") == [
        (CONTRACTED,)] * 4 + [(APPLIED,)] * 2


def test_old_app_instances_come_back_through_their_views_during_the_way_back(dsn):
    """With app_versions, the undo of contract 2 brings both versions' views back, pointed at the swapped
    columns and in the table's original column order: an old-version instance reads and writes its enum labels,
    with prepared statements, before and after the swap back."""
    from .test_app_versions import NEW, OLD, connect, table_columns, view_columns
    seed_chatter(dsn, rows=300)
    original = table_columns(dsn, chatter.SPECS)
    orch = Orchestrator(real_playbook(), dsn)
    try:
        forward_through_contract(orch)
        assert query(dsn, "SELECT to_regnamespace('chatter_v1')") == [(None,)]
        for k in range(6, 1, -1):
            orch.rollback(k)
        old_view, new_view = view_columns(dsn, OLD, chatter.SPECS), view_columns(dsn, NEW, chatter.SPECS)
        assert [c for c, _ in old_view] == original and dict(old_view)["workflow_type"] == "workflowtype"
        assert dict(new_view)["workflow_type"] == "character varying(50)"
        (rid,) = query(dsn, "SELECT min(id) FROM template_specs")[0]
        with connect(dsn, OLD) as old, connect(dsn, NEW) as new:
            read = "SELECT workflow_type::text FROM template_specs WHERE id = %s"
            old.execute("UPDATE template_specs SET workflow_type = 'tools' WHERE id = %s", (rid,))
            assert old.execute(read, (rid,)).fetchone() == ("tools",)
            assert new.execute(read, (rid,)).fetchone() == ("function_chat",)
            orch.rollback(1)  # the last contract step undone: every phase is applied again
            assert orch.rollback(6) == "rolled back" and orch.rollback(5) == "rolled back"  # the swap back
            assert old.execute(read, (rid,)).fetchone() == ("tools",)  # the same prepared statements
            old.execute("UPDATE template_specs SET workflow_type = 'full' WHERE id = %s", (rid,))
            assert new.execute(read, (rid,)).fetchone() == ("advanced_chat",)
        assert [c for c, _ in view_columns(dsn, OLD, chatter.SPECS)] == original
    finally:
        orch.close()


def test_an_index_created_on_the_column_after_the_contract_stops_the_way_back(dsn):
    """The swap back would leave it on the varchar column, which rollback 1 drops: refused, named, unchanged."""
    seed_chatter(dsn, rows=100)
    orch = Orchestrator(real_playbook(), dsn)
    try:
        forward_through_contract(orch)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE INDEX ix_specs_type_name ON template_specs (workflow_type, name)")
        assert orch.rollback(6) == "contract undone"
        unchanged = snapshot(dsn)
        with pytest.raises(Refused, match="template_specs.workflow_type: index 'ix_specs_type_name'"):
            orch.rollback(5)
        assert snapshot(dsn) == unchanged
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("DROP INDEX ix_specs_type_name")
        assert orch.rollback(5) == "contract undone"
    finally:
        orch.close()
