"""A model-based test of the rolling deploy (issue 26): hypothesis drives both app versions and the DBA at once.

The rules are the old and the new app version writing through their own search_path (INSERT, UPDATE, UPSERT,
DELETE, with RETURNING; mapped values and, for the new version, a value with no enum label) and reading with
prepared `SELECT *` on connections that live across every command; and the DBA's commands: run the next phase,
roll back the last, contract, go back after the contract, and a command stopped part-way (an app transaction
holding a lock past the command's lock budget), then the same command again.

After every rule, the invariants: every row holds what its last writer wrote, as each live version reads it
(the old version the enum label, or the fallback label for a value with none; the new version the value); no
app statement failed; a refused command changed nothing; back at the start, the catalog equals the original.

Two schema variants: Chatter's as it is, and with a default on both columns (inserts that leave the type to it)
and a generated column beside them. Bounded in `make test`; `make test-slow` runs it longer
(ROLLING_DEPLOY_EXAMPLES / ROLLING_DEPLOY_STEPS).
"""

from __future__ import annotations

import os
import secrets

import psycopg
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from psycopg import sql

from orchestrator.lab import chatter, server
from orchestrator.lab.snapshot import ignoring_column_order, schema_snapshot
from orchestrator.run.runner import Orchestrator

from .helpers import SLOW_SHARDS, real_playbook, seed_chatter, shard_of
from .model_support import ClonedDatabaseMachine

OLD, NEW = "chatter_v1", "chatter_v2"
MAPPING = {"plain": "simple_chat", "tools": "function_chat", "rag": "rag_chat", "full": "advanced_chat"}
REVERSE = {v: k for k, v in MAPPING.items()}
FALLBACK = "plain"
UNLABELED = "medical_chat"
TABLES = (chatter.TEMPLATES, chatter.SPECS)


def playbook(**extra):
    # fallback: a value with no enum label is always writable, and rolling back the swap keeps going
    return real_playbook(**{"rollback.unmapped": "fallback", "rollback.fallback_label": FALLBACK,
                            "settings.old_version_quiet_s": 0, "settings.retries": 2, **extra})


def row_values(table: str, rid: str, value: str) -> dict:
    make = chatter.template_values if table == chatter.TEMPLATES else chatter.spec_values
    return make(rid, value)


class RollingDeploy(ClonedDatabaseMachine):
    """One database per example, cloned from a seeded template."""

    defaults = False  # the schema variant: a default on both columns, a generated column beside them

    @initialize()
    def start(self):
        self.clone("m")
        with psycopg.connect(self.dsn) as conn:
            self.original = schema_snapshot(conn)
            # canonical value of every row (the new version's vocabulary): what its last writer wrote
            self.rows: dict[tuple[str, str], str] = {
                (t, rid): MAPPING[v] for t in TABLES
                for rid, v in conn.execute(sql.SQL("SELECT id, workflow_type::text FROM {}").format(sql.Identifier(t)))}
        self.applied, self.contracted, self.went_through_contract = 0, 0, False
        self.errors: list[str] = []

    # -- who is live ------------------------------------------------------------------------------------------
    def old_live(self) -> bool:
        """Before contract 2 (and again once its undo brought the views back)."""
        return self.contracted < 2

    def new_live(self) -> bool:
        """From phase 4, when its views appear, on through the contract."""
        return self.applied >= 4

    def seen_as(self, version: str, canonical: str) -> str:
        if version == NEW:
            return canonical
        return REVERSE.get(canonical, FALLBACK)

    # -- the apps ---------------------------------------------------------------------------------------------
    @rule(table=st.sampled_from(TABLES), label=st.sampled_from(sorted(MAPPING)),
          kind=st.sampled_from(["insert", "update", "upsert", "delete"]), pick=st.integers(0, 10_000))
    def old_writes(self, table, label, kind, pick):
        if self.old_live():
            self._write(OLD, table, label, MAPPING[label], kind, pick)

    @rule(table=st.sampled_from(TABLES), value=st.sampled_from(sorted(MAPPING.values()) + [UNLABELED]),
          kind=st.sampled_from(["insert", "update", "upsert", "delete"]), pick=st.integers(0, 10_000))
    def new_writes(self, table, value, kind, pick):
        if self.new_live():
            self._write(NEW, table, value, value, kind, pick)

    def _write(self, version, table, written, canonical, kind, pick):
        conn = self.conn(version)
        ids = sorted(rid for t, rid in self.rows if t == table)
        if not ids and kind != "insert":
            kind = "insert"
        rid = secrets.token_hex(13)[:26].upper() if kind == "insert" else ids[pick % len(ids)]
        t = sql.Identifier(table)
        values = row_values(table, rid, written)
        insert = sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
            t, sql.SQL(", ").join(map(sql.Identifier, values)), sql.SQL(", ").join(sql.Placeholder() * len(values)))
        returning = sql.SQL(" RETURNING workflow_type::text")
        try:
            if kind == "insert":
                got = conn.execute(insert + returning, chatter.insert_params(values)).fetchone()
            elif kind == "upsert":
                upsert = insert + sql.SQL(" ON CONFLICT (id) DO UPDATE SET workflow_type = excluded.workflow_type")
                got = conn.execute(upsert + returning, chatter.insert_params(values)).fetchone()
            elif kind == "update":
                got = conn.execute(sql.SQL("UPDATE {} SET workflow_type = %s WHERE id = %s").format(t) + returning,
                                   (written, rid)).fetchone()
            else:
                if table == chatter.TEMPLATES and conn.execute(
                        "SELECT EXISTS (SELECT FROM workflow_templates WHERE base_template_id = %s)",
                        (rid,)).fetchone()[0]:
                    return  # a template another one derives from: its foreign key keeps it
                conn.execute(sql.SQL("DELETE FROM {} WHERE id = %s").format(t), (rid,))
                self.rows.pop((table, rid), None)
                return
        except psycopg.Error as err:
            self.errors.append(f"{version} {kind} {table} {written!r}: {' '.join(str(err).split())}")
            return
        assert got == (written,), (version, kind, table, written, got)  # RETURNING: what this version wrote
        before = self.rows.get((table, rid))
        if kind != "insert" and before is not None and self.seen_as(version, before) == written:
            canonical = before  # it wrote what it reads (an ORM saving the row back): the other side's value stays
        self.rows[(table, rid)] = canonical

    @precondition(lambda self: self.defaults)
    @rule(version=st.sampled_from([OLD, NEW]), table=st.sampled_from(TABLES))
    def insert_leaving_the_type_to_its_default(self, version, table):
        """An insert that omits the column gets the table's default, in the writer's vocabulary."""
        if (version == OLD and not self.old_live()) or (version == NEW and not self.new_live()):
            return
        rid = secrets.token_hex(13)[:26].upper()
        values = row_values(table, rid, "unused")
        del values["workflow_type"]
        insert = sql.SQL("INSERT INTO {} ({}) VALUES ({}) RETURNING workflow_type::text").format(
            sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, values)),
            sql.SQL(", ").join(sql.Placeholder() * len(values)))
        try:
            got = self.conn(version).execute(insert, chatter.insert_params(values)).fetchone()
        except psycopg.Error as err:
            self.errors.append(f"{version} insert with the default, {table}: {' '.join(str(err).split())}")
            return
        assert got == (self.seen_as(version, MAPPING["plain"]),), (version, table, got)
        self.rows[(table, rid)] = MAPPING["plain"]

    @rule(version=st.sampled_from([OLD, NEW]))
    def prepared_select_star(self, version):
        if (version == OLD and not self.old_live()) or (version == NEW and not self.new_live()):
            return
        conn = self.conn(version)
        try:
            for table in TABLES:
                cur = conn.execute(sql.SQL("SELECT * FROM {} ORDER BY id LIMIT 3").format(sql.Identifier(table)),
                                   prepare=True)
                names = [d.name for d in cur.description]
                assert "workflow_type" in names and not {"workflow_type_new", "workflow_type_old"} & set(names), names
        except psycopg.Error as err:
            self.errors.append(f"{version} prepared SELECT *: {' '.join(str(err).split())}")

    # -- the DBA ----------------------------------------------------------------------------------------------
    def _command(self, what, *args, pb=None):
        # refused: nothing changed (the state says so); the model stays where it was
        return self.dba(pb or playbook(), self._position, what, *args)

    @staticmethod
    def _position(orch) -> tuple[int, int]:
        rows = orch.state.phases()
        applied = sum(1 for r in rows.values() if r.status in ("applied", "contracted"))
        contracted = sum(1 for r in rows.values() if r.status == "contracted")
        return applied, contracted

    def _sync_position(self):
        orch = Orchestrator(playbook(), self.dsn)
        try:
            self.applied, self.contracted = self._position(orch)
        finally:
            orch.close()

    @precondition(lambda self: self.contracted == 0 and self.applied < 6)
    @rule()
    def run_next(self):
        if self._command("run", self.applied + 1):
            self.applied += 1

    @precondition(lambda self: self.contracted == 0 and self.applied > 0)
    @rule()
    def roll_back_last(self):
        n = self.applied
        if self._command("rollback", n):
            self.applied -= 1
            if n in (2, 5):
                self._fallback_applied(completed=True)

    @precondition(lambda self: self.applied == 6 and self.contracted < 6)
    @rule()
    def contract(self):
        if self._command("contract"):
            self.contracted, self.went_through_contract = 6, True
            # The old instances are gone (the contract waited for them to be quiet): ones deployed again after
            # the way back connect anew, and look the re-created enum type up then (its OID is new).
            old = self.conns.pop(OLD, None)
            if old is not None:
                old.close()

    @precondition(lambda self: self.contracted > 0)
    @rule()
    def undo_contract_step(self):
        if self._command("rollback", self.contracted):
            self.contracted -= 1

    @precondition(lambda self: self.contracted == 0 and self.applied in (2, 5, 6))
    @rule(table=st.sampled_from(TABLES))
    def command_stopped_part_way(self, table):
        """An app transaction holds a lock past the command's lock budget: the rollback gives up part-way; the
        blocker goes, and the next rules go on from wherever it stopped (roll_back_last runs it again)."""
        was = self.applied
        self.rollback_stopped_part_way(playbook(**{"settings.retries": 1}), table, was)
        self._sync_position()  # whatever the stopped command left, the next rules' writes must go through
        if was in (2, 5):
            self._fallback_applied(completed=self.applied == was - 1, column="workflow_type_new" if was == 2
                                   else "workflow_type")

    def _fallback_applied(self, completed: bool, column: str = "workflow_type") -> None:
        """Rolling back the sync (2) or the swap (5) under fallback gives values with no enum label the fallback
        label's value, in batches first: a rollback stopped after them leaves some or all rewritten."""
        for (table, rid), v in list(self.rows.items()):
            if v in REVERSE:
                continue
            if completed:
                self.rows[(table, rid)] = MAPPING[FALLBACK]
                continue
            with psycopg.connect(self.dsn) as conn:  # the varchar column, by its name now
                (now,) = conn.execute(sql.SQL("SELECT {} FROM {} WHERE id = %s").format(
                    sql.Identifier(column), sql.Identifier(table)), (rid,)).fetchone()
            assert now in (v, MAPPING[FALLBACK]), (table, rid, v, now)
            self.rows[(table, rid)] = now

    # -- invariants -------------------------------------------------------------------------------------------
    @invariant()
    def no_app_statement_failed(self):
        if hasattr(self, "errors"):
            assert not self.errors, self.errors

    @invariant()
    def every_row_holds_what_its_last_writer_wrote(self):
        if not hasattr(self, "rows"):
            return
        for version in (OLD, NEW):
            if (version == OLD and not self.old_live()) or (version == NEW and not self.new_live()):
                continue
            conn = self.conn(version)
            for table in TABLES:
                apps_rows = sql.SQL("SELECT id, workflow_type::text FROM {} WHERE id NOT LIKE '%%\\_builtin'").format(
                    sql.Identifier(table))  # phase 6's built-in rows are not the apps'
                got = dict(conn.execute(apps_rows))
                want = {rid: self.seen_as(version, v) for (t, rid), v in self.rows.items() if t == table}
                wrong = {rid: (got.get(rid), w) for rid, w in want.items() if got.get(rid) != w}
                extra = set(got) - set(want)
                assert not wrong and not extra, (version, table, dict(list(wrong.items())[:5]), sorted(extra)[:5])

    @invariant()
    def back_at_the_start_the_catalog_is_the_original(self):
        if not hasattr(self, "rows") or self.applied != 0:
            return
        with psycopg.connect(self.dsn) as conn:
            now = schema_snapshot(conn)
        if self.went_through_contract:  # the re-added enum column is the table's last one
            assert ignoring_column_order(now) == ignoring_column_order(self.original)
        else:
            assert now == self.original


@pytest.fixture(scope="module", params=["plain", "defaults"])
def template(pg_server, request):
    name = f"tmpl_{secrets.token_hex(4)}"
    dsn = server.create_database(pg_server.dsn, name)
    seed_chatter(dsn, rows=24)
    if request.param == "defaults":
        with psycopg.connect(dsn, autocommit=True) as conn:
            for table in TABLES:
                conn.execute(sql.SQL("ALTER TABLE {} ALTER COLUMN workflow_type SET DEFAULT 'plain'").format(
                    sql.Identifier(table)))
            conn.execute("ALTER TABLE template_specs ADD COLUMN name_length int GENERATED ALWAYS AS (length(name)) "
                         "STORED")
    yield dsn, request.param == "defaults"
    server.drop_database(pg_server.dsn, name)


def _run(pg_server, template, examples: int, steps: int):
    RollingDeploy.template_dsn, RollingDeploy.defaults = template
    RollingDeploy.admin_dsn = pg_server.dsn
    run_state_machine_as_test(RollingDeploy, settings=settings(
        max_examples=examples, stateful_step_count=steps, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))


def test_rolling_deploy_model(pg_server, template):
    _run(pg_server, template, int(os.environ.get("ROLLING_DEPLOY_EXAMPLES", 8)),
         int(os.environ.get("ROLLING_DEPLOY_STEPS", 40)))


@pytest.mark.slow
@pytest.mark.parametrize("shard", range(SLOW_SHARDS))
def test_rolling_deploy_model_long(pg_server, template, shard):
    _run(pg_server, template, shard_of(int(os.environ.get("ROLLING_DEPLOY_EXAMPLES", 40))),
         int(os.environ.get("ROLLING_DEPLOY_STEPS", 80)))
