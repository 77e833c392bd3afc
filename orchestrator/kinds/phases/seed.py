"""Phase 6: the playbook's seed rows (built-in templates), inserted once and removed by the rollback."""

from __future__ import annotations

import json

from psycopg import sql
from psycopg.types.json import Jsonb

from orchestrator.engine.context import Context
from orchestrator.engine.errors import Refused
from orchestrator.engine.sqlkit import I, L, Q, join
from orchestrator.kinds.phases.base import Phase


def _value(v):
    return Jsonb(v) if isinstance(v, (dict, list)) else v


class SeedRowsPhase(Phase):
    name = "seed_rows"
    title = "insert the seed rows"
    expand_doc = "INSERT each seed row unless a row with its key exists; remember which ones were inserted"
    rollback_doc = "DELETE the seed rows this phase inserted (by key)"
    locks_doc = "ROW EXCLUSIVE (plain inserts)"

    def _refuse_app_data(self, ctx: Context, keys: list[dict]) -> None:
        """Built-in rows the application has since edited or points at are its data now: refuse, naming them."""
        seeds = {json.dumps([str(r[k]) for k in ctx.m.seed_rows.key]): r for r in ctx.m.seed_rows.rows}
        edited, referenced = [], []
        for key in keys:
            shown = ", ".join(str(v) for v in key.values())
            seed = seeds.get(json.dumps([str(key[k]) for k in ctx.m.seed_rows.key]))
            if seed is not None and ctx.x.scalar(self._edited_query(ctx, key, seed)):
                edited.append(shown)
            for child, cols in self._references(ctx, key):
                referenced.append(f"{shown} (from {child}.{','.join(cols)})")
        if edited or referenced:
            parts = ([f"edited since: {', '.join(edited)}"] if edited else []) + \
                    ([f"referenced: {', '.join(referenced)}"] if referenced else [])
            raise Refused(f"rollback of phase {self.number} would delete built-in rows of {ctx.m.table.name} that "
                          f"the application has made its own ({'; '.join(parts)}); nothing was changed",
                          hint="keep the migration, or restore/delete those rows yourself and re-run the rollback "
                               "(rows already gone are skipped)")

    def _edited_query(self, ctx: Context, key: dict, seed: dict) -> sql.Composed:
        # Each column compared as the table's type would hold the seed value (json columns via jsonb).
        cols = [c for c in seed if c not in ctx.m.seed_rows.key]
        differs = join((Q("to_jsonb(t) -> {0} IS DISTINCT FROM to_jsonb(s) -> {0}").format(L(c)) for c in cols),
                       " OR ")
        return Q("SELECT EXISTS (SELECT FROM {0} t, jsonb_populate_record(NULL::{0}, {1}) s "
                 "WHERE {2} AND ({3}))").format(
            ctx.table, L(Jsonb({c: seed[c] for c in cols})), self._key_cond(ctx, key, alias="t"),
            differs if cols else Q("false"))

    def _references(self, ctx: Context, key: dict) -> list[tuple[str, list[str]]]:
        """(table, columns) of each foreign key with rows pointing at the row with this key."""
        fks = ctx.x.query(Q("""SELECT n.nspname, c.relname,
                                      array(SELECT a.attname FROM unnest(k.conkey) WITH ORDINALITY u(n, i)
                                            JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = u.n
                                            ORDER BY i),
                                      array(SELECT a.attname FROM unnest(k.confkey) WITH ORDINALITY u(n, i)
                                            JOIN pg_attribute a ON a.attrelid = k.confrelid AND a.attnum = u.n
                                            ORDER BY i)
                               FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid
                               JOIN pg_namespace n ON n.oid = c.relnamespace
                               WHERE k.contype = 'f' AND k.confrelid = to_regclass({})""").format(
            L(ctx.x.render(ctx.table))))
        found = []
        for schema, table, cols, parent_cols in fks:
            child = I(schema, table)
            q = Q("SELECT EXISTS (SELECT FROM {} c WHERE ({}) IN (SELECT {} FROM {} t WHERE {}))").format(
                child, join(I("c", col) for col in cols), join(I("t", col) for col in parent_cols), ctx.table,
                self._key_cond(ctx, key, alias="t"))
            if ctx.x.scalar(q):
                found.append((table, list(cols)))
        return found

    def _key_cond(self, ctx: Context, row: dict, alias: str | None = None) -> sql.Composed:
        if alias is not None:
            return join((Q("{} = {}").format(I(alias, k), L(_value(row[k]))) for k in ctx.m.seed_rows.key), " AND ")
        return join((Q("{} = {}").format(I(k), L(_value(row[k]))) for k in ctx.m.seed_rows.key), " AND ")

    def expand(self, ctx: Context) -> None:
        if not ctx.m.seed_rows.rows:
            return
        for row in ctx.m.seed_rows.rows:
            cols = list(row)
            insert = Q("INSERT INTO {} ({}) SELECT {} WHERE NOT EXISTS (SELECT FROM {} WHERE {}) RETURNING {}").format(
                ctx.table, join(I(c) for c in cols), join(L(_value(row[c])) for c in cols), ctx.table,
                self._key_cond(ctx, row), join(I(k) for k in ctx.m.seed_rows.key))
            if ctx.x.dry_run:
                ctx.x.note(ctx.x.render(insert), lock="ROW EXCLUSIVE")
                continue
            # The insert and the record of it commit together, so the rollback always knows what is ours.
            record = Q("""UPDATE {} SET details = details || jsonb_build_object('inserted',
                              coalesce(details->'inserted', '{{}}'::jsonb) || jsonb_build_object(%s::text,
                                  coalesce(details->'inserted'->%s::text, '[]'::jsonb) || %s::jsonb))
                          WHERE playbook = %s AND phase = %s""").format(ctx.state.t("phases"))

            def attempt(insert=insert, record=record):
                with ctx.x.conn.transaction():
                    got = ctx.x.logged(insert, lambda: ctx.x.conn.execute(insert).fetchall())
                    if got:
                        ctx.x.conn.execute(record, (ctx.m.label, ctx.m.label,
                                                    json.dumps([list(got[0])], default=str),
                                                    ctx.state.playbook, self.number))
            ctx.x.with_retries("insert seed row", attempt)

    def _inserted(self, ctx: Context) -> list[dict]:
        """The keys of the rows this phase inserted into ctx's table (recorded with each insert)."""
        recorded = (ctx.state.details(self.number).get("inserted") or {}).get(ctx.m.label, [])
        return [dict(zip(ctx.m.seed_rows.key, values)) for values in recorded]

    def before_rollback_all(self, ctxs: list[Context]) -> None:
        for ctx in ctxs:
            if ctx.m.seed_rows.rows and not ctx.x.dry_run:
                self._refuse_app_data(ctx, self._inserted(ctx))

    def rollback(self, ctx: Context) -> None:
        if not ctx.m.seed_rows.rows:
            return
        key = ctx.m.seed_rows.key
        if ctx.x.dry_run:
            ctx.x.note(f"DELETE FROM {ctx.x.render(ctx.table)} WHERE {', '.join(key)} = <each key inserted>",
                       lock="ROW EXCLUSIVE")
            return
        for row_key in self._inserted(ctx):
            ctx.x.atomic(Q("DELETE FROM {} WHERE {}").format(ctx.table, self._key_cond(ctx, row_key)),
                         lock="ROW EXCLUSIVE", what="delete seed row")
        ctx.x.conn.execute(Q("""UPDATE {} SET details = jsonb_set(details, '{{inserted}}',
                                   coalesce(details->'inserted', '{{}}'::jsonb) - %s::text)
                                WHERE playbook = %s AND phase = %s""").format(ctx.state.t("phases")),
                           (ctx.m.label, ctx.state.playbook, self.number))
