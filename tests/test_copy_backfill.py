"""Phase 3 by copy (settings.backfill_method: copy): the table written once into a twin and swapped in by a rename.

What must hold is what holds for the in-place backfill: the app never notices (writers of every shape through the
old version's view and the table, prepared statements, deletes racing the batches, a key changed), every row the
app wrote is there as it wrote it, the catalog is the table's own again (same as an in-place run), and every stop
part-way is fixed by running the same command again, or undone by rollback 3."""

from __future__ import annotations

import random
import threading
import time

import psycopg
import psycopg.conninfo
import pytest

from orchestrator.engine import playbook
from orchestrator.engine.errors import OrchestratorError
from orchestrator.kinds.phases import copy as copy_mod
from orchestrator.lab import server
from orchestrator.lab.snapshot import snapshot_diff

from .helpers import query, real_playbook, seed_chatter, snapshot
from .helpers import run_steps as run

COPY = {"settings.backfill_method": "copy", "settings.batch_size": 500, "settings.min_batch_size": 100,
        "settings.max_batch_size": 1000}
MAPPING = {"plain": "simple_chat", "rag": "rag_chat", "tools": "function_chat", "full": "advanced_chat"}
ROW = "SELECT id, name, description, workflow_type::text, owner_id FROM workflow_templates"


def rows(dsn: str) -> dict[str, tuple]:
    return {r[0]: r[1:] for r in query(dsn, ROW)}


class Writers:
    """Threads writing as an app does, each over its own rows (so what it committed is known exactly): updates
    of the name and the enum column, inserts, deletes and key changes of rows it inserted; half of them through
    the old version's view (search_path), all with prepared statements. `ledger` is what they committed."""

    def __init__(self, dsn: str, before: dict[str, tuple], ids: list[str], n: int = 3):
        self.dsn, self.before, self.stop_at, self.errors = dsn, before, threading.Event(), []
        self.ledger: dict[str, tuple | None] = {}
        self.lock = threading.Lock()
        self.count = 0
        share = [ids[i::n] for i in range(n)]
        self.threads = [threading.Thread(target=self._run, args=(i, share[i]), daemon=True) for i in range(n)]

    def __enter__(self) -> Writers:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_at.set()
        for t in self.threads:
            t.join(30)

    def _run(self, i: int, mine: list[str]) -> None:
        rnd = random.Random(i)
        path = "chatter_v1,public" if i % 2 else "public"
        conn = psycopg.connect(self.dsn, autocommit=True, options=f"-csearch_path={path}")
        inserted: list[str] = []
        k = 0
        try:
            while not self.stop_at.is_set():
                k += 1
                op = rnd.random()
                try:
                    if op < 0.4 and mine:
                        id_ = rnd.choice(mine)
                        name, label = f"w{i}-{k}", rnd.choice(list(MAPPING))
                        conn.execute("UPDATE workflow_templates SET name = %s, workflow_type = %s WHERE id = %s",
                                     (name, label, id_), prepare=True)
                        self._note(id_, lambda old, name=name, label=label: (name, old[1], label, old[3]))
                    elif op < 0.7:
                        id_ = f"c{i}-{k}"
                        conn.execute(
                            "INSERT INTO workflow_templates (id, owner_id, name, description, workflow_type, category,"
                            " default_params, is_builtin, version, is_latest, is_public, rating_count, usage_count,"
                            " total_tokens_used, total_cost, config_hash) VALUES (%s, 'system', %s, 'd', 'rag',"
                            " 'general', '{}', false, 1, true, false, 0, 0, 0, 0, 'h')", (id_, f"n{i}-{k}"),
                            prepare=True)
                        inserted.append(id_)
                        self._set(id_, (f"n{i}-{k}", "d", "rag", "system"))
                    elif op < 0.85 and inserted:
                        id_ = inserted.pop(rnd.randrange(len(inserted)))
                        conn.execute("DELETE FROM workflow_templates WHERE id = %s", (id_,), prepare=True)
                        self._set(id_, None)
                    elif inserted:
                        old_id = inserted.pop(rnd.randrange(len(inserted)))
                        new_id = f"k{i}-{k}"
                        conn.execute("UPDATE workflow_templates SET id = %s WHERE id = %s", (new_id, old_id),
                                     prepare=True)
                        with self.lock:
                            self.ledger[new_id] = self.ledger[old_id]
                            self.ledger[old_id] = None
                        inserted.append(new_id)
                    conn.execute("SELECT * FROM workflow_templates WHERE id = %s", (rnd.choice(mine),), prepare=True)
                    self.count += 1
                except psycopg.Error as err:
                    self.errors.append(f"{type(err).__name__}: {err}")
                except Exception as err:  # a bug of the test itself: fail the test, not only the thread
                    self.errors.append(f"writer: {type(err).__name__}: {err}")
                    return
        finally:
            conn.close()

    def _set(self, id_: str, value: tuple | None) -> None:
        with self.lock:
            self.ledger[id_] = value

    def _note(self, id_: str, change) -> None:
        with self.lock:
            self.ledger[id_] = change(self.ledger.get(id_, self.before[id_]))


def check_rows(dsn: str, before: dict[str, tuple], ledger: dict[str, tuple | None]) -> None:
    now = rows(dsn)
    expected = dict(before)
    for id_, value in ledger.items():
        if value is None:
            expected.pop(id_, None)
        else:
            expected[id_] = value
    missing = set(expected) - set(now)
    extra = set(now) - set(expected)
    wrong = [i for i in expected if i in now and now[i] != expected[i]]
    assert not missing and not extra and not wrong, (sorted(missing)[:5], sorted(extra)[:5], wrong[:5])


def shadow_agrees(dsn: str) -> None:
    bad = query(dsn, "SELECT id, workflow_type::text, workflow_type_new FROM workflow_templates "
                     "WHERE workflow_type_new IS DISTINCT FROM CASE workflow_type::text "
                     "WHEN 'plain' THEN 'simple_chat' "
                     "WHEN 'rag' THEN 'rag_chat' WHEN 'tools' THEN 'function_chat' ELSE 'advanced_chat' END LIMIT 5")
    assert bad == []


def test_copy_under_writers_of_every_shape_loses_nothing_and_the_app_sees_no_error(dsn):
    seed_chatter(dsn, 6000, 1000)
    pb = real_playbook(**COPY)
    run(pb, dsn, 1, 2)
    before = rows(dsn)
    ids = sorted(before)
    writers = Writers(dsn, before, ids[::7])
    with writers:
        time.sleep(0.3)
        run(pb, dsn, 3)
        time.sleep(0.3)
    assert writers.errors == [], writers.errors[:5]
    assert writers.count > 100
    check_rows(dsn, before, writers.ledger)
    shadow_agrees(dsn)
    assert query(dsn, "SELECT count(*) FROM pg_class WHERE relname LIKE '\\_ec\\_copy%' OR relname LIKE '\\_ec\\_old%'"
                      " OR relname LIKE '\\_ec\\_copy\\_log%'") == [(0,)]
    run(pb, dsn, 4, 5, 6)  # parity holds, and the rest of the way is as after an in-place backfill


def test_catalog_after_a_copy_is_the_in_place_backfills_and_rollback_restores_the_original(dsn, pg_server):
    seed_chatter(dsn, 1500, 300)
    with psycopg.connect(dsn, autocommit=True) as c:  # what a copy must carry over besides columns and indexes
        c.execute("CREATE ROLE copy_reader NOLOGIN") if not c.execute(
            "SELECT 1 FROM pg_roles WHERE rolname = 'copy_reader'").fetchone() else None
        c.execute("GRANT SELECT ON workflow_templates TO copy_reader")
        c.execute("GRANT UPDATE (name) ON workflow_templates TO copy_reader WITH GRANT OPTION")
        c.execute("COMMENT ON TABLE workflow_templates IS 'templates'")
        c.execute("COMMENT ON INDEX ix_workflow_templates_name IS 'by name'")
        c.execute("COMMENT ON CONSTRAINT workflow_templates_pkey ON workflow_templates IS 'the key'")
        c.execute("ALTER TABLE workflow_templates ADD COLUMN serial_no bigserial")
        c.execute("CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS "
                  "$$BEGIN NEW.updated_at = now(); RETURN NEW; END$$")
        c.execute("CREATE TRIGGER touch BEFORE UPDATE ON workflow_templates FOR EACH ROW EXECUTE FUNCTION touch()")
        c.execute("ALTER TABLE workflow_templates ENABLE ALWAYS TRIGGER touch")
        c.execute("COMMENT ON TRIGGER touch ON workflow_templates IS 'stamps'")
        c.execute("ALTER TABLE workflow_templates SET (fillfactor = 90, toast.autovacuum_vacuum_scale_factor = 0.3)")
        c.execute("ALTER TABLE template_specs SET (autovacuum_enabled = false)")
        c.execute("ALTER TABLE workflow_templates REPLICA IDENTITY USING INDEX workflow_templates_pkey")
        c.execute("ALTER TABLE workflow_templates ALTER COLUMN name SET STATISTICS 500")
    original = snapshot(dsn)
    extra = ("SELECT c.relname, c.reloptions, c.relreplident, t.reloptions FROM pg_class c "
             "JOIN pg_class t ON t.oid = c.reltoastrelid WHERE c.oid IN ('public.workflow_templates'::regclass, "
             "'public.template_specs'::regclass) ORDER BY 1",
             "SELECT attname, attstattarget FROM pg_attribute WHERE attrelid = 'workflow_templates'::regclass "
             "AND attname = 'name'",
             "SELECT obj_description('workflow_templates'::regclass, 'pg_class'), "
             "obj_description('ix_workflow_templates_name'::regclass, 'pg_class')")
    original_extra = [query(dsn, q) for q in extra]
    # the same migration in place, on a clone: what phase 3 must leave
    name = f"copycmp_{random.randrange(10**9)}"
    with psycopg.connect(pg_server.dsn, autocommit=True) as c:
        c.execute(psycopg.sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
            psycopg.sql.Identifier(name), psycopg.sql.Identifier(psycopg.conninfo.conninfo_to_dict(dsn)["dbname"])))
    other = server._with_dbname(pg_server.dsn, name)
    pb_copy = real_playbook(**COPY)
    run(real_playbook(**{"settings.indexes_after_backfill": True, "settings.app_triggers": "fire"}), other, 1, 2, 3)
    run(pb_copy, dsn, 1, 2, 3)
    after_copy = snapshot(dsn)
    assert snapshot_diff(snapshot(other), after_copy) == []
    server.drop_database(pg_server.dsn, name)
    assert [query(dsn, q) for q in extra] == original_extra
    assert query(dsn, "SELECT last_value > 0 FROM workflow_templates_serial_no_seq") == [(True,)]
    n = query(dsn, "SELECT count(*) FROM workflow_templates")[0][0]
    with psycopg.connect(dsn, autocommit=True) as c:  # the sequence still serves the table, and the trigger fires
        c.execute("UPDATE workflow_templates SET name = name || '!' "
                  "WHERE id = (SELECT min(id) FROM workflow_templates)")
    run(pb_copy, dsn, "rollback 3", "rollback 2", "rollback 1")
    assert snapshot_diff(original, snapshot(dsn)) == []
    assert [query(dsn, q) for q in extra] == original_extra
    assert query(dsn, "SELECT count(*) FROM workflow_templates") == [(n,)]


@pytest.mark.parametrize("where", ["batches", "indexes", "exchange", "after the swap"])
def test_a_copy_stopped_part_way_goes_on_when_run_again_or_rolls_back(dsn, monkeypatch, where):
    seed_chatter(dsn, 3000, 200)
    pb = real_playbook(**COPY)
    run(pb, dsn, 1, 2)
    after_2 = snapshot(dsn)
    before = rows(dsn)
    calls = {"n": 0}
    target = {"batches": (copy_mod.CopyBatches, "after_batch"), "indexes": (copy_mod.TableCopy, "build_indexes"),
              "exchange": (copy_mod.TableCopy, "_exchange"), "after the swap": (copy_mod.TableCopy, "drop_old")}[where]
    original = getattr(*target)

    def stop(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 3 or where != "batches":
            raise RuntimeError("killed")
        return original(self, *a, **kw)

    monkeypatch.setattr(*target, stop)
    with pytest.raises(OrchestratorError):
        run(pb, dsn, 3)
    monkeypatch.setattr(*target, original)
    with psycopg.connect(dsn, autocommit=True) as c:  # the app writes between the stop and the re-run
        c.execute("UPDATE workflow_templates SET name = 'between' WHERE id = %s", (min(before),))
    if where == "exchange":  # a stopped copy can also be undone: the table was never touched
        run(pb, dsn, "rollback 3")
        assert snapshot_diff(after_2, snapshot(dsn)) == []
    run(pb, dsn, 3)
    assert query(dsn, "SELECT count(*) FROM pg_class WHERE relname LIKE '\\_ec\\_old%' "
                      "OR relname LIKE '\\_ec\\_copy%' OR relname LIKE '\\_ec\\_copy\\_log%'") == [(0,)]
    assert query(dsn, "SELECT count(*) FROM pg_constraint WHERE NOT convalidated") == [(0,)]
    now = rows(dsn)
    assert now[min(before)][0] == "between"
    assert {k: v for k, v in now.items() if k != min(before)} == {k: v for k, v in before.items() if k != min(before)}
    shadow_agrees(dsn)
    run(pb, dsn, 4, 5)


def test_a_table_the_copy_cannot_carry_is_refused_by_name_and_nothing_changes(dsn):
    seed_chatter(dsn, 500, 100)
    pb = real_playbook(**COPY)
    run(pb, dsn, 1, 2)
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE VIEW report AS SELECT id, name FROM workflow_templates")
    before = snapshot(dsn)
    with pytest.raises(OrchestratorError, match="cannot copy workflow_templates.*view report reads it"):
        run(pb, dsn, 3)
    assert snapshot_diff(before, snapshot(dsn)) == []
    run(real_playbook(**{**COPY, "settings.backfill_method": "update"}), dsn, 3)  # the hint's way out works
    shadow_agrees(dsn)


def test_copy_with_odd_names(dsn):
    schema, table, col = 'S p"ace', 'Tä "ble"', 'kind of'
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(psycopg.sql.SQL("CREATE SCHEMA {}").format(psycopg.sql.Identifier(schema)))
        c.execute(psycopg.sql.SQL("CREATE TYPE {} AS ENUM ('a', 'b')").format(psycopg.sql.Identifier(schema, "e t")))
        c.execute(psycopg.sql.SQL("CREATE TABLE {} ({} int PRIMARY KEY, {} {} NOT NULL, note text)").format(
            psycopg.sql.Identifier(schema, table), psycopg.sql.Identifier("i d"), psycopg.sql.Identifier(col),
            psycopg.sql.Identifier(schema, "e t")))
        c.execute(psycopg.sql.SQL("INSERT INTO {} SELECT g, CASE WHEN g % 2 = 0 THEN 'a' ELSE 'b' END::{}, 'n' "
                                  "FROM generate_series(1, 2000) g").format(
            psycopg.sql.Identifier(schema, table), psycopg.sql.Identifier(schema, "e t")))
        c.execute(psycopg.sql.SQL("CREATE INDEX {} ON {} ({})").format(
            psycopg.sql.Identifier("ix odd"), psycopg.sql.Identifier(schema, table), psycopg.sql.Identifier(col)))
    from orchestrator.engine import playbook
    pb = playbook.parse({
        "name": "odd_copy", "enum": {"name": "e t", "schema": schema},
        "columns": [{"table": table, "schema": schema, "column": col}],
        "target": {"type": "varchar", "length": 10}, "mapping": {"a": "A", "b": "B"},
        "settings": {"backfill_method": "copy", "batch_size": 300, "min_batch_size": 100}})
    original = snapshot(dsn, schema)
    run(pb, dsn, 1, 2, 3)
    assert query(dsn, psycopg.sql.SQL("SELECT count(*), count(*) FILTER (WHERE {} = {}::text) FROM {}").format(
        psycopg.sql.Identifier(pb.migrations[0].shadow), psycopg.sql.SQL("upper({}::text)").format(
            psycopg.sql.Identifier(col)), psycopg.sql.Identifier(schema, table))) == [(2000, 2000)]
    run(pb, dsn, "rollback 3", "rollback 2", "rollback 1")
    assert snapshot_diff(original, snapshot(dsn, schema)) == []
    run(pb, dsn, 1, 2, 3, 4, 5, 6, "contract")


def test_the_swap_waits_for_a_repeatable_read_snapshot_that_would_miss_rows(dsn):
    """A REPEATABLE READ transaction that began before the swap and reads the table after it would see the twin
    without the rows copied after its snapshot: the swap waits for it to end, and refuses if it will not."""
    seed_chatter(dsn, 2000, 100)
    pb = real_playbook(**{**COPY, "settings.throttle_max_wait_s": 1})
    run(pb, dsn, 1, 2)
    n = query(dsn, "SELECT count(*) FROM workflow_templates")[0][0]
    reader = psycopg.connect(dsn)
    reader.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
    reader.execute("SELECT count(*) FROM users").fetchone()  # its snapshot; the table not touched yet
    try:
        with pytest.raises(OrchestratorError, match="snapshot older than the swap.*pid"):
            run(pb, dsn, 3)
        assert query(dsn, "SELECT count(*) FROM pg_class WHERE relname LIKE '\\_ec\\_copy%'") != [(0,)]
        assert reader.execute("SELECT count(*) FROM workflow_templates").fetchone() == (n,)
    finally:
        reader.close()
    run(pb, dsn, 3)  # the reader gone, the same command finishes
    shadow_agrees(dsn)


def test_a_role_that_is_no_superuser_copies_once_it_may_reference_the_parent_tables(dsn, pg_server):
    """The copy re-adds the table's foreign keys on its twin: REFERENCES on `users` is named up front (before
    phase 1) when missing; granted it, the table's owner copies it, and the app's UPDATE trigger never fires."""
    role = f"copier_{random.randrange(10**8)}"
    seed_chatter(dsn, 800, 100)
    with psycopg.connect(pg_server.dsn, autocommit=True) as c:
        c.execute(psycopg.sql.SQL("CREATE ROLE {} LOGIN").format(psycopg.sql.Identifier(role)))
    r_ = psycopg.sql.Identifier(role)
    try:
        with psycopg.connect(dsn, autocommit=True) as c:
            for stmt in ("ALTER TABLE workflow_templates OWNER TO {}", "ALTER TABLE template_specs OWNER TO {}",
                         "ALTER TYPE workflowtype OWNER TO {}", "GRANT CREATE ON SCHEMA public TO {}",
                         "GRANT SELECT ON users TO {}"):
                c.execute(psycopg.sql.SQL(stmt).format(r_))
            c.execute(psycopg.sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(
                psycopg.sql.Identifier(c.info.dbname), r_))
            c.execute("CREATE FUNCTION stamp() RETURNS trigger LANGUAGE plpgsql AS "
                      "$$BEGIN NEW.updated_at = now(); RETURN NEW; END$$")
            c.execute("UPDATE workflow_templates SET updated_at = '2020-01-01'")
            c.execute("CREATE TRIGGER stamp BEFORE UPDATE ON workflow_templates FOR EACH ROW EXECUTE FUNCTION stamp()")
        role_dsn = psycopg.conninfo.make_conninfo(dsn, user=role)
        pb = real_playbook(**COPY)
        with pytest.raises(OrchestratorError, match="REFERENCES on table users"):
            run(pb, role_dsn, 1)
        assert query(dsn, "SELECT count(*) FROM information_schema.columns WHERE column_name = 'workflow_type_new'") \
            == [(0,)]
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute(psycopg.sql.SQL("GRANT REFERENCES ON users TO {}").format(r_))
        run(pb, role_dsn, 1, 2, 3)
        shadow_agrees(dsn)
        assert query(dsn, "SELECT count(*) FROM workflow_templates WHERE updated_at <> '2020-01-01'") == [(0,)]
        assert query(dsn, "SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = 'workflow_templates'::regclass"
                     ) == [(role,)]
    finally:
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute(psycopg.sql.SQL("REASSIGN OWNED BY {} TO CURRENT_USER").format(r_))
            c.execute(psycopg.sql.SQL("DROP OWNED BY {}").format(r_))
        with psycopg.connect(pg_server.dsn, autocommit=True) as c:
            c.execute(psycopg.sql.SQL("DROP ROLE IF EXISTS {}").format(r_))


def test_writes_between_batches_behind_and_ahead_of_the_cursor_with_a_composite_key(dsn, monkeypatch):
    """Deterministic interleaving: after every batch the app updates a row already copied, deletes one not yet
    copied and one already copied, moves a row to another key and inserts one behind the cursor; the composite
    primary key goes through the log, its replay and the swap."""
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE TYPE st AS ENUM ('a', 'b')")
        c.execute("CREATE TABLE pairs (x int, y int, s st NOT NULL, note text, PRIMARY KEY (x, y))")
        c.execute("INSERT INTO pairs SELECT g / 10, g % 10, CASE WHEN g % 3 = 0 THEN 'a' ELSE 'b' END::st, 'n' || g "
                  "FROM generate_series(0, 2999) g")
    from orchestrator.engine import playbook
    pb = playbook.parse({"name": "pairs_copy", "enum": {"name": "st"}, "columns": [{"table": "pairs", "column": "s"}],
                         "target": {"type": "varchar", "length": 5}, "mapping": {"a": "A", "b": "B"},
                         "settings": {"backfill_method": "copy", "batch_size": 200, "min_batch_size": 200,
                                      "max_batch_size": 200}})
    run(pb, dsn, 1, 2)
    writer = psycopg.connect(dsn, autocommit=True)
    original = copy_mod.CopyBatches.after_batch
    k = {"n": 0}

    def interleave(self, scanned):
        k["n"] += 1
        n = k["n"]
        writer.execute("UPDATE pairs SET note = 'upd' || %s, s = 'a' WHERE (x, y) = (%s, 1)", (n, n * 2 - 1))
        writer.execute("DELETE FROM pairs WHERE (x, y) = (%s, 2)", (290 - n,))  # ahead of the cursor
        writer.execute("DELETE FROM pairs WHERE (x, y) = (%s, 3)", (n * 2 - 2,))  # behind it
        writer.execute("UPDATE pairs SET x = x + 1000 WHERE (x, y) = (%s, 4)", (n * 2 - 2,))  # a key moved
        writer.execute("INSERT INTO pairs VALUES (-%s, 0, 'b', 'new')", (n,))  # behind the cursor
        return original(self, scanned)

    monkeypatch.setattr(copy_mod.CopyBatches, "after_batch", interleave)
    try:
        run(pb, dsn, 3)
    finally:
        writer.close()
    assert k["n"] >= 10
    # what the table holds equals what the app left: every column, and the shadow mapped from it
    assert query(dsn, "SELECT count(*) FROM pairs WHERE s_new IS DISTINCT FROM upper(s::text)") == [(0,)]
    assert query(dsn, "SELECT count(*) FROM pairs WHERE note = 'new'") == [(k["n"],)]
    assert query(dsn, "SELECT count(*) FROM pairs WHERE x >= 1000") == [(k["n"],)]
    assert query(dsn, "SELECT count(*) FROM pairs WHERE (x, y) IN (SELECT 290 - g, 2 FROM generate_series(1, %s) g)",
                 (k["n"],)) == [(0,)]
    assert query(dsn, "SELECT count(*) FROM pairs") == [(3000 - 2 * k["n"] + k["n"],)]
    run(pb, dsn, 4, 5)  # parity holds over it


def copied_up_to_the_swap(dsn: str, monkeypatch) -> playbook.Playbook:
    """Chatter's tables after phases 1-2 and a phase 3 stopped right before its swap: the copy made, its rows and
    indexes in. Returns the playbook."""
    seed_chatter(dsn, 800, 100)
    pb = real_playbook(**COPY)
    run(pb, dsn, 1, 2)

    def stopped(self):
        raise RuntimeError("stopped before the swap")

    with monkeypatch.context() as m:
        m.setattr(copy_mod.TableCopy, "exchange", stopped)
        with pytest.raises(OrchestratorError, match="stopped before the swap"):
            run(pb, dsn, 3)
    return pb


# DDL a DBA (or another deploy) runs on the table while it is copied: what the twin was made from is no longer the
# table. Each: the statement, what the refusal must name, a probe of the change that must survive. (Indexes are
# read from the table when built on the copy: test_indexes_created_or_dropped_before_a_rerun_are_carried.)
DDL = {
    "default changed": ("ALTER TABLE workflow_templates ALTER COLUMN usage_count SET DEFAULT 7",
                        "column 'usage_count' is now 'integer NOT NULL DEFAULT 7'",
                        "SELECT column_default FROM information_schema.columns WHERE table_name = 'workflow_templates' "
                        "AND column_name = 'usage_count'"),
    "NOT NULL dropped": ("ALTER TABLE workflow_templates ALTER COLUMN rating_count DROP NOT NULL",
                         "column 'rating_count' is now 'integer'",
                         "SELECT is_nullable FROM information_schema.columns WHERE table_name = 'workflow_templates' "
                         "AND column_name = 'rating_count'"),
    "CHECK added": ("ALTER TABLE workflow_templates ADD CONSTRAINT check_late CHECK (version < 1000000)",
                    "check 'check_late' .* is new on the table",
                    "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = 'check_late'"),
    "column added": ("ALTER TABLE workflow_templates ADD COLUMN late_note text DEFAULT 'x'",
                     "column 'late_note' .*text DEFAULT 'x'.* is new on the table",
                     "SELECT count(*) FILTER (WHERE late_note = 'x') FROM workflow_templates"),
    "column comment": ("COMMENT ON COLUMN workflow_templates.name IS 'shown'", "column 'name' is now .*COMMENT",
                       "SELECT col_description(attrelid, attnum) FROM pg_attribute "
                       "WHERE attrelid = 'workflow_templates'::regclass AND attname = 'name'"),
    "statistics target": ("ALTER TABLE workflow_templates ALTER COLUMN name SET STATISTICS 321",
                          "column 'name' is now .*STATISTICS 321",
                          "SELECT attstattarget FROM pg_attribute WHERE attrelid = 'workflow_templates'::regclass "
                          "AND attname = 'name'"),
    "view created": ("CREATE VIEW late_report AS SELECT id, name FROM workflow_templates",
                     "view late_report reads it",
                     "SELECT count(*) FROM late_report"),
}


@pytest.mark.parametrize("change", list(DDL))
def test_ddl_on_the_table_during_the_copy_is_refused_by_name_at_the_swap_and_never_undone(dsn, monkeypatch, change):
    statement, named, probe = DDL[change]
    pb = copied_up_to_the_swap(dsn, monkeypatch)
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(statement)
    after_ddl, probed = snapshot(dsn), query(dsn, probe)
    refused = f"(cannot swap the copy of|cannot copy) workflow_templates.*: .*{named}"
    with pytest.raises(OrchestratorError, match=refused) as err:
        run(pb, dsn, 3)
    assert "rollback 3" in err.value.hint
    assert snapshot_diff(after_ddl, snapshot(dsn)) == []  # the table as the DDL left it; the copy is kept
    assert query(dsn, "SELECT count(*) FROM pg_class WHERE relname LIKE '\\_ec\\_copy\\_workflow%'") == [(1,)]
    if change == "view created":  # the copy cannot carry it: the way out is an in-place backfill
        run(pb, dsn, "rollback 3")
        run(real_playbook(**{**COPY, "settings.backfill_method": "update"}), dsn, 3)
    else:
        run(pb, dsn, "rollback 3", 3)  # the hint's way: a new copy, made from the table as it is now
    assert query(dsn, probe) == probed
    shadow_agrees(dsn)
    run(pb, dsn, 4, 5)


def test_an_index_created_between_the_swaps_reading_of_the_indexes_and_its_lock_is_refused(dsn, monkeypatch):
    """The race the early check cannot see: the definition is compared again under the swap's lock."""
    seed_chatter(dsn, 600, 100)
    pb = real_playbook(**COPY)
    run(pb, dsn, 1, 2)
    original = copy_mod.versions.rebuilt_views  # called after the indexes are read, before the lock

    def with_ddl(ctx):
        if ctx.m.table.name == "workflow_templates":
            with psycopg.connect(dsn, autocommit=True) as c:
                c.execute("CREATE INDEX IF NOT EXISTS ix_race ON workflow_templates (config_hash, name)")
        return original(ctx)

    monkeypatch.setattr(copy_mod.versions, "rebuilt_views", with_ddl)
    with pytest.raises(OrchestratorError, match="index 'ix_race' .* is new on the table") as refused:
        run(pb, dsn, 3)
    assert "run phase 3 again: the copy's indexes are built again" in refused.value.hint
    monkeypatch.setattr(copy_mod.versions, "rebuilt_views", original)
    assert query(dsn, "SELECT count(*) FROM pg_indexes WHERE indexname = 'ix_race' "
                      "AND tablename = 'workflow_templates'") == [(1,)]
    run(pb, dsn, 3)  # the hint's way: no new copy needed, the index is built on this one
    assert query(dsn, "SELECT count(*) FROM pg_indexes WHERE indexname = 'ix_race' "
                      "AND tablename = 'workflow_templates'") == [(1,)]
    shadow_agrees(dsn)


def test_ddl_during_the_batches_is_refused_when_the_copy_is_run_again(dsn, monkeypatch):
    """A copy stopped in its batches and run again after a change to the table refuses before copying more."""
    seed_chatter(dsn, 3000, 100)
    pb = real_playbook(**COPY)
    run(pb, dsn, 1, 2)
    original, calls = copy_mod.CopyBatches.after_batch, {"n": 0}

    def stop(self, scanned):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("killed")
        return original(self, scanned)

    monkeypatch.setattr(copy_mod.CopyBatches, "after_batch", stop)
    with pytest.raises(OrchestratorError):
        run(pb, dsn, 3)
    monkeypatch.setattr(copy_mod.CopyBatches, "after_batch", original)
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("ALTER TABLE workflow_templates ALTER COLUMN is_public SET DEFAULT true")
    cursor = query(dsn, "SELECT rows_done FROM _orchestrator.backfills WHERE target LIKE '%copy\"]'")
    with pytest.raises(OrchestratorError, match="column 'is_public' is now 'boolean NOT NULL DEFAULT true'"):
        run(pb, dsn, 3)
    assert query(dsn, "SELECT rows_done FROM _orchestrator.backfills WHERE target LIKE '%copy\"]'") == cursor
    run(pb, dsn, "rollback 3", 3)
    assert query(dsn, "SELECT column_default FROM information_schema.columns WHERE table_schema = 'public' "
                      "AND table_name = 'workflow_templates' AND column_name = 'is_public'") == [("true",)]


def test_indexes_created_or_dropped_before_a_rerun_are_carried(dsn, monkeypatch):
    """Indexes are built on the copy from the table's as they are at that run: a copy stopped before its swap and
    run again after an index was created, another dropped and the primary key's renamed carries each."""
    pb = copied_up_to_the_swap(dsn, monkeypatch)
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE INDEX ix_late ON workflow_templates (owner_id, name)")
        c.execute("DROP INDEX ix_workflow_templates_is_public")
        c.execute("ALTER INDEX workflow_templates_pkey RENAME TO wt_key")  # the key the copy's upserts use
    indexes = "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'workflow_templates' ORDER BY 1"
    before = query(dsn, indexes)
    run(pb, dsn, 3)
    after = query(dsn, indexes)
    assert set(before) <= set(after)  # and the migration's own, built on the copy
    assert "ix_workflow_templates_is_public" not in dict(after)
    assert query(dsn, "SELECT conname FROM pg_constraint WHERE conrelid = 'workflow_templates'::regclass "
                      "AND contype = 'p'") == [("wt_key",)]
    assert query(dsn, "SELECT count(*) FROM pg_class WHERE relname LIKE '\\_ec\\_%'") == [(0,)]
    shadow_agrees(dsn)


UNIQUE_PB = {"name": "acct_n_to_bigint", "kind": "change_type",
             "columns": [{"table": "acct", "column": "n", "type": "bigint", "up": "n::bigint", "down": "n::integer"}],
             "settings": {"backfill_method": "copy", "old_version_quiet_s": 0, "retries": 2, "batch_size": 20,
                          "min_batch_size": 20, "max_batch_size": 20}}
# Writes that move a UNIQUE value from one row to another, each one transaction: the log names both rows, in
# an order in which copying them again one by one (or a chunk at a time) passes through a duplicate.
MOVES = {
    "re-created": ["DELETE FROM acct WHERE id = 1", "INSERT INTO acct (id, email, n) VALUES (1001, 'e1', 5)"],
    "swapped": ["UPDATE acct SET email = 'tmp' WHERE id = 2", "UPDATE acct SET email = 'e2' WHERE id = 3",
                "UPDATE acct SET email = 'e3' WHERE id = 2"],
    "moved on": ["UPDATE acct SET email = 'x4' WHERE id = 4", "UPDATE acct SET email = 'e4' WHERE id = 5"],
}


@pytest.mark.parametrize("chunk", [1, 10_000], ids=lambda n: f"chunk{n}")
def test_replaying_writes_that_move_a_unique_value_between_rows_never_breaks_the_twins_index(dsn, monkeypatch,
                                                                                              chunk):
    """A UNIQUE email deleted and re-created under another id, swapped between two rows, moved on, while the copy
    waits for its swap: the replay (outside the swap's lock and under it, by chunks of every size) brings the
    twin to the table's rows without a unique violation, and the swap goes in."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE acct (id int PRIMARY KEY, email text NOT NULL UNIQUE, n int NOT NULL)")
        conn.execute("INSERT INTO acct SELECT i, 'e' || i, i FROM generate_series(1, 100) i")
    pb = playbook.parse(UNIQUE_PB)
    run(pb, dsn, 1, 2)

    def stopped(self):
        raise RuntimeError("stopped before the swap")

    with monkeypatch.context() as m:
        m.setattr(copy_mod.TableCopy, "exchange", stopped)
        with pytest.raises(OrchestratorError, match="stopped before the swap"):
            run(pb, dsn, 3)
    with psycopg.connect(dsn) as conn:
        for statements in MOVES.values():
            with conn.transaction():
                for s in statements:
                    conn.execute(s)
    monkeypatch.setattr(copy_mod, "REPLAY_CHUNK", chunk)
    expected = query(dsn, "SELECT id, email, n FROM acct ORDER BY id")
    run(pb, dsn, 3)
    assert query(dsn, "SELECT id, email, n FROM acct ORDER BY id") == expected
    assert query(dsn, "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 'acct'::regclass "
                      "AND attname = 'n_new'") == [("bigint",)]


def test_the_swap_waits_for_a_repeatable_read_transaction_running_a_long_statement(dsn, monkeypatch):
    """A REPEATABLE READ transaction whose snapshot came after a row was written, still unreplayed, and that runs
    a long statement (not idle) while the swap goes: it must not read the twin as of that snapshot (the row as it
    was before). The swap waits for its transaction to end, as CREATE INDEX CONCURRENTLY does."""
    pb = copied_up_to_the_swap(dsn, monkeypatch)
    key = query(dsn, "SELECT min(id) FROM workflow_templates")[0][0]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE workflow_templates SET name = 'fresh' WHERE id = %s", (key,))
    reader = psycopg.connect(dsn)
    reader.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    reader.execute("SELECT count(*) FROM users").fetchone()  # its snapshot, after the update
    seen: list = []
    errors: list = []

    def read() -> None:
        try:
            reader.execute("SELECT pg_sleep(6)")  # running, not idle, while the swap goes
            seen.append(reader.execute("SELECT name FROM workflow_templates WHERE id = %s", (key,)).fetchone())
            reader.commit()
        except Exception as err:  # seen by the test, not lost in the thread
            errors.append(err)

    thread = threading.Thread(target=read)
    thread.start()
    try:
        time.sleep(0.5)
        run(pb, dsn, 3)
    finally:
        thread.join(timeout=60)
        reader.close()
    assert not errors and seen == [("fresh",)], errors
    assert query(dsn, "SELECT name FROM workflow_templates WHERE id = %s", (key,)) == [("fresh",)]
