"""Phase 6: the playbook's seed rows (built-in templates), inserted once and removed by the rollback."""

from __future__ import annotations

import json

from psycopg import sql
from psycopg.types.json import Jsonb

from ..sqlkit import I, L, Q, join
from .base import Context, Phase


def _value(v):
    return Jsonb(v) if isinstance(v, (dict, list)) else v


class SeedRowsPhase(Phase):
    name = "seed_rows"
    title = "insert the seed rows"
    expand_doc = "INSERT each seed row unless a row with its key exists; remember which ones were inserted"
    rollback_doc = "DELETE the seed rows this phase inserted (by key)"
    locks_doc = "ROW EXCLUSIVE (plain inserts)"

    def _key_cond(self, ctx: Context, row: dict) -> sql.Composable:
        return join((Q("{} = {}").format(I(k), L(_value(row[k]))) for k in ctx.pb.seed_rows.key), " AND ")

    def expand(self, ctx: Context) -> None:
        for row in ctx.pb.seed_rows.rows:
            cols = list(row)
            insert = Q("INSERT INTO {} ({}) SELECT {} WHERE NOT EXISTS (SELECT FROM {} WHERE {}) RETURNING {}").format(
                ctx.table, join(I(c) for c in cols), join(L(_value(row[c])) for c in cols), ctx.table,
                self._key_cond(ctx, row), join(I(k) for k in ctx.pb.seed_rows.key))
            if ctx.x.dry_run:
                ctx.x.note(ctx.x.render(insert), lock="ROW EXCLUSIVE")
                continue
            # The insert and the record of it commit together, so the rollback always knows what is ours.
            record = Q("""UPDATE {} SET details = jsonb_set(details, '{{inserted}}',
                              coalesce(details->'inserted', '[]'::jsonb) || %s::jsonb)
                          WHERE playbook = %s AND phase = %s""").format(ctx.state.t("phases"))

            def attempt(insert=insert, record=record):
                with ctx.x.conn.transaction():
                    got = ctx.x.logged(insert, lambda: ctx.x.conn.execute(insert).fetchall())
                    if got:
                        ctx.x.conn.execute(record, (json.dumps([list(got[0])], default=str),
                                                    ctx.state.playbook, self.number))
            ctx.x.with_retries("insert seed row", attempt)

    def rollback(self, ctx: Context) -> None:
        key = ctx.pb.seed_rows.key
        if ctx.x.dry_run:
            ctx.x.note(f"DELETE FROM {ctx.x.render(ctx.table)} WHERE {', '.join(key)} = <each key inserted>",
                       lock="ROW EXCLUSIVE")
            return
        for values in ctx.state.details(self.number).get("inserted", []):
            ctx.x.atomic(Q("DELETE FROM {} WHERE {}").format(ctx.table, self._key_cond(ctx, dict(zip(key, values)))),
                         lock="ROW EXCLUSIVE", what="delete seed row")
        ctx.x.conn.execute(Q("UPDATE {} SET details = details - 'inserted' WHERE playbook = %s AND phase = %s")
                           .format(ctx.state.t("phases")), (ctx.state.playbook, self.number))
