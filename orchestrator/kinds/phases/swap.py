"""Phase 5: the shadow column takes the column's name, in one short transaction.

NOT NULL is prepared online first (CHECK ... NOT VALID, then VALIDATE, which only takes SHARE UPDATE
EXCLUSIVE), so the final SET NOT NULL needs no scan. The retired enum column stays, kept in sync by the
reverse trigger, until the contract: that is the rollback window.
"""

from __future__ import annotations

import psycopg
import structlog
from psycopg import sql

from orchestrator.engine import catalog, parity
from orchestrator.engine.backfill import progress_key
from orchestrator.engine.context import Context, unlabeled_refusal, unlabeled_rows
from orchestrator.engine.errors import OrchestratorError, Refused
from orchestrator.engine.playbook import _suffixed
from orchestrator.engine.sqlkit import I, L, Q
from orchestrator.kinds.phases import keys, old_type, restore, shape, target_check, verify, versions
from orchestrator.kinds.phases.base import Phase
from orchestrator.kinds.phases.dual_write import (
    create_triggers,
    drop_triggers,
    refuse_later_triggers,
    remove_sync,
    reverse_function,
)
from orchestrator.kinds.phases.shadow import AddShadowColumn

log = structlog.get_logger()


def lock_tables(ctxs: list[Context], mode: str = "ACCESS EXCLUSIVE") -> sql.Composed:
    """LOCK every table of the playbook, in one fixed (sorted) order, as the first statement of the swap; the
    version views (app_versions) before them, in the order an app statement through a view takes its locks
    (the view, then its table): the other way round, each would wait for what the other holds."""
    names = sorted({ctx.m.table.schema_ + "\x00" + ctx.m.table.name: ctx.table for ctx in ctxs}.items())
    return Q("LOCK TABLE {} IN {} MODE").format(
        Q(", ").join([*versions.existing_views(ctxs), *(t for _, t in names)]), Q(mode))


def all_of(queries) -> sql.Composed:
    return Q("SELECT ({})").format(Q(") AND (").join(list(queries)))


def any_of(queries) -> sql.Composed:
    return Q("SELECT ({})").format(Q(") OR (").join(list(queries)))


def recheck_parity(ctx: Context) -> None:
    """Phase 4's verdict may be stale (writes that bypassed the triggers since): scan again before the swap."""
    result = verify.scan_before_swap(ctx)
    if result.mismatches:
        raise Refused(f"cannot swap {ctx.m.label}: {result.mismatches} of {result.rows} rows changed since phase 4 "
                      f"without the sync (e.g. ids {result.sample}); nothing was changed",
                      hint="find what writes bypassing the triggers (session_replication_role = replica, disabled "
                           "triggers), then orchestrator rollback 4; rollback 3; run 3; run 4")
    verify.refuse_lossy(ctx, result, "nothing was changed")


class SwapColumns(Phase):
    name = "swap"
    title = "swap the columns"
    expand_doc = ("CHECK (shadow IS NOT NULL) NOT VALID; VALIDATE; then one transaction: SET NOT NULL, move the "
                  "default, RENAME column -> retired and shadow -> column, rename indexes, point the trigger "
                  "at the reverse mapping (the enum column stays in sync for the rollback window)")
    rollback_doc = ("refuse (listing rows) or apply the fallback label where a value has no enum label; CHECK "
                    "NOT VALID + VALIDATE on the enum column; one transaction renaming everything back")
    contract_doc = "DROP INDEX CONCURRENTLY the retired indexes; DROP COLUMN retired; DROP TYPE the enum"
    uncontract_doc = ("a reverse migration: CREATE TYPE (original labels, order, owner, comment, grants); ADD COLUMN "
                      "retired enum (catalog only) with the column's comment and grants; the sync triggers; backfill "
                      "retired = reverse mapping in resumable batches; CREATE INDEX CONCURRENTLY the retired "
                      "indexes; parity scan. Ends swapped, as before the contract: rollback 5 then swaps back")
    undone_note = ("the sync triggers are back (the reverse backfill needed them) although the dual-write phase "
                   "still shows contracted; they stay until that phase is rolled back, or contract 5 drops them")
    locks_doc = ("ACCESS EXCLUSIVE for milliseconds (catalog only, under lock_timeout, retried); "
                 "VALIDATE takes SHARE UPDATE EXCLUSIVE, which does not block the app")
    visible_to_app = True

    # -- names ------------------------------------------------------------------------------------
    def new_check(self, ctx: Context) -> str:
        return _suffixed(f"_ec_{ctx.m.shadow}", "_nn")

    def old_check(self, ctx: Context) -> str:
        return _suffixed(f"_ec_{ctx.m.retired}", "_nn")

    def swapped(self, ctx: Context) -> sql.Composed:
        return ctx.exists_query("column", ctx.m.retired)

    # -- expand -----------------------------------------------------------------------------------
    _excused: tuple[str, ...] = ()  # constraints the swap moves (keys.excused), set by before_expand_all

    def before_expand_all(self, ctxs: list[Context]) -> None:
        self._excused = keys.excused(ctxs)
        super().before_expand_all(ctxs)

    def before_expand(self, ctx: Context) -> None:
        if ctx.x.dry_run or ctx.has("column", ctx.m.retired):
            return
        conn = ctx.x.conn
        oid = catalog.existing_table_oid(conn, *ctx.table_name)
        info = catalog.existing_column(conn, oid, ctx.m.column.name)
        ours = (ctx.pb.app_versions.old, ctx.pb.app_versions.new) if ctx.pb.app_versions else ()
        blockers = catalog.column_dependents(conn, oid, info["attnum"], ours, excused=self._excused)
        if blockers:
            raise Refused(f"cannot swap: objects created since phase 1 depend on {ctx.m.column.name!r}: "
                          + "; ".join(blockers), hint="drop or move them, then run the swap again")
        refuse_later_triggers(ctx)
        shape.refuse_new_indexes(ctx)
        old_type.current_default(ctx)
        old_type.check_moved_default(ctx)

    def expand_all(self, ctxs: list[Context]) -> dict:
        x = ctxs[0].x
        labels = {ctx.m.label: None if x.dry_run and not ctx.has("column", ctx.m.column.name)
                  else self._default_label(ctx) for ctx in ctxs}
        target_check.prepare_all(ctxs)  # target.check: NOT VALID + VALIDATE on the shadow column
        if x.dry_run:
            for ctx in ctxs:  # the parity scan again, as phase 4 runs it
                x.note(parity.plan_note(ctx, swapped=False), lock="ACCESS SHARE")
        elif not any(ctx.has("column", ctx.m.retired) for ctx in ctxs):
            try:
                for ctx in ctxs:
                    recheck_parity(ctx)
            except Refused:
                target_check.drop_all(ctxs)  # refused: nothing changed
                raise
        for ctx in ctxs:
            self._prepare_not_null(ctx)
        # Every table in one short transaction: no statement ever sees one column swapped and another not
        # (a join between them keeps working), locks taken in a fixed order so two runs cannot deadlock.
        x.atomic(lock_tables(ctxs), *keys.drop_foreign_keys(ctxs),
                 *(st for ctx in ctxs for st in self._swap_statements(ctx, labels[ctx.m.label])),
                 *keys.add_foreign_keys(ctxs),
                 skip_if=all_of(self.swapped(ctx) for ctx in ctxs),
                 lock="ACCESS EXCLUSIVE on every table (catalog only, milliseconds)", what="swap columns")
        keys.validate_foreign_keys(ctxs)
        # The default each enum column had at the swap: its rollback puts that one back.
        return {"tables": {label: {"default_label": d} for label, d in labels.items()}}

    def _default_label(self, ctx: Context) -> str | None:
        if ctx.x.dry_run or ctx.has("column", ctx.m.retired):  # already swapped: what the swap recorded
            return self._swap_time_default(ctx)
        return old_type.current_default(ctx)

    def _swap_time_default(self, ctx: Context) -> str | None:
        recorded = ((ctx.state.details(self.number) if ctx.state is not None and not ctx.x.dry_run else {})
                    .get("tables") or {}).get(ctx.m.label)
        return recorded["default_label"] if recorded else ctx.facts.default_label

    def _prepare_not_null(self, ctx: Context) -> None:
        x, t = ctx.x, ctx.table
        if not ctx.new_not_null:
            return
        x.atomic(Q("ALTER TABLE {} ADD CONSTRAINT {} CHECK ({} IS NOT NULL) NOT VALID").format(
            t, I(self.new_check(ctx)), ctx.shadow),
            skip_if=Q("SELECT ({}) OR ({})").format(ctx.exists_query("constraint", self.new_check(ctx)),
                                                  self.swapped(ctx)),
            lock="ACCESS EXCLUSIVE (catalog only)", what="add NOT NULL check")
        x.atomic(Q("ALTER TABLE {} VALIDATE CONSTRAINT {}").format(t, I(self.new_check(ctx))),
                 skip_if=self.swapped(ctx), lock="SHARE UPDATE EXCLUSIVE (reads and writes go on)",
                 what="validate NOT NULL check", online=True)

    def _swap_statements(self, ctx: Context, default_label: str | None) -> list[sql.Composed]:
        t, f = ctx.table, ctx.facts
        prep = [Q("ALTER COLUMN {} DROP DEFAULT").format(ctx.col)]
        key_drops = keys.drop_key(ctx)  # before DROP NOT NULL, which a primary key forbids
        if f.not_null:
            prep.append(Q("ALTER COLUMN {} DROP NOT NULL").format(ctx.col))  # rows the old enum cannot hold
        if ctx.new_not_null:
            prep.append(Q("ALTER COLUMN {} SET NOT NULL").format(ctx.shadow))  # uses the valid CHECK: no scan
        stmts = [*key_drops, Q("ALTER TABLE {} {}").format(t, Q(", ").join(prep))]
        if ctx.new_not_null:
            # A statement of its own: in the same ALTER TABLE the CHECK would go first and SET NOT NULL would
            # scan the whole table under ACCESS EXCLUSIVE.
            stmts.append(Q("ALTER TABLE {} DROP CONSTRAINT {}").format(t, I(self.new_check(ctx))))
        stmts += shape.carry_statements(ctx, ctx.m.column.name, ctx.m.shadow)  # grants, comment
        stmts += [Q("ALTER TABLE {} RENAME COLUMN {} TO {}").format(t, ctx.col, ctx.retired),
                 Q("ALTER TABLE {} RENAME COLUMN {} TO {}").format(t, ctx.shadow, ctx.col)]
        stmts += shape.set_default(ctx, old_type.new_default(ctx, default_label))
        for ix in f.indexes:
            if ix.constraint is None:  # a key's index went with its constraint: keys.add_key moves it
                stmts += [Q("ALTER INDEX {} RENAME TO {}").format(ctx.index(ix.name), I(ix.retired_name)),
                          Q("ALTER INDEX {} RENAME TO {}").format(ctx.index(ix.shadow_name), I(ix.name))]
        stmts += keys.add_key(ctx, "shadow_name")
        if f.new_type is not None:
            stmts += keys.move_sequence(ctx, f.new_type)
        return stmts + create_triggers(ctx, swapped=True) + versions.replace_views(ctx, swapped=True)

    # -- rollback ---------------------------------------------------------------------------------
    def rollback_all(self, ctxs: list[Context]) -> None:
        x = ctxs[0].x
        if not x.dry_run and not any(ctx.has("column", ctx.m.retired) for ctx in ctxs):
            # Swap never happened: only the online NOT NULL preparation may be left.
            for ctx in ctxs:
                x.atomic(Q("ALTER TABLE {} DROP CONSTRAINT IF EXISTS {}").format(ctx.table, I(self.new_check(ctx))),
                         lock="ACCESS EXCLUSIVE (catalog only)", what="drop NOT NULL check")
            target_check.drop_all(ctxs)
            return
        # From here on the sync refuses new values without an enum label (the new app is being rolled back;
        # rows holding one already stay writable), and a lock that waits for every write in flight makes sure
        # none slipped in before: the check for such values below cannot miss one written meanwhile.
        for ctx in ctxs:
            x.atomic(reverse_function(ctx, closing=True), skip_if=Q("SELECT NOT ({})").format(self.swapped(ctx)),
                     lock="none (function only)", what=f"refuse new values without {ctx.old_value_word}")
        try:
            self._close_and_unswap(ctxs)
        except BaseException:  # refused, out of lock budget, a lost connection, Ctrl-C: the sync as it was
            self.reapply_all(ctxs)
            raise
        target_check.drop_all(ctxs)  # back on the shadow column: no trace of target.check

    def _close_and_unswap(self, ctxs: list[Context]) -> None:
        x = ctxs[0].x
        x.atomic(lock_tables(ctxs, "SHARE ROW EXCLUSIVE"), lock="SHARE ROW EXCLUSIVE on every table (waits for "
                 "the writes in flight, then released)", what="wait for writes in flight")
        self._resolve_unmapped(ctxs)
        if not x.dry_run and any(ctx.has("column", ctx.m.retired) for ctx in ctxs):
            keys.refuse_sequence_past_old_type(ctxs)
        for ctx in ctxs:  # the old column's unique index, for its key to come back to (kept after a re-run)
            for ix in keys.key_indexes(ctx):
                if x.dry_run or ctx.has("column", ctx.m.retired):
                    AddShadowColumn._build(ctx, ix.retired_name, [ctx.m.retired], True)
        for ctx in ctxs:
            if ctx.facts.not_null:
                x.atomic(Q("ALTER TABLE {} ADD CONSTRAINT {} CHECK ({} IS NOT NULL) NOT VALID").format(
                    ctx.table, I(self.old_check(ctx)), ctx.retired),
                    skip_if=Q("SELECT ({}) OR NOT ({})").format(
                        ctx.exists_query("constraint", self.old_check(ctx)), self.swapped(ctx)),
                    lock="ACCESS EXCLUSIVE (catalog only)", what=f"add NOT NULL check on {ctx.old_copy}")
                x.atomic(Q("ALTER TABLE {} VALIDATE CONSTRAINT {}").format(ctx.table, I(self.old_check(ctx))),
                         skip_if=Q("SELECT NOT ({})").format(self.swapped(ctx)),
                         lock="SHARE UPDATE EXCLUSIVE", what=f"validate NOT NULL check on {ctx.old_copy}",
                         online=True)
        x.atomic(lock_tables(ctxs), *keys.drop_foreign_keys(ctxs),
                 *(st for ctx in ctxs for st in self._unswap_statements(ctx)),
                 *keys.add_foreign_keys(ctxs),
                 skip_if=Q("SELECT NOT ({})").format(any_of(self.swapped(ctx) for ctx in ctxs)),
                 lock="ACCESS EXCLUSIVE on every table (catalog only, milliseconds)", what="swap columns back")
        keys.validate_foreign_keys(ctxs)
        for ctx in ctxs:  # the new column's copy of the key index went with the key: phase 5 needs it again
            for ix in keys.key_indexes(ctx):
                AddShadowColumn._build(ctx, ix.shadow_name, [ctx.m.shadow], True)

    def reapply_all(self, ctxs: list[Context]) -> None:
        """The swapped state as the app needs it, in case a rollback that stopped part-way (killed, out of lock
        budget) left the sync that refuses new values without a way back, or the NOT NULL check it put on the
        old copy (which a value the old type cannot hold, copied as NULL, would break). Never raises: a failure
        here must not hide the error that brought us here; `run 5` and the same rollback call it again."""
        x = ctxs[0].x
        if x.dry_run:
            return
        for ctx in ctxs:
            not_swapped = Q("SELECT NOT ({})").format(self.swapped(ctx))
            try:
                if ctx.facts.not_null:
                    x.atomic(Q("ALTER TABLE {} DROP CONSTRAINT IF EXISTS {}").format(ctx.table, I(self.old_check(ctx))),
                             skip_if=Q("SELECT NOT ({}) OR NOT ({})").format(
                                 self.swapped(ctx), ctx.exists_query("constraint", self.old_check(ctx))),
                             lock="ACCESS EXCLUSIVE (catalog only, milliseconds)",
                             what="drop the old copy's NOT NULL check")
            except (OrchestratorError, psycopg.Error) as err:
                if ctx.m.rollback.unmapped == "refuse":
                    # The check stays (a session holds the table): so does the sync that refuses, with its own
                    # message, the values the check would refuse (their old copy would be NULL), until this
                    # rollback or `run 5` is run again. Under fallback the old copy is never NULL: no such risk.
                    log.warning("the rollback stays closed until it is run again", table=ctx.m.label,
                                error=str(err))
                    continue
            try:
                x.atomic(reverse_function(ctx), skip_if=not_swapped, lock="none (function only)",
                         what="restore the sync")
            except (OrchestratorError, psycopg.Error) as err:
                log.warning("could not restore the swapped state", table=ctx.m.label, error=str(err))

    def _unswap_statements(self, ctx: Context) -> list[sql.Composed]:
        t, f = ctx.table, ctx.facts
        stmts = [*drop_triggers(ctx), *keys.drop_key(ctx),
                 reverse_function(ctx),  # as it was before the rollback closed it, for the next swap
                 Q("ALTER TABLE {} ALTER COLUMN {} DROP DEFAULT").format(t, ctx.col),
                 Q("ALTER TABLE {} RENAME COLUMN {} TO {}").format(t, ctx.col, ctx.shadow),
                 Q("ALTER TABLE {} RENAME COLUMN {} TO {}").format(t, ctx.retired, ctx.col)]
        restored = []
        if f.not_null:
            restored.append(Q("ALTER COLUMN {} SET NOT NULL").format(ctx.col))  # uses the valid CHECK: no scan
        label = self._swap_time_default(ctx)
        if label is not None:
            restored.append(Q("ALTER COLUMN {} SET DEFAULT {}").format(ctx.col, old_type.old_default_sql(ctx, label)))
        if ctx.new_not_null:
            restored.append(Q("ALTER COLUMN {} DROP NOT NULL").format(ctx.shadow))
        if restored:
            stmts.append(Q("ALTER TABLE {} {}").format(t, Q(", ").join(restored)))
        if f.not_null:  # only after SET NOT NULL, in a statement of its own (see _swap_statements)
            stmts.append(Q("ALTER TABLE {} DROP CONSTRAINT {}").format(t, I(self.old_check(ctx))))
        for ix in f.indexes:
            if ix.constraint is None:
                stmts += [Q("ALTER INDEX {} RENAME TO {}").format(ctx.index(ix.name), I(ix.shadow_name)),
                          Q("ALTER INDEX {} RENAME TO {}").format(ctx.index(ix.retired_name), I(ix.name))]
        stmts += keys.add_key(ctx, "retired_name")
        if f.sequence is not None:
            stmts += keys.move_sequence(ctx, f.sequence.type)
        return stmts + create_triggers(ctx, swapped=False) + versions.replace_views(ctx, swapped=False)

    def _resolve_unmapped(self, ctxs: list[Context]) -> None:
        """Values the new app wrote that have no enum label: refuse (naming every table's rows), or rewrite them
        to the fallback label."""
        x = ctxs[0].x
        if x.dry_run:
            for ctx in ctxs:
                x.note(f"-- rows WHERE {x.render(ctx.no_label())}: policy {ctx.m.rollback.unmapped!r}")
            return
        found = unlabeled_rows(ctxs)
        if found and ctxs[0].m.rollback.unmapped == "refuse":
            raise unlabeled_refusal("rollback of the swap", ctxs, found)
        for ctx, _, _ in found:
            self._apply_fallback(ctx)

    def _apply_fallback(self, ctx: Context) -> None:
        no_label = ctx.no_label()
        label = ctx.m.rollback.fallback_label
        if label is None:  # never: only `unmapped: fallback` comes here, and the playbook requires the label then
            raise RuntimeError(f"{ctx.m.label}: rollback.fallback_label is not set")
        ctx.update_in_batches(ctx.col, L(ctx.m.mapping[label]), no_label, what="apply the rollback fallback label")

    # -- contract ---------------------------------------------------------------------------------
    def contract_all(self, ctxs: list[Context]) -> None:
        x = ctxs[0].x
        # After an undo of this contract (the sync came back with the enum column): the triggers go first, they
        # read the column. Otherwise contract 2 removed them already, and nothing is locked here.
        remove_sync(ctxs)
        for ctx in ctxs:
            for ix in ctx.facts.indexes:
                x.concurrently(Q("DROP INDEX CONCURRENTLY IF EXISTS {}").format(ctx.index(ix.retired_name)),
                               lock="SHARE UPDATE EXCLUSIVE", what=f"drop index {ix.retired_name}")
            x.atomic(Q("ALTER TABLE {} DROP COLUMN IF EXISTS {}").format(ctx.table, ctx.retired),
                     lock="ACCESS EXCLUSIVE (catalog only, milliseconds)",
                     what=f"drop the retired column of {ctx.m.label}")
        # The tables now look like the new version's views (versions._view): its search_path falls through to
        # them with the same columns, so its prepared statements keep their result type.
        versions.remove_views(ctxs, ("new",))
        old_type.retire(ctxs)  # only once no column uses it any more

        if ctxs[0].state is not None and not x.dry_run:  # a later undo must backfill again, from the start
            x.conn.execute(Q("DELETE FROM {} WHERE playbook = %s AND target = ANY(%s)").format(
                ctxs[0].state.t("backfills")), (ctxs[0].state.playbook, [progress_key(c, reverse=True) for c in ctxs]))

    # -- undo of the contract: a reverse migration ------------------------------------------------
    def before_uncontract_all(self, ctxs: list[Context]) -> None:
        restore.before(ctxs)

    def uncontract_all(self, ctxs: list[Context]) -> dict:
        return restore.restore(ctxs)

    def check(self, ctx: Context) -> list[str]:
        return [] if ctx.has("column", ctx.m.retired) else [f"column {ctx.m.retired!r} missing after the swap"]
