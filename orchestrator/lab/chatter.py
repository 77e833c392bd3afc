"""Chatter's real schema and data: the tables the reference migration really runs against.

``sql/chatter_schema.sql`` (packaged) is Chatter's database before its enum-removal revision:
``users``, ``workflow_templates`` (wide: ten indexes, CHECK constraints, a self-referencing
foreign key, many NOT NULL columns without defaults) and ``template_specs``, both of the latter
using the enum ``workflowtype``.  This module creates that schema, bulk-generates plausible rows
server-side, and gives the full column dict of one app-written row per table for the traffic
simulator and tests.  All SQL is composed with ``psycopg.sql``.
"""
from __future__ import annotations

import hashlib
import json
import secrets
import time
import zlib
from datetime import datetime, timezone
from functools import lru_cache
from importlib import resources

import psycopg
from psycopg import sql
from psycopg.types.json import Json

from orchestrator.lab.seed import SeedNames, commit

USERS = "users"
TEMPLATES = "workflow_templates"
SPECS = "template_specs"
COLUMN = "workflow_type"
ENUM = "workflowtype"
CATEGORY_ENUM = "templatecategory"
LABELS: tuple[str, ...] = ("plain", "tools", "rag", "full")
CATEGORIES: tuple[str, ...] = (
    "general", "customer_support", "programming", "research", "data_analysis",
    "creative", "educational", "business", "custom",
)
SCHEMA_FILE = "sql/chatter_schema.sql"

# Owner of the built-in templates the migration inserts (phase 6).
SYSTEM_USER = "system"
# App users owning the generated and app-written rows (26 chars, like Chatter's ULID ids).
OWNERS: tuple[str, ...] = tuple(f"01APPOWNER{i:016d}" for i in range(5))

# ms since 2020-01-01: 10 hex digits last until ~2054, so the time part of an id stays 10 chars
_ID_EPOCH_MS = 1_577_836_800_000


def chatter_names(schema: str = "public") -> SeedNames:
    """The SeedNames (table, column, enum, labels) of workflow_templates.workflow_type."""
    return SeedNames(schema=schema, table=TEMPLATES, column=COLUMN, enum=ENUM, labels=LABELS)


def schema_sql() -> str:
    """Text of the packaged schema file (header comment included)."""
    return resources.files("orchestrator.lab").joinpath(SCHEMA_FILE).read_text(encoding="utf-8")


def create_chatter_schema(conn: psycopg.Connection, schema: str = "public") -> None:
    """Create users, the enums, workflow_templates and template_specs in ``schema``, plus the
    system and app owner users.  The same file serves any schema: it runs with
    ``SET LOCAL search_path`` to it, so its unqualified names land there."""
    with conn.transaction():
        if schema != "public":
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        conn.execute(sql.SQL("SET LOCAL search_path TO {}").format(sql.Identifier(schema)))
        conn.execute(sql.SQL(schema_sql()))  # several statements: no parameters, simple protocol
    commit(conn)
    ensure_users(conn, schema)


def ensure_users(conn: psycopg.Connection, schema: str = "public") -> None:
    """Insert the ``system`` user and the app owners unless present."""
    rows = [(SYSTEM_USER, SYSTEM_USER)] + [(o, f"app_owner_{i}") for i, o in enumerate(OWNERS)]
    stmt = sql.SQL("INSERT INTO {} (id, username) VALUES {} ON CONFLICT (id) DO NOTHING").format(
        sql.Identifier(schema, USERS),
        sql.SQL(", ").join(sql.SQL("({}, {})").format(sql.Literal(i), sql.Literal(u)) for i, u in rows),
    )
    with conn.transaction():
        conn.execute(stmt)
    commit(conn)


# --- bulk generation ------------------------------------------------------------


def _id_expr(g: sql.Composable, salt_param: str) -> sql.Composed:
    """26-char id of generated row number ``g`` of this call: 10 hex chars of (call's ms clock + g),
    then 16 of md5(per-call salt, g).  Uppercase hex is Crockford base32, ids sort like ULIDs,
    the time part is unique within a call and the random salt keeps repeated calls apart."""
    return sql.SQL(
        "upper(lpad(to_hex(%(base)s::bigint + {g}), 10, '0')) || upper(substr(md5({salt} || ({g})::text), 1, 16))"
    ).format(g=g, salt=sql.Placeholder(salt_param))


_TEMPLATE_ROWS = """INSERT INTO {table} (id, created_at, updated_at, owner_id, name, description, workflow_type,
    category, default_params, required_tools, required_retrievers, base_template_id, is_builtin, version,
    is_latest, changelog, is_public, rating, rating_count, usage_count, success_rate, avg_response_time_ms,
    last_used_at, total_tokens_used, total_cost, avg_tokens_per_use, tags, extra_metadata, config_hash,
    estimated_complexity)
SELECT {id}, v.ts, v.ts + make_interval(secs => mod(g, 3600)::double precision),
       (%(owners)s::text[])[1 + mod(g, %(nowners)s)],
       initcap(replace(v.cat, '_', ' ')) || ' template ' || g,
       'Generated ' || v.wt || ' workflow template #' || g || ' for ' || replace(v.cat, '_', ' '),
       v.wt::{enum}, v.cat::{cat_enum},
       json_build_object('temperature', mod(g, 10) / 10.0, 'max_tokens', 256 * (1 + mod(g, 4)),
                         'model', 'gpt-4o-mini'),
       CASE WHEN v.wt IN ('tools', 'full') THEN json_build_array('web_search', 'calculator') END,
       CASE WHEN v.wt IN ('rag', 'full') THEN json_build_array('documents') END,
       CASE WHEN mod(g / 4, 10) = 7 THEN {parent_id} END,
       false, 1 + mod(g, 3), mod(g, 5) <> 0,
       CASE WHEN mod(g, 3) > 0 THEN 'v' || (1 + mod(g, 3)) || ': tuned prompts' END,
       mod(g, 3) = 0,
       CASE WHEN v.rc > 0 THEN (1 + mod(g, 41) / 10.0)::double precision END,
       v.rc, v.uc,
       CASE WHEN v.uc > 0 THEN (mod(g, 101) / 100.0)::double precision END,
       CASE WHEN v.uc > 0 THEN 200 + mod(g, 4800)::int END,
       CASE WHEN v.uc > 0 THEN v.ts + make_interval(secs => mod(g, 3600)::double precision) END,
       v.tok, (v.tok * 0.000002)::double precision,
       CASE WHEN v.uc > 0 THEN v.tok::double precision / v.uc END,
       json_build_array(v.wt, v.cat),
       json_build_object('source', 'generated', 'row', g),
       encode(sha256(convert_to(v.wt || ':' || v.cat || ':' || g, 'UTF8')), 'hex'),
       CASE WHEN mod(g, 4) > 0 THEN 1 + mod(g, 10)::int END
FROM generate_series(%(lo)s::bigint, %(hi)s::bigint) AS g,
     LATERAL (SELECT (%(labels)s::text[])[1 + mod(g, 4)],
                     (%(cats)s::text[])[1 + mod(g, %(ncats)s)],
                     now() - make_interval(secs => (3600 + %(n)s - g)::double precision),
                     mod(g, 50)::int, mod(g * 7, 1000)::int,
                     (mod(g * 7, 1000) * (100 + mod(g, 400)))::int) AS v(wt, cat, ts, rc, uc, tok)"""

_SPEC_ROWS = """INSERT INTO {table} (id, created_at, updated_at, owner_id, name, description, workflow_type,
    default_params, required_tools, required_retrievers, base_template_name, usage_count, last_used_at, tags,
    extra_metadata)
SELECT {id}, v.ts, v.ts + make_interval(secs => mod(g, 3600)::double precision),
       (%(owners)s::text[])[1 + mod(g, %(nowners)s)],
       'Spec ' || v.wt || ' #' || g,
       'Generated ' || v.wt || ' template spec #' || g,
       v.wt::{enum},
       json_build_object('temperature', mod(g, 10) / 10.0, 'max_tokens', 512),
       CASE WHEN v.wt IN ('tools', 'full') THEN json_build_array('web_search') END,
       CASE WHEN v.wt IN ('rag', 'full') THEN json_build_array('documents') END,
       CASE WHEN mod(g, 3) = 0 THEN 'General template ' || g END,
       v.uc,
       CASE WHEN v.uc > 0 THEN v.ts + make_interval(secs => mod(g, 3600)::double precision) END,
       json_build_array(v.wt),
       CASE WHEN mod(g, 2) = 0 THEN json_build_object('source', 'generated') END
FROM generate_series(%(lo)s::bigint, %(hi)s::bigint) AS g,
     LATERAL (SELECT (%(labels)s::text[])[1 + mod(g + 1, 4)],
                     now() - make_interval(secs => (3600 + %(n)s - g)::double precision),
                     mod(g * 3, 200)::int) AS v(wt, ts, uc)"""


def insert_chatter_rows(
    conn: psycopg.Connection, templates: int, specs: int | None = None, *,
    schema: str = "public", batch: int = 200_000,
) -> None:
    """Bulk-generate ``templates`` workflow_templates and ``specs`` template_specs rows
    (default max(1, templates // 4); none when templates <= 0), server-side, one committed
    transaction per batch, then ANALYZE both tables.

    Every NOT NULL column is filled and every CHECK holds; workflow_type cycles over the four
    labels, category over templatecategory; every 10th template (rows 28-31, 68-71, ...) has a
    base_template_id pointing at an earlier row of the same call; owners are ``OWNERS``.
    """
    if specs is None:
        specs = max(1, templates // 4) if templates > 0 else 0
    ensure_users(conn, schema)
    base = int(time.time() * 1000) - _ID_EPOCH_MS
    params = {"base": base, "owners": list(OWNERS), "nowners": len(OWNERS), "labels": list(LABELS),
              "cats": list(CATEGORIES), "ncats": len(CATEGORIES)}
    enum = sql.Identifier(schema, ENUM)
    g = sql.SQL("g")
    tmpl = sql.SQL(_TEMPLATE_ROWS).format(
        table=sql.Identifier(schema, TEMPLATES), id=_id_expr(g, "salt"), enum=enum,
        cat_enum=sql.Identifier(schema, CATEGORY_ENUM),
        parent_id=_id_expr(sql.SQL("(g * 7 / 10)"), "salt"),  # row 28 -> 19, 29 -> 20, ...: earlier
    )
    spec = sql.SQL(_SPEC_ROWS).format(table=sql.Identifier(schema, SPECS), id=_id_expr(g, "salt"), enum=enum)
    for stmt, n in ((tmpl, templates), (spec, specs)):
        salt = secrets.token_hex(8)
        for lo in range(0, max(n, 0), batch):
            with conn.transaction():
                conn.execute(stmt, {**params, "salt": salt, "n": n, "lo": lo, "hi": min(n, lo + batch) - 1})
            commit(conn)
    for table in (TEMPLATES, SPECS):
        conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(schema, table)))
    commit(conn)


# --- single app-written rows ----------------------------------------------------


def _hash(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def template_values(id: str, workflow_type: str, owner_id: str = OWNERS[0], **overrides) -> dict:
    """Column -> value of one app-written workflow_templates row: every column of the file's
    table (nullable ones mostly None), json columns as plain dicts/lists.  ``overrides`` replace
    or add columns (e.g. ``execution_pattern`` once the migration added it)."""
    h = zlib.crc32(id.encode())
    category = CATEGORIES[h % len(CATEGORIES)]
    params = {"temperature": (h % 10) / 10, "max_tokens": 256 * (1 + h % 4), "model": "gpt-4o-mini"}
    now = datetime.now(timezone.utc)
    values = {
        "id": id, "created_at": now, "updated_at": now, "owner_id": owner_id,
        "name": f"App template {id[-8:]}",
        "description": f"{workflow_type} workflow template created by the app",
        "workflow_type": workflow_type, "category": category, "default_params": params,
        "required_tools": None, "required_retrievers": None, "base_template_id": None,
        "is_builtin": False, "version": 1, "is_latest": True, "changelog": None, "is_public": h % 2 == 0,
        "rating": None, "rating_count": 0, "usage_count": 0, "success_rate": None,
        "avg_response_time_ms": None, "last_used_at": None, "total_tokens_used": 0, "total_cost": 0.0,
        "avg_tokens_per_use": None, "tags": ["app", category], "extra_metadata": None,
        "config_hash": _hash(workflow_type, category, params), "estimated_complexity": 1 + h % 10,
    }
    values.update(overrides)
    return values


def spec_values(id: str, workflow_type: str, owner_id: str = OWNERS[0], **overrides) -> dict:
    """Column -> value of one app-written template_specs row (every column of the file's table)."""
    now = datetime.now(timezone.utc)
    values = {
        "id": id, "created_at": now, "updated_at": now, "owner_id": owner_id,
        "name": f"App spec {id[-8:]}", "description": f"{workflow_type} template spec created by the app",
        "workflow_type": workflow_type, "default_params": {"temperature": 0.7, "max_tokens": 512},
        "required_tools": None, "required_retrievers": None, "base_template_name": None,
        "usage_count": 0, "last_used_at": None, "tags": ["app"], "extra_metadata": None,
    }
    values.update(overrides)
    return values


@lru_cache(maxsize=256)
def insert_sql(schema: str, table: str, columns: tuple[str, ...], returning: str | None = None) -> sql.Composed:
    """``INSERT INTO schema.table (columns) VALUES (%s, ...) [RETURNING returning]``."""
    stmt = sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
        sql.Identifier(schema, table),
        sql.SQL(", ").join(map(sql.Identifier, columns)),
        sql.SQL(", ").join(sql.Placeholder() * len(columns)),
    )
    if returning is not None:
        stmt += sql.SQL(" RETURNING {}").format(sql.Identifier(returning))
    return stmt


def insert_params(values: dict) -> list:
    """The values in column order, json columns (dicts and lists) wrapped for psycopg."""
    return [Json(v) if isinstance(v, (dict, list)) else v for v in values.values()]


def insert_template(conn: psycopg.Connection, id: str, workflow_type: str, owner_id: str = OWNERS[0], *,
                    schema: str = "public", **overrides) -> dict:
    """INSERT one template_values(...) row in the caller's transaction; returns the values."""
    values = template_values(id, workflow_type, owner_id, **overrides)
    conn.execute(insert_sql(schema, TEMPLATES, tuple(values)), insert_params(values))
    return values


def insert_spec(conn: psycopg.Connection, id: str, workflow_type: str, owner_id: str = OWNERS[0], *,
                schema: str = "public", **overrides) -> dict:
    """INSERT one spec_values(...) row in the caller's transaction; returns the values."""
    values = spec_values(id, workflow_type, owner_id, **overrides)
    conn.execute(insert_sql(schema, SPECS, tuple(values)), insert_params(values))
    return values


def is_chatter(pb) -> bool:
    """Whether a playbook migrates Chatter's tables (the demo, rehearsal and benchmarks then build its schema)."""
    return pb.columns is not None and {t for _, t in pb.tables} <= {"workflow_templates", "template_specs"}
