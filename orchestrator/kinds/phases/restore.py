"""The undo of the swap's contract: the old column back beside the new one, online (a reverse migration).

The contract dropped the retired columns (and the enum type, or the conversion functions). Putting them back
is the forward migration run the other way, with the same discipline: the old type made again
(old_type.recreate: the enum with its labels in their order, owner, comment and grants; or the conversion
functions), the old column added to every table (nullable, no default: catalog only) with the column's
comment and grants, the sync triggers of the swapped state (the new column is the app's, the old copy follows
it through the conversion), a batched, resumable backfill, the retired indexes built CONCURRENTLY, and a parity
scan. It ends where the swap left the tables before its contract, so `rollback 5` then swaps back in one short
transaction, and `contract 5` drops it all again.

What cannot come back: the column's position in the table (the re-added column is the last one; only a
table rewrite could move it) and the enum type's OID (clients look types up by name on connecting).
"""

from __future__ import annotations

from orchestrator.engine import catalog, parity
from orchestrator.engine.backfill import Backfill, analyze, check_app_triggers
from orchestrator.engine.context import Context, unlabeled_refusal, unlabeled_rows
from orchestrator.engine.errors import Refused
from orchestrator.engine.sqlkit import Q
from orchestrator.kinds.phases import keys, old_type, shape, target_check, versions
from orchestrator.kinds.phases.dual_write import install_sync
from orchestrator.kinds.phases.shadow import AddShadowColumn


def refuse_unlabeled(ctxs: list[Context]) -> None:
    """Under rollback.unmapped: refuse, values with no enum label stop the reverse migration before it starts
    (the swap back would refuse them anyway, after the whole backfill): one message naming every table."""
    if ctxs[0].x.dry_run or ctxs[0].m.rollback.unmapped != "refuse":
        return
    found = unlabeled_rows(ctxs, typed=False)  # the type may not exist yet
    if found:
        raise unlabeled_refusal("the reverse migration", ctxs, found)


def refuse_new_dependents(ctxs: list[Context]) -> None:
    """Indexes, views or constraints created on the column since the contract: the swap back would leave them
    on the varchar column, which `rollback 1` drops (an index silently, with what it guaranteed). Refuse, naming
    them all, as the swap does for objects created since phase 1."""
    x, pb = ctxs[0].x, ctxs[0].pb
    if x.dry_run:
        return
    ours = (pb.app_versions.old, pb.app_versions.new) if pb.app_versions else ()
    found = []
    for ctx in ctxs:
        oid = catalog.existing_table_oid(x.conn, *ctx.table_name)
        attnum = catalog.existing_column(x.conn, oid, ctx.m.column.name)["attnum"]
        simple, blockers = catalog.column_indexes(x.conn, oid, attnum, keys=ctx.changes_type)
        known = {ix.name for ix in ctx.facts.indexes}
        found += [f"{ctx.m.label}: index {ix.name!r}" for ix in simple if ix.name not in known]
        found += [f"{ctx.m.label}: {b}" for b in blockers]
        found += [f"{ctx.m.label}: {d}" for d in catalog.column_dependents(x.conn, oid, attnum, ours,
                                                                           excused=keys.excused(ctxs))
                  if not d.startswith(f"constraint {target_check.name(ctx)} ")]
    if found:
        raise Refused(f"the way back cannot carry objects created on the column since the contract: "
                      f"{'; '.join(found)}; nothing was changed",
                      hint=f"drop them (re-create them once {ctxs[0].old_copy} is back), then re-run the rollback")


def before(ctxs: list[Context]) -> None:
    """Refusals that must come before anything changes."""
    refuse_new_dependents(ctxs)
    if ctxs[0].changes_type and not ctxs[0].x.dry_run:  # the check below calls `back`: made now, gone if refused
        old_type.recreate(ctxs)
        try:
            refuse_unlabeled(ctxs)
        except Refused:
            for ctx in ctxs:
                old_type.drop_conversions(ctx)
            raise
    else:
        refuse_unlabeled(ctxs)
    if not ctxs[0].x.dry_run:
        check_app_triggers(ctxs, reverse=True)  # its batches update every row, as phase 3's did


def add_enum_column(ctx: Context) -> None:
    """The retired column again: nullable, no default (catalog only), with the column's comment and grants,
    which the varchar column has carried since the swap."""
    ctx.x.atomic(Q("ALTER TABLE {} ADD COLUMN {} {}").format(ctx.table, ctx.retired, ctx.old_type),
                 *shape.carry_statements(ctx, ctx.m.column.name, ctx.m.retired),
                 skip_if=ctx.exists_query("column", ctx.m.retired),
                 lock="ACCESS EXCLUSIVE (catalog only, milliseconds)", what=f"add {ctx.old_copy} to {ctx.m.label}")


def build_retired_indexes(ctx: Context) -> None:
    """The column's original indexes, on the enum copy and under the names the swap gave them: `rollback 5`
    renames them back."""
    for ix in ctx.facts.indexes:
        cols = [ctx.m.retired if c == ctx.m.column.name else c for c in ix.columns]
        AddShadowColumn._build(ctx, ix.retired_name, cols, ix.unique)


def check_parity(ctx: Context) -> dict:
    if ctx.x.dry_run:
        ctx.x.note(parity.plan_note(ctx, swapped=True), lock="ACCESS SHARE")
        return {}
    result = parity.check(ctx, swapped=True)
    if result.mismatches:
        raise Refused(f"parity check after the reverse backfill found {result.mismatches} of {result.rows} rows of "
                      f"{ctx.m.label} whose old copy differs from the reverse conversion (e.g. ids {result.sample})",
                      hint="find what writes bypassing the triggers, then re-run the same rollback: the backfill "
                           "mends the drifted rows")
    return {"parity": result.to_json()}


def restore(ctxs: list[Context]) -> dict:
    """Every step skips what is done, so a re-run after a crash resumes (the backfill at its stored cursor)."""
    old_type.recreate(ctxs)
    # The new version's views first (contract 5 dropped them): its search_path leads to them again before the
    # tables grow a column it does not know, so its statements keep their result type.
    versions.install_views(ctxs, ("new",), swapped=True)
    for ctx in ctxs:
        add_enum_column(ctx)
    install_sync(ctxs, swapped=True)  # from here every write keeps the enum copy in step
    details = {}
    for ctx in ctxs:
        engine = Backfill(ctx, reverse=True)
        if ctx.x.dry_run:
            engine.plan()
            done = {}
        else:
            st = engine.run()
            done = {"rows_done": st["rows_done"], "batches": st["batches"], "max_batch_ms": st["max_batch_ms"]}
        build_retired_indexes(ctx)
        analyze(ctx, reverse=True)
        details[ctx.m.label] = {**done, **check_parity(ctx)}
    return {"reverse": details}
