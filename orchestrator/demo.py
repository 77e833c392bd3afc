"""Seed schema, bulk sample data and catalog snapshots for the reference migration.

The reference migration turns ``workflow_templates.workflow_type`` (enum
``workflowtype``) into ``varchar(50)``.  Everything here takes a ``SeedNames`` so
tests can run the same flow against hostile-but-legal identifiers.  All SQL is
composed with ``psycopg.sql``; no identifier or value is ever formatted in.
"""
from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

ORCHESTRATOR_SCHEMA = "_orchestrator"

# old enum label -> new varchar value (the reference mapping)
REFERENCE_MAPPING: dict[str, str] = {
    "plain": "simple_chat",
    "rag": "rag_chat",
    "tools": "function_chat",
    "full": "advanced_chat",
}

_CATEGORIES = ["general", "support", "sales", "engineering", "research"]
# ms since 2020-01-01: fits 10 hex digits until ~2054, so the time part stays 10 chars
_ID_EPOCH_MS = 1_577_836_800_000


@dataclass(frozen=True)
class SeedNames:
    """Names of the seed objects; override to exercise quoting/unicode/schemas."""

    schema: str = "public"
    table: str = "workflow_templates"
    column: str = "workflow_type"
    enum: str = "workflowtype"
    labels: tuple[str, ...] = ("plain", "tools", "rag", "full")

    @property
    def table_ident(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.table)

    @property
    def enum_ident(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.enum)

    @property
    def index_name(self) -> str:
        return truncate_identifier(f"ix_{self.table}_{self.column}")


def truncate_identifier(name: str, limit: int = 63) -> str:
    """Clip to PostgreSQL's NAMEDATALEN-1 bytes without splitting a UTF-8 char
    (the server does the same, so the name we predict is the name it stores)."""
    return name.encode("utf-8")[:limit].decode("utf-8", errors="ignore")


def _commit(conn: psycopg.Connection) -> None:
    # Callers may hand us an autocommit or a transactional connection.
    if not conn.autocommit:
        conn.commit()


def create_seed_schema(
    conn: psycopg.Connection, names: SeedNames = SeedNames(), *, enum_default: str | None = None
) -> None:
    """Create schema (unless public), enum, table and index exactly like the app's seed."""
    default = sql.SQL("")
    if enum_default is not None:
        if enum_default not in names.labels:
            raise ValueError(f"enum_default {enum_default!r} is not one of {names.labels}")
        default = sql.SQL(" DEFAULT {}::{}").format(sql.Literal(enum_default), names.enum_ident)
    with conn.transaction():
        if names.schema != "public":
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(names.schema)))
        conn.execute(
            sql.SQL("CREATE TYPE {} AS ENUM ({})").format(
                names.enum_ident, sql.SQL(", ").join(map(sql.Literal, names.labels))
            )
        )
        conn.execute(
            sql.SQL(
                """CREATE TABLE {table} (
    id varchar(26) PRIMARY KEY,
    owner_id varchar(26) NOT NULL,
    name varchar(255) NOT NULL,
    description text,
    {col} {enum} NOT NULL{default},
    category varchar(50) NOT NULL DEFAULT 'general',
    default_params jsonb NOT NULL DEFAULT '{{}}',
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
)"""
            ).format(
                table=names.table_ident,
                col=sql.Identifier(names.column),
                enum=names.enum_ident,
                default=default,
            )
        )
        conn.execute(
            sql.SQL("CREATE INDEX {} ON {} ({})").format(
                sql.Identifier(names.index_name), names.table_ident, sql.Identifier(names.column)
            )
        )
    _commit(conn)


def insert_rows(
    conn: psycopg.Connection, n: int, names: SeedNames = SeedNames(), *, batch: int = 200_000
) -> None:
    """Bulk-generate ``n`` rows server-side (INSERT ... SELECT generate_series), commit per batch.

    id = 10 hex chars of (ms clock + row number) + 16 chars of md5(salt, row number):
    the time part alone is unique within a call, the per-call random salt keeps
    repeated calls from colliding.
    """
    if n <= 0:
        return
    salt = secrets.token_hex(8)
    base_ms = int(time.time() * 1000) - _ID_EPOCH_MS
    stmt = sql.SQL(
        """INSERT INTO {table} (id, owner_id, name, description, {col}, category,
                    default_params, created_at, updated_at)
SELECT upper(lpad(to_hex(%(base)s::bigint + g), 10, '0'))
           || upper(substr(md5(%(salt)s || g::text), 1, 16)),
       upper(substr(md5('owner-' || (g %% 17)::text), 1, 26)),
       'Template ' || g,
       CASE WHEN g %% 10 = 0 THEN NULL ELSE 'Generated sample template #' || g END,
       (%(labels)s::text[])[1 + g %% %(nlabels)s]::{enum},
       (%(cats)s::text[])[1 + g %% %(ncats)s],
       jsonb_build_object('temperature', (g %% 10) / 10.0, 'max_tokens', 256 * (1 + g %% 4)),
       ts, ts
FROM generate_series(%(lo)s::bigint, %(hi)s::bigint) AS g,
     LATERAL (SELECT now() - make_interval(secs => g::double precision)) AS t(ts)"""
    ).format(table=names.table_ident, col=sql.Identifier(names.column), enum=names.enum_ident)
    params = {
        "base": base_ms,
        "salt": salt,
        "labels": list(names.labels),
        "nlabels": len(names.labels),
        "cats": _CATEGORIES,
        "ncats": len(_CATEGORIES),
    }
    for lo in range(0, n, batch):
        hi = min(n, lo + batch) - 1
        with conn.transaction():
            conn.execute(stmt, {**params, "lo": lo, "hi": hi})
        _commit(conn)
    conn.execute(sql.SQL("ANALYZE {}").format(names.table_ident))
    _commit(conn)


# --- catalog snapshot ---------------------------------------------------------

_SNAPSHOT_QUERIES: dict[str, str] = {
    # attnum order is kept by the ORDER BY inside json_agg; attnum itself is not
    # recorded so that dropped-and-gone columns don't make snapshots differ.
    "tables": """
SELECT c.relname AS name, c.relkind::text AS kind,
       (SELECT json_agg(json_build_object(
                   'name', a.attname,
                   'type', format_type(a.atttypid, a.atttypmod),
                   'not_null', a.attnotnull,
                   'default', pg_get_expr(d.adbin, d.adrelid),
                   'identity', a.attidentity::text,
                   'generated', a.attgenerated::text) ORDER BY a.attnum)
          FROM pg_attribute a
          LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
         WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped) AS columns
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = %(schema)s AND c.relkind IN ('r', 'p')
 ORDER BY 1""",
    "indexes": """
SELECT i.relname AS name, t.relname AS table, pg_get_indexdef(x.indexrelid) AS definition,
       x.indisvalid AS valid
  FROM pg_index x
  JOIN pg_class i ON i.oid = x.indexrelid
  JOIN pg_class t ON t.oid = x.indrelid
  JOIN pg_namespace n ON n.oid = t.relnamespace
 WHERE n.nspname = %(schema)s
 ORDER BY 1, 2""",
    "constraints": """
SELECT con.conname AS name, coalesce(t.relname, '') AS table, con.contype::text AS type,
       pg_get_constraintdef(con.oid) AS definition
  FROM pg_constraint con
  JOIN pg_namespace n ON n.oid = con.connamespace
  LEFT JOIN pg_class t ON t.oid = con.conrelid
 WHERE n.nspname = %(schema)s
 ORDER BY 2, 1, 4""",
    "triggers": """
SELECT tg.tgname AS name, t.relname AS table, pg_get_triggerdef(tg.oid) AS definition,
       tg.tgenabled::text AS enabled
  FROM pg_trigger tg
  JOIN pg_class t ON t.oid = tg.tgrelid
  JOIN pg_namespace n ON n.oid = t.relnamespace
 WHERE n.nspname = %(schema)s AND NOT tg.tgisinternal
 ORDER BY 2, 1""",
    "enums": """
SELECT ty.typname AS name, pg_get_userbyid(ty.typowner) AS owner,
       (SELECT json_agg(e.enumlabel ORDER BY e.enumsortorder)
          FROM pg_enum e WHERE e.enumtypid = ty.oid) AS labels
  FROM pg_type ty JOIN pg_namespace n ON n.oid = ty.typnamespace
 WHERE n.nspname = %(schema)s AND ty.typtype = 'e'
 ORDER BY 1""",
    "views": """
SELECT c.relname AS name, c.relkind::text AS kind, pg_get_viewdef(c.oid) AS definition
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = %(schema)s AND c.relkind IN ('v', 'm')
 ORDER BY 1""",
    "functions": """
SELECT p.proname AS name, pg_get_function_identity_arguments(p.oid) AS args,
       p.prokind::text AS kind
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
 WHERE n.nspname = %(schema)s
 ORDER BY 1, 2""",
    "comments": """
SELECT c.relname AS object, a.attname AS column, col_description(c.oid, a.attnum) AS comment
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
  JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
 WHERE n.nspname = %(schema)s AND c.relkind IN ('r', 'p') AND col_description(c.oid, a.attnum) IS NOT NULL
UNION ALL
SELECT c.relname, NULL, obj_description(c.oid, 'pg_class')
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = %(schema)s AND c.relkind IN ('r', 'p') AND obj_description(c.oid, 'pg_class') IS NOT NULL
UNION ALL
SELECT ty.typname, NULL, obj_description(ty.oid, 'pg_type')
  FROM pg_type ty JOIN pg_namespace n ON n.oid = ty.typnamespace
 WHERE n.nspname = %(schema)s AND ty.typtype = 'e' AND obj_description(ty.oid, 'pg_type') IS NOT NULL
 ORDER BY 1, 2 NULLS FIRST""",
    # grantee 0 is PUBLIC
    "privileges": """
SELECT c.relname AS object, NULL::name AS column, p.privilege_type AS privilege,
       CASE WHEN p.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(p.grantee) END AS grantee, p.is_grantable AS grantable
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace, aclexplode(c.relacl) p
 WHERE n.nspname = %(schema)s AND c.relkind IN ('r', 'p')
UNION ALL
SELECT c.relname, a.attname, p.privilege_type,
       CASE WHEN p.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(p.grantee) END, p.is_grantable
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
  JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped, aclexplode(a.attacl) p
 WHERE n.nspname = %(schema)s AND c.relkind IN ('r', 'p')
UNION ALL
SELECT ty.typname, NULL, p.privilege_type,
       CASE WHEN p.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(p.grantee) END, p.is_grantable
  FROM pg_type ty JOIN pg_namespace n ON n.oid = ty.typnamespace, aclexplode(ty.typacl) p
 WHERE n.nspname = %(schema)s AND ty.typtype = 'e'
 ORDER BY 1, 2 NULLS FIRST, 3, 4""",
    "sequences": """
SELECT c.relname AS name
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = %(schema)s AND c.relkind = 'S'
 ORDER BY 1""",
}


def schema_snapshot(conn: psycopg.Connection, schema: str = "public") -> dict:
    """JSON-serialisable, deterministically ordered description of a schema's objects.

    Used to assert "schema identical after rollback": compare two snapshots with ==
    (``snapshot_diff`` gives a readable difference).  The orchestrator's own state
    schema is never described.
    """
    snap: dict = {"schema": schema}
    if schema == ORCHESTRATOR_SCHEMA:
        return {**snap, **{k: [] for k in _SNAPSHOT_QUERIES}}
    with conn.cursor(row_factory=dict_row) as cur:
        for key, query in _SNAPSHOT_QUERIES.items():
            cur.execute(sql.SQL(query), {"schema": schema})
            snap[key] = [dict(r) for r in cur.fetchall()]
    for table in snap["tables"]:
        table["columns"] = table["columns"] or []
    for enum in snap["enums"]:
        enum["labels"] = enum["labels"] or []
    # Read-only, but leave a transactional connection idle rather than idle-in-transaction.
    if not conn.autocommit:
        conn.rollback()
    return snap


def ignoring_column_order(snap: dict) -> dict:
    """The snapshot with each table's columns by name: after a reverse migration that followed a contract, the
    enum column is back but as the table's last column (only a rewrite could move it)."""
    out = dict(snap)
    out["tables"] = [{**t, "columns": sorted(t["columns"], key=lambda c: c["name"])} for t in snap["tables"]]
    return out


def snapshot_diff(before: dict, after: dict) -> list[str]:
    """Human-readable list of differences between two snapshots (empty if equal)."""
    out: list[str] = []
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key), after.get(key)
        if a == b:
            continue
        if isinstance(a, list) and isinstance(b, list):
            lines = [f"{key}: - {item}" for item in a if item not in b]
            lines += [f"{key}: + {item}" for item in b if item not in a]
            out += lines or [f"{key}: same items, different order"]
        else:
            out.append(f"{key}: {a!r} != {b!r}")
    return out


def describe_table(conn: psycopg.Connection, schema: str, table: str) -> list[tuple[str, str, bool, str]]:
    """(column, type, not null, default) in column order: what `make demo` shows before and after."""
    return conn.execute(
        """SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
                  coalesce(pg_get_expr(d.adbin, d.adrelid), '')
           FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
           WHERE a.attrelid = (SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                               WHERE n.nspname = %s AND c.relname = %s)
             AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum""", (schema, table)).fetchall()


def refuse_existing(dsn: str, pb) -> None:
    """The demo creates the seed's enum type and table: refuse, changing nothing, when either exists."""
    from . import db
    from .errors import Refused
    with db.connect(dsn) as conn:
        found = conn.execute(
            """SELECT (SELECT format('table %%I.%%I', n.nspname, c.relname) FROM pg_class c
                       JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s),
                      (SELECT format('type %%I.%%I', n.nspname, t.typname) FROM pg_type t
                       JOIN pg_namespace n ON n.oid = t.typnamespace WHERE n.nspname = %s AND t.typname = %s)""",
            (pb.migrations[0].table.schema_, pb.migrations[0].table.name, *pb.enum_type)).fetchone()
    existing = [f for f in found if f]
    if existing:
        raise Refused(f"the demo creates the seed schema, but {' and '.join(existing)} already exist(s) in this "
                      "database; nothing was changed",
                      hint="point --dsn / DATABASE_URL at an empty database, or leave it unset to use the local "
                           "demo server (recreated each time); to migrate this table instead: orchestrator plan")


def run_demo(dsn: str, pb, *, rows: int, setup_only: bool = False, console=None) -> None:
    """Chatter's schema (or, for a one-column playbook, the simplified table) with sample rows, then every
    phase and the contract, printing as it goes and showing every migrated table before and after."""
    from rich.console import Console

    from . import chatter, output
    from .runner import Orchestrator

    console = console or Console()
    schema = pb.migrations[0].table.schema_
    enum_schema, enum_name = pb.enum_type

    def show(title: str) -> None:
        with psycopg.connect(dsn) as conn:
            for m in pb.migrations:
                output.print_table(console, f"{title}: {m.table.schema_}.{m.table.name}",
                                   ["column", "type", "not null", "default"],
                                   [[name, type_, "yes" if nn else "", default] for name, type_, nn, default
                                    in describe_table(conn, m.table.schema_, m.table.name)])
                counts = conn.execute(sql.SQL("SELECT {}::text, count(*) FROM {} GROUP BY 1 ORDER BY 1").format(
                    sql.Identifier(m.column.name), sql.Identifier(m.table.schema_, m.table.name)),
                    prepare=False).fetchall()
                console.print(f"{m.label} values: " + ", ".join(f"{v}={n:,}" for v, n in counts))
                for name, definition in conn.execute(
                        "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = %s AND tablename = %s "
                        "ORDER BY 1", (m.table.schema_, m.table.name)):
                    console.print(f"index {name}: {definition}", markup=False, highlight=False, soft_wrap=True)
            enum = conn.execute("SELECT EXISTS (SELECT FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace "
                                "WHERE n.nspname = %s AND t.typname = %s)", (enum_schema, enum_name)).fetchone()[0]
            console.print(f"enum type {enum_name}: {'present' if enum else 'dropped'}")
            builtins = [m for m in pb.migrations if m.seed_rows.rows]
            for m in builtins:
                keys = [str(r[m.seed_rows.key[0]]) for r in m.seed_rows.rows]
                found = conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE {}::text = ANY(%s)").format(
                    sql.Identifier(m.table.schema_, m.table.name), sql.Identifier(m.seed_rows.key[0])),
                    (keys,)).fetchone()[0]
                console.print(f"built-in rows in {m.table.name}: {found} of {len(keys)}")

    with psycopg.connect(dsn) as conn:
        if is_chatter(pb):
            chatter.create_chatter_schema(conn, schema)
            chatter.insert_chatter_rows(conn, rows, schema=schema)
            console.print(f"created Chatter's schema in {schema} with {rows:,} workflow_templates and "
                          f"{max(1, rows // 4):,} template_specs rows")
        else:
            m = pb.migrations[0]
            names = SeedNames(schema=m.table.schema_, table=m.table.name, column=m.column.name,
                              enum=m.column.enum_type, labels=tuple(m.mapping))
            create_seed_schema(conn, names, enum_default=names.labels[0])
            insert_rows(conn, rows, names)
            console.print(f"created {names.schema}.{names.table} with {rows:,} rows")
    show("before")
    if setup_only:
        return
    orch = Orchestrator(pb, dsn)
    try:
        for phase in orch.phases:
            output.rule(console, f"phase {phase.number}: {phase.title}")
            console.print(f"expand: {phase.expand_doc}\nlocks: {phase.locks_doc}")
            orch.run(phase.number)
        output.rule(console, "contract")
        for phase in orch.phases:
            console.print(f"contract {phase.number} ({phase.name}): {phase.contract_doc}")
            orch.contract(phase.number)
    finally:
        orch.close()
    show("after")


def is_chatter(pb) -> bool:
    """Whether a playbook migrates Chatter's tables (the demo, rehearsal and benchmarks then build its schema)."""
    return pb.columns is not None and {t for _, t in pb.tables} <= {"workflow_templates", "template_specs"}
