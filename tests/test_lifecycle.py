"""Every phase, pgroll-style: expand 1..k -> check -> roll back k..1 -> schema and data as before ->
expand everything again -> contract -> the final schema the seed describes. On each PostgreSQL major."""

from __future__ import annotations

import psycopg
import pytest
from psycopg import sql

from orchestrator.engine.errors import Refused
from orchestrator.lab.seed import SeedNames
from orchestrator.lab.snapshot import snapshot_diff

from .helpers import column_values, make_playbook, orchestrator, query, seed, snapshot

N = SeedNames()
T = N.table_ident
MAPPING = {"plain": "simple_chat", "rag": "rag_chat", "tools": "function_chat", "full": "advanced_chat"}


def columns(dsn, names=N) -> dict[str, tuple[str, bool]]:
    rows = query(dsn, """SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull FROM pg_attribute a
                         WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped""",
                 (names.table_ident.as_string(None),))
    return {name: (type_, nn) for name, type_, nn in rows}


def indexes(dsn) -> dict[str, str]:
    return dict(query(dsn, "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'workflow_templates'"))


def triggers(dsn) -> set[str]:
    return {r[0] for r in query(dsn, "SELECT tgname FROM pg_trigger WHERE tgrelid = 'workflow_templates'::regclass "
                                     "AND NOT tgisinternal")}


def insert(dsn, id_, value, column="workflow_type"):
    with psycopg.connect(dsn) as conn:
        conn.execute(sql.SQL("INSERT INTO workflow_templates (id, owner_id, name, {}) VALUES (%s, 'o', 'n', %s)")
                     .format(sql.Identifier(column)), (id_, value))


def one(dsn, column, id_):
    return query(dsn, sql.SQL("SELECT {}::text FROM workflow_templates WHERE id = %s").format(
        sql.Identifier(column)), (id_,))[0][0]


# What must hold once phases 1..k are applied: the "check" of each case.
def after_shadow(dsn):
    cols = columns(dsn)
    assert cols["workflow_type_new"] == ("character varying(50)", False)
    assert cols["is_dynamic"] == ("boolean", True)
    assert cols["execution_pattern"] == ("character varying(100)", False)
    ix = indexes(dsn)
    assert "ix_workflow_templates_workflow_type_ecnew" in ix
    assert {"ix_workflow_templates_is_dynamic", "ix_workflow_templates_execution_pattern"} <= set(ix)


def after_dual_write(dsn):
    assert {"~ec_workflow_type_sync_ins", "~ec_workflow_type_sync_upd"} <= triggers(dsn)
    insert(dsn, "T-INSERT-RAG", "rag")
    assert one(dsn, "workflow_type_new", "T-INSERT-RAG") == "rag_chat"
    assert one(dsn, "execution_pattern", "T-INSERT-RAG") == "chat"
    query_exec(dsn, "UPDATE workflow_templates SET workflow_type = 'tools' WHERE id = 'T-INSERT-RAG'")
    assert one(dsn, "workflow_type_new", "T-INSERT-RAG") == "function_chat"


def after_backfill(dsn):
    bad = query(dsn, """SELECT count(*) FROM workflow_templates WHERE workflow_type_new IS DISTINCT FROM
        CASE workflow_type::text WHEN 'plain' THEN 'simple_chat' WHEN 'rag' THEN 'rag_chat'
        WHEN 'tools' THEN 'function_chat' WHEN 'full' THEN 'advanced_chat' END OR execution_pattern IS NULL""")
    assert bad == [(0,)]


def after_verify(dsn):
    details = query(dsn, "SELECT details FROM _orchestrator.phases WHERE phase = 4")[0][0]
    assert details["parity"]["mismatches"] == 0 and details["parity"]["rows"] >= 2000


def after_swap(dsn):
    cols = columns(dsn)
    assert cols["workflow_type"] == ("character varying(50)", True)
    assert cols["workflow_type_old"] == ("workflowtype", False)
    assert "workflow_type_new" not in cols
    assert "ix_workflow_templates_workflow_type" in indexes(dsn)
    assert "(workflow_type)" in indexes(dsn)["ix_workflow_templates_workflow_type"]
    default = query(dsn, "SELECT pg_get_expr(adbin, adrelid) FROM pg_attrdef WHERE adrelid = "
                         "'workflow_templates'::regclass AND adnum = (SELECT attnum FROM pg_attribute WHERE attrelid = "
                         "'workflow_templates'::regclass AND attname = 'workflow_type')")
    assert default and "simple_chat" in default[0][0]
    insert(dsn, "T-NEW-APP", "rag_chat")
    assert one(dsn, "workflow_type_old", "T-NEW-APP") == "rag"
    insert(dsn, "T-STALE-APP", "full")  # an old app instance still writing old labels
    assert one(dsn, "workflow_type", "T-STALE-APP") == "advanced_chat"
    assert one(dsn, "workflow_type_old", "T-STALE-APP") == "full"


def after_seed(dsn):
    names = {r[0] for r in query(dsn, "SELECT name FROM workflow_templates WHERE owner_id = 'system'")}
    assert names == {"simple_chat_builtin", "rag_chat_builtin", "function_chat_builtin", "advanced_chat_builtin"}


def query_exec(dsn, stmt):
    with psycopg.connect(dsn) as conn:
        conn.execute(stmt)


CHECKS = [after_shadow, after_dual_write, after_backfill, after_verify, after_swap, after_seed]


def assert_final(dsn, before: dict[str, str]):
    cols = columns(dsn)
    assert cols["workflow_type"] == ("character varying(50)", True)
    assert "workflow_type_old" not in cols and "workflow_type_new" not in cols
    assert cols["is_dynamic"] == ("boolean", True) and cols["execution_pattern"][0] == "character varying(100)"
    assert query(dsn, "SELECT count(*) FROM pg_type WHERE typname = 'workflowtype'") == [(0,)]
    assert triggers(dsn) == set()
    ix = indexes(dsn)
    assert {"ix_workflow_templates_workflow_type", "ix_workflow_templates_is_dynamic",
            "ix_workflow_templates_execution_pattern"} <= set(ix)
    after = column_values(dsn)
    for id_, label in before.items():
        assert after[id_] == MAPPING[label], id_
    after_seed(dsn)


@pytest.mark.parametrize("k", range(1, 7), ids=[c.__name__ for c in CHECKS])
def test_phase_expand_rollback_expand_contract(dsn, k):
    seed(dsn)
    pb = make_playbook()
    original_schema, original_values = snapshot(dsn), column_values(dsn)
    orch = orchestrator(pb, dsn)
    try:
        for n in range(1, k + 1):
            assert orch.run(n) == "applied"
        CHECKS[k - 1](dsn)
        for n in range(k, 0, -1):
            assert orch.rollback(n) == "rolled back"
        diff = snapshot_diff(original_schema, snapshot(dsn))
        assert diff == [], diff
        values = column_values(dsn)
        # rows the checks inserted stay (they are app data); every original row is untouched
        assert {i: values[i] for i in original_values} == original_values
        for n in range(1, 7):
            orch.run(n)
        orch.contract()
        assert_final(dsn, original_values)
        assert {r[0] for r in query(dsn, "SELECT status FROM _orchestrator.phases")} == {"contracted"}
    finally:
        orch.close()


def test_rerun_is_a_no_op_and_order_is_enforced(dsn):
    seed(dsn, rows=300)
    orch = orchestrator(make_playbook(), dsn)
    try:
        with pytest.raises(Refused, match="needs phase 1"):
            orch.run(2)
        assert orch.run(1) == "applied"
        assert orch.run(1) == "already applied"
        with pytest.raises(Refused, match="phase 3 .* needs phase 2"):
            orch.run(3)
        orch.run(2)
        with pytest.raises(Refused, match="roll it back before phase 1"):
            orch.rollback(1)
        with pytest.raises(Refused, match="contract needs every phase applied"):
            orch.contract(1)
        for n in range(3, 7):
            orch.run(n)
        with pytest.raises(Refused, match="contract the phases in order"):
            orch.contract(2)
        orch.contract(1)
        with pytest.raises(Refused, match="phase 1 .* is contracted; undo the contract steps from the last one"):
            orch.rollback(6)
    finally:
        orch.close()


def _to_swap(orch):
    for n in range(1, 6):
        orch.run(n)


def test_rollback_of_swap_refuses_when_values_have_no_enum_label(dsn):
    seed(dsn, rows=300)
    orch = orchestrator(make_playbook(), dsn)
    try:
        _to_swap(orch)
        insert(dsn, "T-MED-1", "medical_chat")
        insert(dsn, "T-MED-2", "medical_chat")
        before = snapshot(dsn)
        with pytest.raises(Refused, match=r"lose 2 values .*T-MED-1.*T-MED-2"):
            orch.rollback(5)
        assert snapshot_diff(before, snapshot(dsn)) == []
        assert one(dsn, "workflow_type", "T-MED-1") == "medical_chat"
    finally:
        orch.close()


def test_rollback_of_swap_applies_the_fallback_policy(dsn):
    seed(dsn, rows=300)
    orch = orchestrator(make_playbook(**{"rollback.unmapped": "fallback", "rollback.fallback_label": "full"}), dsn)
    try:
        _to_swap(orch)
        insert(dsn, "T-MED-1", "medical_chat")
        orch.rollback(5)
        assert columns(dsn)["workflow_type"] == ("workflowtype", True)
        assert one(dsn, "workflow_type", "T-MED-1") == "full"
        assert one(dsn, "workflow_type_new", "T-MED-1") == "advanced_chat"
        orch.run(5)  # and forward again
        assert one(dsn, "workflow_type", "T-MED-1") == "advanced_chat"
    finally:
        orch.close()


def test_rollback_of_shadow_refuses_to_drop_app_written_extra_values(dsn):
    seed(dsn, rows=100)
    orch = orchestrator(make_playbook(), dsn)
    try:
        orch.run(1)
        query_exec(dsn, "UPDATE workflow_templates SET execution_pattern = 'batch' WHERE id IN "
                        "(SELECT id FROM workflow_templates ORDER BY id LIMIT 3)")
        with pytest.raises(Refused, match="3 rows"):
            orch.rollback(1)
        assert "execution_pattern" in columns(dsn)
    finally:
        orch.close()


HOSTILE = SeedNames(schema="Sales Dept", table='work"flow templates', column="Wörk type", enum="wf type")


def test_legal_but_hostile_identifiers_work_end_to_end(dsn):
    seed(dsn, HOSTILE, rows=500, enum_default="rag")
    pb = make_playbook(HOSTILE)
    before_schema = snapshot(dsn, HOSTILE.schema)
    before = column_values(dsn, HOSTILE)
    orch = orchestrator(pb, dsn)
    try:
        for n in range(1, 7):
            orch.run(n)
        for n in range(6, 0, -1):
            orch.rollback(n)
        assert snapshot_diff(before_schema, snapshot(dsn, HOSTILE.schema)) == []
        for n in range(1, 7):
            orch.run(n)
        orch.contract()
        after = column_values(dsn, HOSTILE)
        assert all(after[i] == MAPPING[v] for i, v in before.items())
        assert query(dsn, "SELECT count(*) FROM pg_type WHERE typname = 'wf type'") == [(0,)]
    finally:
        orch.close()


def test_a_nullable_enum_column_keeps_its_nulls_both_ways(dsn):
    query_exec(dsn, """CREATE TYPE mood AS ENUM ('ok', 'meh');
        CREATE TABLE notes (id int PRIMARY KEY, m mood);
        INSERT INTO notes SELECT n, CASE n % 3 WHEN 0 THEN NULL WHEN 1 THEN 'ok' ELSE 'meh' END::mood
          FROM generate_series(1, 900) n;""")
    from orchestrator.engine import playbook
    from orchestrator.engine.errors import BadInput
    base = {"name": "notes_mood", "table": {"name": "notes"}, "column": {"name": "m", "enum_type": "mood"},
            "target": {"type": "text", "nullable": False}, "mapping": {"ok": "fine", "meh": "so-so"}}
    with pytest.raises(BadInput, match="target.nullable"):
        orchestrator(playbook.parse(base), dsn).run(1)
    before = snapshot(dsn)
    orch = orchestrator(playbook.parse({**base, "target": {"type": "text", "nullable": True}}), dsn)
    try:
        for n in range(1, 7):
            orch.run(n)
        assert query(dsn, "SELECT count(*) FROM notes WHERE m IS NULL") == [(300,)]
        for n in range(6, 0, -1):
            orch.rollback(n)  # NULLs need no enum label: nothing to refuse
        assert snapshot_diff(before, snapshot(dsn)) == []
        for n in range(1, 7):
            orch.run(n)
        orch.contract()
    finally:
        orch.close()
    assert query(dsn, "SELECT m, count(*) FROM notes GROUP BY m ORDER BY m NULLS FIRST") == [
        (None, 300), ("fine", 300), ("so-so", 300)]


def test_swap_and_its_rollback_set_not_null_without_scanning_the_table(dsn):
    """PostgreSQL says so at DEBUG1 when a valid CHECK proves the column has no NULLs."""
    seed(dsn, rows=500)
    orch = orchestrator(make_playbook(), dsn)
    notices: list[str] = []
    try:
        for n in range(1, 5):
            orch.run(n)
        orch.x.conn.add_notice_handler(lambda d: notices.append(d.message_primary))
        orch.x.conn.execute("SET client_min_messages = debug1")
        orch.run(5)
        assert any("sufficient to prove" in m and "workflow_type_new" in m for m in notices), notices
        notices.clear()
        orch.rollback(5)
        assert any("sufficient to prove" in m and "workflow_type" in m for m in notices), notices
    finally:
        orch.close()


@pytest.mark.parametrize("pg14_blocks", [True, False], ids=["block-ranges", "key-ranges"])
def test_verify_finds_a_drifted_row_and_the_swap_stays_blocked(dsn, pg14_blocks, monkeypatch):
    from orchestrator.engine import parity
    if not pg14_blocks:  # the key-range walk servers before 14 use
        monkeypatch.setattr(parity, "_by_blocks", parity._by_keys)
    seed(dsn, rows=3000)
    orch = orchestrator(make_playbook(**{"settings.verify_chunk_rows": 700}), dsn)
    try:
        for n in (1, 2, 3):
            orch.run(n)
        drifted = query(dsn, "SELECT id FROM workflow_templates ORDER BY id OFFSET 2222 LIMIT 1")[0][0]
        query_exec(dsn, "ALTER TABLE workflow_templates DISABLE TRIGGER USER")
        query_exec(dsn, f"UPDATE workflow_templates SET workflow_type_new = 'rag_chat' "
                        f"WHERE id = '{drifted}' AND workflow_type <> 'rag'")
        query_exec(dsn, f"UPDATE workflow_templates SET workflow_type_new = 'simple_chat' "
                        f"WHERE id = '{drifted}' AND workflow_type = 'rag'")
        query_exec(dsn, "ALTER TABLE workflow_templates ENABLE TRIGGER USER")
        with pytest.raises(Refused, match=f"found 1 of 3000 rows .*{drifted}"):
            orch.run(4)
        with pytest.raises(Refused, match="needs phase 4"):
            orch.run(5)
        result = orch.verify()["workflow_templates.workflow_type"]
        assert (result.rows, result.mismatches, result.sample) == (3000, 1, [drifted])
        orch.rollback(4)
        orch.rollback(3)  # forget the cursor: the re-run re-checks every row and mends the drifted one
        orch.run(3)
        assert orch.run(4) == "applied"
    finally:
        orch.close()
