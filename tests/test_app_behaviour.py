"""The application's own behaviour during a migration, on Chatter's real schema (issue 13): its triggers,
writes that bypass triggers, schema changes made between phases, labels added to the enum, edits of the
built-in rows. Each case ends with the right data or a one-line refusal that changed nothing."""

from __future__ import annotations

import psycopg
import pytest

from orchestrator.engine.errors import Refused
from orchestrator.lab.snapshot import snapshot_diff
from orchestrator.run.runner import Orchestrator

from .helpers import query, real_playbook, seed_chatter, snapshot

T = "workflow_templates"


def execute(dsn: str, *stmts: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for stmt in stmts:
            conn.execute(stmt)


def one(dsn: str, column: str, id_: str, table: str = T):
    return query(dsn, f'SELECT "{column}"::text FROM {table} WHERE id = %s', (id_,))[0][0]


def any_id(dsn: str, table: str = T, label: str = "plain") -> str:
    return query(dsn, f"SELECT id FROM {table} WHERE workflow_type::text = %s ORDER BY id LIMIT 1", (label,))[0][0]


@pytest.fixture
def orch(dsn):
    seed_chatter(dsn, rows=400)
    o = Orchestrator(real_playbook(), dsn)
    yield o
    o.close()


def run(o: Orchestrator, *phases: int) -> None:
    for n in phases:
        assert o.run(n) == "applied"


# 1. An app BEFORE trigger that changes the column -------------------------------------------------------------
@pytest.fixture
def orch_firing(dsn):
    """The app's own triggers are accepted to fire during the backfill (settings.app_triggers: fire)."""
    seed_chatter(dsn, rows=400)
    o = Orchestrator(real_playbook(**{"settings.app_triggers": "fire"}), dsn)
    yield o
    o.close()


def test_an_app_trigger_changing_the_column_is_seen_by_the_sync(dsn, orch_firing):
    orch = orch_firing
    execute(dsn, """CREATE FUNCTION set_type() RETURNS trigger LANGUAGE plpgsql AS $$
                    BEGIN IF NEW.name LIKE 'force%' THEN NEW.workflow_type := 'full'; END IF; RETURN NEW; END $$""",
            "CREATE TRIGGER set_type BEFORE INSERT OR UPDATE ON workflow_templates FOR EACH ROW "
            "EXECUTE FUNCTION set_type()")
    run(orch, 1, 2)
    rid = any_id(dsn)
    execute(dsn, f"UPDATE workflow_templates SET name = 'force it' WHERE id = '{rid}'")  # SET list: name only
    assert (one(dsn, "workflow_type", rid), one(dsn, "workflow_type_new", rid)) == ("full", "advanced_chat")
    run(orch, 3, 4, 5)  # parity holds
    execute(dsn, f"UPDATE workflow_templates SET name = 'force again', workflow_type = 'rag_chat' WHERE id = '{rid}'")
    # after the swap the app trigger writes an old label: translated, and the enum copy follows it
    assert (one(dsn, "workflow_type", rid), one(dsn, "workflow_type_old", rid)) == ("advanced_chat", "full")


def test_a_trigger_that_would_fire_after_the_sync_is_refused(dsn, orch):
    execute(dsn, """CREATE FUNCTION late() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$""",
            'CREATE TRIGGER "~zz_late" BEFORE UPDATE ON template_specs FOR EACH ROW EXECUTE FUNCTION late()')
    run(orch, 1)
    before = snapshot(dsn)
    with pytest.raises(Refused, match="'~zz_late' would fire after the sync"):
        orch.run(2)
    assert snapshot_diff(before, snapshot(dsn)) == []


# 2 and 10. Drift that bypasses the triggers after verify -----------------------------------------------------
def test_a_write_bypassing_the_triggers_after_verify_stops_the_swap(dsn, orch):
    run(orch, 1, 2, 3, 4)
    rid = any_id(dsn, "template_specs")
    execute(dsn, "SET session_replication_role = replica; "
                 f"UPDATE template_specs SET workflow_type = 'rag' WHERE id = '{rid}'")
    before = snapshot(dsn)
    with pytest.raises(Refused, match=f"template_specs.workflow_type: 1 of .* rows changed since phase 4.*{rid}"):
        orch.run(5)
    assert snapshot_diff(before, snapshot(dsn)) == []


def test_verify_checks_a_row_added_past_the_end_during_the_scan(dsn, monkeypatch):
    seed_chatter(dsn, rows=3000)
    execute(dsn, "ALTER TABLE workflow_templates SET (autovacuum_enabled = false)")  # new rows go to the end
    # The walk on one connection: most of these rows fill free space ahead of its cursor rather than extend the
    # table, which only a serial walk is sure to reach; tests/test_verify_speed.py has the end rule on several.
    # In place: a copy packs the table (and its end moves with the rows the log re-copies), which is not the
    # layout this test builds on.
    o = Orchestrator(real_playbook(**{"settings.verify_chunk_rows": 200, "settings.verify_parallelism": 1,
                                      "settings.backfill_method": "update"}), dsn)
    try:
        run(o, 1, 2, 3)
        from orchestrator.engine import parity
        from orchestrator.lab import chatter
        real, calls = parity._tally, []

        def tally(ctx, *args, **kw):
            n = real(ctx, *args, **kw)
            calls.append(ctx.m.label)
            if len(calls) == 1:  # while the scan runs, a write that bypasses the sync lands past its first end
                with psycopg.connect(dsn, autocommit=True) as conn:  # enough rows to extend the table
                    conn.execute("SET session_replication_role = replica")
                    for i in range(300):
                        chatter.insert_template(conn, f"LATE{i:022d}", "plain", workflow_type_new="rag_chat")
            return n
        monkeypatch.setattr(parity, "_tally", tally)
        with pytest.raises(Refused, match="found 300 of 3300 rows of workflow_templates"):
            o.run(4)
    finally:
        o.close()


# 3. The table's shape changed after phase 1 ----------------------------------------------------------------
def test_an_index_created_after_phase_1_stops_the_swap(dsn, orch):
    run(orch, 1, 2, 3, 4)
    execute(dsn, "CREATE INDEX ix_wt_type_name ON workflow_templates (workflow_type, name)")
    with pytest.raises(Refused, match="'ix_wt_type_name'"):
        orch.run(5)
    assert query(dsn, "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = "
                      "'workflow_templates'::regclass AND attname = 'workflow_type'") == [("workflowtype",)]


def test_grants_comment_and_a_new_default_follow_the_column(dsn, orch):
    execute(dsn, "DROP ROLE IF EXISTS app_reader", "CREATE ROLE app_reader",
            "GRANT SELECT (id, workflow_type) ON workflow_templates TO app_reader",
            "COMMENT ON COLUMN workflow_templates.workflow_type IS 'what kind of workflow'")
    run(orch, 1, 2, 3, 4)
    execute(dsn, "ALTER TABLE template_specs ALTER COLUMN workflow_type SET DEFAULT 'rag'")
    run(orch, 5)
    assert query(dsn, "SELECT has_column_privilege('app_reader', 'workflow_templates', 'workflow_type', 'SELECT')") \
        == [(True,)]
    assert query(dsn, "SELECT col_description('workflow_templates'::regclass, attnum) FROM pg_attribute "
                      "WHERE attrelid = 'workflow_templates'::regclass AND attname = 'workflow_type'") == [
        ("what kind of workflow",)]
    assert query(dsn, "SELECT pg_get_expr(adbin, adrelid) FROM pg_attrdef d JOIN pg_attribute a ON a.attrelid = "
                      "d.adrelid AND a.attnum = d.adnum WHERE d.adrelid = 'template_specs'::regclass AND "
                      "a.attname = 'workflow_type'")[0][0].startswith("'rag_chat'")
    assert orch.rollback(5) == "rolled back"  # the default set at the swap comes back
    assert query(dsn, "SELECT pg_get_expr(adbin, adrelid) FROM pg_attrdef d JOIN pg_attribute a ON a.attrelid = "
                      "d.adrelid AND a.attnum = d.adnum WHERE d.adrelid = 'template_specs'::regclass AND "
                      "a.attname = 'workflow_type'")[0][0] == "'rag'::workflowtype"
    execute(dsn, "DROP OWNED BY app_reader", "DROP ROLE app_reader")


# 6. Rolling back the swap never loses a value -------------------------------------------------------------
def test_a_value_written_while_the_swap_rolls_back_is_not_lost(dsn, orch, monkeypatch):
    run(orch, 1, 2, 3, 4, 5)
    rid = any_id(dsn, "template_specs", "simple_chat")
    from orchestrator.kinds.phases.swap import SwapColumns
    real = SwapColumns._resolve_unmapped
    rejected = []

    def late_write(self, ctxs):  # the new app writes a value with no label just as the check runs
        try:
            execute(dsn, f"UPDATE template_specs SET workflow_type = 'medical_chat' WHERE id = '{rid}'")
        except psycopg.errors.CheckViolation as err:
            rejected.append(err)
        return real(self, ctxs)
    monkeypatch.setattr(SwapColumns, "_resolve_unmapped", late_write)
    assert orch.rollback(5) == "rolled back"
    assert rejected and one(dsn, "workflow_type", rid, "template_specs") == "plain"


def test_phase_1_rollback_refuses_to_drop_values_the_enum_column_lacks(dsn):
    seed_chatter(dsn, rows=100)
    execute(dsn, "ALTER TABLE template_specs ALTER COLUMN workflow_type DROP NOT NULL")
    o = Orchestrator(real_playbook(**{"target.nullable": True}), dsn)
    try:
        run(o, 1)
        rid = any_id(dsn, "template_specs")
        execute(dsn, f"UPDATE template_specs SET workflow_type = NULL, workflow_type_new = 'medical_chat' "
                     f"WHERE id = '{rid}'")
        with pytest.raises(Refused, match=f"template_specs.workflow_type lacks .*{rid}"):
            o.rollback(1)
        assert one(dsn, "workflow_type_new", rid, "template_specs") == "medical_chat"
    finally:
        o.close()


# 7. A label added to the enum type during the migration ------------------------------------------------------
def test_a_label_added_to_the_enum_is_refused_before_the_next_phase(dsn, orch):
    run(orch, 1, 2)
    execute(dsn, "ALTER TYPE workflowtype ADD VALUE 'legacy'")
    with pytest.raises(Refused, match="'legacy' was added to public.workflowtype"):
        orch.run(3)
    assert query(dsn, "SELECT status FROM _orchestrator.phases WHERE phase = 3") == [("pending",)]


# 9. Built-in rows the app has made its own ---------------------------------------------------------------
def test_rollback_of_seed_rows_refuses_edited_or_referenced_rows(dsn, orch):
    run(orch, 1, 2, 3, 4, 5, 6)
    execute(dsn, "UPDATE workflow_templates SET description = 'ours now' WHERE id = 'rag_chat_builtin'")
    child = any_id(dsn, label="simple_chat")
    execute(dsn, f"UPDATE workflow_templates SET base_template_id = 'function_chat_builtin' WHERE id = '{child}'")
    with pytest.raises(Refused) as err:
        orch.rollback(6)
    text = str(err.value)
    assert "edited since: rag_chat_builtin" in text and "function_chat_builtin (from workflow_templates." \
        "base_template_id)" in text
    assert query(dsn, "SELECT count(*) FROM workflow_templates WHERE id LIKE '%%_builtin'") == [(4,)]
    # the untouched ones go once the app's rows are dealt with
    execute(dsn, f"UPDATE workflow_templates SET base_template_id = NULL WHERE id = '{child}'",
            "DELETE FROM workflow_templates WHERE id = 'rag_chat_builtin'")
    assert orch.rollback(6) == "rolled back"
    assert query(dsn, "SELECT count(*) FROM workflow_templates WHERE id LIKE '%%_builtin'") == [(0,)]


# 2 (contract). The irreversible step re-checks too --------------------------------------------------------
def test_the_contract_refuses_an_enum_copy_that_drifted_after_the_swap(dsn, orch):
    run(orch, 1, 2, 3, 4, 5, 6)
    rid = query(dsn, "SELECT id FROM workflow_templates WHERE workflow_type = 'rag_chat' LIMIT 1")[0][0]
    execute(dsn, "SET session_replication_role = replica; "
                 f"UPDATE workflow_templates SET workflow_type = 'function_chat' WHERE id = '{rid}'")
    with pytest.raises(Refused, match=f"cannot contract: 1 rows of workflow_templates.workflow_type.*{rid}"):
        orch.contract(old_version_gone=True)
    assert query(dsn, "SELECT count(*) FROM _orchestrator.phases WHERE status = 'contracted'") == [(0,)]
    # The hint: the right value into the wrong copy (a no-op SET x = x no longer recomputes the other one).
    execute(dsn, f"UPDATE workflow_templates SET workflow_type = 'rag_chat' WHERE id = '{rid}'")
    assert orch.contract(old_version_gone=True) == ["contracted"] * 6
