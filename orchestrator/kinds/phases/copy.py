"""Phase 3 by copy (settings.backfill_method: copy): the table written once, whole, instead of updated row by row.

An UPDATE of every row writes each row twice over (a full-page image of the old page when it is first touched
after a checkpoint, the new row version elsewhere, an entry in every index) and leaves the table and its
indexes half empty: measured 2.8-4.2x the WAL of the blocking rewrite and 1.9x its size. A copy writes what the
rewrite writes: each row once into a new table (its `twin`, with the shadow column filled), each index built
once after the rows, as pg_repack and psycopack do. Meanwhile an AFTER trigger on the table notes the key of
every row the app writes in a log table; after each batch (and under the exchange's lock, for the last ones)
those rows are copied again from the table as they are then, or deleted from the twin when they are gone. The
log, not a direct copy, is what makes a row deleted while its batch was in flight come out deleted.

The exchange is one short transaction: the version views and the table locked (under lock_timeout, retried),
the log drained, the table renamed away and the twin renamed in its place, the views re-pointed, the sequences
the table owns handed over, the old table dropped, then the twin's indexes and keys take their names and its
foreign keys (NOT VALID, validated online after), triggers, comments and grants are the table's own again.
The table is then what it was, with the same name, columns, values, constraints, indexes, triggers and grants:
what phase 3's rollback and every later phase see is the same as after an in-place backfill.

Copied only when the table allows it (`unsupported` names what does not), else refused before any change. The
swap's catalog reads and statements are in copy_swap.py.
"""

from __future__ import annotations

import datetime
import hashlib
import time
from functools import partial

import psycopg
import structlog
from psycopg import errors as pgerr
from psycopg import sql

from orchestrator.engine.backfill import Backfill, copy_key
from orchestrator.engine.context import Context
from orchestrator.engine.errors import Refused
from orchestrator.engine.playbook import _suffixed
from orchestrator.engine.sqlkit import I, L, Q, idents, join
from orchestrator.kinds.phases import copy_bound, shadow, versions
from orchestrator.kinds.phases.copy_swap import (
    CAPTURE,
    OLD_SNAPSHOTS,
    STILL_RUNNING,
    IndexPlan,
    capture_query,
    definition_changes,
    shape_query,
    swap_statements,
)

log = structlog.get_logger()

REPLAY_CHUNK = 10_000  # logged keys copied again per transaction
LOCKED_REPLAY_KEYS = 200  # at most about this many left for the swap to copy again under its lock
VACUUM_EVERY_ROWS = 100_000  # the twin's, unless settings.vacuum_every_rows says otherwise
class TableCopy:
    def __init__(self, ctx: Context):
        self.ctx, self.x = ctx, ctx.x
        schema, table = ctx.table_name
        self.tag = hashlib.sha1(f"{schema}\x00{table}".encode()).hexdigest()[:10]
        self.twin_name = _suffixed(f"_ec_copy_{table}", f"_{self.tag}")
        self.old_name = _suffixed(f"_ec_old_{table}", f"_{self.tag}")
        self.twin = I(schema, self.twin_name)
        state = ctx.pb.settings.state_schema
        self.log = I(state, f"_ec_copy_log_{self.tag}")
        self.log_fn = I(state, f"_ec_copy_log_{self.tag}")
        self.truncate_fn = I(state, f"_ec_copy_truncate_{self.tag}")
        self.trigger_name = ctx.trigger_name("_copy")
        self.truncate_trigger_name = ctx.trigger_name("_copy_t")
        self.pk = list(ctx.facts.pk)
        self._columns: list[str] | None = None
        self._key_types: list[sql.SQL] | None = None

    # -- what the table is made of -------------------------------------------------------------------
    def columns(self) -> list[str]:
        """The columns a copy writes: the twin's, all but generated ones (it computes those itself). Read once
        per run: the swap refuses if the table's differ by then (check_definition)."""
        if self._columns is None:
            self._columns = [r[0] for r in self.x.query(Q(
                "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass({}) AND attnum > 0 "
                "AND NOT attisdropped AND attgenerated = '' ORDER BY attnum").format(L(self.x.render(self.twin))))]
        return self._columns

    def key_types(self) -> list[sql.SQL]:
        """The primary key's column types (the log's too), read once per run."""
        if self._key_types is None:
            rows = dict(self.x.query(Q(
                "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
                "WHERE attrelid = to_regclass({}) AND attname = ANY (%s)").format(L(self.x.render(self.ctx.table))),
                (self.pk,)))
            self._key_types = [Q(rows[c]) for c in self.pk]  # format_type(): the catalog's text, not the playbook's
        return self._key_types

    def check_definition(self, plans: list[IndexPlan], cur: psycopg.Cursor | None = None,
                         indexes: bool = True) -> None:
        """Refuse, naming each difference, when the table's definition is no longer the one its twin was made
        from (DDL run on it while it was copied): the swap would silently undo it. Before the index builds,
        `indexes=False` (they are read from the table when built)."""
        query = shape_query(self.x.render(self.ctx.table), self.x.render(self.twin))
        rows = cur.execute(query).fetchall() if cur is not None else self.x.query(query)
        if not indexes:
            rows = [r for r in rows if r[1] != "index"]
        own = {name for name, _, _ in shadow.planned_indexes(self.ctx)}
        if changes := definition_changes(rows, plans, own):
            # Indexes are read from the table whenever they are built on the copy: a re-run carries them.
            again = ("run phase 3 again: the copy's indexes are built again from the table's"
                     if all(kind == "index" for kind, _ in changes) else
                     "orchestrator rollback 3, then run phase 3 again: the copy is made anew from the table as it is "
                     "now")
            raise Refused(f"cannot swap the copy of {self.ctx.m.label} in: the table was changed while it was "
                          f"copied, and the swap would undo it: {'; '.join(words for _, words in changes)}; nothing "
                          f"was changed (the table is as it is; the copy is kept)", hint=again)

    def indexes(self) -> list[IndexPlan]:
        rows = self.x.query(Q("""
            SELECT ic.relname, pg_get_indexdef(x.indexrelid),
                   format('CREATE %sINDEX %s ON %s', CASE WHEN x.indisunique THEN 'UNIQUE ' ELSE '' END,
                          quote_ident(ic.relname), quote_ident(n.nspname) || '.' || quote_ident(t.relname)),
                   format('CREATE %sINDEX %s ON %s', CASE WHEN x.indisunique THEN 'UNIQUE ' ELSE '' END,
                          quote_ident(ic.relname), quote_ident(t.relname)),
                   x.indisunique, con.conname, con.contype::text, x.indisprimary
              FROM pg_index x JOIN pg_class ic ON ic.oid = x.indexrelid JOIN pg_class t ON t.oid = x.indrelid
              JOIN pg_namespace n ON n.oid = t.relnamespace
              LEFT JOIN pg_constraint con ON con.conindid = x.indexrelid AND con.conrelid = x.indrelid
                   AND con.contype IN ('p', 'u', 'x')
             WHERE x.indrelid = to_regclass({}) ORDER BY ic.relname""").format(L(self.x.render(self.ctx.table))))
        plans = []
        for name, definition, qualified, plain, unique, conname, contype, primary in rows:
            prefix = qualified if definition.startswith(qualified) else plain
            if not definition.startswith(prefix):
                raise Refused(f"cannot copy {self.ctx.m.label}: index {name!r} has a definition this tool does not "
                              f"parse ({definition})", hint="set settings.backfill_method: update")
            plans.append(IndexPlan(name, self.temp_index(name), Q(definition[len(prefix):]), unique, conname,
                                   contype, bool(primary)))
        return plans

    def temp_index(self, name: str) -> str:
        """The name of an index's copy on the twin, from the index's name: an index created or dropped on the
        table while it is copied changes no other index's."""
        return f"_ec_{self.tag}_{hashlib.sha1(name.encode()).hexdigest()[:10]}"

    def unsupported(self) -> list[str]:
        """What this table has that a copy would not carry over: empty when it can be copied."""
        table = L(self.x.render(self.ctx.table))
        checks = [
            ("it is not a plain permanent table (partitioned, a partition, unlogged or typed)",
             "SELECT c.relkind <> 'r' OR c.relpersistence <> 'p' OR c.relispartition OR c.reloftype <> 0 "
             "FROM pg_class c WHERE c.oid = to_regclass({t})"),
            ("it has inheritance parents or children",
             "SELECT EXISTS (SELECT FROM pg_inherits WHERE inhrelid = to_regclass({t}) "
             "OR inhparent = to_regclass({t}))"),
            ("it has identity columns",
             "SELECT EXISTS (SELECT FROM pg_attribute WHERE attrelid = to_regclass({t}) AND attnum > 0 "
             "AND NOT attisdropped AND attidentity <> '')"),
            ("it has row-level security or policies",
             "SELECT c.relrowsecurity OR EXISTS (SELECT FROM pg_policy WHERE polrelid = c.oid) "
             "FROM pg_class c WHERE c.oid = to_regclass({t})"),
            ("it has an exclusion, deferrable or NOT VALID constraint",
             "SELECT EXISTS (SELECT FROM pg_constraint WHERE conrelid = to_regclass({t}) "
             "AND (contype = 'x' OR (condeferrable AND contype IN ('p', 'u')) OR NOT convalidated))"),
            ("another table's foreign key to it is NOT VALID",
             "SELECT EXISTS (SELECT FROM pg_constraint WHERE confrelid = to_regclass({t}) AND contype = 'f' "
             "AND NOT convalidated)"),
            ("it or one of its indexes has its own tablespace, or an index is invalid",
             "SELECT EXISTS (SELECT FROM pg_class c WHERE c.oid = to_regclass({t}) AND c.reltablespace <> 0) "
             "OR EXISTS (SELECT FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid "
             "WHERE x.indrelid = to_regclass({t}) AND (i.reltablespace <> 0 OR NOT x.indisvalid))"),
        ]
        found = [why for why, q in checks if self.x.scalar(Q(q).format(t=table))]
        found += self.bound_objects()
        # The swap re-creates the table under the migrating role: it must be able to own it, create it in its
        # schema and re-add its foreign keys (REFERENCES on each table they point at).
        rights = self.x.query(Q("""
            SELECT NOT pg_has_role(c.relowner, 'MEMBER'), NOT has_schema_privilege(c.relnamespace, 'CREATE'),
                   (SELECT array_agg(DISTINCT f.confrelid::regclass::text ORDER BY f.confrelid::regclass::text)
                      FROM pg_constraint f WHERE f.conrelid = c.oid AND f.contype = 'f'
                       AND NOT has_table_privilege(f.confrelid, 'REFERENCES')),
                   (SELECT array_agg(DISTINCT f.conrelid::regclass::text ORDER BY f.conrelid::regclass::text)
                      FROM pg_constraint f JOIN pg_class r ON r.oid = f.conrelid
                     WHERE f.confrelid = c.oid AND f.contype = 'f' AND NOT pg_has_role(r.relowner, 'MEMBER'))
              FROM pg_class c WHERE c.oid = to_regclass({t})""").format(t=table))
        if rights:
            not_owner, no_create, no_references, children = rights[0]
            if children:
                found.append(f"the migrating role does not own {', '.join(children)}, whose foreign keys to it the "
                             f"swap re-adds")
            if not_owner:
                found.append("the migrating role is not a member of the table's owner")
            if no_create:
                found.append("the migrating role may not CREATE in the table's schema")
            if no_references:
                found.append(f"the migrating role lacks REFERENCES on {', '.join(no_references)} (the copy "
                             f"re-adds the foreign keys)")
        found += self.grantors_out_of_reach()
        if not self.pk:
            found.append("it has no primary key")
        same = [m for m in self.ctx.pb.migrations if (m.table.schema_, m.table.name) == self.ctx.table_name]
        if len(same) > 1:
            found.append("the playbook migrates more than one of its columns")
        return found

    def grantors_out_of_reach(self) -> list[str]:
        """The swap makes each grant again as the role that made it (its REVOKE must still reach it): a grant by a
        role other than the owner needs the migrating role to be able to SET ROLE to it."""
        mode = "SET" if self.x.conn.info.server_version >= 160000 else "MEMBER"
        roles = self.x.scalar(Q("""
            SELECT string_agg(DISTINCT pg_get_userbyid(p.grantor), ', ' ORDER BY pg_get_userbyid(p.grantor))
              FROM pg_class c, LATERAL (SELECT grantor FROM aclexplode(c.relacl) UNION ALL
                   SELECT (aclexplode(a.attacl)).grantor FROM pg_attribute a
                    WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped) p
             WHERE c.oid = to_regclass({}) AND p.grantor <> c.relowner AND NOT pg_has_role(p.grantor, {})""").format(
            L(self.x.render(self.ctx.table)), L(mode)))
        return [f"it has grants made by {roles}, which the swap must make again as them and the migrating role may "
                f"not SET ROLE to (GRANT those roles to it, or revoke and re-grant them as the owner)"] if roles else []

    def bound_objects(self, cur: psycopg.Cursor | None = None) -> list[str]:
        """What holds the table by its OID and would follow it when renamed away (copy_bound.py), in words; and
        the publications that would publish the twin. Under the swap's lock with its cursor `cur`."""
        table = self.x.render(self.ctx.table)
        ours = [versions.version_schema(self.ctx.pb, v) for v in ("old", "new")] if versions.enabled(self.ctx.pb) \
            else []
        bound, published = copy_bound.bound_query(table), copy_bound.published_query(
            table, self.x.conn.info.server_version)

        def ask(q: sql.Composed, params: tuple | None = None) -> list[tuple]:
            return cur.execute(q, params).fetchall() if cur is not None else self.x.query(q, params)

        return ([copy_bound.in_words(*row) for row in ask(bound, (ours,))]
                + [copy_bound.published_in_words(*row) for row in ask(published)])

    def refuse_bound_under_lock(self, cur: psycopg.Cursor) -> None:
        """bound_objects again under the swap's lock: one created since the check before it is refused too."""
        if reasons := self.bound_objects(cur):
            raise Refused(f"cannot swap the copy of {self.ctx.m.label} in: {'; '.join(reasons)}; nothing was "
                          f"changed (the copy is kept)", hint="undo that and re-run phase 3, or orchestrator "
                                                              "rollback 3 and set settings.backfill_method: update")

    def refuse_unsupported(self) -> None:
        if self.x.dry_run or self.exchanged():
            return
        reasons = self.unsupported()
        if reasons:
            begun = self.twin_exists()  # a copy begun before the table changed: it goes first
            raise Refused(f"cannot copy {self.ctx.m.label}: {'; '.join(reasons)}; nothing was changed",
                          hint=("orchestrator rollback 3 (drops the copy begun), then " if begun else "")
                          + "set settings.backfill_method: update (an in-place backfill), then re-run phase 3")

    # -- state -------------------------------------------------------------------------------------
    def twin_exists(self) -> bool:
        return bool(self.x.scalar(Q("SELECT to_regclass(%s) IS NOT NULL"), (self.x.render(self.twin),)))

    def exchanged(self) -> bool:
        """The twin took the table's place (its name is gone and the copy had finished)."""
        st = self.ctx.state.backfill(copy_key(self.ctx.m)) if self.ctx.state is not None else None
        return bool(st and st["finished_at"] is not None and not self.twin_exists())

    def plan(self) -> None:
        """What `plan` shows for phase 3 by copy."""
        x, t, twin = self.x, self.x.render(self.ctx.table), self.x.render(self.twin)
        x.note(f"CREATE TABLE {twin} (LIKE {t} INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING STORAGE "
               f"INCLUDING GENERATED INCLUDING COMMENTS INCLUDING COMPRESSION); its primary key's index; the log "
               f"{x.render(self.log)} of written keys", lock="ACCESS SHARE on the table")
        x.note(f"CREATE TRIGGER {self.trigger_name} AFTER INSERT OR UPDATE OR DELETE ON {t} (notes the key) and "
               f"{self.truncate_trigger_name} AFTER TRUNCATE", lock="SHARE ROW EXCLUSIVE for milliseconds")
        x.note(f"INSERT INTO {twin} SELECT <columns, the shadow as map(column)> FROM {t} WHERE <key range> "
               f"ON CONFLICT DO NOTHING  -- per key range, each in its own transaction with the cursor; after each, "
               f"the rows the log names copied again; VACUUM of the copy every {VACUUM_EVERY_ROWS:,} rows "
               f"(settings.vacuum_every_rows)", lock="ACCESS SHARE on the table (reads only)")
        x.note(f"CREATE INDEX ... ON {twin}: each index of the table, under a temporary name; ANALYZE",
               lock="SHARE on the copy only")
        for name, cols, unique in shadow.planned_indexes(self.ctx):  # the migration's own, under their names
            x.note(x.render(Q("CREATE {}INDEX IF NOT EXISTS {} ON {} ({})").format(
                Q("UNIQUE ") if unique else Q(""), I(name), self.twin, idents(cols))), lock="SHARE on the copy only")
        self.exchange()

    # -- before the rows -----------------------------------------------------------------------------
    def prepare(self) -> None:
        """The twin (the table's columns, defaults, CHECKs, NOT NULLs, storage, comments; no rows), its key index,
        the log and the trigger that fills it. Each piece skipped when present: a re-run goes on."""
        ctx, x = self.ctx, self.x
        st = ctx.state.backfill(copy_key(ctx.m)) if ctx.state is not None and not x.dry_run else None
        if st is not None and not x.dry_run and not self.twin_exists():
            self.forget()  # progress of a twin that is gone (dropped by hand): start over
        owner, reloptions = (None, None) if x.dry_run else x.query(Q(
            "SELECT pg_get_userbyid(relowner), reloptions FROM pg_class WHERE oid = to_regclass({})").format(
            L(x.render(ctx.table))))[0]
        create = Q("CREATE TABLE IF NOT EXISTS {} (LIKE {} INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING "
                   "GENERATED INCLUDING STORAGE INCLUDING COMMENTS INCLUDING COMPRESSION)").format(self.twin, ctx.table)
        # No autovacuum on the twin while it is filled: we VACUUM it ourselves, and a worker on it would hold
        # the swap's lock (it yields only after deadlock_timeout, past every lock_timeout attempt). The swap
        # gives the table its own storage parameters back.
        options = {o.split("=", 1)[0]: o.split("=", 1)[1] for o in reloptions or []}
        options.update({"autovacuum_enabled": "false", "toast.autovacuum_enabled": "false"})
        create = Q("{} WITH ({})").format(create, join(
            Q("{} = {}").format(Q(".").join(I(part) for part in k.split(".")), L(v)) for k, v in options.items()))
        stmts: list[sql.Composed] = [create]
        if owner is not None and owner != x.scalar(Q("SELECT current_user")):
            stmts.append(Q("ALTER TABLE {} OWNER TO {}").format(self.twin, I(owner)))
        if not x.dry_run:
            stmts += [Q("ALTER TABLE {} ALTER COLUMN {} SET STATISTICS {}").format(self.twin, I(c), L(n))
                      for c, n in x.query(Q(
                          "SELECT attname, attstattarget FROM pg_attribute WHERE attrelid = to_regclass({}) "
                          "AND attnum > 0 AND NOT attisdropped AND attstattarget >= 0").format(L(x.render(ctx.table))))]
            stmts += self.column_options()
        keys = [ix for ix in (self.indexes() if not x.dry_run else []) if ix.is_key]
        stmts += [Q("CREATE UNIQUE INDEX IF NOT EXISTS {} ON {} {}").format(I(ix.temp), self.twin, ix.tail)
                  for ix in keys]
        cols = [I(c) for c in self.pk]
        types = self.key_types() if not x.dry_run else [Q("<key type>") for _ in self.pk]
        stmts.append(Q("CREATE TABLE IF NOT EXISTS {} "
                       "(_ec_seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, {})").format(
            self.log, join(Q("{} {}").format(c, t) for c, t in zip(cols, types))))
        stmts += self._log_functions()
        x.atomic(*stmts, lock="ACCESS SHARE on the table (the twin and the log are new)",
                 skip_if=Q("SELECT to_regclass({}) IS NOT NULL AND to_regclass({}) IS NOT NULL").format(
                     L(x.render(self.twin)), L(x.render(self.log))),
                 what=f"create the copy of {ctx.m.label}")
        x.atomic(Q("DROP TRIGGER IF EXISTS {} ON {}").format(I(self.trigger_name), ctx.table),
                 Q("CREATE TRIGGER {} AFTER INSERT OR UPDATE OR DELETE ON {} FOR EACH ROW EXECUTE FUNCTION {}()")
                 .format(I(self.trigger_name), ctx.table, self.log_fn),
                 Q("DROP TRIGGER IF EXISTS {} ON {}").format(I(self.truncate_trigger_name), ctx.table),
                 Q("CREATE TRIGGER {} AFTER TRUNCATE ON {} FOR EACH STATEMENT EXECUTE FUNCTION {}()")
                 .format(I(self.truncate_trigger_name), ctx.table, self.truncate_fn),
                 skip_if=Q("SELECT ({}) AND ({})").format(ctx.exists_query("trigger", self.trigger_name),
                                                          ctx.exists_query("trigger", self.truncate_trigger_name)),
                 lock="SHARE ROW EXCLUSIVE (CREATE TRIGGER; waits out writes in flight, milliseconds)",
                 what=f"note the writes to {ctx.m.label} while it is copied")
        if not x.dry_run:  # a re-run: the table may have been changed since its twin was made
            self.check_definition([], indexes=False)

    def column_options(self) -> list[sql.Composed]:
        """The table's per-column options (n_distinct, n_distinct_inherited), which LIKE does not copy."""
        return [Q("ALTER TABLE {} ALTER COLUMN {} SET ({})").format(self.twin, I(column), join(
                    Q("{} = {}").format(I(k), L(v)) for k, v in (o.split("=", 1) for o in options)))
                for column, options in self.x.query(Q(
                    "SELECT attname, attoptions FROM pg_attribute WHERE attrelid = to_regclass({}) AND attnum > 0 "
                    "AND NOT attisdropped AND attoptions IS NOT NULL ORDER BY attnum").format(
                    L(self.x.render(self.ctx.table))))]

    def carry_index_details(self, plans: list[IndexPlan]) -> None:
        """What pg_get_indexdef leaves out, set on the index's copy (a rename keeps it): the index the table is
        CLUSTERed ON, an expression column's statistics target. Each statement idempotent: a re-run sets it again."""
        temp = {ix.name: ix.temp for ix in plans}
        stmts: list[sql.Composed] = []
        for name, clustered, targets in self.x.query(Q("""
                SELECT i.relname, x.indisclustered,
                       (SELECT json_agg(json_build_array(a.attnum, a.attstattarget::int) ORDER BY a.attnum)
                          FROM pg_attribute a WHERE a.attrelid = i.oid AND coalesce(a.attstattarget::int, -1) >= 0)
                  FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
                 WHERE x.indrelid = to_regclass({}) AND (x.indisclustered OR EXISTS (SELECT FROM pg_attribute a
                       WHERE a.attrelid = i.oid AND coalesce(a.attstattarget::int, -1) >= 0))""").format(
                L(self.x.render(self.ctx.table)))):
            if name not in temp:
                continue  # created since the indexes were read: the swap refuses it (check_definition)
            index = I(self.ctx.m.table.schema_, temp[name])
            if clustered:
                stmts.append(Q("ALTER TABLE {} CLUSTER ON {}").format(self.twin, I(temp[name])))
            stmts += [Q("ALTER INDEX {} ALTER COLUMN {} SET STATISTICS {}").format(index, L(n), L(target))
                      for n, target in targets or []]
        if stmts:
            self.x.atomic(*stmts, lock="SHARE UPDATE EXCLUSIVE on the copy only",
                          what=f"CLUSTER ON and index statistics targets of {self.ctx.m.label} on the copy")

    def _log_functions(self) -> list[sql.Composed]:
        """SECURITY DEFINER with a fixed search_path: the app's roles write the log without rights on our schema."""
        cols = join(I(c) for c in self.pk)
        new = join(Q("NEW.{}").format(I(c)) for c in self.pk)
        old = join(Q("OLD.{}").format(I(c)) for c in self.pk)
        note = Q("INSERT INTO {} ({}) VALUES ").format(self.log, cols)
        body = self.x.render(Q(
            "BEGIN IF TG_OP <> 'INSERT' THEN {0}({1}); END IF; "
            "IF TG_OP = 'INSERT' OR (TG_OP = 'UPDATE' AND ({2}) IS DISTINCT FROM ({1})) THEN {0}({2}); END IF; "
            "RETURN NULL; END").format(note, old, new))
        truncate = self.x.render(Q("BEGIN TRUNCATE {}; DELETE FROM {}; RETURN NULL; END").format(self.twin, self.log))
        return [Q("CREATE OR REPLACE FUNCTION {}() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER "
                  "SET search_path = pg_catalog AS {}").format(fn, L(text))
                for fn, text in ((self.log_fn, body), (self.truncate_fn, truncate))]

    # -- the rows ------------------------------------------------------------------------------------
    def values(self, source: str = "s") -> sql.Composed:
        """The select list copying a row: every column as it is, the shadow as the backfill would set it."""
        ctx = self.ctx
        out: list[sql.Composable] = []
        for c in self.columns():
            ref = I(source, c)
            if c == ctx.m.shadow:
                col = I(source, ctx.m.column.name)
                out.append(Q("CASE WHEN {} THEN {} ELSE {} END").format(
                    ctx.copies_agree(col, ref), ref, ctx.forward(col)))
            else:
                out.append(ref)
        return join(out)

    def insert(self, where: sql.Composable, *, refresh: bool) -> sql.Composed:
        """INSERT INTO twin SELECT ... FROM table AS s WHERE ...: a batch skips rows the log already copied
        (theirs is as fresh), a refresh overwrites them."""
        cols = self.columns()
        stmt = Q("INSERT INTO {} ({}) SELECT {} FROM {} AS s WHERE {} ON CONFLICT ({}) ").format(
            self.twin, join(I(c) for c in cols), self.values(), self.ctx.table, where, join(I(c) for c in self.pk))
        rest = [c for c in cols if c not in self.pk]
        if refresh and rest:
            return Q("{} DO UPDATE SET {}").format(stmt, join(Q("{0} = EXCLUDED.{0}").format(I(c)) for c in rest))
        return Q("{} DO NOTHING").format(stmt)

    def replay(self, *, everything: bool = False, cur: psycopg.Cursor | None = None, down_to: int = REPLAY_CHUNK,
               rounds: int = 1_000) -> int:
        """Copy again the rows the app wrote since they were noted, a chunk per transaction, until a chunk finds
        fewer than `down_to` keys (or, in the exchange, all of them in its transaction, `cur`). Returns how many
        keys it took from the log."""
        types = self.key_types()
        unnest = Q("SELECT * FROM unnest({})").format(join(Q("%s::{}[]").format(t) for t in types))
        key = Q("({})").format(join(I("s", c) for c in self.pk))
        take = Q("WITH d AS (DELETE FROM {0} WHERE _ec_seq IN (SELECT _ec_seq FROM {0} ORDER BY _ec_seq LIMIT %s) "
                 "RETURNING {1}) "
                 "SELECT DISTINCT {1} FROM d").format(self.log, join(I(c) for c in self.pk))
        twin_key = Q("({})").format(join(I("w", c) for c in self.pk))
        drop = Q("DELETE FROM {} AS w WHERE {} IN ({})").format(self.twin, twin_key, unnest)
        more = Q("SELECT count(*) > %s FROM {}").format(self.log)
        total = 0

        def apply(c: psycopg.Cursor, limit: int) -> int:
            keys = c.execute(take, (limit,)).fetchall()
            if keys:
                # Every logged row out of the twin, then in again as the table has it now: the rows inserted
                # are one snapshot of the table, unique among themselves; an upsert row by row could collide
                # with a row of the twin that the same chunk moves out of the way later (emails swapped, a row
                # deleted and re-created with its email in one transaction).
                arrays = [list(col) for col in zip(*keys)]
                c.execute(drop, arrays)
                c.execute(self.insert(Q("{} IN ({})").format(key, unnest), refresh=True), arrays)
            return len(keys)

        def chunk(c: psycopg.Cursor) -> int:
            """One chunk of the log in a savepoint. A unique violation means a row of the twin not yet copied again
            holds the value: its key is later in the log, so the chunk is taken again with more of the log,
            up to all of it. Still violated then, the rest is in transactions not yet committed: outside the
            swap's lock the keys stay in the log for the next replay (0: this one stops); under it (the app
            held off, the whole log visible) the twin would break a unique index the table keeps: raised."""
            limit = REPLAY_CHUNK
            while True:
                try:
                    with c.connection.transaction():
                        return apply(c, limit)
                except pgerr.UniqueViolation:
                    if c.execute(more, (limit,)).fetchone() == (True,):
                        limit *= 4
                    elif cur is not None:
                        raise
                    else:
                        log.info("replay left for later: a unique value is held by a row written in a "
                                 "transaction not committed yet", table=self.ctx.m.label)
                        return 0

        while True:
            if cur is not None:
                n = chunk(cur)
            else:
                def attempt() -> int:
                    with self.x.conn.transaction():
                        c = self.x.conn.cursor()
                        c.execute(Q("SET LOCAL lock_timeout = {}").format(
                            L(f"{self.ctx.pb.settings.lock_timeout_ms}ms")))
                        return chunk(c)
                n = self.x.with_retries(f"copy the rows written to {self.ctx.m.label} again", attempt)
            total += n
            rounds -= 1
            if (n < down_to or rounds <= 0) and not (everything and n):
                return total

    def copy_rows(self) -> dict:
        return CopyBatches(self.ctx, self).run()

    def build_indexes(self) -> None:
        """Each of the table's indexes on the twin, built once over its rows, and the migration's own (under
        their final names: they exist nowhere else yet). Plain CREATE INDEX: only the copy writes the twin,
        so its SHARE lock holds up nothing of the app's."""
        plans = self.indexes()
        # An index dropped from the table since an earlier run built it on the twin (a re-run reads them again).
        for (stale,) in self.x.query(Q(
                "SELECT c.relname FROM pg_index x JOIN pg_class c ON c.oid = x.indexrelid "
                "WHERE x.indrelid = to_regclass({}) AND starts_with(c.relname, %s) AND NOT c.relname = ANY (%s)"
                ).format(L(self.x.render(self.twin))), (f"_ec_{self.tag}_", [ix.temp for ix in plans])):
            self.x.atomic(Q("DROP INDEX IF EXISTS {}").format(I(self.ctx.m.table.schema_, stale)),
                          lock="ACCESS EXCLUSIVE on the copy only",
                          what=f"drop {stale}, gone from the table, on the copy")
        builds: list[tuple[sql.SQL, sql.Identifier, sql.Composable, str]] = [
            (Q("UNIQUE ") if ix.unique else Q(""), I(ix.temp), ix.tail, ix.name) for ix in plans]
        builds += [(Q("UNIQUE ") if unique else Q(""), I(name), Q("({})").format(idents(cols)), name)
                   for name, cols, unique in shadow.planned_indexes(self.ctx)
                   if not self.ctx.has("valid_index", name)]
        for unique, name, tail, shown in builds:
            self.x.online(Q("CREATE {}INDEX IF NOT EXISTS {} ON {} {}").format(unique, name, self.twin, tail),
                          lock="SHARE on the copy only (the app does not use it)", what=f"build {shown} on the copy")
        self.carry_index_details(plans)
        self.x.online(Q("ANALYZE {}").format(self.twin), lock="SHARE UPDATE EXCLUSIVE on the copy only",
                      what=f"analyze the copy of {self.ctx.m.label}")

    # -- the exchange --------------------------------------------------------------------------------
    def exchange(self) -> None:
        ctx, x = self.ctx, self.x
        if x.dry_run:
            x.note(f"-- in one transaction: LOCK the views and {x.render(ctx.table)}; copy the logged rows again; "
                   f"RENAME {x.render(ctx.table)} away and {x.render(self.twin)} in its place; views, sequences, "
                   f"indexes, keys, foreign keys (NOT VALID), triggers, comments, grants; then DROP the replaced table",
                   lock="ACCESS EXCLUSIVE for milliseconds")
            return
        if reasons := self.unsupported():  # what a copy cannot carry, added to the table since it was made
            raise Refused(f"cannot swap the copy of {ctx.m.label} in: {'; '.join(reasons)}; nothing was changed "
                          f"(the copy is kept)", hint="undo that and re-run phase 3, or orchestrator rollback 3 and "
                                                      "set settings.backfill_method: update")
        plans = self.indexes()
        self.check_definition(plans)  # early, and outside the lock; again under it
        self.replay()  # most of the log outside the lock
        views = versions.existing_views([ctx])
        rebuilt = versions.rebuilt_views(ctx)  # over the columns the copy has too: built before the lock
        # Tables whose foreign keys the swap re-adds (regclass text: the catalog's own quoting): re-adding a
        # foreign key takes SHARE ROW EXCLUSIVE on its parent (lock_for_swap says in which order).
        # (LOCK TABLE needs UPDATE, DELETE or TRUNCATE on it, which ADD FOREIGN KEY does not: a parent the role
        # may only reference is left to the statement's own lock.)
        related = x.query(Q(
            "SELECT DISTINCT conrelid::regclass::text, confrelid::regclass::text, conrelid = to_regclass({0}), "
            "has_table_privilege(confrelid, 'UPDATE') OR has_table_privilege(confrelid, 'DELETE') "
            "OR has_table_privilege(confrelid, 'TRUNCATE') "
            "FROM pg_constraint WHERE to_regclass({0}) IN (conrelid, confrelid) AND conrelid <> confrelid "
            "AND contype = 'f' ORDER BY 1, 2").format(L(x.render(ctx.table))))
        children = sorted({child for child, _, outgoing, _ in related if not outgoing})
        parents = sorted({parent for _, parent, outgoing, lockable in related if outgoing and lockable}
                         - set(children))
        started = time.monotonic()

        held: list[float] = []

        tries = [0]

        def attempt() -> None:
            tries[0] += 1
            # Right before the lock, down to a few keys: the lock's own replay copies what came since, and it
            # holds the app meanwhile (measured: 7.4 s at 10M rows when it was left up to a chunk of 10,000).
            since = self.wait_for_old_snapshots()
            self.replay(down_to=LOCKED_REPLAY_KEYS, rounds=100)
            held[:] = [time.monotonic()]
            with x.conn.transaction():
                cur = x.conn.cursor()
                cur.execute(Q("SET LOCAL lock_timeout = {}").format(L(f"{ctx.pb.settings.lock_timeout_ms}ms")))
                self.lock_for_swap(cur, [*views, ctx.table, self.twin, *(Q(c) for c in children)],
                                   [Q(p) for p in parents], parents_first=tries[0] % 2 == 0)
                self.refuse_old_snapshots_under_lock(cur, since)
                held.append(time.monotonic())  # the locks are ours from here to the commit
                self.check_definition(plans, cur)
                self.refuse_bound_under_lock(cur)
                self.replay(everything=True, cur=cur)
                held.append(time.monotonic())
                self._exchange(cur, plans, rebuilt)
            held.append(time.monotonic())

        x.with_retries(f"swap the copy of {ctx.m.label} in", attempt)
        log.info("copy swapped in", table=ctx.m.label, seconds=round(time.monotonic() - started, 3),
                 locks_held_ms=round((held[3] - held[1]) * 1000, 1),
                 of_which_replay_ms=round((held[2] - held[1]) * 1000, 1))
        self.finish_exchange()

    @staticmethod
    def lock_for_swap(cur: psycopg.Cursor, table: list[sql.Composable], parents: list[sql.Composable], *,
                      parents_first: bool) -> None:
        """The swap's locks: ACCESS EXCLUSIVE on the views, the table, its twin and the tables whose foreign keys
        point at it, in one statement (views first, as an app statement through a view takes them); SHARE ROW
        EXCLUSIVE on the tables the table's own foreign keys point at, in another. No order suits every app: one
        that writes the table and then a parent (pgbench: pgbench_accounts, then pgbench_branches) waits, holding
        the table, for a parent locked first; one that writes a parent and then the table does the reverse. Each
        is a lock cycle that only lock_timeout breaks, on every attempt; so the attempts alternate, the table
        first, then the parents first (measured under pgbench -c 4: 31 attempts in 64 s, failed, with the
        parents always first)."""
        steps = [Q("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(join(table))]
        if parents:
            steps.insert(len(steps) if not parents_first else 0,
                         Q("LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE").format(join(parents)))
        for step in steps:
            cur.execute(step)

    def finish_exchange(self) -> None:
        """After the swap's commit, each step skipped when done: the replaced table dropped, the foreign keys
        re-added NOT VALID validated (a copy refuses a table with NOT VALID ones of its own), the log dropped."""
        ctx, x = self.ctx, self.x
        self.drop_old()
        for table, name in x.query(Q("SELECT conrelid::regclass::text, conname FROM pg_constraint "
                                     "WHERE to_regclass({}) IN (conrelid, confrelid) AND contype = 'f' "
                                     "AND NOT convalidated ORDER BY 1, 2").format(L(x.render(ctx.table)))):
            x.online(Q("ALTER TABLE {} VALIDATE CONSTRAINT {}").format(Q(table), I(name)),
                     lock="SHARE UPDATE EXCLUSIVE (reads and writes go on)", what=f"validate {name}")
        x.atomic(Q("DROP TABLE IF EXISTS {}").format(self.log),
                 Q("DROP FUNCTION IF EXISTS {}(), {}()").format(self.log_fn, self.truncate_fn),
                 lock="none (our own log)", what="drop the copy's log")

    def drop_old(self) -> None:
        """The table the copy replaced, under its new name: no statement reaches it any more. Its foreign keys
        go first, each in its own short transaction: dropping one removes its triggers on the parent table under
        ACCESS EXCLUSIVE, and the DROP TABLE holds its locks until its files are unlinked, seconds for a big
        table (measured: an app statement waited 12.8 s for the parent `users` at 10M rows)."""
        old = I(self.ctx.m.table.schema_, self.old_name)
        for (name,) in self.x.query(Q("SELECT conname FROM pg_constraint WHERE conrelid = to_regclass({}) "
                                      "AND contype = 'f' ORDER BY conname").format(L(self.x.render(old)))):
            self.x.atomic(Q("ALTER TABLE {} DROP CONSTRAINT IF EXISTS {}").format(old, I(name)),
                          lock="ACCESS EXCLUSIVE on the replaced table and, for milliseconds, its parent",
                          what=f"drop {name} of the table the copy replaced")
        self.x.atomic(Q("DROP TABLE IF EXISTS {}").format(old),
                      lock="ACCESS EXCLUSIVE on the replaced table only (nothing uses it)",
                      what=f"drop the table the copy of {self.ctx.m.label} replaced")

    def wait_for_old_snapshots(self) -> datetime.datetime:
        """A transaction that keeps its snapshot (REPEATABLE READ, SERIALIZABLE) and reads the table after the swap
        would see the twin as of that snapshot: without the rows copied since. As CREATE INDEX CONCURRENTLY does,
        the swap first waits for every transaction holding a snapshot now, idle or running (a long statement too),
        to end; ones that begin meanwhile are not waited for. Up to settings.throttle_max_wait_s, then refused,
        naming them. Returns the server's time when the wait began."""
        since, = self.x.query(Q("SELECT clock_timestamp()"))[0]
        old = self.x.query(OLD_SNAPSHOTS)
        limit, started = self.ctx.pb.settings.throttle_max_wait_s, time.monotonic()
        while old:
            running = {v for (v,) in self.x.query(STILL_RUNNING, ([o[1] for o in old],))}
            if not (old := [o for o in old if o[1] in running]):
                break
            if time.monotonic() - started >= limit:
                shown = "; ".join(f"pid {pid} ({state}, transaction open {age}: {query!r})"
                                  for pid, _, state, _, age, query in old)
                raise Refused(f"cannot swap the copy of {self.ctx.m.label} in: transactions holding a snapshot older "
                              f"than the swap would read it without its last rows; waited "
                              f"{time.monotonic() - started:.0f}s (settings.throttle_max_wait_s) for: {shown}; nothing "
                              f"was changed (the copy is kept)",
                              hint="let those transactions end (or end them: SELECT pg_terminate_backend(pid)), or "
                                   "raise settings.throttle_max_wait_s, then re-run phase 3")
            if time.monotonic() - started < 0.1:
                log.info("the copy's swap waits for transactions holding old snapshots", pids=[o[0] for o in old])
            time.sleep(0.2)
        return since

    @staticmethod
    def refuse_old_snapshots_under_lock(cur: psycopg.Cursor, since: datetime.datetime) -> None:
        """Under the swap's lock, without waiting (the app queues behind it): a transaction older than the wait
        (one the wait could not see yet) or idle with its snapshot (REPEATABLE READ, begun since) would read the
        twin without its last rows: the attempt is given up and retried, after a new wait."""
        old = [o for o in cur.execute(OLD_SNAPSHOTS).fetchall()
               if o[3] < since or o[2] in ("idle in transaction", "idle in transaction (aborted)")]
        if old:
            raise pgerr.LockNotAvailable(f"sessions {[o[0] for o in old]} hold a snapshot older than the swap")

    def _exchange(self, cur: psycopg.Cursor, plans: list[IndexPlan], views: list[sql.Composed]) -> None:
        """The statements of the swap, read from the catalog under its lock in one query and sent in one round
        trip (each round trip holds the lock longer, the more so on a busy server)."""
        row = cur.execute(capture_query(self.x.render(self.ctx.table)),
                          ([self.trigger_name, self.truncate_trigger_name],)).fetchone()
        assert row is not None  # a SELECT of scalar subqueries returns one row
        swap = Q(";\n").join(swap_statements(self.ctx, dict(zip(CAPTURE, row)), plans, views, twin=self.twin,
                                              old_name=self.old_name, tag=self.tag))
        self.x.logged(swap, partial(cur.execute, swap))

    # -- the way back (before the exchange) ------------------------------------------------------------
    def discard(self) -> None:
        """Phase 3's rollback before the exchange: the trigger, the log and the twin go; the table is untouched."""
        ctx, x = self.ctx, self.x
        x.atomic(Q("DROP TRIGGER IF EXISTS {} ON {}").format(I(self.trigger_name), ctx.table),
                 Q("DROP TRIGGER IF EXISTS {} ON {}").format(I(self.truncate_trigger_name), ctx.table),
                 skip_if=Q("SELECT NOT ({}) AND NOT ({})").format(
                     ctx.exists_query("trigger", self.trigger_name),
                     ctx.exists_query("trigger", self.truncate_trigger_name)),
                 lock="ACCESS EXCLUSIVE for milliseconds (DROP TRIGGER)", what=f"stop noting writes to {ctx.m.label}")
        self.drop_old()  # a run stopped right after the swap left it
        x.atomic(Q("DROP TABLE IF EXISTS {}").format(self.twin), Q("DROP TABLE IF EXISTS {}").format(self.log),
                 Q("DROP FUNCTION IF EXISTS {}(), {}()").format(self.log_fn, self.truncate_fn),
                 lock="ACCESS EXCLUSIVE on the copy only", what=f"drop the copy of {ctx.m.label}")
        self.forget()

    def forget(self) -> None:
        if self.ctx.state is not None and not self.x.dry_run:
            self.x.conn.execute(Q("DELETE FROM {} WHERE playbook = %s AND target = %s").format(
                self.ctx.state.t("backfills")), (self.ctx.state.playbook, copy_key(self.ctx.m)))


class CopyBatches(Backfill):
    """The backfill engine's keyset batches, each an INSERT into the twin; the log replayed after each."""

    fires_app_triggers = False  # the batches write the twin only: the app's triggers on the table do not fire

    def __init__(self, ctx: Context, copy: TableCopy):
        super().__init__(ctx)
        self.copy = copy
        self.key = copy_key(ctx.m)
        self.title = f"copy {ctx.m.label}"
        self.vacuum_table = copy.twin

    def statement(self, cond: sql.Composable) -> sql.Composed:
        return self.copy.insert(cond, refresh=False)

    def after_batch(self, scanned: int) -> None:
        self.copy.replay()

    def vacuum_every_rows(self) -> int:
        """The twin's VACUUM sets hint bits and the visibility map while the copied pages are fresh in the
        WAL: with data checksums, the first reader to set a hint bit after a checkpoint logs the whole page."""
        return self.s.vacuum_every_rows or VACUUM_EVERY_ROWS
