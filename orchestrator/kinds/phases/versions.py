"""A schema of views per application version (playbook `app_versions`), from phase 2 until the contract.

During a rolling deploy the old and the new app run side by side. The old version connects with
`search_path=<old>,public` and sees each migrated table as a view whose column is the enum with its labels;
the new version connects with `search_path=<new>,public` and sees the varchar column with the new values (and
the new columns). The views are plain column lists, so PostgreSQL updates them itself; the sync triggers
(dual_write) copy whichever column a version wrote to the other. The swap re-points both views in its own
transaction (`CREATE OR REPLACE VIEW`, same names and types), so neither version sees it happen.

The old version's writes are noted (a sequence set to the time, by a SECURITY DEFINER function the triggers
call): `status` shows when it last wrote, and `contract` waits for `settings.old_version_quiet_s` of quiet.
"""

from __future__ import annotations

from datetime import datetime, timezone

import psycopg
from psycopg import sql

from orchestrator.engine import db
from orchestrator.engine.context import Context
from orchestrator.engine.errors import Refused
from orchestrator.engine.playbook import Playbook, _suffixed
from orchestrator.engine.sqlkit import I, L, Q, join, typed_literal

SCHEMA_LOCK = "none on the tables (CREATE SCHEMA / VIEW: catalog only)"


def enabled(pb: Playbook) -> bool:
    return pb.app_versions is not None


def sequence(pb: Playbook) -> sql.Identifier:
    return I(pb.settings.state_schema, _suffixed(f"{pb.name}", "_old_seen"))


def seen_old_function(ctx: Context) -> sql.Identifier:
    # In the table's schema: every app role that writes the table can use it.
    return I(ctx.m.table.schema_, _suffixed(f"_ec_{ctx.pb.name}", "_seen_old"))


def search_path(pb: Playbook, version: str) -> str:
    schemas = [getattr(pb.app_versions, version), *dict.fromkeys(s for s, _ in pb.tables)]
    return ", ".join(schemas)


def connection_hints(pb: Playbook) -> dict | None:
    """What each version's connections need, for `plan`, `status` and the README."""
    if not enabled(pb):
        return None
    return {v: {"schema": getattr(pb.app_versions, v), "search_path": search_path(pb, v),
                "dsn_option": f"options=-csearch_path={search_path(pb, v).replace(' ', '')}"}
            for v in ("old", "new")}


# -- install / remove (phase 2) ---------------------------------------------------------------------------
def install_tracking(ctxs: list[Context]) -> None:
    """The sequence and the function the sync triggers call: before the triggers that call it."""
    pb, x = ctxs[0].pb, ctxs[0].x
    if not enabled(pb):
        return
    x.atomic(Q("CREATE SEQUENCE IF NOT EXISTS {} MINVALUE 0 START 0").format(sequence(pb)),
             *(_seen_old_definition(ctx) for ctx in _one_per_schema(ctxs)),
             lock="none (sequence and function only)", what="note the old version's writes")


def install_views(ctxs: list[Context], which: tuple[str, ...], swapped: bool = False) -> None:
    """The old version's views come with the sync (phase 2); the new version's once every row has its new
    value (phase 4, after parity): before that it would read NULL for rows the backfill has not reached.
    `swapped`: both at once after the swap, when the undo of contract 2 brings them back."""
    pb, x = ctxs[0].pb, ctxs[0].x
    if not enabled(pb):
        return
    _refuse_foreign_objects(ctxs, which)
    stmts = [Q("CREATE SCHEMA IF NOT EXISTS {}").format(I(getattr(pb.app_versions, v))) for v in which]
    for ctx in ctxs:
        for version in which:
            stmts += [_view(ctx, version, swapped), *_defaults(ctx, version), *_grants(ctx, version)]
    x.atomic(*stmts, lock=SCHEMA_LOCK, what=f"create the {' and '.join(which)} version schema")


def remove_views(ctxs: list[Context], which: tuple[str, ...] = ("old", "new")) -> None:
    pb, x = ctxs[0].pb, ctxs[0].x
    if not enabled(pb):
        return
    stmts = [Q("DROP VIEW IF EXISTS {}").format(view_name(ctx, v)) for ctx in ctxs for v in which]
    stmts += [Q("DROP SCHEMA IF EXISTS {}").format(I(getattr(pb.app_versions, v))) for v in which]
    x.atomic(*stmts, lock="ACCESS EXCLUSIVE on the views only", what=f"drop the {' and '.join(which)} version schema")


def remove_tracking(ctxs: list[Context]) -> None:
    """After the triggers that call it are gone."""
    pb, x = ctxs[0].pb, ctxs[0].x
    if not enabled(pb):
        return
    x.atomic(*(Q("DROP FUNCTION IF EXISTS {}()").format(seen_old_function(ctx)) for ctx in _one_per_schema(ctxs)),
             Q("DROP SEQUENCE IF EXISTS {}").format(sequence(pb)), lock="none", what="drop the old-version note")


def replace_views(ctx: Context, swapped: bool) -> list[sql.Composed]:
    """The views of both versions pointed at the columns as they are once the statement's transaction ends
    (the swap runs with both versions present: the new one since phase 4)."""
    if not enabled(ctx.pb):
        return []
    return [_view(ctx, v, swapped) for v in ("old", "new")]


def view_name(ctx: Context, version: str) -> sql.Identifier:
    return I(getattr(ctx.pb.app_versions, version), ctx.m.table.name)


def _one_per_schema(ctxs: list[Context]) -> list[Context]:
    return list({ctx.m.table.schema_: ctx for ctx in ctxs}.values())


def _refuse_foreign_objects(ctxs: list[Context], which: tuple[str, ...]) -> None:
    pb, x = ctxs[0].pb, ctxs[0].x
    if x.dry_run:
        return
    ours = [ctx.m.table.name for ctx in ctxs]
    for version in which:
        schema = getattr(pb.app_versions, version)
        others = x.query(Q("""SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                              WHERE n.nspname = {} AND NOT (c.relkind = 'v' AND c.relname = ANY({}))
                              ORDER BY 1 LIMIT 3""").format(L(schema), L(ours)))
        if others:
            raise Refused(f"app_versions.{version}: schema {schema!r} already holds {others[0][0]!r}, which is not "
                          f"one of the orchestrator's views; nothing was changed",
                          hint="choose another schema name in app_versions, or empty that schema")


def _seen_old_definition(ctx: Context) -> sql.Composed:
    seq = ctx.x.render(sequence(ctx.pb))
    body = ctx.x.render(Q("""DECLARE now_s bigint := extract(epoch FROM clock_timestamp())::bigint;
        BEGIN IF (SELECT last_value FROM {0}) < now_s THEN PERFORM setval({1}::regclass, now_s); END IF; END""")
                        .format(sequence(ctx.pb), L(seq)))
    # SECURITY DEFINER with a fixed search_path: app roles note their writes without rights on our state schema.
    return Q("CREATE OR REPLACE FUNCTION {}() RETURNS void LANGUAGE plpgsql SECURITY DEFINER "
             "SET search_path = pg_catalog AS {}").format(seen_old_function(ctx), L(body))


# -- the views ----------------------------------------------------------------------------------------------
def _numbered_columns(ctx: Context) -> list[tuple[str, int]]:
    return [tuple(r) for r in ctx.x.conn.execute(
        "SELECT attname, attnum FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attnum > 0 AND NOT "
        "attisdropped ORDER BY attnum", (ctx.x.render(ctx.table),)).fetchall()]


def _columns(ctx: Context) -> list[str]:
    return [name for name, _ in _numbered_columns(ctx)]


def _view(ctx: Context, version: str, swapped: bool) -> sql.Composed:
    """The table's columns in its order; the migrated column at its original place, taken from the enum column
    (old version) or the varchar one (new version) as they are named when `swapped` says."""
    m = ctx.m
    enum_now = m.retired if m.retired in _columns(ctx) else m.column.name
    varchar_now = m.column.name if enum_now == m.retired else m.shadow
    enum_then, varchar_then = (m.retired, m.column.name) if swapped else (m.column.name, m.shadow)
    extras = {c.name for c in m.extra_columns}
    migrated = Q("{} AS {}").format(I(enum_then if version == "old" else varchar_then), I(m.column.name))
    # At the column's original place (phase 1 recorded its attnum): where the enum column stands, or, once a
    # reverse migration after the contract re-added it as the last column, where it stood.
    ours = (enum_now, varchar_now)
    place = ctx.facts.attnum
    items: list[sql.Composable] = []
    placed = False
    for name, attnum in _numbered_columns(ctx):
        if not placed and (name in ours if place is None else attnum >= place and name not in ours):
            items.append(migrated)
            placed = True
        if name not in ours and not (name in extras and version == "old"):
            items.append(I(name))
    if not placed:
        items.append(migrated)
    options = Q(" WITH (security_invoker = true)") if ctx.x.conn.info.server_version >= 150000 else Q("")
    return Q("CREATE OR REPLACE VIEW {}{} AS SELECT {} FROM {}").format(
        view_name(ctx, version), options, join(items), ctx.table)


def _defaults(ctx: Context, version: str) -> list[sql.Composed]:
    """Views have no defaults of their own: the table's, and for the migrated column its version's value."""
    m, view = ctx.m, view_name(ctx, version)
    enum_now = m.retired if m.retired in _columns(ctx) else m.column.name
    extras = {c.name for c in m.extra_columns}
    rows = ctx.x.conn.execute("""SELECT a.attname, pg_get_expr(d.adbin, d.adrelid) FROM pg_attribute a
                                 JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
                                 WHERE a.attrelid = to_regclass(%s)""", (ctx.x.render(ctx.table),)).fetchall()
    out = []
    for name, expr in rows:
        if name in (enum_now, m.shadow, m.retired, m.column.name) or (name in extras and version == "old"):
            continue
        # the server's own text of the default expression, as pg_dump uses it
        out.append(Q("ALTER VIEW {} ALTER COLUMN {} SET DEFAULT {}").format(view, I(name), Q(expr)))
    label = ctx.facts.default_label
    if label is not None:
        value = typed_literal(label, ctx.enum_type) if version == "old" else \
            typed_literal(m.target.default or m.mapping[label], ctx.target_type)
        out.append(Q("ALTER VIEW {} ALTER COLUMN {} SET DEFAULT {}").format(view, I(m.column.name), value))
    return out


def _grants(ctx: Context, version: str) -> list[sql.Composed]:
    """The table's grants (and its columns') on the view, and USAGE on the version schema to the same roles."""
    m, view = ctx.m, view_name(ctx, version)
    enum_now = m.retired if m.retired in _columns(ctx) else m.column.name
    rows = ctx.x.conn.execute("""
        SELECT NULL::name, p.privilege_type, (SELECT rolname FROM pg_roles WHERE oid = p.grantee)
        FROM pg_class c, aclexplode(c.relacl) p WHERE c.oid = to_regclass(%s)
          AND p.grantee <> c.relowner
        UNION ALL
        SELECT a.attname, p.privilege_type, (SELECT rolname FROM pg_roles WHERE oid = p.grantee)
        FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid, aclexplode(a.attacl) p
        WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped AND p.grantee <> c.relowner
        ORDER BY 1 NULLS FIRST, 3, 2""", (ctx.x.render(ctx.table), ctx.x.render(ctx.table))).fetchall()
    allowed = {"SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER"}
    out, roles = [], set()
    for column, privilege, grantee in rows:
        if privilege not in allowed or column in (m.shadow, m.retired) or (column is not None and column not in (
                enum_now, *(_view_columns(ctx, version)))):
            continue
        who = Q("PUBLIC") if grantee is None else I(grantee)
        roles.add(grantee)
        if column is None:
            out.append(Q("GRANT {} ON {} TO {}").format(Q(privilege), view, who))
        else:
            shown = m.column.name if column == enum_now else column
            out.append(Q("GRANT {} ({}) ON {} TO {}").format(Q(privilege), I(shown), view, who))
    schema = I(getattr(ctx.pb.app_versions, version))
    out += [Q("GRANT USAGE ON SCHEMA {} TO {}").format(schema, Q("PUBLIC") if r is None else I(r))
            for r in sorted(roles, key=lambda r: r or "")]
    return out


def _view_columns(ctx: Context, version: str) -> list[str]:
    extras = {c.name for c in ctx.m.extra_columns}
    return [c for c in _columns(ctx) if not (c in extras and version == "old")]


# -- the old version's activity -------------------------------------------------------------------------------
def old_last_seen(conn: psycopg.Connection, pb: Playbook) -> datetime | None:
    """When the old version last wrote, or None (never, or no version schemas)."""
    if not enabled(pb):
        return None
    name = sequence(pb).as_string(conn)
    if db.scalar(conn, "SELECT to_regclass(%s)", (name,)) is None:
        return None
    value, called = db.one(conn, Q("SELECT last_value, is_called FROM {}").format(sequence(pb)))
    return datetime.fromtimestamp(value, timezone.utc) if called and value > 0 else None


def refuse_if_old_version_active(conn: psycopg.Connection, pb: Playbook) -> None:
    """Before the first contract step: the old version must have been quiet for settings.old_version_quiet_s."""
    seen = old_last_seen(conn, pb)
    quiet = pb.settings.old_version_quiet_s
    if seen is None or quiet == 0 or pb.app_versions is None:  # (seen is None already without app_versions)
        return
    ago = max(0.0, (datetime.now(timezone.utc) - seen).total_seconds())  # clocks of client and server differ
    if ago < quiet:
        raise Refused(f"the old app version (schema {pb.app_versions.old}) wrote {ago:.0f}s ago; the contract "
                      f"ends its views and needs {quiet}s without its writes (settings.old_version_quiet_s); "
                      f"nothing was changed",
                      hint="finish the rolling deploy and wait, or if those writes are not the app: "
                           "orchestrator contract --old-version-gone")
