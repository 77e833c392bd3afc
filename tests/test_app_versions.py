"""A schema of views per app version (issue 12), on Chatter's real schema: the old version keeps the enum,
the new one sees varchar, both write both columns, the swap is invisible to both, the contract waits for the
old version to be gone."""

from __future__ import annotations

import json
import time

import psycopg
import pytest

from orchestrator.engine.errors import Refused
from orchestrator.lab import chatter
from orchestrator.run.runner import Orchestrator

from .helpers import cli, query, real_playbook, seed_chatter, snapshot

OLD, NEW = "chatter_v1", "chatter_v2"


def connect(dsn: str, version: str) -> psycopg.Connection:
    """How an app version connects: its schema first on the search_path (prepared statements on)."""
    return psycopg.connect(dsn, autocommit=True, options=f"-csearch_path={version},public", prepare_threshold=0)


def view_columns(dsn: str, schema: str, table: str) -> list[tuple[str, str]]:
    return query(dsn, """SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a
                         WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 ORDER BY a.attnum""",
                 (f"{schema}.{table}",))


def table_columns(dsn: str, table: str) -> list[str]:
    return [r[0] for r in query(dsn, """SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass
                                         AND attnum > 0 AND NOT attisdropped ORDER BY attnum""", (table,))]


@pytest.fixture
def orch(dsn):
    seed_chatter(dsn, rows=300)
    o = Orchestrator(real_playbook(), dsn)
    yield o
    o.close()


def write_through_both(dsn: str, tag: str) -> dict[str, tuple[str, str]]:
    """Each version inserts and updates a row of each table; returns id -> (what it wrote, table)."""
    done = {}
    with connect(dsn, OLD) as old, connect(dsn, NEW) as new:
        for conn, value, version in ((old, "rag", OLD), (new, "medical_chat", NEW)):
            for table, insert in ((chatter.TEMPLATES, chatter.insert_template), (chatter.SPECS, chatter.insert_spec)):
                rid = f"{tag}{version[-2:]}{table[:4]}".upper().ljust(26, "0")[:26]
                values = insert(conn, rid, value, schema=version) if conn is old else \
                    insert(conn, rid, "function_chat", schema=version)  # through the version's view
                done[rid] = (values["workflow_type"], table)
                conn.execute(f"UPDATE {table} SET workflow_type = %s WHERE id = %s", (value, rid))
                done[rid] = (value, table)
    return done


def test_versions_see_their_own_vocabulary_and_writes_reach_both_columns(dsn, orch):
    original = {t: table_columns(dsn, t) for t in (chatter.TEMPLATES, chatter.SPECS)}
    pb = orch.pb.model_copy(update={"rollback": orch.pb.rollback.model_copy(
        update={"unmapped": "fallback", "fallback_label": "plain"})})
    orch.close()
    orch = Orchestrator(pb, dsn)
    try:
        for n in (1, 2, 3):
            orch.run(n)
        assert query(dsn, "SELECT to_regclass('chatter_v2.workflow_templates') IS NULL") == [(True,)]
        orch.run(4)  # every row has its new value: the new version exists from here
        for table in (chatter.TEMPLATES, chatter.SPECS):
            old, new = view_columns(dsn, OLD, table), view_columns(dsn, NEW, table)
            assert [c for c, _ in old] == original[table]  # the table's own order
            assert dict(old)["workflow_type"] == "workflowtype"
            assert dict(new)["workflow_type"] == "character varying(50)"
            # the new version sees the shape the table has after the contract: the varchar column where it
            # stands (after the table's own columns), then the new columns
            after_contract = ["workflow_type" if c == "workflow_type_new" else c
                              for c in table_columns(dsn, table) if c != "workflow_type"]
            assert [c for c, _ in new] == after_contract
            assert after_contract[:len(original[table])] == [c for c in original[table] if c != "workflow_type"] + [
                "workflow_type"]
        assert "is_dynamic" in dict(view_columns(dsn, NEW, chatter.TEMPLATES))
        assert "is_dynamic" not in dict(view_columns(dsn, OLD, chatter.TEMPLATES))
        # prepared statements of both versions, before the swap
        with connect(dsn, OLD) as old, connect(dsn, NEW) as new:
            rid = old.execute("SELECT id FROM workflow_templates WHERE workflow_type = 'rag' LIMIT 1").fetchone()[0]
            read = "SELECT workflow_type::text, * FROM workflow_templates WHERE id = %s"
            for _ in range(3):
                assert old.execute(read, (rid,), prepare=True).fetchone()[0] == "rag"
                assert new.execute(read, (rid,), prepare=True).fetchone()[0] == "rag_chat"
            before = write_through_both(dsn, "A")
            assert orch.run(5) == "applied"
            # after the swap, the same prepared statements on the same connections: nothing noticed
            for _ in range(3):
                assert old.execute(read, (rid,), prepare=True).fetchone()[0] == "rag"
                assert new.execute(read, (rid,), prepare=True).fetchone()[0] == "rag_chat"
        after = write_through_both(dsn, "B")
        orch.run(6)
        mapping = pb.migrations[0].mapping
        for rid, (value, table) in {**before, **after}.items():
            new_value, old_value = query(dsn, f"SELECT workflow_type, workflow_type_old::text FROM {table} "
                                              f"WHERE id = %s", (rid,))[0]
            if value in mapping:  # written by the old version
                assert (old_value, new_value) == (value, mapping[value]), rid
            else:  # the new version's value with no label: the fallback label on the enum side
                assert (new_value, old_value) == (value, "plain"), rid
        # each version reads its own vocabulary
        with connect(dsn, OLD) as old, connect(dsn, NEW) as new:
            assert ({r[0] for r in old.execute("SELECT DISTINCT workflow_type::text FROM template_specs")}
                    <= set(mapping))
            assert "medical_chat" in {r[0] for r in new.execute("SELECT DISTINCT workflow_type FROM template_specs")}
    finally:
        orch.close()


def test_rollback_of_phase_1_removes_the_versions(dsn, orch):
    before = snapshot(dsn)
    orch.run(1)  # the old version's schema comes before the tables grow columns; the new one's after verify
    assert query(dsn, "SELECT count(*) FROM pg_namespace WHERE nspname IN (%s, %s)", (OLD, NEW)) == [(1,)]
    after_1 = snapshot(dsn)
    orch.run(2)
    orch.rollback(2)
    assert snapshot(dsn) == after_1
    assert query(dsn, "SELECT count(*) FROM pg_namespace WHERE nspname = %s", (OLD,)) == [(1,)]
    orch.rollback(1)
    assert snapshot(dsn) == before
    assert query(dsn, "SELECT count(*) FROM pg_namespace WHERE nspname IN (%s, %s)", (OLD, NEW)) == [(0,)]


def test_contract_waits_for_the_old_version_to_be_quiet(dsn):
    seed_chatter(dsn, rows=100)
    orch = Orchestrator(real_playbook(**{"settings.old_version_quiet_s": 2}), dsn)
    try:
        for n in range(1, 7):
            orch.run(n)
        st = orch.status()["app_versions"]
        assert st["old"]["search_path"] == "chatter_v1, public" and st["new"]["schema"] == NEW
        assert st["old_last_write"] is None
        with connect(dsn, OLD) as old:  # a straggling old instance
            old.execute("UPDATE template_specs SET workflow_type = 'tools' WHERE id = "
                        "(SELECT id FROM template_specs WHERE workflow_type <> 'tools' LIMIT 1)")
        assert orch.status()["app_versions"]["old_last_write"] is not None
        with pytest.raises(Refused, match="old app version .* wrote .*old_version_quiet_s") as err:
            orch.contract()
        assert "--old-version-gone" in err.value.hint
        assert query(dsn, "SELECT count(*) FROM _orchestrator.phases WHERE status = 'contracted'") == [(0,)]
        time.sleep(3)  # the quiet period passes
        assert orch.contract() == ["contracted"] * 6
        assert query(dsn, "SELECT count(*) FROM pg_namespace WHERE nspname IN (%s, %s)", (OLD, NEW)) == [(0,)]
        # the new version's search_path now falls through to the table itself
        with connect(dsn, NEW) as new:
            assert new.execute("SELECT count(*) FROM workflow_templates WHERE workflow_type = 'rag_chat'"
                               ).fetchone()[0] > 0
    finally:
        orch.close()


def test_status_and_plan_say_what_each_version_connects_with(dsn, orch):
    orch.run(1)
    r = cli("status", "--json", dsn=dsn)
    assert r.returncode == 0, r.stderr
    versions = json.loads(r.stdout)["app_versions"]
    assert versions["old"]["dsn_option"] == "options=-csearch_path=chatter_v1,public"
    assert versions["new"]["search_path"] == "chatter_v2, public"
    plan = cli("plan", "--no-lint", dsn=dsn)
    assert "options=-csearch_path=chatter_v1,public" in plan.stdout and "chatter_v2" in plan.stdout
