"""The old type, which only the kind knows: the enum type (its labels, its default label, CREATE and DROP TYPE)
or change_type's conversion functions (engine/convert.py). Made, retired and brought back here; the generic
phases ask this module and the column's conversion (Context.conversion), never the kind."""

from __future__ import annotations

import psycopg
from psycopg import sql

from orchestrator.engine import catalog, convert
from orchestrator.engine.context import Context
from orchestrator.engine.errors import Refused
from orchestrator.engine.sqlkit import I, L, Q, typed_literal


def create_conversions(ctx: Context) -> None:
    """The conversion functions of a change_type column (CREATE OR REPLACE: a re-run, or the way back after the
    contract, makes them again)."""
    facts = ctx.facts
    if facts.old_type is None or facts.new_type is None:
        raise RuntimeError(f"{ctx.m.label}: the stored facts lack the column's types")
    ctx.x.atomic(*convert.create_statements(ctx.m, facts.old_type, facts.new_type), lock="none (functions only)",
                 what="create conversion functions")


def drop_conversions(ctx: Context) -> None:
    ctx.x.atomic(convert.drop_statement(ctx.m), lock="none (functions only)", what="drop conversion functions")


def recreate(ctxs: list[Context]) -> None:
    """The way back after the contract, first: the enum type again, or the conversion functions."""
    if ctxs[0].changes_type:
        for ctx in ctxs:
            create_conversions(ctx)
    else:
        create_type(ctxs)


def retire(ctxs: list[Context]) -> None:
    """The contract, last, once no column uses the old type: DROP TYPE the enum (settings.drop_enum_type), or
    drop the conversion functions (the sync that called them is gone)."""
    if ctxs[0].changes_type:
        for ctx in ctxs:
            drop_conversions(ctx)
    elif ctxs[0].pb.settings.drop_enum_type:
        ctxs[0].x.atomic(Q("DROP TYPE IF EXISTS {}").format(ctxs[0].enum_type),
                         lock="ACCESS EXCLUSIVE on the type only", what="drop the enum type")


def labels(ctx: Context) -> list[str]:
    """The type's labels in their original order (state recorded before they were kept: the mapping's order)."""
    return list(ctx.facts.enum.labels) if ctx.facts.enum is not None else list(ctx.m.mapping)


def type_exists(ctx: Context) -> sql.Composed:
    return Q("SELECT to_regtype({}) IS NOT NULL").format(L(ctx.x.render(ctx.enum_type)))


def create_type(ctxs: list[Context]) -> None:
    """CREATE TYPE with the original labels in their order, owner, comment and grants: one transaction."""
    ctx = ctxs[0]
    enum, facts = ctx.enum_type, ctx.facts.enum
    stmts: list[sql.Composed] = [Q("CREATE TYPE {} AS ENUM ({})").format(enum, Q(", ").join(L(v) for v in labels(ctx)))]
    if facts is not None:
        if facts.comment is not None:
            stmts.append(Q("COMMENT ON TYPE {} IS {}").format(enum, L(facts.comment)))
        if not ctx.x.dry_run and facts.owner != ctx.x.scalar(Q("SELECT current_user")):
            stmts.append(Q("ALTER TYPE {} OWNER TO {}").format(enum, I(facts.owner)))
        if facts.acl is not None:  # None: the default ACL, which the new type has already
            stmts.append(Q("REVOKE ALL ON TYPE {} FROM PUBLIC").format(enum))
            for grantee, privilege, grantable in facts.acl:
                stmts.append(Q("GRANT {} ON TYPE {} TO {}{}").format(
                    Q(privilege), enum, Q("PUBLIC") if grantee is None else I(grantee),
                    Q(" WITH GRANT OPTION") if grantable else Q("")))
    ctx.x.atomic(*stmts, skip_if=type_exists(ctx), lock="none on the tables (a new type)",
                 what="recreate the enum type")


def current_default(ctx: Context) -> str | None:
    """The old column's default now (it may have changed since phase 1): an enum label (a non-label default is
    refused), or (change_type) the default expression as the catalog prints it."""
    conn = ctx.x.conn
    oid = catalog.existing_table_oid(conn, *ctx.table_name)
    info = catalog.existing_column(conn, oid, ctx.m.column.name)
    if ctx.changes_type:
        return info["default"]
    label, problem = catalog.default_label(info["default"], catalog.enum_labels(conn, info["type_oid"]))
    if problem and ctx.m.target.default is None:
        raise Refused(f"cannot swap {ctx.m.label}: {problem}, set after phase 1; nothing was changed",
                      hint="set a plain enum label as the default again, or set target.default in the playbook")
    return label


def new_default(ctx: Context, label: str | None) -> str | None:
    if ctx.changes_type:
        return None if label is None else moved_default(ctx, label)
    if ctx.m.target.default is not None:
        return ctx.m.target.default
    return ctx.m.mapping[label] if label is not None else None


def old_default_sql(ctx: Context, default: str) -> sql.Composable:
    """The old column's default as SQL: its enum label, or (change_type) the expression the catalog printed."""
    return Q(default) if ctx.changes_type else typed_literal(default, ctx.enum_type)




def moved_default(ctx: Context, default: str) -> str:
    """change_type: the new column's default, up(old default) with up inlined, as the new type. The old text as
    it is would change meaning: `now() AT TIME ZONE 'UTC'` read as a timestamptz is taken in the session's
    TimeZone, an instant hours off."""
    expr = convert.up_of_default(ctx.m, default)
    if expr is None:
        raise Refused(f"cannot swap {ctx.m.label}: its default {default} cannot move to the new column as up(default): "
                      f"up names {ctx.m.column.name!r} more than once, so the default would be computed more than "
                      f"once per row; nothing was changed",
                      hint="drop the column's default before the swap and set it on the new column after it, or "
                           "write up naming the column once")
    return ctx.x.render(Q("CAST(({}) AS {})").format(Q(expr), ctx.target_type))


def check_moved_default(ctx: Context) -> None:
    """Before the swap: the moved default parses as the new type (EXPLAIN: nothing runs, no nextval)."""
    default = current_default(ctx) if ctx.changes_type else None
    if default is None:
        return
    expr = moved_default(ctx, default)
    try:
        with ctx.x.conn.transaction(force_rollback=True):
            ctx.x.conn.execute(Q("EXPLAIN (COSTS OFF) SELECT {}").format(Q(expr)))
    except psycopg.Error as err:
        raise Refused(f"cannot swap {ctx.m.label}: its default {default} does not go through up: {expr} fails: "
                      f"{(str(err).strip().splitlines() or [type(err).__name__])[0]}; nothing was changed",
                      hint="drop the column's default before the swap and set it on the new column after it") from None
