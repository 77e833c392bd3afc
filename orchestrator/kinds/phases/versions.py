"""A schema of views per application version (playbook `app_versions`), from phase 1 until the contract.

During a rolling deploy the old and the new app run side by side. The old version connects with
`search_path=<old>,public` and sees each migrated table as a view whose column is the enum with its labels;
the new version connects with `search_path=<new>,public` and sees the varchar column with the new values (and
the new columns). The views are plain column lists, so PostgreSQL updates them itself; the sync triggers
(dual_write) copy whichever column a version wrote to the other. The swap re-points both views in its own
transaction (`CREATE OR REPLACE VIEW`, same names and types), so neither version sees it happen.

The new version's views have the shape its tables will have after the contract: the varchar column where it
stands in the table (not where the enum column stood), so a statement the new version prepared against a view
returns the same columns after contract 5 drops the retired column and the views, and its search_path falls
through to the tables. The old version's views go at contract 2 (the old version is gone by then); the new
version's at contract 5, once the tables look like them.

The old version's writes are noted (a sequence set to the time, by a SECURITY DEFINER function): a statement
trigger on each table notes every write of a session whose search_path holds the old version's schema,
whatever columns it changes, and the sync triggers note writes of the enum column from anywhere. `status`
shows when it last wrote, and `contract` waits for `settings.old_version_quiet_s` of quiet.

The swap and its rollback lock the views before the tables: an app statement through a view locks the view,
then its table, and taking them in the other order would leave each waiting for what the other holds.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from orchestrator.engine import db
from orchestrator.engine.context import Context
from orchestrator.engine.errors import Refused
from orchestrator.engine.playbook import Playbook, _suffixed
from orchestrator.engine.sqlkit import I, L, Q, join
from orchestrator.kinds.phases import shape

SCHEMA_LOCK = "none on the tables (CREATE SCHEMA / VIEW: catalog only)"
OLD_WRITES = "_old_writes"  # the statement trigger's suffix (Context.trigger_name)


def enabled(pb: Playbook) -> bool:
    return pb.app_versions is not None


def sequence(pb: Playbook) -> sql.Identifier:
    return I(pb.settings.state_schema, _suffixed(f"{pb.name}", "_old_seen"))


def seen_old_function(ctx: Context) -> sql.Identifier:
    # In the table's schema: every app role that writes the table can use it.
    return I(ctx.m.table.schema_, _suffixed(f"_ec_{ctx.pb.name}", "_seen_old"))


def old_write_function(ctx: Context) -> sql.Identifier:
    return I(ctx.m.table.schema_, _suffixed(f"_ec_{ctx.pb.name}", "_old_writes"))


def _schemas(pb: Playbook, version: str) -> list[str]:
    return [version_schema(pb, version), *dict.fromkeys(s for s, _ in pb.tables)]


def _path_item(schema: str) -> str:
    """A schema as search_path reads it: bare when that reads back unchanged, else double-quoted."""
    return schema if re.fullmatch(r"[a-z_][a-z0-9_]*", schema) else '"' + schema.replace('"', '""') + '"'


def search_path(pb: Playbook, version: str) -> str:
    return ", ".join(_path_item(s) for s in _schemas(pb, version))


def connection_hints(pb: Playbook) -> dict | None:
    """What each version's connections need, for `plan`, `status` and the README. `dsn_option` is a conninfo
    key=value pair, quoted as libpq reads it (a space in a schema name is escaped in `options`)."""
    if not enabled(pb):
        return None
    out = {}
    for v in ("old", "new"):
        items = ",".join(_path_item(s) for s in _schemas(pb, v))
        option = "-csearch_path=" + items.replace("\\", "\\\\").replace(" ", "\\ ")
        out[v] = {"schema": version_schema(pb, v), "search_path": search_path(pb, v),
                  "dsn_option": make_conninfo("", options=option)}
    return out


def version_schema(pb: Playbook, version: str) -> str:
    if pb.app_versions is None:
        raise RuntimeError("no app_versions in the playbook")
    return str(getattr(pb.app_versions, version))


def existing_views(ctxs: list[Context]) -> list[sql.Identifier]:
    """The version views that exist now (all of them in a dry run), in a fixed order: what the swap locks first."""
    pb, x = ctxs[0].pb, ctxs[0].x
    if not enabled(pb):
        return []
    names = [view_name(ctx, v) for v in ("old", "new") for ctx in ctxs]
    if x.dry_run:
        return names
    return [n for n in names if db.scalar(x.conn, "SELECT to_regclass(%s) IS NOT NULL", (x.render(n),))]


# -- install / remove (phase 2) ---------------------------------------------------------------------------
def install_tracking(ctxs: list[Context]) -> None:
    """The sequence and the functions the triggers call: before the triggers that call them."""
    pb, x = ctxs[0].pb, ctxs[0].x
    if not enabled(pb):
        return
    x.atomic(Q("CREATE SEQUENCE IF NOT EXISTS {} MINVALUE 0 START 0").format(sequence(pb)),
             *(_seen_old_definition(ctx) for ctx in _one_per_schema(ctxs)),
             *(_old_writes_definition(ctx) for ctx in _one_per_schema(ctxs)),
             lock="none (sequence and function only)", what="note the old version's writes")


def old_write_trigger(ctx: Context) -> list[sql.Composed]:
    """A statement trigger noting every write of an old-version session, whichever columns it changes (the sync
    triggers only see writes that touch the migrated column). Through a view, the table's statement triggers
    are the ones that fire."""
    if not enabled(ctx.pb):
        return []
    return [Q("CREATE TRIGGER {} AFTER INSERT OR UPDATE OR DELETE ON {} FOR EACH STATEMENT EXECUTE FUNCTION {}()")
            .format(ctx.trigger(OLD_WRITES), ctx.table, old_write_function(ctx))]


def drop_old_write_trigger(ctx: Context) -> list[sql.Composed]:
    if not enabled(ctx.pb):
        return []
    return [Q("DROP TRIGGER IF EXISTS {} ON {}").format(ctx.trigger(OLD_WRITES), ctx.table)]


def install_views(ctxs: list[Context], which: tuple[str, ...], swapped: bool = False) -> None:
    """The old version's views come first (phase 1, before the tables grow columns); the new version's once
    every row has its new value (phase 4, after parity): before that it would read NULL for rows the backfill
    has not reached. `swapped`: both at once after the swap, when the undo of contract 2 brings them back."""
    pb, x = ctxs[0].pb, ctxs[0].x
    if not enabled(pb):
        return
    _refuse_foreign_objects(ctxs, which)
    stmts = [Q("CREATE SCHEMA IF NOT EXISTS {}").format(I(getattr(pb.app_versions, v))) for v in which]
    for ctx in ctxs:
        for version in which:
            stmts += [_view(ctx, version, swapped), *_grants(ctx, version)]
            if version == "new" and not swapped:
                # Through its view the new version writes the shadow column: the column privileges the app's
                # roles have on the column (GRANT INSERT (...) ...) are needed there from now, not at the swap.
                stmts += shape.carry_statements(ctx, ctx.m.column.name, ctx.m.shadow, comment=False)
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
    x.atomic(*(Q("DROP FUNCTION IF EXISTS {}(), {}()").format(old_write_function(ctx), seen_old_function(ctx))
               for ctx in _one_per_schema(ctxs)),
             Q("DROP SEQUENCE IF EXISTS {}").format(sequence(pb)), lock="none", what="drop the old-version note")


def replace_views(ctx: Context, swapped: bool) -> list[sql.Composed]:
    """The views of both versions pointed at the columns as they are once the statement's transaction ends
    (the swap runs with both versions present: the new one since phase 4)."""
    if not enabled(ctx.pb):
        return []
    return [_view(ctx, v, swapped) for v in ("old", "new")]


def rebuilt_views(ctx: Context) -> list[sql.Composed]:
    """The version views that exist now, defined again over whatever the table's name points at now (a table
    copy swapped in by a rename, phases/copy.py)."""
    if not enabled(ctx.pb):
        return []
    return [_view(ctx, v, swapped=ctx.m.retired in _columns(ctx)) for v in ("old", "new")
            if db.scalar(ctx.x.conn, "SELECT to_regclass(%s) IS NOT NULL", (ctx.x.render(view_name(ctx, v)),))]


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


def _old_writes_definition(ctx: Context) -> sql.Composed:
    # The invoker's search_path, not a fixed one: it is what tells an old-version session from the others.
    body = ctx.x.render(Q("BEGIN IF {}::name = ANY (current_schemas(false)) THEN PERFORM {}(); END IF; "
                          "RETURN NULL; END").format(L(version_schema(ctx.pb, "old")), seen_old_function(ctx)))
    return Q("CREATE OR REPLACE FUNCTION {}() RETURNS trigger LANGUAGE plpgsql AS {}").format(
        old_write_function(ctx), L(body))


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
    """The table's columns in its order, the migrated column taken from the enum column (old version) or the
    varchar one (new version) as they are named when `swapped` says. The old version sees it at its original
    place; the new version where the varchar column stands, the shape the table has after the contract."""
    m = ctx.m
    enum_now = m.retired if m.retired in _columns(ctx) else m.column.name
    varchar_now = m.column.name if enum_now == m.retired else m.shadow
    enum_then, varchar_then = (m.retired, m.column.name) if swapped else (m.column.name, m.shadow)
    extras = {c.name for c in m.extra_columns}
    migrated = Q("{} AS {}").format(I(enum_then if version == "old" else varchar_then), I(m.column.name))
    options = Q(" WITH (security_invoker = true)") if ctx.x.conn.info.server_version >= 150000 else Q("")
    if version == "new":
        present = _columns(ctx)
        if m.retired not in present and m.shadow not in present:  # one column: the contract dropped the other
            enum_now, varchar_now = ("", m.column.name) if swapped else (m.column.name, "")
        items: list[sql.Composable] = [migrated if name == varchar_now else I(name)
                                       for name, _ in _numbered_columns(ctx) if name != enum_now]
        if varchar_now not in present:  # only in a dry run before phase 1 added it
            items.append(migrated)
        return Q("CREATE OR REPLACE VIEW {}{} AS SELECT {} FROM {}").format(
            view_name(ctx, version), options, join(items), ctx.table)
    # At the column's original place (phase 1 recorded its attnum): where the enum column stands, or, once a
    # reverse migration after the contract re-added it as the last column, where it stood.
    ours = (enum_now, varchar_now)
    place = ctx.facts.attnum
    items = []
    placed = False
    for name, attnum in _numbered_columns(ctx):
        if not placed and (name in ours if place is None else attnum >= place and name not in ours):
            items.append(migrated)
            placed = True
        if name not in ours and not (name in extras and version == "old"):
            items.append(I(name))
    if not placed:
        items.append(migrated)
    return Q("CREATE OR REPLACE VIEW {}{} AS SELECT {} FROM {}").format(
        view_name(ctx, version), options, join(items), ctx.table)


def _grants(ctx: Context, version: str) -> list[sql.Composed]:
    """Who may use the view. With security_invoker (PostgreSQL 15+) a view checks the caller's own privileges
    on the table, column by column, so the view and its schema are open to PUBLIC and the table's grants decide,
    those given after the views were made too (a role without USAGE on the version schema would silently skip
    it on its search_path and read the table's column instead). Before 15 a view reads the table with its
    owner's rights: the table's grants (and its columns') are copied, with USAGE on the schema to those roles."""
    m, view = ctx.m, view_name(ctx, version)
    schema = I(version_schema(ctx.pb, version))
    if ctx.x.conn.info.server_version >= 150000:
        return [Q("GRANT SELECT, INSERT, UPDATE, DELETE ON {} TO PUBLIC").format(view),
                Q("GRANT USAGE ON SCHEMA {} TO PUBLIC").format(schema)]
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
