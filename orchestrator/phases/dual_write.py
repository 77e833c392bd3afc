"""Phase 2: a trigger keeps the two columns in sync, whichever one the application writes.

Before the swap the app writes the enum column and the trigger fills the shadow; the swap re-points the
same trigger names at the reverse function, so the retired enum column stays usable for a rollback.
The update trigger is `UPDATE OF <column>` with a WHEN clause: updates of other columns (and the
backfill's own updates of the shadow) never call it, which keeps the app's overhead small.
"""

from __future__ import annotations

from psycopg import sql

from ..sqlkit import L, Q, case_map
from .base import Context, Phase

INSERT, UPDATE = "_sync_ins", "_sync_upd"


def forward_function(ctx: Context) -> sql.Composable:
    # One assignment: PL/pgSQL pays per expression and per transaction, and most app transactions are one row.
    body = [Q("NEW.{} := {};").format(ctx.shadow, ctx.forward(Q("NEW.{}").format(ctx.col)))]
    return _function(ctx, ctx.fn("_fwd"), body)


def reverse_function(ctx: Context) -> sql.Composable:
    body = []
    translate = [(k, v) for k, v in ctx.pb.mapping.items() if k != v]
    if ctx.pb.settings.translate_old_writes and translate:
        # A stale app instance still writing old labels after the swap gets them translated, not stored raw.
        body.append(Q("NEW.{0} := {1};").format(
            ctx.col, case_map(Q("NEW.{}").format(ctx.col), translate, otherwise=Q("NEW.{}").format(ctx.col))))
    body.append(Q("NEW.{} := {};").format(ctx.retired, ctx.backward(Q("NEW.{}").format(ctx.col))))
    return _function(ctx, ctx.fn("_rev"), body)


def _function(ctx: Context, name: sql.Identifier, body: list[sql.Composable]) -> sql.Composable:
    text = ctx.x.render(Q("BEGIN {} RETURN NEW; END").format(Q(" ").join(body)))
    return Q("CREATE OR REPLACE FUNCTION {}() RETURNS trigger LANGUAGE plpgsql AS {}").format(name, L(text))


def create_triggers(ctx: Context, function: sql.Identifier, column: sql.Identifier) -> list[sql.Composable]:
    return [
        *drop_triggers(ctx),
        Q("CREATE TRIGGER {} BEFORE INSERT ON {} FOR EACH ROW EXECUTE FUNCTION {}()").format(
            ctx.trigger(INSERT), ctx.table, function),
        Q("CREATE TRIGGER {} BEFORE UPDATE OF {} ON {} FOR EACH ROW WHEN (OLD.{} IS DISTINCT FROM NEW.{}) "
          "EXECUTE FUNCTION {}()").format(ctx.trigger(UPDATE), column, ctx.table, column, column, function),
    ]


def drop_triggers(ctx: Context) -> list[sql.Composable]:
    return [Q("DROP TRIGGER IF EXISTS {} ON {}").format(ctx.trigger(t), ctx.table) for t in (INSERT, UPDATE)]


def drop_functions(ctx: Context) -> sql.Composable:
    return Q("DROP FUNCTION IF EXISTS {}(), {}()").format(ctx.fn("_fwd"), ctx.fn("_rev"))


class DualWrite(Phase):
    name = "dual_write"
    title = "install the dual-write trigger"
    expand_doc = ("CREATE FUNCTION (old label -> new value); CREATE TRIGGER BEFORE INSERT and BEFORE UPDATE OF "
                  "the column, so every write from now on fills the shadow column")
    rollback_doc = "DROP TRIGGER; DROP FUNCTION"
    contract_doc = "DROP TRIGGER and DROP FUNCTION (ends the rollback window: run after the app is on the new column)"
    locks_doc = ("CREATE TRIGGER: SHARE ROW EXCLUSIVE, DROP TRIGGER: ACCESS EXCLUSIVE, each for milliseconds "
                 "and waiting at most lock_timeout")

    def expand(self, ctx: Context) -> None:
        ctx.x.atomic(forward_function(ctx), reverse_function(ctx), lock="none (function only)",
                     what="create sync functions")
        ctx.x.atomic(*create_triggers(ctx, ctx.fn("_fwd"), ctx.col),
                     lock="SHARE ROW EXCLUSIVE; ACCESS EXCLUSIVE if the triggers exist already (a re-run drops "
                          "them first); milliseconds, under lock_timeout", what="create sync triggers")

    def rollback(self, ctx: Context) -> None:
        ctx.x.atomic(*drop_triggers(ctx), lock="ACCESS EXCLUSIVE (catalog only, milliseconds)",
                     what="drop sync triggers")
        ctx.x.atomic(drop_functions(ctx), lock="none", what="drop sync functions")

    contract = rollback

    def check(self, ctx: Context) -> list[str]:
        return [f"trigger {ctx.trigger_name(t)!r} missing" for t in (INSERT, UPDATE)
                if not ctx.has("trigger", ctx.trigger_name(t))]
