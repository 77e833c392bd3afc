"""Catalog snapshots: a schema's objects as sorted JSON, to prove a rollback leaves the catalog as it found it."""
from __future__ import annotations

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

ORCHESTRATOR_SCHEMA = "_orchestrator"  # the orchestrator's own state: never part of a snapshot

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
       pg_get_constraintdef(con.oid) AS definition, con.convalidated AS valid
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
SELECT c.relname AS name, format_type(s.seqtypid, NULL) AS type, s.seqmax::text AS max,
       (SELECT t.relname || '.' || a.attname FROM pg_depend d
          JOIN pg_class t ON t.oid = d.refobjid
          JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
         WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype IN ('a', 'i')) AS owned_by
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace JOIN pg_sequence s ON s.seqrelid = c.oid
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
