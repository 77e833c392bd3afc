"""The column's shape as it is at the swap, not as phase 1 saw it: what changed since is carried or refused.

Between phase 1 and the swap the app's DBAs may add an index on the column, grant column privileges, comment
on it or change its default. The swap carries grants, the comment and the default to the new column, and
refuses (one line, nothing changed) on indexes it cannot carry in its short transaction.
"""

from __future__ import annotations

from psycopg import sql

from orchestrator.engine import catalog, db
from orchestrator.engine.context import Context
from orchestrator.engine.errors import Refused
from orchestrator.engine.sqlkit import I, L, Q, typed_literal

# Column privileges PostgreSQL has; anything else from the catalog is not passed to SQL.
COLUMN_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "REFERENCES")


def refuse_new_indexes(ctx: Context) -> None:
    """Indexes on the column created after phase 1 have no copy on the new column: the swap would leave them
    on the retired column (and the contract would drop them, a UNIQUE one with its guarantee)."""
    conn = ctx.x.conn
    oid = catalog.existing_table_oid(conn, *ctx.table_name)
    info = catalog.existing_column(conn, oid, ctx.m.column.name)
    simple, blockers = catalog.column_indexes(conn, oid, info["attnum"], keys=ctx.changes_type)
    known = {ix.name for ix in ctx.facts.indexes}
    added = [ix.name for ix in simple if ix.name not in known]
    if added or blockers:
        what = ", ".join(repr(n) for n in added) if added else "; ".join(blockers)
        raise Refused(f"cannot swap {ctx.m.label}: index(es) {what} were created on the column after phase 1 and "
                      f"have no copy on {ctx.m.shadow!r}; nothing was changed",
                      hint="drop them (re-create them on the new column after the swap), or roll back to phase 1 "
                           "and run it again so they are copied")


def carry_statements(ctx: Context, source: str, target: str, *, comment: bool = True) -> list[sql.Composed]:
    """GRANTs and COMMENT that the column `source` has, given to `target` too (same table)."""
    if ctx.x.dry_run and not ctx.has("column", source):
        return []
    conn = ctx.x.conn
    rows = conn.execute(Q("""SELECT p.privilege_type, p.is_grantable,
                                    (SELECT rolname FROM pg_roles WHERE oid = p.grantee)
                             FROM pg_attribute a, aclexplode(a.attacl) p
                             WHERE a.attrelid = to_regclass({}) AND a.attname = {}
                             ORDER BY 3, 1""").format(L(ctx.x.render(ctx.table)), L(source))).fetchall()
    out = []
    for privilege, grantable, grantee in rows:
        if privilege not in COLUMN_PRIVILEGES:
            continue
        out.append(Q("GRANT {} ({}) ON {} TO {}{}").format(  # grantee 0 (no role) is PUBLIC
            Q(privilege), I(target), ctx.table, Q("PUBLIC") if grantee is None else I(grantee),
            Q(" WITH GRANT OPTION") if grantable else Q("")))
    if not comment:
        return out
    text = db.scalar(conn, "SELECT col_description(to_regclass(%s), (SELECT attnum FROM pg_attribute WHERE "
                           "attrelid = to_regclass(%s) AND attname = %s))",
                     (ctx.x.render(ctx.table), ctx.x.render(ctx.table), source))
    if text is not None:
        out.append(Q("COMMENT ON COLUMN {} IS {}").format(I(*ctx.table_name, target), L(text)))
    return out


def set_default(ctx: Context, value: str | None) -> list[sql.Composed]:
    if value is None:
        return []
    # change_type: up(old default), as old_type.moved_default wrote it (never the old text as it is, which the
    # new type may read otherwise).
    expr = Q(value) if ctx.changes_type else typed_literal(value, ctx.target_type)
    return [Q("ALTER TABLE {} ALTER COLUMN {} SET DEFAULT {}").format(ctx.table, ctx.col, expr)]
