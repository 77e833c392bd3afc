"""Phase 2: a trigger keeps the two columns in sync, whichever one the application writes.

Before the swap the app writes the enum column and the trigger fills the shadow; the swap re-points the
same trigger names at the reverse function, so the retired enum column stays usable for a rollback.
The triggers are named to fire after the app's own BEFORE triggers (see Context.trigger_name), so they see
the row as it will be stored, and the update trigger fires on any UPDATE (not `UPDATE OF`: another trigger
may change the column without it being in the SET list). Its WHEN clause calls the function only when the
copy would change, so the backfill's own updates and most app updates never call it.
"""

from __future__ import annotations

from psycopg import sql

from ..errors import Refused
from ..sqlkit import L, Q, case_map
from .base import Context, Phase

INSERT, UPDATE = "_sync_ins", "_sync_upd"


def forward_function(ctx: Context) -> sql.Composable:
    # One assignment: PL/pgSQL pays per expression and per transaction, and most app transactions are one row.
    body = [Q("NEW.{} := {};").format(ctx.shadow, ctx.forward(Q("NEW.{}").format(ctx.col)))]
    return _function(ctx, ctx.fn("_fwd"), body)


def reverse_function(ctx: Context) -> sql.Composable:
    body = []
    translate = [(k, v) for k, v in ctx.m.mapping.items() if k != v]
    if ctx.pb.settings.translate_old_writes and translate:
        # A stale app instance still writing old labels after the swap gets them translated, not stored raw.
        body.append(Q("NEW.{0} := {1};").format(
            ctx.col, case_map(Q("NEW.{}").format(ctx.col), translate, otherwise=Q("NEW.{}").format(ctx.col))))
    body.append(Q("NEW.{} := {};").format(ctx.retired, ctx.backward(Q("NEW.{}").format(ctx.col))))
    return _function(ctx, ctx.fn("_rev"), body)


def _function(ctx: Context, name: sql.Identifier, body: list[sql.Composable]) -> sql.Composable:
    text = ctx.x.render(Q("BEGIN {} RETURN NEW; END").format(Q(" ").join(body)))
    return Q("CREATE OR REPLACE FUNCTION {}() RETURNS trigger LANGUAGE plpgsql AS {}").format(name, L(text))


def out_of_sync(ctx: Context, swapped: bool) -> sql.Composable:
    """True for a NEW row whose copy is not what the sync function would write."""
    new = Q("NEW.{}").format(ctx.col)
    if not swapped:
        return Q("NEW.{} IS DISTINCT FROM {}").format(ctx.shadow, ctx.forward(new))
    cond = Q("NEW.{} IS DISTINCT FROM {}").format(ctx.retired, ctx.backward(new))
    translate = [k for k, v in ctx.m.mapping.items() if k != v]
    if ctx.pb.settings.translate_old_writes and translate:  # a stale write of an old label, to translate
        cond = Q("{} OR {} IN ({})").format(cond, new, Q(", ").join(L(k) for k in translate))
    return cond


def create_triggers(ctx: Context, swapped: bool) -> list[sql.Composable]:
    function = ctx.fn("_rev" if swapped else "_fwd")
    return [
        *drop_triggers(ctx),
        Q("CREATE TRIGGER {} BEFORE INSERT ON {} FOR EACH ROW EXECUTE FUNCTION {}()").format(
            ctx.trigger(INSERT), ctx.table, function),
        Q("CREATE TRIGGER {} BEFORE UPDATE ON {} FOR EACH ROW WHEN ({}) EXECUTE FUNCTION {}()").format(
            ctx.trigger(UPDATE), ctx.table, out_of_sync(ctx, swapped), function),
    ]


def later_triggers(ctx: Context) -> list[str]:
    """The table's other row-level BEFORE INSERT/UPDATE triggers that would fire after the sync (their names
    sort after ours), and could change the column behind it."""
    rows = ctx.x.query(Q("""SELECT tgname FROM pg_trigger WHERE tgrelid = to_regclass({}) AND NOT tgisinternal
                            AND tgtype & 1 = 1 AND tgtype & 2 = 2 AND tgtype & (4 | 16) <> 0
                            AND tgname NOT IN ({}, {}) AND tgname COLLATE "C" > {} COLLATE "C"
                            ORDER BY 1""").format(
        L(ctx.x.render(ctx.table)), L(ctx.trigger_name(INSERT)), L(ctx.trigger_name(UPDATE)),
        L(ctx.trigger_name(INSERT))))
    return [r[0] for r in rows]


def refuse_later_triggers(ctx: Context) -> None:
    if ctx.x.dry_run:
        return
    later = later_triggers(ctx)
    if later:
        raise Refused(f"{ctx.m.label}: trigger(s) {', '.join(repr(t) for t in later)} would fire after the sync "
                      f"trigger {ctx.trigger_name(INSERT)!r} and could change the column behind it; nothing was "
                      f"changed", hint="rename them to sort before '~' (e.g. a lowercase name), then re-run")


def drop_triggers(ctx: Context) -> list[sql.Composable]:
    return [Q("DROP TRIGGER IF EXISTS {} ON {}").format(ctx.trigger(t), ctx.table) for t in (INSERT, UPDATE)]


def drop_functions(ctx: Context) -> sql.Composable:
    return Q("DROP FUNCTION IF EXISTS {}(), {}()").format(ctx.fn("_fwd"), ctx.fn("_rev"))


class DualWrite(Phase):
    name = "dual_write"
    title = "install the dual-write trigger"
    expand_doc = ("CREATE FUNCTION (old label -> new value); CREATE TRIGGER BEFORE INSERT and BEFORE UPDATE "
                  "WHEN the copy would change, named to fire after the app's own triggers, so every write from now "
                  "on fills the shadow column")
    rollback_doc = "DROP TRIGGER; DROP FUNCTION"
    contract_doc = "DROP TRIGGER and DROP FUNCTION (ends the rollback window: run after the app is on the new column)"
    locks_doc = ("CREATE TRIGGER: SHARE ROW EXCLUSIVE, DROP TRIGGER: ACCESS EXCLUSIVE, each for milliseconds "
                 "and waiting at most lock_timeout")

    def expand(self, ctx: Context) -> None:
        ctx.x.atomic(forward_function(ctx), reverse_function(ctx), lock="none (function only)",
                     what="create sync functions")
        ctx.x.atomic(*create_triggers(ctx, swapped=False),
                     lock="SHARE ROW EXCLUSIVE (short, under lock_timeout)", what="create sync triggers")

    def rollback(self, ctx: Context) -> None:
        ctx.x.atomic(*drop_triggers(ctx), lock="ACCESS EXCLUSIVE (catalog only, milliseconds)",
                     what="drop sync triggers")
        ctx.x.atomic(drop_functions(ctx), lock="none", what="drop sync functions")

    contract = rollback

    def before_expand(self, ctx: Context) -> None:
        refuse_later_triggers(ctx)

    def check(self, ctx: Context) -> list[str]:
        return [f"trigger {ctx.trigger_name(t)!r} missing" for t in (INSERT, UPDATE)
                if not ctx.has("trigger", ctx.trigger_name(t))]
