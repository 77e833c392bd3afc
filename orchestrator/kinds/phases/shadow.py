"""Phase 1: the new varchar column beside the enum one, the playbook's extra columns and their indexes."""

from __future__ import annotations

from orchestrator.engine.context import Context
from orchestrator.engine.errors import Refused
from orchestrator.engine.sqlkit import I, Q, extra_type, idents, join, typed_literal
from orchestrator.kinds.phases import old_type, versions
from orchestrator.kinds.phases.base import Phase


class AddShadowColumn(Phase):
    name = "add_shadow_column"
    title = "add the shadow column, the new columns and their indexes"
    expand_doc = ("ADD COLUMN shadow varchar (nullable, no default) and the extra columns (constant defaults "
                  "are metadata-only); CREATE INDEX CONCURRENTLY for copies of the column's indexes and extra indexes "
                  "(in phase 3, after the backfill, with settings.indexes_after_backfill)")
    contract_doc = "DROP DEFAULT of extra columns whose backfill value served as a temporary default"
    uncontract_doc = "SET DEFAULT again on the extra columns whose backfill value served as a temporary default"
    rollback_doc = ("refuse if an extra column holds values the app wrote; DROP INDEX CONCURRENTLY; "
                    "DROP COLUMN shadow and the extra columns")
    locks_doc = ("ACCESS EXCLUSIVE for milliseconds (catalog only, under lock_timeout); index builds take "
                 "SHARE UPDATE EXCLUSIVE, which does not block reads or writes")

    def expand_all(self, ctxs: list[Context]) -> dict | None:
        # With app_versions, the old version's views come before its tables grow columns: a statement it
        # prepared (SELECT *) is re-planned against a view of the columns it knows, not the wider table.
        versions.install_views(ctxs, ("old",))
        return super().expand_all(ctxs)

    def rollback_all(self, ctxs: list[Context]) -> None:
        super().rollback_all(ctxs)
        versions.remove_views(ctxs, ("old",))  # the tables are as they were: the old version falls through to them

    def expand(self, ctx: Context) -> None:
        if ctx.changes_type:  # up, down and back (engine/convert.py): the sync, backfill and parity call them
            old_type.create_conversions(ctx)
        adds = [Q("ADD COLUMN IF NOT EXISTS {} {}").format(ctx.shadow, ctx.target_type)]
        for c in ctx.m.extra_columns:
            clause = Q("ADD COLUMN IF NOT EXISTS {} {}").format(I(c.name), extra_type(c))
            # A backfill value is a temporary default: existing rows read it at once (no rewrite, no batch),
            # old-app inserts get it without trigger work; the contract drops it.
            default = c.default if c.default is not None else c.backfill
            if default is not None:
                clause = Q("{} DEFAULT {}").format(clause, typed_literal(default, extra_type(c)))
            if not c.nullable:
                clause = Q("{} NOT NULL").format(clause)
            adds.append(clause)
        # On a re-run the columns exist: skip the ALTER, which would take ACCESS EXCLUSIVE even as a no-op.
        present = [ctx.exists_query("column", n) for n in [ctx.m.shadow, *(c.name for c in ctx.m.extra_columns)]]
        ctx.x.atomic(Q("ALTER TABLE {} {}").format(ctx.table, join(adds)),
                     skip_if=Q("SELECT ({})").format(Q(") AND (").join(present)),
                     lock="ACCESS EXCLUSIVE (catalog only, no rewrite)", what="add columns")
        if ctx.pb.settings.defers_indexes:
            ctx.x.note("-- settings.indexes_after_backfill or backfill_method copy: the index builds run in "
                       "phase 3, after its rows")
            return
        build_indexes(ctx)

    def contract(self, ctx: Context) -> None:
        temporary = [Q("ALTER COLUMN {} DROP DEFAULT").format(I(c.name)) for c in ctx.m.extra_columns
                     if c.backfill is not None]
        if not temporary:
            return super().contract(ctx)
        ctx.x.atomic(Q("ALTER TABLE {} {}").format(ctx.table, join(temporary)),
                     lock="ACCESS EXCLUSIVE (catalog only, milliseconds)", what="drop temporary defaults")

    def uncontract(self, ctx: Context) -> None:
        temporary = [Q("ALTER COLUMN {} SET DEFAULT {}").format(I(c.name), typed_literal(c.backfill, extra_type(c)))
                     for c in ctx.m.extra_columns if c.backfill is not None]
        if not temporary:
            return super().uncontract(ctx)
        ctx.x.atomic(Q("ALTER TABLE {} {}").format(ctx.table, join(temporary)),
                     lock="ACCESS EXCLUSIVE (catalog only, milliseconds)", what="restore temporary defaults")

    @staticmethod
    def _build(ctx: Context, name: str, cols: list[str], unique: bool) -> None:
        ctx.x.concurrently(
            Q("CREATE {}INDEX CONCURRENTLY IF NOT EXISTS {} ON {} ({})").format(
                Q("UNIQUE ") if unique else Q(""), I(name), ctx.table, idents(cols)),
            cleanup=Q("DROP INDEX CONCURRENTLY IF EXISTS {}").format(ctx.index(name)),  # a failed build's leftover
            skip_if=ctx.exists_query("valid_index", name),
            lock="SHARE UPDATE EXCLUSIVE (reads and writes go on)", what=f"build index {name}")

    def before_rollback_all(self, ctxs: list[Context]) -> None:
        for ctx in ctxs:
            self._refuse_losing_app_values(ctx)

    def rollback(self, ctx: Context) -> None:
        for name in index_names(ctx):
            ctx.x.concurrently(Q("DROP INDEX CONCURRENTLY IF EXISTS {}").format(ctx.index(name)),
                               lock="SHARE UPDATE EXCLUSIVE", what=f"drop index {name}")
        drops = [Q("DROP COLUMN IF EXISTS {}").format(ctx.shadow)]
        drops += [Q("DROP COLUMN IF EXISTS {}").format(I(c.name)) for c in ctx.m.extra_columns]
        ctx.x.atomic(Q("ALTER TABLE {} {}").format(ctx.table, join(drops)),
                     lock="ACCESS EXCLUSIVE (catalog only)", what="drop columns")
        if ctx.changes_type:
            old_type.drop_conversions(ctx)

    def _refuse_losing_app_values(self, ctx: Context) -> None:
        """Extra columns are the new app's to fill; values other than the default/backfill are its data. So is
        a shadow value where the enum column holds none (a NULL the enum column was left with)."""
        if ctx.x.dry_run:
            return
        if ctx.has("column", ctx.m.shadow):
            n, ids = ctx.sample_ids(Q("{} IS NOT NULL AND {} IS NULL").format(ctx.shadow, ctx.col))
            if n:
                raise Refused(f"rollback would drop {ctx.m.shadow!r} holding values that {ctx.m.label} lacks "
                              f"(NULL there) in {n} rows (e.g. ids {ids}); nothing was changed",
                              hint=f"give those rows a value in {ctx.m.column.name!r} "
                                   f"({'of its type' if ctx.changes_type else 'an enum label'}), then re-run")
        for c in ctx.m.extra_columns:
            if not ctx.has("column", c.name):
                continue
            ours = [typed_literal(v, extra_type(c)) for v in (c.default, c.backfill) if v is not None]
            where = Q("{} IS NOT NULL").format(I(c.name))
            if ours:
                where = Q("{} AND {} NOT IN ({})").format(where, I(c.name), join(ours))
            n, ids = ctx.sample_ids(where)
            if n:
                raise Refused(f"rollback would drop column {c.name!r} holding values the application wrote "
                              f"in {n} rows (e.g. ids {ids}); nothing was changed",
                              hint="copy those values elsewhere first, or keep the migration and contract it")

    def check(self, ctx: Context) -> list[str]:
        problems = [f"column {n!r} missing" for n in [ctx.m.shadow, *(c.name for c in ctx.m.extra_columns)]
                    if not ctx.has("column", n)]
        if not ctx.pb.settings.defers_indexes:  # else phase 3 builds them, and checks them
            problems += [f"index {ix.shadow_name!r} missing or invalid" for ix in ctx.facts.indexes
                         if not ctx.has("valid_index", ix.shadow_name)]
        return problems


def index_names(ctx: Context) -> list[str]:
    """The indexes the migration adds: copies of the column's indexes on the shadow, the extra columns' ones."""
    return [ix.shadow_name for ix in ctx.facts.indexes] + [ctx.extra_index_name(c.name)
                                                           for c in ctx.m.extra_columns if c.index]


def planned_indexes(ctx: Context) -> list[tuple[str, list[str], bool]]:
    """(name, columns, unique) of each index the migration adds, in the order of index_names."""
    out = [(ix.shadow_name, [ctx.m.shadow if c == ctx.m.column.name else c for c in ix.columns], ix.unique)
           for ix in ctx.facts.indexes]
    return out + [(ctx.extra_index_name(c.name), [c.name], False) for c in ctx.m.extra_columns if c.index]


def build_indexes(ctx: Context) -> None:
    """CREATE INDEX CONCURRENTLY each of index_names (skipped when valid): in phase 1, or in phase 3 after the
    backfill with settings.indexes_after_backfill."""
    for name, cols, unique in planned_indexes(ctx):
        AddShadowColumn._build(ctx, name, cols, unique)
