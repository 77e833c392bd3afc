"""The simplified one-table seed (an enum column in one table) and its bulk rows, for the reference migration.

The reference migration turns ``workflow_templates.workflow_type`` (enum ``workflowtype``) into ``varchar(50)``.
Everything here takes a ``SeedNames`` so tests can run the same flow against hostile-but-legal identifiers.
All SQL is composed with ``psycopg.sql``; no identifier or value is ever formatted in.
"""
from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

import psycopg
from psycopg import sql

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


def commit(conn: psycopg.Connection) -> None:
    # Callers may hand us an autocommit or a transactional connection.
    if not conn.autocommit:
        conn.commit()


def create_seed_schema(
    conn: psycopg.Connection, names: SeedNames = SeedNames(), *, enum_default: str | None = None
) -> None:
    """Create schema (unless public), enum, table and index exactly like the app's seed."""
    default: sql.Composable = sql.SQL("")
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
    commit(conn)


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
        commit(conn)
    conn.execute(sql.SQL("ANALYZE {}").format(names.table_ident))
    commit(conn)


# --- catalog snapshot ---------------------------------------------------------
