"""Phase 2: a trigger keeps the two columns in sync, whichever one the application writes.

Before the swap the app writes the enum column and the trigger fills the shadow; the swap re-points the
same trigger names at the reverse function, so the retired enum column stays usable for a rollback.
The triggers are named to fire after the app's own BEFORE triggers (see Context.trigger_name), so they see
the row as it will be stored, and the update trigger fires on any UPDATE (not `UPDATE OF`: another trigger
may change the column without it being in the SET list). Its WHEN clause calls the function only when the
copy would change, so the backfill's own updates and most app updates never call it.
"""

from __future__ import annotations

from typing import Sequence

from psycopg import sql

from orchestrator.engine.context import TRIGGER_PREFIX, Context, unlabeled_refusal
from orchestrator.engine.errors import Refused
from orchestrator.engine.sqlkit import L, Q, Stmt, case_map
from orchestrator.kinds.phases import versions
from orchestrator.kinds.phases.base import Phase

INSERT, UPDATE = "_sync_ins", "_sync_upd"


def forward_function(ctx: Context) -> sql.Composed:
    """Before the swap. The enum column is the old version's, the shadow the new version's (its view writes
    it): whichever of the two a write changed is copied to the other; the enum side by default. Copies that
    agree already are left alone: a new value with no enum label beside the enum copy's fallback label (or
    NULL) is what the new version wrote, not something to overwrite with the enum side's mapping."""
    new, shadow = Q("NEW.{}").format(ctx.col), Q("NEW.{}").format(ctx.shadow)
    to_old = ctx.old_value(shadow)
    disagree = Q("NOT {}").format(ctx.copies_agree(new, shadow))
    wrote_new = _wrote(ctx.shadow, disagree)
    # Conditions in parentheses: PL/pgSQL would take a CASE's THEN for the IF's.
    wrote_old = Q("{} AND {}").format(_changed(ctx.col), disagree)
    body = Q("IF ({}) THEN NEW.{} := {}; ELSIF ({}) THEN NEW.{} := {};{} END IF;").format(
        wrote_new, ctx.col, to_old, wrote_old, ctx.shadow, ctx.forward(new), _seen_old(ctx, ctx.col))
    return _function(ctx, ctx.fn("_fwd"), [body])


def reverse_function(ctx: Context, closing: bool = False) -> sql.Composed:
    """After the swap. The varchar column is the new version's, the retired enum column the old version's (its
    view writes it): the same, the other way round; old labels written into the varchar column by a stale
    instance are translated. `closing` (while the swap is rolled back): a write giving the column a value with
    no enum label is refused, so none can appear after the rollback has looked for them."""
    new, retired = Q("NEW.{}").format(ctx.col), Q("NEW.{}").format(ctx.retired)
    translate = ctx.conversion.translations
    keep_in_sync = []
    if ctx.pb.settings.translate_old_writes and translate:
        # A stale app instance still writing old labels after the swap gets them translated, not stored raw.
        keep_in_sync.append(Q("IF ({0} IN ({1})) THEN NEW.{2} := {3};{4} END IF;").format(
            new, Q(", ").join(L(k) for k, _ in translate), ctx.col,
            case_map(new, translate, otherwise=new), _seen_old(ctx)))
    keep_in_sync.append(Q("NEW.{} := {};").format(ctx.retired, ctx.old_value(new)))
    # ELSIF, not ELSE: an UPDATE leaving the column as it was leaves the old copy too (a value down(up(x)) does
    # not give back stays as the old version wrote it, for the rollback).
    body = [Q("IF ({}) THEN NEW.{} := {};{} ELSIF ({}) THEN {} END IF;").format(
        _wrote(ctx.retired, Q("{} IS DISTINCT FROM {}").format(retired, ctx.old_value(new))), ctx.col,
        ctx.forward(retired), _seen_old(ctx), _changed(ctx.col),
        Q(" ").join(keep_in_sync))]
    if closing:
        body.append(Q("IF ({0} IS NOT NULL AND {1} IS NULL AND (TG_OP = 'INSERT' OR {0} IS DISTINCT FROM OLD.{2})) "
                      "THEN RAISE EXCEPTION USING ERRCODE = 'check_violation', MESSAGE = {3} || {0} || {4}; "
                      "END IF;").format(new, ctx.backward(new), ctx.col,
                                        L(f"{ctx.m.label}: the value "),
                                        L(f" cannot go back to {ctx.old_name}: the swap is being rolled back")))
    return _function(ctx, ctx.fn("_rev"), body)


def _wrote(column: sql.Identifier, disagree: sql.Composable) -> sql.Composed:
    """The write set `column` itself (an INSERT giving it, an UPDATE changing it) and the two columns disagree:
    that version's write wins."""
    return Q("(CASE WHEN TG_OP = 'INSERT' THEN NEW.{0} IS NOT NULL ELSE NEW.{0} IS DISTINCT FROM OLD.{0} END) "
             "AND {1}").format(column, disagree)


def _changed(column: sql.Identifier) -> sql.Composed:
    """An INSERT, or an UPDATE that changed `column`: only then is the other copy computed from it. An UPDATE of
    other columns leaves both copies as they are, whatever they hold (recomputing would overwrite a value the
    conversion does not give back, e.g. a DST-gap time, with its converted neighbour)."""
    return Q("(TG_OP = 'INSERT' OR NEW.{0} IS DISTINCT FROM OLD.{0})").format(column)


def _seen_old(ctx: Context, column: sql.Identifier | None = None) -> Stmt:
    """Note that the old version wrote (app_versions): `status` shows when, `contract` waits for quiet."""
    if ctx.pb.app_versions is None:
        return Q("")
    call = Q(" PERFORM {}();").format(versions.seen_old_function(ctx))
    if column is None:
        return call
    return Q(" IF (TG_OP = 'INSERT' OR NEW.{0} IS DISTINCT FROM OLD.{0}) THEN{1} END IF;").format(column, call)


def _function(ctx: Context, name: sql.Identifier, body: Sequence[sql.Composable]) -> sql.Composed:
    text = ctx.x.render(Q("BEGIN {} RETURN NEW; END").format(Q(" ").join(body)))
    return Q("CREATE OR REPLACE FUNCTION {}() RETURNS trigger LANGUAGE plpgsql AS {}").format(name, L(text))


def out_of_sync(ctx: Context, swapped: bool) -> sql.Composed:
    """True for a NEW row whose copy is not what the sync function would write."""
    new = Q("NEW.{}").format(ctx.col)
    if not swapped:
        return Q("NOT {}").format(ctx.copies_agree(new, Q("NEW.{}").format(ctx.shadow)))
    cond = Q("NEW.{} IS DISTINCT FROM {}").format(ctx.retired, ctx.old_value(new))
    translate = [k for k, _ in ctx.conversion.translations]
    if ctx.pb.settings.translate_old_writes and translate:  # a stale write of an old label, to translate
        cond = Q("{} OR {} IN ({})").format(cond, new, Q(", ").join(L(k) for k in translate))
    return cond


def _update_when(ctx: Context, swapped: bool) -> sql.Composed:
    """The update trigger's WHEN: one of the two copies changed, and they disagree (see _changed)."""
    other = ctx.retired if swapped else ctx.shadow
    return Q("(NEW.{0} IS DISTINCT FROM OLD.{0} OR NEW.{1} IS DISTINCT FROM OLD.{1}) AND ({2})").format(
        ctx.col, other, out_of_sync(ctx, swapped))


def create_triggers(ctx: Context, swapped: bool) -> list[sql.Composed]:
    function = ctx.fn("_rev" if swapped else "_fwd")
    return [
        *drop_triggers(ctx),
        *versions.old_write_trigger(ctx),
        Q("CREATE TRIGGER {} BEFORE INSERT ON {} FOR EACH ROW EXECUTE FUNCTION {}()").format(
            ctx.trigger(INSERT), ctx.table, function),
        Q("CREATE TRIGGER {} BEFORE UPDATE ON {} FOR EACH ROW WHEN ({}) EXECUTE FUNCTION {}()").format(
            ctx.trigger(UPDATE), ctx.table, _update_when(ctx, swapped), function),
    ]


def later_triggers(ctx: Context) -> list[str]:
    """The table's other row-level BEFORE INSERT/UPDATE triggers that would fire after the sync (their names
    sort after ours), and could change the column behind it. Ours (every column's) each touch their own pair."""
    rows = ctx.x.query(Q("""SELECT tgname FROM pg_trigger WHERE tgrelid = to_regclass({}) AND NOT tgisinternal
                            AND tgtype & 1 = 1 AND tgtype & 2 = 2 AND tgtype & (4 | 16) <> 0
                            AND tgname NOT LIKE {} AND tgname COLLATE "C" > {} COLLATE "C"
                            ORDER BY 1""").format(
        L(ctx.x.render(ctx.table)), L(TRIGGER_PREFIX.replace("_", "\\_") + "%"), L(ctx.trigger_name(INSERT))))
    return [r[0] for r in rows]


def refuse_later_triggers(ctx: Context) -> None:
    if ctx.x.dry_run:
        return
    later = later_triggers(ctx)
    if later:
        raise Refused(f"{ctx.m.label}: trigger(s) {', '.join(repr(t) for t in later)} would fire after the sync "
                      f"trigger {ctx.trigger_name(INSERT)!r} and could change the column behind it; nothing was "
                      f"changed", hint="rename them to sort before '~' (e.g. a lowercase name), then re-run")


def drop_triggers(ctx: Context) -> list[sql.Composed]:
    return [*(Q("DROP TRIGGER IF EXISTS {} ON {}").format(ctx.trigger(t), ctx.table) for t in (INSERT, UPDATE)),
            *versions.drop_old_write_trigger(ctx)]


def drop_functions(ctx: Context) -> sql.Composed:
    return Q("DROP FUNCTION IF EXISTS {}(), {}()").format(ctx.fn("_fwd"), ctx.fn("_rev"))


def _triggers_present(ctx: Context, every: bool) -> sql.Composed:
    checks = [ctx.exists_query("trigger", ctx.trigger_name(t)) for t in (INSERT, UPDATE)]
    return Q("SELECT ({})").format(Q(") AND (" if every else ") OR (").join(checks))


def install_sync(ctxs: list[Context], swapped: bool) -> None:
    """Both functions, the triggers and the old version's note, skipping triggers already in place: the undo of
    a contract puts the sync back in the swapped state (the enum copy follows the varchar column)."""
    versions.install_tracking(ctxs)
    for ctx in ctxs:
        ctx.x.atomic(forward_function(ctx), reverse_function(ctx), lock="none (function only)",
                     what="create sync functions")
        ctx.x.atomic(*create_triggers(ctx, swapped), skip_if=_triggers_present(ctx, every=True),
                     lock="SHARE ROW EXCLUSIVE (milliseconds, under lock_timeout)", what="create sync triggers")


def drop_sync(ctx: Context) -> None:
    """One column's triggers and functions; no lock is taken when the triggers are gone already."""
    ctx.x.atomic(*drop_triggers(ctx), skip_if=Q("SELECT NOT ({})").format(_triggers_present(ctx, every=False)),
                 lock="ACCESS EXCLUSIVE (catalog only, milliseconds)", what="drop sync triggers")
    ctx.x.atomic(drop_functions(ctx), lock="none", what="drop sync functions")


def remove_sync(ctxs: list[Context]) -> None:
    for ctx in reversed(ctxs):
        drop_sync(ctx)
    versions.remove_tracking(ctxs)  # after the triggers that call it


def _unlabeled_shadow(ctx: Context) -> sql.Composed:
    """Rows whose new column holds a value with no enum label (the new version's, before the swap)."""
    return Q("{} IS NOT NULL AND {} IS NULL").format(ctx.shadow, ctx.backward(ctx.shadow))


def _fallback_shadow(ctx: Context) -> None:
    """Under fallback: those values become the fallback label's value, as the enum copy already reads, in
    batches (re-checked outside the subquery: a row written meanwhile is not clobbered)."""
    x = ctx.x
    if x.dry_run:
        x.note(f"-- rows WHERE {x.render(_unlabeled_shadow(ctx))}: {ctx.m.shadow} = the fallback label's value")
        return
    if ctx.has("column", ctx.m.shadow):
        ctx.update_in_batches(ctx.shadow, ctx.forward(ctx.col), _unlabeled_shadow(ctx),
                              what="give the new column the fallback label's value")


class DualWrite(Phase):
    name = "dual_write"
    title = "install the dual-write trigger"
    expand_doc = ("CREATE FUNCTION (old label -> new value); CREATE TRIGGER BEFORE INSERT and BEFORE UPDATE "
                  "WHEN the copy would change, named to fire after the app's own triggers, so every write from now "
                  "on fills the shadow column")
    rollback_doc = "DROP TRIGGER; DROP FUNCTION"
    contract_doc = "DROP TRIGGER and DROP FUNCTION (ends the rollback window: run after the app is on the new column)"
    uncontract_doc = ("the sync triggers (in place already after phase 5's undo) and, with app_versions, both "
                      "versions' views, pointed at the swapped columns")
    locks_doc = ("CREATE TRIGGER: SHARE ROW EXCLUSIVE, DROP TRIGGER: ACCESS EXCLUSIVE, each for milliseconds "
                 "and waiting at most lock_timeout")

    def expand(self, ctx: Context) -> None:
        ctx.x.atomic(forward_function(ctx), reverse_function(ctx), lock="none (function only)",
                     what="create sync functions")
        ctx.x.atomic(*create_triggers(ctx, swapped=False),
                     lock="SHARE ROW EXCLUSIVE; ACCESS EXCLUSIVE if the triggers exist already (a re-run drops "
                          "them first); milliseconds, under lock_timeout", what="create sync triggers")

    def rollback(self, ctx: Context) -> None:
        drop_sync(ctx)

    contract = rollback

    def before_expand(self, ctx: Context) -> None:
        refuse_later_triggers(ctx)

    # With app_versions, the old version's views come with phase 1 and the new version's with phase 4; the
    # old version's writes are noted from here on.
    def expand_all(self, ctxs: list[Context]) -> dict | None:
        versions.install_tracking(ctxs)
        return super().expand_all(ctxs)

    def before_rollback_all(self, ctxs: list[Context]) -> None:
        """Without the sync the new column is no longer kept in step. A value with no enum label the new version
        wrote there would outlive it and later pass for a copy that agrees (beside the fallback label, or NULL),
        so the backfill of a new attempt would keep it over what the old version wrote since. Under refuse:
        refuse, naming the rows; under fallback the rollback gives them the fallback label's value."""
        if ctxs[0].x.dry_run or ctxs[0].m.rollback.unmapped != "refuse":
            return
        found = []
        for ctx in ctxs:
            if ctx.has("column", ctx.m.shadow):
                n, ids = ctx.sample_ids(_unlabeled_shadow(ctx))
                if n:
                    found.append((ctx, n, ids))
        if found:
            raise unlabeled_refusal("rollback of the sync", ctxs, found)

    def rollback_all(self, ctxs: list[Context]) -> None:
        if ctxs[0].m.rollback.unmapped == "fallback":
            for ctx in ctxs:
                _fallback_shadow(ctx)
        remove_sync(ctxs)

    def contract_all(self, ctxs: list[Context]) -> None:
        # The old version is gone (the contract waited for its quiet). The new version keeps its views until
        # contract 5 drops the enum column: only then do the tables look like them.
        versions.remove_views(ctxs, ("old",))
        remove_sync(ctxs)

    def uncontract_all(self, ctxs: list[Context]) -> None:
        # The sync is back already: the undo of the swap's contract (before this one) needed it for its backfill.
        install_sync(ctxs, swapped=True)
        versions.install_views(ctxs, ("old", "new"), swapped=True)

    def check_all(self, ctxs: list[Context]) -> list[str]:
        problems = super().check_all(ctxs)
        if versions.enabled(ctxs[0].pb):
            problems += [f"view {ctxs[0].x.render(versions.view_name(c, v))} missing" for c in ctxs for v in ("old",)
                         if not ctxs[0].x.scalar(Q("SELECT to_regclass({}) IS NOT NULL").format(
                             L(ctxs[0].x.render(versions.view_name(c, v)))))]
        return problems

    def check(self, ctx: Context) -> list[str]:
        return [f"trigger {ctx.trigger_name(t)!r} missing" for t in (INSERT, UPDATE)
                if not ctx.has("trigger", ctx.trigger_name(t))]
