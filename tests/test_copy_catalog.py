"""Phase 3 by copy and the catalog around the table: what holds the table by its OID (a SQL-standard function body,
another table's policy, a view, extended statistics, ...) would follow the table renamed away by the swap, so each
is refused by name before anything changes, and again under the swap's lock; a publication that would publish the
twin too."""

from __future__ import annotations

import difflib
import random
import subprocess

import psycopg
import psycopg.conninfo
import psycopg.sql
import pytest

from orchestrator.engine.errors import OrchestratorError
from orchestrator.kinds.phases import copy as copy_mod
from orchestrator.lab import server
from orchestrator.lab.snapshot import snapshot_diff

from .helpers import query, real_playbook, seed_chatter, snapshot
from .helpers import run_steps as run
from .test_copy_backfill import copied_up_to_the_swap

COPY = {"settings.backfill_method": "copy", "settings.batch_size": 500, "settings.min_batch_size": 100,
        "settings.max_batch_size": 1000}
TWINS = "SELECT count(*) FROM pg_class WHERE relname LIKE '\\_ec\\_copy\\_%' OR relname LIKE '\\_ec\\_old\\_%'"
NOTES = ("CREATE TABLE IF NOT EXISTS notes (id int PRIMARY KEY, owner text); "
         "CREATE OR REPLACE FUNCTION noop() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NULL; END$$")

# Each kind of object bound to workflow_templates by OID: (the statements creating it, what the refusal must say,
# the oldest major that has it).
BOUND = {
    "SQL-standard function body": (
        "CREATE FUNCTION add_template(p text) RETURNS void LANGUAGE sql BEGIN ATOMIC "
        "UPDATE workflow_templates SET name = p WHERE id = p; END",
        r"function add_template\(text\) has a SQL-standard body", 14),
    "policy of another table": (
        f"{NOTES}; ALTER TABLE notes ENABLE ROW LEVEL SECURITY; CREATE POLICY by_owner ON notes "
        "USING (EXISTS (SELECT FROM workflow_templates w WHERE w.owner_id = notes.owner))",
        "policy by_owner on table notes reads it", 10),
    "view": ("CREATE VIEW report AS SELECT id, name FROM workflow_templates", "view report reads it", 10),
    "materialized view": ("CREATE MATERIALIZED VIEW counts AS SELECT count(*) FROM workflow_templates",
                          "materialized view counts reads it", 10),
    "rule": ("CREATE RULE keep AS ON DELETE TO workflow_templates DO ALSO NOTHING",
             "rule keep on table workflow_templates: a copy does not carry rules", 10),
    "extended statistics": ("CREATE STATISTICS wt_stats ON name, owner_id FROM workflow_templates",
                            "statistics object wt_stats: a copy does not carry extended statistics", 10),
    "function of the row type": ("CREATE FUNCTION label(workflow_templates) RETURNS text LANGUAGE sql "
                                 "AS 'SELECT $1.name'", r"function label\(workflow_templates\) uses its row type", 10),
    "column of the row type": ("CREATE TABLE kept (id int PRIMARY KEY, t workflow_templates)",
                               "column t of table kept uses its row type", 10),
    "constraint trigger of another table": (
        f"{NOTES}; CREATE CONSTRAINT TRIGGER watch AFTER INSERT ON notes FROM workflow_templates "
        "FOR EACH ROW EXECUTE FUNCTION noop()",
        "trigger watch on table notes is bound to it", 10),
    "default naming the table": (
        "ALTER TABLE workflow_templates ADD COLUMN src regclass DEFAULT 'workflow_templates'::regclass",
        "default value for column src of table workflow_templates names the table itself", 10),
    "publication of the table": ("CREATE PUBLICATION pub_wt FOR TABLE workflow_templates",
                                 "it is published .*publication pub_wt", 10),
    "publication of every table": ("CREATE PUBLICATION pub_all FOR ALL TABLES",
                                   r"publication pub_all \(FOR ALL TABLES\) would publish the copy", 10),
    "publication of the schema": ("CREATE PUBLICATION pub_public FOR TABLES IN SCHEMA public",
                                  r"publication pub_public \(FOR TABLES IN SCHEMA public\) would publish the copy",
                                  15),
}


def skip_before(dsn: str, major: int) -> None:
    if query(dsn, "SHOW server_version_num")[0][0] < str(major * 10000):
        pytest.skip(f"PostgreSQL {major}+")


@pytest.mark.parametrize("kind", list(BOUND))
def test_an_object_bound_to_the_table_by_oid_is_refused_by_name_before_anything_changes(dsn, kind):
    statement, named, since = BOUND[kind]
    skip_before(dsn, since)
    seed_chatter(dsn, 300, 50)
    pb = real_playbook(**COPY)
    run(pb, dsn, 1, 2)
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(statement)
    before = snapshot(dsn)
    with pytest.raises(OrchestratorError, match=f"cannot copy workflow_templates.*: .*{named}") as err:
        run(pb, dsn, 3)
    assert "settings.backfill_method: update" in err.value.hint
    assert "\n" not in str(err.value)
    assert str(err.value).count("; ") == 1, "the one object is the only reason"
    assert snapshot_diff(before, snapshot(dsn)) == []
    assert query(dsn, TWINS) == [(0,)]


# Created after the check before the swap, before its lock: the check under the lock refuses them.
RACES = ["SQL-standard function body", "policy of another table", "publication of the schema"]


@pytest.mark.parametrize("kind", RACES)
def test_an_object_bound_to_the_table_while_the_swap_takes_its_lock_is_refused_under_it(dsn, monkeypatch, kind):
    statement, named, since = BOUND[kind]
    skip_before(dsn, since)
    seed_chatter(dsn, 300, 50)
    pb = real_playbook(**COPY)
    run(pb, dsn, 1, 2)
    original = copy_mod.versions.rebuilt_views  # called after the early checks, before the lock

    def with_ddl(ctx):
        if ctx.m.table.name == "workflow_templates":
            with psycopg.connect(dsn, autocommit=True) as c:
                c.execute(statement)
        return original(ctx)

    monkeypatch.setattr(copy_mod.versions, "rebuilt_views", with_ddl)
    with pytest.raises(OrchestratorError, match=f"cannot swap the copy of workflow_templates.* in: .*{named}") as err:
        run(pb, dsn, 3)
    assert str(err.value).count("; ") == 1, "the one object is the only reason"
    monkeypatch.setattr(copy_mod.versions, "rebuilt_views", original)
    # Nothing swapped: the table is the app's, its twin kept, the object still bound to the table.
    assert query(dsn, "SELECT count(*) FROM pg_class WHERE relname LIKE '\\_ec\\_old\\_%'") == [(0,)]
    assert query(dsn, "SELECT count(*) FROM pg_class WHERE relname LIKE '\\_ec\\_copy\\_workflow%'") == [(1,)]
    assert query(dsn, "SELECT count(*) FROM pg_depend WHERE refobjid = 'workflow_templates'::regclass "
                      "AND classid IN ('pg_proc'::regclass, 'pg_policy'::regclass)") != [(0,)] \
        or kind == "publication of the schema"
    run(pb, dsn, "rollback 3")  # the hint's way out: the in-place backfill
    run(real_playbook(**{**COPY, "settings.backfill_method": "update"}), dsn, 3)
    assert query(dsn, TWINS) == [(0,)]


def dump(pg_server, dsn: str) -> str:
    """pg_dump --schema-only of workflow_templates: everything of the table's a DBA would see change."""
    out = subprocess.run([str(pg_server.bin_dir / "pg_dump"), "--schema-only", "--table=public.workflow_templates",
                          "--dbname", dsn], capture_output=True, text=True, check=True).stdout
    # pg_dump 17+ prints a random \restrict key per run
    return "\n".join(line for line in out.splitlines() if not line.startswith(("\\restrict", "\\unrestrict")))


def changes(before: str, after: str) -> list[str]:
    return [line for line in difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="", n=0)
            if line.startswith(("+", "-")) and not line.startswith(("+++", "---"))]


def ensure_role(c: psycopg.Connection, name: str) -> None:
    if not c.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone():
        c.execute(psycopg.sql.SQL("CREATE ROLE {} NOLOGIN").format(psycopg.sql.Identifier(name)))


def test_the_swap_and_its_rollback_leave_the_tables_dump_as_it_was(dsn, pg_server):
    """Catalog details a rename keeps and a copy must carry: a column's n_distinct, CLUSTER ON, an index column's
    statistics target, the grantor of a grant (a later REVOKE by that grantor must still reach it)."""
    seed_chatter(dsn, 300, 50)
    with psycopg.connect(dsn, autocommit=True) as c:
        for role in ("copy_lead", "copy_app"):
            ensure_role(c, role)
        c.execute("ALTER TABLE workflow_templates ALTER COLUMN name SET (n_distinct = 100)")
        c.execute("ALTER TABLE workflow_templates ALTER COLUMN owner_id SET (n_distinct_inherited = -0.5)")
        c.execute("ALTER TABLE workflow_templates CLUSTER ON ix_workflow_templates_name")
        c.execute("CREATE INDEX ix_wt_lower ON workflow_templates (lower(name), id)")
        c.execute("ALTER INDEX ix_wt_lower ALTER COLUMN 1 SET STATISTICS 300")
        c.execute("GRANT SELECT, UPDATE ON workflow_templates TO copy_lead WITH GRANT OPTION")
        c.execute("SET ROLE copy_lead")
        c.execute("GRANT SELECT ON workflow_templates TO copy_app")
        c.execute("GRANT UPDATE (name) ON workflow_templates TO copy_app")
        c.execute("RESET ROLE")
        c.execute("GRANT TRIGGER ON workflow_templates TO PUBLIC")  # grantee 0 in the ACL
        c.execute("GRANT REFERENCES (description) ON workflow_templates TO PUBLIC")
    pb = real_playbook(**COPY)
    run(pb, dsn, 1, 2)
    before = dump(pg_server, dsn)
    # What phase 3 must leave (a copy builds the new columns' indexes in phase 3): the in-place backfill's, on a
    # clone.
    name = f"copydump_{random.randrange(10**9)}"
    with psycopg.connect(pg_server.dsn, autocommit=True) as c:
        c.execute(psycopg.sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
            psycopg.sql.Identifier(name), psycopg.sql.Identifier(psycopg.conninfo.conninfo_to_dict(dsn)["dbname"])))
    other = server._with_dbname(pg_server.dsn, name)
    try:
        run(real_playbook(**{**COPY, "settings.backfill_method": "update", "settings.indexes_after_backfill": True}),
            other, 3)
        in_place = dump(pg_server, other)
    finally:
        server.drop_database(pg_server.dsn, name)
    run(pb, dsn, 3)
    assert query(dsn, TWINS) == [(0,)]
    assert not (diff := changes(in_place, dump(pg_server, dsn))), "after the swap:\n" + "\n".join(diff)
    run(pb, dsn, "rollback 3")
    assert not (diff := changes(before, dump(pg_server, dsn))), "after its rollback:\n" + "\n".join(diff)
    with psycopg.connect(dsn, autocommit=True) as c:  # the grantor's REVOKE reaches the grant it made
        c.execute("SET ROLE copy_lead")
        c.execute("REVOKE SELECT ON workflow_templates FROM copy_app")
        c.execute("RESET ROLE")
    assert query(dsn, "SELECT has_table_privilege('copy_app', 'workflow_templates', 'SELECT')") == [(False,)]


def test_a_grant_by_a_role_the_migrating_role_cannot_become_is_refused_by_name(dsn, pg_server):
    """The swap makes a grant again as its grantor: a migrating role (the table's owner, no superuser) that may not
    SET ROLE to that grantor is refused before any change, naming it; once it may, the grant keeps its grantor."""
    role = f"copier_{random.randrange(10**8)}"
    seed_chatter(dsn, 300, 50)
    ident = psycopg.sql.Identifier(role)
    with psycopg.connect(pg_server.dsn, autocommit=True) as c:
        c.execute(psycopg.sql.SQL("CREATE ROLE {} LOGIN").format(ident))
        for name in ("copy_lead", "copy_app"):
            ensure_role(c, name)
    try:
        with psycopg.connect(dsn, autocommit=True) as c:
            for stmt in ("ALTER TABLE workflow_templates OWNER TO {}", "ALTER TABLE template_specs OWNER TO {}",
                         "ALTER TYPE workflowtype OWNER TO {}", "GRANT CREATE ON SCHEMA public TO {}",
                         "GRANT SELECT, REFERENCES ON users TO {}"):
                c.execute(psycopg.sql.SQL(stmt).format(ident))
            c.execute(psycopg.sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(
                psycopg.sql.Identifier(c.info.dbname), ident))
            c.execute("GRANT SELECT ON workflow_templates TO copy_lead WITH GRANT OPTION")
            c.execute("SET ROLE copy_lead")
            c.execute("GRANT SELECT ON workflow_templates TO copy_app")
            c.execute("RESET ROLE")
        role_dsn = psycopg.conninfo.make_conninfo(dsn, user=role)
        pb = real_playbook(**COPY)
        run(pb, role_dsn, 1, 2)
        before = snapshot(dsn)
        with pytest.raises(OrchestratorError, match="grants made by copy_lead, which the swap must make again"):
            run(pb, role_dsn, 3)
        assert snapshot_diff(before, snapshot(dsn)) == []
        assert query(dsn, TWINS) == [(0,)]
        with psycopg.connect(pg_server.dsn, autocommit=True) as c:
            c.execute(psycopg.sql.SQL("GRANT copy_lead TO {}").format(ident))
        run(pb, role_dsn, 3)
        assert query(dsn, "SELECT pg_get_userbyid(p.grantor) FROM pg_class c, aclexplode(c.relacl) p "
                          "WHERE c.oid = 'workflow_templates'::regclass AND p.grantee = 'copy_app'::regrole") \
            == [("copy_lead",)]
    finally:
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute(psycopg.sql.SQL("REASSIGN OWNED BY {} TO CURRENT_USER").format(ident))
            c.execute(psycopg.sql.SQL("DROP OWNED BY {}").format(ident))
        with psycopg.connect(pg_server.dsn, autocommit=True) as c:
            c.execute(psycopg.sql.SQL("DROP ROLE IF EXISTS {}").format(ident))



def test_cluster_on_and_an_index_statistics_target_set_during_the_copy_are_carried(dsn, monkeypatch):
    """Set on the table while it is copied: a re-run carries them (its index builds read them again); set after
    those builds, right before the swap's lock, the swap refuses rather than lose them, and its hint's re-run
    carries them."""
    pb = copied_up_to_the_swap(dsn, monkeypatch)
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE INDEX ix_wt_late ON workflow_templates (lower(name))")
        c.execute("ALTER INDEX ix_wt_late ALTER COLUMN 1 SET STATISTICS 250")
    original = copy_mod.versions.rebuilt_views  # after the index builds and the early checks, before the lock

    def with_ddl(ctx):
        if ctx.m.table.name == "workflow_templates":
            with psycopg.connect(dsn, autocommit=True) as c:
                c.execute("ALTER TABLE workflow_templates CLUSTER ON ix_workflow_templates_name")
        return original(ctx)

    monkeypatch.setattr(copy_mod.versions, "rebuilt_views", with_ddl)
    with pytest.raises(OrchestratorError, match="index 'ix_workflow_templates_name' is now .* CLUSTER") as err:
        run(pb, dsn, 3)
    assert "run phase 3 again" in err.value.hint
    monkeypatch.setattr(copy_mod.versions, "rebuilt_views", original)
    run(pb, dsn, 3)
    assert query(dsn, TWINS) == [(0,)]
    assert query(dsn, "SELECT indexrelid::regclass::text FROM pg_index WHERE indisclustered") \
        == [("ix_workflow_templates_name",)]
    assert query(dsn, "SELECT attstattarget::int FROM pg_attribute WHERE attrelid = 'ix_wt_late'::regclass") == [(250,)]
