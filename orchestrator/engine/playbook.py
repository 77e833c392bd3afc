"""Declarative playbooks: what to migrate, validated strictly before anything touches the database."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from orchestrator.engine import target_rules
from orchestrator.engine.errors import BadInput

MAX_IDENTIFIER_BYTES = 63  # NAMEDATALEN - 1: PostgreSQL silently truncates longer names

# Types the playbook may name for new columns; anything else is refused rather than passed through to SQL.
COLUMN_TYPES = ("varchar", "text", "boolean", "integer", "bigint", "timestamptz", "jsonb")


def _identifier(value: str, field: str) -> str:
    if not value:
        raise ValueError(f"{field} must not be empty")
    if "\x00" in value:
        raise ValueError(f"{field} must not contain a NUL byte")
    if len(value.encode()) > MAX_IDENTIFIER_BYTES:
        raise ValueError(f"{field} {value!r} is longer than {MAX_IDENTIFIER_BYTES} bytes")
    return value


def _key(value: str) -> str:
    """A label or name as it appears in a message: as is, or quoted when it would break the line."""
    if not value:
        return '""'
    return value if value.isprintable() else repr(value)


def _nul_path(data: Any, path: tuple = ()) -> tuple | None:
    """Where a NUL byte hides in the parsed YAML (keys too): PostgreSQL text cannot hold one."""
    if isinstance(data, str):
        return path if "\x00" in data else None
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for k, v in items:
        if isinstance(k, str) and "\x00" in k:
            return (*path, k)
        found = _nul_path(v, (*path, k))
        if found is not None:
            return found
    return None


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class TableSpec(Strict):
    schema_: str = Field("public", alias="schema")
    name: str

    @field_validator("schema_", "name")
    @classmethod
    def _ident(cls, v: str, info) -> str:
        return _identifier(v, f"table.{info.field_name.rstrip('_')}")


class ColumnSpec(Strict):
    name: str
    enum_type: str = ""  # required by enum_to_varchar (Playbook._validate); change_type has none
    enum_schema: str | None = None  # defaults to the table's schema
    shadow: str | None = None  # the new column while both exist; default <name>_new
    retired: str | None = None  # what the enum column is renamed to at the swap; default <name>_old

    @field_validator("name", "enum_type", "enum_schema", "shadow", "retired")
    @classmethod
    def _ident(cls, v: str | None, info) -> str | None:
        if v is None or (v == "" and info.field_name == "enum_type"):
            return v
        return _identifier(v, f"column.{info.field_name}")


class TargetCheck(Strict):
    """What the enum guaranteed, kept by a CHECK on the new column (orchestrator/engine/target_rules.py)."""

    non_empty: bool = False  # at least one character that is not white space
    pattern: str | None = None  # a regular expression, in the subset PostgreSQL and Python read alike

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str | None) -> str | None:
        if v is not None:
            target_rules.to_python(v)  # PatternError (a ValueError) names the position
        return v

    @model_validator(mode="after")
    def _some_rule(self) -> TargetCheck:
        if not self.non_empty and self.pattern is None:
            raise ValueError("set non_empty: true, a pattern, or both")
        return self


class TargetSpec(Strict):
    type: Literal["varchar", "text"] = "varchar"
    length: int | None = Field(None, ge=1, le=10_485_760)
    nullable: bool = False
    default: str | None = None  # default of the new column; derived from the old default when omitted
    check: TargetCheck | None = None  # CHECK on the new column, added online before the swap

    @model_validator(mode="after")
    def _length(self) -> TargetSpec:
        if self.type == "varchar" and self.length is None:
            raise ValueError("target.length is required for varchar")
        if self.type == "text" and self.length is not None:
            raise ValueError("target.length is only allowed for varchar")
        return self


class RollbackSpec(Strict):
    # Values written after the swap that have no enum label: refuse the rollback, or rewrite them to a label.
    unmapped: Literal["refuse", "fallback"] = "refuse"
    fallback_label: str | None = None
    reverse_mapping: dict[str, str] = Field(default_factory=dict)  # extra new value -> label


class ExtraColumn(Strict):
    name: str
    type: Literal["varchar", "text", "boolean", "integer", "bigint", "timestamptz", "jsonb"]
    length: int | None = Field(None, ge=1, le=10_485_760)
    nullable: bool = True
    default: str | bool | int | None = None
    backfill: str | bool | int | None = None  # existing rows and old-app inserts: a default until the contract
    index: bool = False

    @field_validator("name")
    @classmethod
    def _ident(cls, v: str) -> str:
        return _identifier(v, "extra_columns.name")

    @model_validator(mode="after")
    def _consistent(self) -> ExtraColumn:
        if self.type == "varchar" and self.length is None:
            raise ValueError(f"extra column {self.name!r}: length is required for varchar")
        if self.type != "varchar" and self.length is not None:
            raise ValueError(f"extra column {self.name!r}: length is only allowed for varchar")
        if self.default is not None and self.backfill is not None:
            raise ValueError(f"extra column {self.name!r}: set default (every row) or backfill (existing rows and "
                             "old-app inserts during the migration), not both")
        if not self.nullable and self.default is None:
            raise ValueError(f"extra column {self.name!r}: NOT NULL needs a default (existing rows)")
        for what, value in (("default", self.default), ("backfill", self.backfill)):
            if value is not None and self.type == "varchar" and len(str(value)) > (self.length or 0):
                raise ValueError(f"extra column {self.name!r}: {what} is longer than varchar({self.length})")
        return self


class SeedRows(Strict):
    key: list[str] = Field(default_factory=lambda: ["id"], min_length=1)
    rows: list[dict[str, Any]] = Field(default_factory=list)

    model_config = ConfigDict(extra="forbid", strict=False, frozen=True)


class Settings(Strict):
    batch_size: int = Field(5_000, ge=1, le=1_000_000)
    min_batch_size: int = Field(100, ge=1, le=1_000_000)
    max_batch_size: int = Field(100_000, ge=1, le=1_000_000)
    target_batch_ms: int = Field(100, ge=1, le=60_000)
    max_batch_ms: int = Field(200, ge=1, le=600_000)  # a batch running longer is cancelled, split and retried
    batch_pause_ms: int = Field(0, ge=0, le=600_000)
    # Throttles, checked before each batch: wait while a replica lags or long transactions pile up.
    max_replica_lag_ms: int | None = Field(None, ge=1, le=86_400_000)
    max_replica_lag_bytes: int | None = Field(None, ge=1, le=1 << 50)  # WAL a standby has yet to replay
    max_long_transactions: int | None = Field(None, ge=0, le=100_000)
    long_transaction_s: int = Field(60, ge=1, le=86_400)
    throttle_max_wait_s: int = Field(600, ge=1, le=86_400)
    # Health throttles (orchestrator/health.py): WAL rate, autovacuum on the table, app backends waiting on locks.
    max_wal_mb_per_s: float | None = Field(None, gt=0, le=1_000_000)
    throttle_on_autovacuum: bool = False
    max_lock_waiters: int | None = Field(None, ge=0, le=100_000)
    max_app_statement_ms: int | None = Field(None, ge=1, le=3_600_000)  # an app statement running this long
    lock_timeout_ms: int = Field(50, ge=1, le=60_000)
    statement_timeout_ms: int = Field(30_000, ge=1, le=86_400_000)
    # Online steps take only locks the app never queues behind (CREATE/DROP INDEX CONCURRENTLY, VALIDATE
    # CONSTRAINT, ANALYZE, parity scans): they may wait for old snapshots and writers, once, this long.
    online_lock_timeout_ms: int = Field(180_000, ge=1, le=86_400_000)
    online_statement_timeout_ms: int = Field(0, ge=0, le=86_400_000)  # 0: no limit
    # The app's UPDATE triggers on a migrated table, during the backfill: refuse to start (default), fire them
    # (accept their effects), or skip them (session_replication_role = replica per batch; needs superuser or,
    # on PostgreSQL 15+, GRANT SET ON PARAMETER session_replication_role).
    app_triggers: Literal["refuse", "fire", "skip"] = "refuse"
    retries: int = Field(30, ge=0, le=10_000)
    retry_wait_initial_ms: int = Field(50, ge=1, le=600_000)
    retry_wait_max_ms: int = Field(2_000, ge=1, le=600_000)
    verify_chunk_rows: int = Field(200_000, ge=1, le=100_000_000)
    verify_parallelism: int = Field(2, ge=1, le=32)  # connections reading verify's block ranges at once (PG 14+)
    # Footprint (issue 16, docs/benchmarks.md "Footprint"): build the shadow and new-column indexes in phase 3,
    # after its batches, instead of in phase 1 (the batches then write fewer index entries); VACUUM the table
    # (TRUNCATE false: no ACCESS EXCLUSIVE) after every `vacuum_every_rows` rows the backfill changed and once
    # at its end, so later batches reuse the space of the row versions earlier ones left behind.
    indexes_after_backfill: bool = False
    # Phase 3 as an UPDATE of every row in place, or as a copy of the table swapped in by a rename
    # (kinds/phases/copy.py): the copy writes each row and index once, about what the blocking rewrite writes.
    backfill_method: Literal["update", "copy"] = "update"
    vacuum_every_rows: int | None = Field(None, ge=1, le=1_000_000_000)
    vacuum_index_cleanup: Literal["auto", "on", "off"] = "auto"
    # Contract step 3 rebuilds each index of the table (REINDEX INDEX CONCURRENTLY, one at a time): the
    # backfill leaves them half empty, where the naive rewrite builds them packed.
    reindex_on_contract: bool = False
    # Compress the full-page images of phase 3's own writes (SET wal_compression in its session: superuser or
    # GRANT SET ON PARAMETER; without the right, or a method the server lacks, it goes on uncompressed).
    wal_compression: Literal["pglz", "lz4", "zstd"] | None = None
    cancel_autovacuum: bool = True  # an autovacuum holding the table would outlast every lock_timeout retry
    drop_enum_type: bool = True
    translate_old_writes: bool = True  # after the swap, old labels written by stale app instances are mapped
    # contract waits until the old app version has written nothing for this long (app_versions)
    old_version_quiet_s: int = Field(300, ge=0, le=30 * 86_400)
    state_schema: str = "_orchestrator"

    @field_validator("state_schema")
    @classmethod
    def _ident(cls, v: str) -> str:
        return _identifier(v, "settings.state_schema")

    @property
    def defers_indexes(self) -> bool:
        """The new columns' indexes are built in phase 3, after the rows (a copy builds them on its table)."""
        return self.indexes_after_backfill or self.backfill_method == "copy"

    @model_validator(mode="after")
    def _bounds(self) -> Settings:
        if not self.min_batch_size <= self.batch_size <= self.max_batch_size:
            raise ValueError("settings.batch_size must lie between min_batch_size and max_batch_size")
        if self.target_batch_ms > self.max_batch_ms:
            raise ValueError("settings.target_batch_ms must not exceed max_batch_ms")
        if self.retry_wait_initial_ms > self.retry_wait_max_ms:
            raise ValueError("settings.retry_wait_initial_ms must not exceed retry_wait_max_ms")
        return self


SEMANTIC_FIELDS = ("name", "kind", "enum", "columns", "table", "column", "target", "mapping", "rollback",
                   "extra_columns", "seed_rows", "settings", "app_versions")
SEMANTIC_SETTINGS = ("drop_enum_type", "translate_old_writes", "state_schema")


class EnumRef(Strict):
    """The enum type a playbook retires, and every column using it is listed under `columns`."""

    name: str
    schema_: str = Field("public", alias="schema")

    @field_validator("name", "schema_")
    @classmethod
    def _ident(cls, v: str, info) -> str:
        return _identifier(v, f"enum.{info.field_name.rstrip('_')}")


class TypeChange(Strict):
    """What `kind: change_type` does to one column: the new SQL type and the two conversions, each a SQL
    expression naming the column (`up` over the old column, `down` over the new one)."""

    type: str
    up: str
    down: str

    @field_validator("type", "up", "down")
    @classmethod
    def _text(cls, v: str, info) -> str:
        if not v.strip():
            raise ValueError(f"{info.field_name} must not be empty")
        if ";" in v and info.field_name == "type":
            raise ValueError("type must be one SQL type, e.g. bigint or varchar(200)")
        return v


class ColumnEntry(Strict):
    """One column using the enum type: `columns: [{table, column, ...}]`; unset fields take the playbook's."""

    table: str
    schema_: str | None = Field(None, alias="schema")  # defaults to the enum's schema
    column: str
    shadow: str | None = None
    retired: str | None = None
    # kind: change_type
    type: str | None = None
    up: str | None = None
    down: str | None = None
    target: TargetSpec | None = None
    mapping: dict[str, str] | None = None
    extra_columns: list[ExtraColumn] = Field(default_factory=list)
    seed_rows: SeedRows = Field(default_factory=SeedRows)

    @field_validator("table", "schema_", "column", "shadow", "retired")
    @classmethod
    def _ident(cls, v: str | None, info) -> str | None:
        return None if v is None else _identifier(v, f"columns.{info.field_name.rstrip('_')}")


class Hooks(Strict):
    """Executables run on phase events, with the details in ORCH_* environment variables (like gh-ost's)."""

    on_start: list[str] = Field(default_factory=list)
    on_success: list[str] = Field(default_factory=list)
    on_failure: list[str] = Field(default_factory=list)
    on_progress: list[str] = Field(default_factory=list)
    progress_every_s: int = Field(30, ge=1, le=86_400)
    timeout_s: int = Field(30, ge=1, le=3_600)
    fail_on_error: bool = False  # by default a failing hook is logged and the migration goes on


class AppVersions(Strict):
    """A schema of views per application version while both run (a rolling deploy): the old version sees the
    enum column and its labels, the new one the varchar column and its values. Chosen by search_path."""

    old: str
    new: str

    @field_validator("old", "new")
    @classmethod
    def _ident(cls, v: str, info) -> str:
        return _identifier(v, f"app_versions.{info.field_name}")

    @model_validator(mode="after")
    def _distinct(self) -> AppVersions:
        if self.old == self.new:
            raise ValueError("app_versions: old and new must be different schemas")
        return self


class AlembicSpec(Strict):
    """Where the generated revisions sit in an application's Alembic history."""

    branch_label: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$", max_length=100)
    depends_on: list[str] = Field(default_factory=list)


class Environment(Strict):
    """Per-environment overrides (dev, staging, production) of settings and hooks, chosen with --env."""

    settings: dict[str, Any] = Field(default_factory=dict)
    hooks: dict[str, Any] = Field(default_factory=dict)

    model_config = ConfigDict(extra="forbid", strict=False, frozen=True)


@dataclass(frozen=True)
class ColumnMigration:
    """The unit of work: one enum column of one table, with everything the phases need to migrate it.

    `where` prefixes field names in messages: "" for a playbook written with `table`/`column`,
    "columns[1]." for an entry of `columns`.
    """

    table: TableSpec
    column: ColumnSpec
    target: TargetSpec
    mapping: dict[str, str]
    rollback: RollbackSpec
    extra_columns: tuple[ExtraColumn, ...] = ()
    seed_rows: SeedRows = SeedRows()
    where: str = ""
    own_mapping: bool = False  # the entry has a mapping of its own (messages name its field)
    own_target: bool = False
    change: TypeChange | None = None  # kind: change_type (then mapping is empty)

    @property
    def shadow(self) -> str:
        return self.column.shadow or _suffixed(self.column.name, "_new")

    @property
    def retired(self) -> str:
        return self.column.retired or _suffixed(self.column.name, "_old")

    @property
    def enum_schema(self) -> str:
        return self.column.enum_schema or self.table.schema_

    @property
    def label(self) -> str:
        """table.column as people write it (schema-qualified outside public)."""
        t = self.table.name if self.table.schema_ == "public" else f"{self.table.schema_}.{self.table.name}"
        return f"{t}.{self.column.name}"

    @property
    def key(self) -> str:
        """Stable key of this unit in the state tables."""
        return json.dumps([self.table.schema_, self.table.name, self.column.name])

    @property
    def reverse(self) -> dict[str, str]:
        """new value -> enum label, for keeping the old column in sync after the swap."""
        return {**{v: k for k, v in self.mapping.items()}, **self.rollback.reverse_mapping}

    def field(self, name: str) -> str:
        """The playbook field a message should point at, e.g. 'column.shadow' -> 'columns[1].shadow'."""
        if not self.where:
            return name
        if name.startswith("mapping"):
            return self.where + name if self.own_mapping else name
        if name.startswith("target"):
            return self.where + name if self.own_target else name
        return _LIST_FORM_FIELDS.get(name, self.where + name).replace("@", self.where)

    def own_values(self) -> Iterable[tuple[str, str]]:
        """(playbook field, value) of every value the playbook itself puts in the migrated column."""
        for label, value in self.mapping.items():
            yield f"{self.field('mapping')}.{_key(label)}", value
        for value in self.rollback.reverse_mapping:
            yield f"rollback.reverse_mapping.{_key(value)}", value
        if self.target.default is not None:
            yield self.field("target.default"), self.target.default
        for i, row in enumerate(self.seed_rows.rows):
            cell = row.get(self.column.name)
            if isinstance(cell, str):
                key = ", ".join(f"{k}={row.get(k)!r}" for k in self.seed_rows.key)
                yield f"{self.where}seed_rows.rows[{i}].{_key(self.column.name)} ({key})", cell


# Where a one-column playbook's field lives in an entry of `columns` (@ = the entry).
_LIST_FORM_FIELDS = {"table.name": "@table", "table.schema": "@schema", "column.name": "@column",
                     "column.shadow": "@shadow", "column.retired": "@retired", "column.enum_type": "enum.name",
                     "column.enum_schema": "enum.schema"}


class Playbook(Strict):
    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    kind: Literal["enum_to_varchar", "change_type"] = "enum_to_varchar"
    # Either every column of an enum type (`enum` + `columns`), or one column (`table` + `column`).
    enum: EnumRef | None = None
    columns: list[ColumnEntry] | None = None
    table: TableSpec | None = None
    column: ColumnSpec | None = None
    target: TargetSpec = Field(default_factory=lambda: TargetSpec(type="text"))  # enum_to_varchar requires it
    mapping: dict[str, str] = Field(default_factory=dict)
    rollback: RollbackSpec = Field(default_factory=RollbackSpec)
    extra_columns: list[ExtraColumn] = Field(default_factory=list)
    seed_rows: SeedRows = Field(default_factory=SeedRows)
    settings: Settings = Field(default_factory=Settings)
    hooks: Hooks = Field(default_factory=Hooks)
    environments: dict[str, Environment] = Field(default_factory=dict)
    alembic: AlembicSpec = Field(default_factory=AlembicSpec)
    app_versions: AppVersions | None = None
    env: str | None = None  # set by load(..., env=): which environment's overrides are in effect

    @model_validator(mode="after")
    def _validate(self) -> Playbook:
        if self.kind == "change_type":
            _check_change_type(self)
        else:
            if not self.mapping and not (self.columns and all(e.mapping for e in self.columns)):
                raise ValueError("playbook field 'mapping': required but missing")
            if self.column is not None and not self.column.enum_type:
                raise ValueError("playbook field 'column.enum_type': required but missing")
            if "target" not in self.model_fields_set and not (self.columns and all(e.target for e in self.columns)):
                raise ValueError("target.length is required for varchar")
        if self.columns is None:
            if self.table is None or self.column is None:
                missing = "table" if self.table is None else "column"
                raise ValueError(f"playbook field '{missing}': required but missing (or list every column of the "
                                 f"enum type under 'enum' and 'columns')")
            if self.enum is not None:
                raise ValueError("playbook field 'enum': goes with 'columns'; with 'table' and 'column' name the "
                                 "type in column.enum_type")
        else:
            if self.table is not None or self.column is not None:
                raise ValueError("playbook fields 'table'/'column' and 'columns' exclude each other: list every "
                                 "column under 'columns'")
            if self.enum is None and self.kind == "enum_to_varchar":
                raise ValueError("playbook field 'enum': required with 'columns' (the enum type they use)")
            if not self.columns:
                raise ValueError("playbook field 'columns': list at least one column")
            if self.extra_columns or self.seed_rows.rows:
                raise ValueError("playbook fields 'extra_columns' and 'seed_rows' belong to an entry of 'columns' "
                                 "(the table they go to)")
        rb = self.rollback
        if rb.unmapped == "fallback" and rb.fallback_label is None:
            raise ValueError("rollback.fallback_label is required when rollback.unmapped is 'fallback'")
        seen_units: set[tuple[str, str, str]] = set()
        for m in self.migrations:
            ident = (m.table.schema_, m.table.name, m.column.name)
            if ident in seen_units:
                raise ValueError(f"{m.where or 'columns'}: {m.label} is listed twice")
            seen_units.add(ident)
            _check_unit(m)
        tables: dict[tuple[str, str], list[str]] = {}
        for m in self.migrations:
            tables.setdefault((m.table.schema_, m.table.name), []).extend(
                [m.column.name, m.shadow, m.retired, *(c.name for c in m.extra_columns)])
        for names in tables.values():
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"column names must be distinct: {dupes[0]!r} is used twice")
        return self

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Playbook:
        copy = super().model_copy(update=update, deep=deep)
        copy.__dict__.pop("migrations", None)  # derived from the fields: rebuilt from the copy's own
        return copy

    @cached_property
    def migrations(self) -> list[ColumnMigration]:
        """The columns this playbook migrates, in the order the phases visit them."""
        if self.columns is None:
            if self.table is None or self.column is None:  # never: _validate requires both without 'columns'
                raise RuntimeError("a playbook without 'columns' must have 'table' and 'column'")
            return [ColumnMigration(table=self.table, column=self.column, target=self.target, mapping=self.mapping,
                                    rollback=self.rollback, extra_columns=tuple(self.extra_columns),
                                    seed_rows=self.seed_rows)]
        if self.kind == "change_type":
            return [ColumnMigration(
                table=TableSpec(schema=e.schema_ or "public", name=e.table),
                column=ColumnSpec(name=e.column, enum_type="", shadow=e.shadow, retired=e.retired),
                target=self.target, mapping={}, rollback=self.rollback, where=f"columns[{i}].",
                change=TypeChange(type=e.type, up=e.up, down=e.down))  # type: ignore[arg-type]  # _validate
                for i, e in enumerate(self.columns)]
        enum = self.enum
        if enum is None:  # never: _validate requires it with 'columns'
            raise RuntimeError("a playbook with 'columns' must have 'enum'")
        out = []
        for i, e in enumerate(self.columns):
            out.append(ColumnMigration(
                table=TableSpec(schema=e.schema_ or enum.schema_, name=e.table),
                column=ColumnSpec(name=e.column, enum_type=enum.name, enum_schema=enum.schema_,
                                  shadow=e.shadow, retired=e.retired),
                target=e.target or self.target, mapping=e.mapping if e.mapping is not None else self.mapping,
                rollback=self.rollback, extra_columns=tuple(e.extra_columns), seed_rows=e.seed_rows,
                where=f"columns[{i}].", own_mapping=e.mapping is not None, own_target=e.target is not None))
        return out

    @property
    def enum_type(self) -> tuple[str, str]:
        """(schema, name) of the enum type."""
        m = self.migrations[0]
        return m.enum_schema, m.column.enum_type

    @property
    def tables(self) -> list[tuple[str, str]]:
        """(schema, table) of every table touched, each once, in playbook order."""
        return list(dict.fromkeys((m.table.schema_, m.table.name) for m in self.migrations))

    def fingerprint(self) -> str:
        """Stable hash of what the playbook asks for; stored at the first run to detect edits between phases.

        Tunables (batch sizes, timeouts, retries, throttles) are left out: a DBA may change them between
        phases. Settings that change the result (drop_enum_type, translate_old_writes, state_schema) count.
        """
        # An explicit list, so a new optional field (with its default) never invalidates running migrations.
        body = self.model_dump(mode="json", by_alias=True, include=set(SEMANTIC_FIELDS), exclude_none=True)
        body["settings"] = {k: body["settings"][k] for k in SEMANTIC_SETTINGS}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


# What only an enum has: a playbook of kind change_type that sets one is refused rather than ignored.
_ENUM_ONLY_FIELDS = ("enum", "table", "column", "mapping", "extra_columns", "seed_rows")
_ENUM_ONLY_ENTRY_FIELDS = ("target", "mapping", "extra_columns", "seed_rows")


def _check_change_type(pb: Playbook) -> None:
    """kind: change_type lists every column under `columns`, each with type, up and down; nothing of an enum."""
    for name in _ENUM_ONLY_FIELDS:
        if name in pb.model_fields_set:
            raise ValueError(f"playbook field '{name}': not used by kind change_type (list each column under "
                             f"'columns' with table, column, type, up and down)")
    if "target" in pb.model_fields_set:
        raise ValueError("playbook field 'target': not used by kind change_type (each column gives its type)")
    if not pb.columns:
        raise ValueError("playbook field 'columns': list at least one column (table, column, type, up, down)")
    if pb.rollback.unmapped != "refuse" or pb.rollback.reverse_mapping or pb.rollback.fallback_label is not None:
        raise ValueError("playbook field 'rollback': kind change_type only refuses a rollback that would lose "
                         "values `down` cannot take back (rollback.unmapped: refuse)")
    if "drop_enum_type" in pb.settings.model_fields_set or "translate_old_writes" in pb.settings.model_fields_set:
        raise ValueError("settings.drop_enum_type and settings.translate_old_writes are for enum_to_varchar")
    for i, e in enumerate(pb.columns):
        for name in ("type", "up", "down"):
            if getattr(e, name) is None:
                raise ValueError(f"playbook field 'columns.{i}.{name}': required with kind change_type")
        for name in _ENUM_ONLY_ENTRY_FIELDS:
            if name in e.model_fields_set:
                raise ValueError(f"playbook field 'columns.{i}.{name}': not used by kind change_type")
        try:
            TypeChange(type=e.type, up=e.up, down=e.down)  # type: ignore[arg-type]  # checked just above
        except ValidationError as err:
            raise ValueError(f"playbook field 'columns.{i}.{err.errors()[0]['loc'][0]}': "
                             f"{err.errors()[0]['msg'].removeprefix('Value error, ')}") from None


def _check_unit(m: ColumnMigration) -> None:
    """A column's mapping, rollback mapping and seed rows agree with each other and its target type."""
    if m.change is not None:
        return
    labels = set(m.mapping)
    if not labels:
        raise ValueError(f"{m.field('mapping')}: must map at least one label")
    length = m.target.length
    seen: dict[str, str] = {}
    for label, value in m.mapping.items():
        where = f"{m.field('mapping')}.{_key(label)}"
        if not label:
            raise ValueError(f"{m.field('mapping')}: an enum label must not be empty")
        if not value:
            raise ValueError(f"{where}: the new value must not be empty")
        if value in seen:
            raise ValueError(f"{where}: duplicate target {value!r} (also mapped from {seen[value]!r})")
        seen[value] = label
        if value in labels and value != label:
            raise ValueError(f"{where}: target {value!r} collides with the enum label {value!r}")
        if length is not None and len(value) > length:
            raise ValueError(f"{where}: {value!r} has {len(value)} characters, longer than target varchar({length})")
    rb = m.rollback
    if rb.fallback_label is not None and rb.fallback_label not in labels:
        raise ValueError(f"rollback.fallback_label: {rb.fallback_label!r} is not an enum label of the mapping")
    for value, label in rb.reverse_mapping.items():
        where = f"rollback.reverse_mapping.{_key(value)}"
        if label not in labels:
            raise ValueError(f"{where}: {label!r} is not an enum label of the mapping")
        if value in seen:
            raise ValueError(f"{where}: already the target of {m.field('mapping')}.{_key(seen[value])}")
        if value in labels:  # after the swap an old label is a stale write, translated by the mapping
            raise ValueError(f"{where}: {value!r} is an enum label; only new values can be mapped back")
    if m.target.default is not None and length is not None and len(m.target.default) > length:
        raise ValueError(f"{m.field('target.default')} is longer than the target type")
    for i, row in enumerate(m.seed_rows.rows):
        for key in m.seed_rows.key:
            if key not in row:
                raise ValueError(f"{m.where}seed_rows.rows[{i}]: the key column {key!r} is missing")
        cell = row.get(m.column.name)
        if isinstance(cell, str) and length is not None and len(cell) > length:
            raise ValueError(f"{m.where}seed_rows.rows[{i}].{_key(m.column.name)}: longer than the target type")
    if m.target.check is not None:  # a value the playbook itself writes must pass the CHECK it installs
        for where, value in m.own_values():
            why = target_rules.violation(m.target.check, value)
            if why:
                raise ValueError(f"{where}: {value!r} {why}")


def _suffixed(name: str, suffix: str) -> str:
    """name+suffix, trimmed on a character boundary to fit PostgreSQL's identifier limit."""
    while len((name + suffix).encode()) > MAX_IDENTIFIER_BYTES:
        name = name[:-1]
    return name + suffix


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, except that a key given twice is an error instead of silently keeping the last value."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: list = []
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(problem=f"duplicate key {key!r}",
                                                        problem_mark=key_node.start_mark)
            seen.append(key)
        return super().construct_mapping(node, deep=deep)


def _first_error(err: ValidationError) -> str:
    e = err.errors()[0]
    loc = ".".join(_key(str(p)) for p in e["loc"])
    msg = e["msg"].removeprefix("Value error, ")
    if not e["loc"]:  # a check across fields: its message starts with the field
        return msg
    if e["type"] == "extra_forbidden":
        return f"playbook field '{loc}': unknown key"
    if e["type"] == "missing":
        return f"playbook field '{loc}': required but missing"
    return f"playbook field '{loc}': {msg}"


def parse(data: Any, source: str = "playbook", env: str | None = None) -> Playbook:
    if not isinstance(data, dict):
        raise BadInput(f"{source}: expected a mapping of playbook fields at the top level")
    nul = _nul_path(data)
    if nul is not None:
        loc = ".".join(_key(str(p)) for p in nul)
        raise BadInput(f"{source}: playbook field '{loc}': must not contain a NUL byte")
    try:
        base = Playbook.model_validate(data)
    except ValidationError as err:
        raise BadInput(f"{source}: {_first_error(err)}") from None
    # Every environment must validate, so a typo in `production` is caught while trying `dev`.
    chosen = None
    for name in data.get("environments") or {}:
        merged = _with_environment(data, name)
        try:
            pb = Playbook.model_validate(merged)
        except ValidationError as err:
            raise BadInput(f"{source}: environments.{name}: {_first_error(err)}") from None
        if name == env:
            chosen = pb
    if env is None:
        return base
    if chosen is None:
        known = ", ".join(base.environments) or "none"
        raise BadInput(f"--env {env!r}: the playbook defines no such environment (it has: {known})")
    return chosen


def _with_environment(data: dict, name: str) -> dict:
    over = (data.get("environments") or {}).get(name) or {}
    merged = dict(data)
    for key in ("settings", "hooks"):
        if isinstance(over, dict) and isinstance(over.get(key), dict):
            merged[key] = {**(data.get(key) or {}), **over[key]}
    merged["env"] = name
    return merged


def read_yaml(path: str | Path, what: str = "playbook") -> Any:
    """A YAML file's data (duplicate keys refused), or BadInput with one line saying where it is wrong."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise BadInput(f"cannot read {what} {str(path)!r}: {err.strerror}") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(err, "problem", None)
        raise BadInput(f"{path}: not valid YAML{where}" + (f": {problem}" if problem else "")) from None


def load(path: str | Path, env: str | None = None) -> Playbook:
    return parse(read_yaml(path), str(path), env)
