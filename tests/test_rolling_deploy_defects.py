"""Issue 26: the rolling deploy tried as a hostile but realistic application would, one reproduction per defect.

Each test names the item of the issue it reproduces; each failed on the code before the fix. Both app versions
connect as the README says (their version schema first on the search_path, prepared statements on).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from orchestrator.engine.errors import BadInput, Refused
from orchestrator.kinds.phases import versions
from orchestrator.lab import chatter
from orchestrator.run.runner import Orchestrator

from .helpers import cli, playbook_dict, query, real_playbook, seed_chatter, write_playbook

OLD, NEW = "chatter_v1", "chatter_v2"


def connect(dsn: str, version: str, **kw) -> psycopg.Connection:
    return psycopg.connect(dsn, autocommit=True, options=f"-csearch_path={version},public", prepare_threshold=0,
                           **kw)


def execute(dsn: str, stmt: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(stmt)


def new_id() -> str:
    return secrets.token_hex(13)[:26].upper()


class ViewTraffic:
    """App connections issuing statements back to back through both versions' views: reads by key, updates of
    another column and of the migrated one, inserts. Every error is kept; `stop()` returns the counts."""

    def __init__(self, dsn: str, connections: int = 4, swapped: bool = False):
        self.dsn, self.stop_at = dsn, threading.Event()
        self.errors: list[str] = []
        self.ops: Counter = Counter()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=((OLD, NEW)[i % 2], i), daemon=True)
                        for i in range(connections)]
        with psycopg.connect(dsn) as conn:
            self.ids = [r[0] for r in conn.execute("SELECT id FROM workflow_templates ORDER BY id LIMIT 50")]

    def __enter__(self):
        for t in self.threads:
            t.start()
        time.sleep(0.3)
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self) -> Counter:
        self.stop_at.set()
        for t in self.threads:
            t.join(timeout=30)
        return self.ops

    def _run(self, version: str, n: int) -> None:
        value = "rag" if version == OLD else "function_chat"
        try:
            conn = connect(self.dsn, version)
        except psycopg.Error as err:  # pragma: no cover - reported by the test
            self.errors.append(f"connect: {err}")
            return
        i = 0
        with conn:
            while not self.stop_at.is_set():
                rid = self.ids[(i * 7 + n) % len(self.ids)]
                kind = ("read", "touch", "write", "insert")[i % 4]
                try:
                    if kind == "read":
                        conn.execute("SELECT * FROM workflow_templates WHERE id = %s", (rid,), prepare=True).fetchone()
                    elif kind == "touch":
                        conn.execute("UPDATE template_specs SET usage_count = usage_count + 1 WHERE id = "
                                     "(SELECT min(id) FROM template_specs)", prepare=True)
                    elif kind == "write":
                        conn.execute("UPDATE workflow_templates SET workflow_type = %s WHERE id = %s",
                                     (value, rid), prepare=True)
                    else:
                        chatter.insert_spec(conn, new_id(), value, schema=version)
                    with self.lock:
                        self.ops[version] += 1
                except psycopg.Error as err:
                    with self.lock:
                        self.errors.append(f"{version} {kind}: {' '.join(str(err).split())}")
                i += 1


@pytest.fixture
def chatter_db(dsn):
    seed_chatter(dsn, rows=400)
    return dsn


def run(pb, dsn, *phases):
    orch = Orchestrator(pb, dsn)
    try:
        return [orch.run(n) for n in phases]
    finally:
        orch.close()


# -- item 1: the swap and its rollback take their locks under traffic through the views ----------------------
def test_item1_swap_and_its_rollback_get_their_locks_under_traffic_through_the_views(chatter_db):
    dsn = chatter_db
    pb = real_playbook(**{"rollback.unmapped": "fallback"})
    run(pb, dsn, 1, 2, 3, 4)
    with ViewTraffic(dsn, connections=4) as load:
        t0 = time.monotonic()
        assert run(pb, dsn, 5) == ["applied"]
        swap_s = time.monotonic() - t0
        orch = Orchestrator(pb, dsn)
        try:
            orch.rollback(5)
            orch.run(5)
        finally:
            orch.close()
        ops = load.stop()
    assert not load.errors, load.errors[:5]
    assert ops[OLD] > 50 and ops[NEW] > 50, ops
    assert swap_s < 20, swap_s
    assert query(dsn, "SELECT status FROM _orchestrator.phases WHERE phase = 5") == [("applied",)]


def test_item1_the_swap_locks_the_views_before_the_tables(chatter_db):
    """The order app statements take (the view, then its table) is the order the swap takes: no inversion."""
    from orchestrator.kinds.phases.swap import lock_tables
    dsn = chatter_db
    pb = real_playbook()
    run(pb, dsn, 1, 2, 3, 4)
    orch = Orchestrator(pb, dsn)
    try:
        ctxs = orch.contexts(orch.facts(register=False))
        stmt = orch.x.render(lock_tables(ctxs))
        views = [orch.x.render(versions.view_name(c, v)) for c in ctxs for v in ("old", "new")]
        tables = [orch.x.render(c.table) for c in ctxs]
    finally:
        orch.close()
    assert all(v in stmt for v in views + tables), stmt
    assert max(stmt.index(v) for v in views) < min(stmt.index(t) for t in tables), stmt


# -- item 2: the new version's INSERT of a value with no enum label is kept ----------------------------------
@pytest.mark.parametrize("variant", ["fallback_with_default", "nullable_refuse"])
def test_item2_new_version_insert_of_an_unlabeled_value_is_kept(chatter_db, variant):
    dsn = chatter_db
    if variant == "fallback_with_default":
        execute(dsn, "ALTER TABLE template_specs ALTER COLUMN workflow_type SET DEFAULT 'plain'")
        pb = real_playbook(**{"rollback.unmapped": "fallback"})
        expect_old = "plain"
    else:
        execute(dsn, "ALTER TABLE template_specs ALTER COLUMN workflow_type DROP NOT NULL")
        execute(dsn, "ALTER TABLE workflow_templates ALTER COLUMN workflow_type DROP NOT NULL")
        pb = real_playbook(**{"target.nullable": True})
        expect_old = None
    run(pb, dsn, 1, 2, 3, 4)
    rid = new_id()
    with connect(dsn, NEW) as new:
        values = chatter.spec_values(rid, "medical_chat")
        stmt = chatter.insert_sql(NEW, chatter.SPECS, tuple(values), returning="workflow_type")
        returned = new.execute(stmt, chatter.insert_params(values)).fetchone()[0]
        updated = new_id()
        chatter.insert_spec(new, updated, "rag_chat", schema=NEW)
        new.execute("UPDATE template_specs SET workflow_type = 'medical_chat' WHERE id = %s", (updated,))
    assert returned == "medical_chat"
    for key in (rid, updated):
        assert query(dsn, "SELECT workflow_type::text, workflow_type_new FROM template_specs WHERE id = %s",
                     (key,)) == [(expect_old, "medical_chat")], key


def test_item2_old_version_insert_still_fills_the_new_column(chatter_db):
    dsn = chatter_db
    pb = real_playbook()
    run(pb, dsn, 1, 2, 3, 4)
    rid = new_id()
    with connect(dsn, OLD) as old:
        chatter.insert_spec(old, rid, "tools", schema=OLD)
    with connect(dsn, NEW) as new:  # the new version, writing a labeled value: the enum side follows
        other = new_id()
        chatter.insert_spec(new, other, "advanced_chat", schema=NEW)
    assert query(dsn, "SELECT workflow_type::text, workflow_type_new FROM template_specs WHERE id = %s",
                 (rid,)) == [("tools", "function_chat")]
    assert query(dsn, "SELECT workflow_type::text, workflow_type_new FROM template_specs WHERE id = %s",
                 (other,)) == [("full", "advanced_chat")]


# -- item 3: the new version's shape does not change under it until the very end -----------------------------
def test_item3_new_version_prepared_select_star_survives_the_whole_contract(chatter_db):
    dsn = chatter_db
    pb = real_playbook(**{"settings.old_version_quiet_s": 0})
    run(pb, dsn, 1, 2, 3, 4)
    with connect(dsn, NEW) as new:
        def read():
            return new.execute("SELECT * FROM workflow_templates ORDER BY id LIMIT 1", prepare=True)

        before = [d.name for d in read().description]
        orch = Orchestrator(pb, dsn)
        try:
            orch.run(5)
            orch.run(6)
            assert [d.name for d in read().description] == before
            for n in range(1, 7):
                orch.contract(n)
                cur = read()  # raised "cached plan must not change result type" after contract 2
                assert [d.name for d in cur.description] == before, n
        finally:
            orch.close()
    # after the contract a new connection of the new version sees the table itself, in the same shape
    with connect(dsn, NEW) as fresh:
        assert [d.name for d in fresh.execute("SELECT * FROM workflow_templates LIMIT 1").description] == before
    assert "workflow_type_old" not in before


# -- item 4: a rollback of the swap stopped part-way leaves the normal sync in place ---------------------------
def test_item4_a_rollback_5_that_gives_up_restores_the_sync(chatter_db):
    dsn = chatter_db
    pb = real_playbook(**{"settings.retries": 3})
    run(pb, dsn, 1, 2, 3, 4, 5)
    blocker = psycopg.connect(dsn)
    blocker.execute("SELECT count(*) FROM template_specs")  # an idle transaction holding ACCESS SHARE
    try:
        orch = Orchestrator(pb, dsn)
        try:
            with pytest.raises(Refused):
                orch.rollback(5)
        finally:
            orch.close()
    finally:
        blocker.close()
    with connect(dsn, NEW) as new:  # the new app's write of a new value must still work
        new.execute("UPDATE template_specs SET workflow_type = 'medical_chat' WHERE id = "
                    "(SELECT min(id) FROM template_specs)")
    assert run(pb, dsn, 5) == ["applied"]


# -- item 5: old-version writes that do not touch the migrated column still count as old-version activity ------
def test_item5_old_version_writes_to_other_columns_hold_the_contract(chatter_db):
    dsn = chatter_db
    pb = real_playbook(**{"settings.old_version_quiet_s": 60})
    run(pb, dsn, 1, 2, 3, 4, 5, 6)
    with connect(dsn, OLD) as old:
        for _ in range(5):
            old.execute("UPDATE template_specs SET usage_count = usage_count + 1 WHERE id = "
                        "(SELECT min(id) FROM template_specs)")
    orch = Orchestrator(pb, dsn)
    try:
        assert orch.status()["app_versions"]["old_last_write"] is not None
        with pytest.raises(Refused, match="old app version"):
            orch.contract()
    finally:
        orch.close()


def test_item5_new_version_writes_are_not_taken_for_the_old_one(chatter_db):
    dsn = chatter_db
    pb = real_playbook(**{"rollback.unmapped": "fallback"})
    run(pb, dsn, 1, 2, 3, 4)
    with connect(dsn, NEW) as new:
        chatter.insert_spec(new, new_id(), "medical_chat", schema=NEW)
        new.execute("UPDATE template_specs SET usage_count = usage_count + 1 WHERE id = "
                    "(SELECT min(id) FROM template_specs)")
    orch = Orchestrator(pb, dsn)
    try:
        assert orch.status()["app_versions"]["old_last_write"] is None
    finally:
        orch.close()


# -- item 14: the printed search_path quotes schema names that need it ----------------------------------------
def test_item14_search_path_hint_works_for_mixed_case_and_spaced_schemas(dsn):
    seed_chatter(dsn, rows=50)
    pb = real_playbook(**{"app_versions.old": "AppV1", "app_versions.new": "app v2"})
    hints = versions.connection_hints(pb)
    assert hints is not None
    run(pb, dsn, 1, 2, 3, 4)
    for version in ("old", "new"):
        option = conninfo_to_dict(hints[version]["dsn_option"])["options"]  # as a DBA pastes it into a DSN
        with psycopg.connect(dsn, options=option) as conn:
            schema = conn.execute("SELECT (current_schemas(false))[1]").fetchone()[0]
            assert schema == (pb.app_versions.old if version == "old" else pb.app_versions.new)
            assert conn.execute(sql.SQL("SELECT count(*) FROM workflow_templates")).fetchone()[0] >= 50


# -- item 6: column-level grants let the new version write the column through its view before the swap ---------
@contextmanager
def app_role(dsn: str, grants: str) -> Iterator[str]:
    """A login role of the app's, given `grants` ({0} is the role); yields its DSN, dropped afterwards."""
    role = f"app_{secrets.token_hex(3)}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'app'").format(sql.Identifier(role)))
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA public TO {0}; " + grants).format(sql.Identifier(role)))
    try:
        yield make_conninfo(dsn, user=role, password="app")
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {0}; DROP ROLE {0}").format(sql.Identifier(role)))


def test_item6_column_grants_reach_the_shadow_column_for_the_new_version(chatter_db):
    dsn = chatter_db
    cols = "id, created_at, updated_at, owner_id, name, description, workflow_type, default_params, usage_count"
    # Column privileges for the writes; SELECT on the table (through a view every column it lists is read).
    grants = (f"GRANT SELECT ON template_specs, users TO {{0}}; GRANT INSERT ({cols}), "
              "UPDATE (workflow_type, usage_count) ON template_specs TO {0}")
    with app_role(dsn, grants) as app:
        run(real_playbook(), dsn, 1, 2, 3, 4)
        with connect(app, NEW) as new:
            rid = new_id()
            new.execute("INSERT INTO template_specs (id, owner_id, name, description, workflow_type, default_params, "
                        "usage_count) VALUES (%s, %s, 'n', 'd', 'function_chat', '{}', 0)", (rid, chatter.OWNERS[0]))
            assert query(dsn, "SELECT workflow_type::text FROM template_specs WHERE id = %s", (rid,)) == [("tools",)]
            new.execute("UPDATE template_specs SET workflow_type = 'rag_chat' WHERE id = "
                        "(SELECT min(id) FROM template_specs)")
            assert new.execute("SELECT workflow_type FROM template_specs WHERE id = (SELECT min(id) FROM "
                               "template_specs)").fetchone()[0] == "rag_chat"


# -- item 7: a role granted table access after the views exist uses its version's views ----------------------
def test_item7_a_role_granted_after_the_views_exist_sees_its_version(chatter_db):
    dsn = chatter_db
    run(real_playbook(), dsn, 1, 2, 3, 4)
    grants = "GRANT SELECT, INSERT, UPDATE ON workflow_templates, template_specs TO {0}; GRANT SELECT ON users TO {0}"
    with app_role(dsn, grants) as app, connect(app, NEW) as new:
        assert new.execute("SELECT (current_schemas(false))[1]").fetchone()[0] == NEW
        rid = new_id()
        chatter.insert_spec(new, rid, "advanced_chat", schema=NEW)
        assert new.execute("SELECT workflow_type FROM template_specs WHERE id = %s", (rid,)).fetchone()[0] \
            == "advanced_chat"


# -- item 8: a STORED generated column elsewhere in the table does not stop phase 2 -----------------------------
def test_item8_a_generated_column_does_not_stop_the_version_views(chatter_db):
    dsn = chatter_db
    execute(dsn, "ALTER TABLE template_specs ADD COLUMN name_length int GENERATED ALWAYS AS (length(name)) STORED")
    pb = real_playbook()
    assert run(pb, dsn, 1, 2, 3, 4, 5) == ["applied"] * 5
    with connect(dsn, OLD) as old:
        rid = new_id()
        chatter.insert_spec(old, rid, "rag", schema=OLD)
        assert old.execute("SELECT name_length > 0 FROM template_specs WHERE id = %s", (rid,)).fetchone()[0]


# -- item 9: a generated column that reads the migrated column is refused at phase 1, naming it ----------------
def test_item9_a_generated_column_reading_the_column_is_refused(chatter_db):
    dsn = chatter_db
    execute(dsn, "ALTER TABLE workflow_templates ADD COLUMN is_rag boolean "
                 "GENERATED ALWAYS AS (workflow_type = 'rag') STORED")
    before = query(dsn, "SELECT count(*) FROM pg_attribute WHERE attrelid = 'workflow_templates'::regclass")
    pb = real_playbook(**{"settings.drop_enum_type": False})
    orch = Orchestrator(pb, dsn)
    try:
        with pytest.raises(BadInput, match="generated column is_rag"):
            orch.run(1)
    finally:
        orch.close()
    assert query(dsn, "SELECT count(*) FROM pg_attribute WHERE attrelid = 'workflow_templates'::regclass") == before


# -- item 10: a DEFAULT on either column of a two-table playbook is accepted ----------------------------------
def test_item10_a_default_on_the_second_table_is_its_own_not_a_blocker(chatter_db):
    dsn = chatter_db
    execute(dsn, "ALTER TABLE template_specs ALTER COLUMN workflow_type SET DEFAULT 'tools'")
    pb = real_playbook()
    assert run(pb, dsn, 1, 2, 3, 4, 5) == ["applied"] * 5
    default = query(dsn, "SELECT column_default FROM information_schema.columns WHERE table_schema = 'public' "
                         "AND table_name = 'template_specs' AND column_name = 'workflow_type'")
    assert default[0][0].startswith("'function_chat'::"), default


# -- item 11: the views follow the table's default as it is now, not as phase 1 saw it -----------------------
def test_item11_views_follow_a_default_changed_during_the_migration(chatter_db):
    dsn = chatter_db
    execute(dsn, "ALTER TABLE template_specs ALTER COLUMN workflow_type SET DEFAULT 'plain'")
    pb = real_playbook()
    run(pb, dsn, 1, 2)
    execute(dsn, "ALTER TABLE template_specs ALTER COLUMN workflow_type SET DEFAULT 'rag'")

    def insert_without_type(version: str) -> tuple[str, str]:
        values = chatter.spec_values(new_id(), "unused")
        del values["workflow_type"]
        with connect(dsn, version) as conn:
            conn.execute(chatter.insert_sql(version, chatter.SPECS, tuple(values)), chatter.insert_params(values))
        return query(dsn, "SELECT workflow_type::text, workflow_type_new FROM template_specs WHERE id = %s",
                     (values["id"],))[0]

    assert insert_without_type(OLD) == ("rag", "rag_chat")
    run(pb, dsn, 3, 4)
    assert insert_without_type(NEW) == ("rag", "rag_chat")
    run(pb, dsn, 5)
    with connect(dsn, NEW) as new:
        values = chatter.spec_values(new_id(), "unused")
        del values["workflow_type"]
        new.execute(chatter.insert_sql(NEW, chatter.SPECS, tuple(values)), chatter.insert_params(values))
    assert query(dsn, "SELECT workflow_type, workflow_type_old::text FROM template_specs WHERE id = %s",
                 (values["id"],)) == [("rag_chat", "rag")]


# -- item 12: partitioned tables are refused in one line ---------------------------------------------------------
def test_item12_a_partitioned_table_is_refused(dsn, tmp_path):
    execute(dsn, "CREATE TYPE workflowtype AS ENUM ('plain', 'tools', 'rag', 'full')")
    execute(dsn, "CREATE TABLE workflow_templates (id text, workflow_type workflowtype NOT NULL, PRIMARY KEY (id)) "
                 "PARTITION BY HASH (id)")
    execute(dsn, "CREATE TABLE workflow_templates_0 PARTITION OF workflow_templates "
                 "FOR VALUES WITH (MODULUS 1, REMAINDER 0)")
    data = playbook_dict()
    data.pop("seed_rows", None)
    data.pop("extra_columns", None)
    path = write_playbook(data, tmp_path / "partitioned.yaml")
    for table in ("workflow_templates", "workflow_templates_0"):
        data["table"]["name"] = table
        write_playbook(data, path)
        r = cli("run", "1", dsn=dsn, playbook_path=path)
        assert r.returncode == 2 and "partitioned or a partition" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    assert query(dsn, "SELECT count(*) FROM pg_attribute WHERE attname = 'workflow_type_new'") == [(0,)]


# -- item 13: under fallback the hint after a target.check refusal leads out of it -------------------------------
def test_item13_target_check_refusal_hint_under_fallback_leads_out(chatter_db):
    dsn = chatter_db
    pb = real_playbook(**{"rollback.unmapped": "fallback"})
    run(pb, dsn, 1, 2, 3, 4)
    rid = new_id()
    with connect(dsn, NEW) as new:
        chatter.insert_spec(new, rid, "Medical Chat", schema=NEW)  # no enum label, breaks the pattern
    orch = Orchestrator(pb, dsn)
    try:
        with pytest.raises(Refused) as err:
            orch.run(5)
        assert "correct those rows" in err.value.hint and rid in err.value.hint, err.value.hint
    finally:
        orch.close()
    execute(dsn, f"UPDATE template_specs SET workflow_type_new = 'medical_chat' WHERE id = '{rid}'")
    assert run(pb, dsn, 5) == ["applied"]


# -- the seed made the column nullable: after the contract its new model may insert NULL; '' is still refused ----
def test_the_reference_playbook_follows_the_seed_nullable_column(chatter_db):
    dsn = chatter_db
    pb = real_playbook()
    assert pb.migrations[0].target.nullable
    run(pb, dsn, 1, 2, 3, 4, 5, 6)
    orch = Orchestrator(pb, dsn)
    try:
        orch.contract()
    finally:
        orch.close()
    with psycopg.connect(dsn, autocommit=True) as conn:  # as the seed's new model (workflow_type=None) writes
        for table, make in ((chatter.TEMPLATES, chatter.template_values), (chatter.SPECS, chatter.spec_values)):
            values = make(new_id(), "unused")
            values["workflow_type"] = None
            conn.execute(chatter.insert_sql("public", table, tuple(values)), chatter.insert_params(values))
            values = make(new_id(), "unused")
            values["workflow_type"] = ""
            with pytest.raises(psycopg.errors.CheckViolation):
                conn.execute(chatter.insert_sql("public", table, tuple(values)), chatter.insert_params(values))
    assert query(dsn, "SELECT count(*) FROM workflow_templates WHERE workflow_type IS NULL") == [(1,)]


# -- found by the model: a value with no label left in the new column after the sync is gone ------------------
@pytest.mark.parametrize("policy", ["fallback", "refuse"])
def test_a_new_value_left_behind_by_a_rolled_back_sync_does_not_outlive_old_writes(chatter_db, policy):
    """Phases 1-4, the new version inserts a value with no enum label, then rollback 4, 3 and 2: without the sync
    that value would stay in the new column while the old version writes the row (to the fallback label, say),
    and the next backfill would keep it, as if the copies agreed. Under fallback the rollback of the sync gives
    it the fallback label's value; under refuse it refuses, naming the row."""
    dsn = chatter_db
    if policy == "refuse":  # a value with no label needs a nullable enum column before the swap
        execute(dsn, "ALTER TABLE template_specs ALTER COLUMN workflow_type DROP NOT NULL")
    pb = real_playbook(**{"rollback.unmapped": policy})
    run(pb, dsn, 1, 2, 3, 4)
    rid = new_id()
    with connect(dsn, NEW) as new:
        chatter.insert_spec(new, rid, "medical_chat", schema=NEW)
    orch = Orchestrator(pb, dsn)
    try:
        orch.rollback(4)
        orch.rollback(3)
        if policy == "refuse":
            with pytest.raises(Refused, match=rid):
                orch.rollback(2)
            return
        orch.rollback(2)
    finally:
        orch.close()
    with connect(dsn, OLD) as old:
        old.execute("UPDATE template_specs SET workflow_type = 'rag' WHERE id = %s", (rid,))
        old.execute("UPDATE template_specs SET workflow_type = 'plain' WHERE id = %s", (rid,))
    run(pb, dsn, 2, 3, 4)
    assert query(dsn, "SELECT workflow_type::text, workflow_type_new FROM template_specs WHERE id = %s",
                 (rid,)) == [("plain", "simple_chat")]
