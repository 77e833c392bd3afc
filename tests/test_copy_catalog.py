"""Phase 3 by copy and the catalog around the table: what holds the table by its OID (a SQL-standard function body,
another table's policy, a view, extended statistics, ...) would follow the table renamed away by the swap, so each
is refused by name before anything changes, and again under the swap's lock; a publication that would publish the
twin too."""

from __future__ import annotations

import psycopg
import pytest

from orchestrator.engine.errors import OrchestratorError
from orchestrator.kinds.phases import copy as copy_mod
from orchestrator.lab.snapshot import snapshot_diff

from .helpers import query, real_playbook, seed_chatter, snapshot
from .helpers import run_steps as run

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
