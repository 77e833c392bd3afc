"""The seed application's own models, in its two versions, and a workload that runs one app version.

Chatter's ORM models of ``workflow_templates`` and ``template_specs`` as an application declares them
(SQLAlchemy 2, typed ``Mapped`` columns), twice:

* **before** (``Before.WorkflowTemplate``, ``Before.TemplateSpec``, metadata ``BeforeBase.metadata``): the
  app version before the migration, ``workflow_type`` the native enum ``workflowtype``
  ('plain', 'tools', 'rag', 'full');
* **after** (``After.WorkflowTemplate``, ``After.TemplateSpec``, metadata ``AfterBase.metadata``): the app
  version after it, ``workflow_type`` a ``String(50)`` holding 'simple_chat', 'function_chat', 'rag_chat',
  'advanced_chat', and ``WorkflowTemplate`` with ``is_dynamic`` (Boolean, default False) and
  ``execution_pattern`` (String(100)).

Both declare the columns of the real schema (``sql/chatter_schema.sql``) and nothing else: no foreign
keys (the database enforces them; the models never create tables), unqualified table names so the
connection's ``search_path`` decides what a version sees (``chatter_v1,public`` for the old app while the
migration's views exist, ``chatter_v2,public`` for the new one).

``AppInstance`` runs one app version's workload in a background thread with its own asyncio loop, over
SQLAlchemy's asyncio engine on one of two drivers, both with server-side prepared statements:

* ``asyncpg`` (``postgresql+asyncpg://``): asyncpg prepares every statement (its statement cache);
* ``psycopg`` (``postgresql+psycopg://``, psycopg 3's async connection): ``prepare_threshold=1``, so a
  statement is prepared on the server from its second execution on.

The workload, on both tables, one operation at a time: read by id (``session.get``), filter by type
(``select(...).where(Model.workflow_type == X)``), insert (``session.add`` with every NOT NULL column, the
values of ``chatter.template_values``/``spec_values``), update of the type of one row
(``update(...).where(Model.id == ...)``) and a bulk update from one label to another.  It counts operations
and errors (with their messages), records what it wrote (table -> id -> value) and every value it read, so
a test can check that no write was lost and that each read is in its version's vocabulary.

Reads commit too (``session.begin()``): psycopg forgets every statement it prepared on a connection when a
ROLLBACK goes through it (its DEALLOCATE ALL), and a session closed without a transaction block rolls back
when the pool takes the connection back, so an app reading outside ``begin()`` re-prepares all the time.

Rows an instance writes have ids starting with its own prefix, and its updates (single and bulk) touch only
those rows, so instances running side by side never overwrite one another's records and the database's
final values can be compared with what each wrote.
"""
from __future__ import annotations

import asyncio
import random
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import JSON, Boolean, DateTime, Enum, Float, Integer, String, Text, func, select, text, update
from sqlalchemy.engine import URL
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from orchestrator.lab import chatter

OLD_LABELS: tuple[str, ...] = chatter.LABELS  # ('plain', 'tools', 'rag', 'full')
TO_NEW: dict[str, str] = {"plain": "simple_chat", "tools": "function_chat", "rag": "rag_chat",
                          "full": "advanced_chat"}
TO_OLD: dict[str, str] = {v: k for k, v in TO_NEW.items()}
NEW_LABELS: tuple[str, ...] = tuple(TO_NEW[label] for label in OLD_LABELS)
EXECUTION_PATTERNS: tuple[str, ...] = ("chat", "agent", "pipeline")  # what the new app writes when it varies them

Driver = Literal["asyncpg", "psycopg"]
Version = Literal["before", "after"]
DRIVERS: tuple[str, ...] = ("asyncpg", "psycopg")
TABLES: tuple[str, ...] = (chatter.TEMPLATES, chatter.SPECS)


def vocabulary(version: Version) -> tuple[str, ...]:
    """The workflow_type values an app version knows."""
    return OLD_LABELS if version == "before" else NEW_LABELS


def as_new(value: str) -> str:
    """A value of either version in the new vocabulary (what the column holds after the contract)."""
    return TO_NEW.get(value, value)


# --- the models -------------------------------------------------------------------------------------------

_CATEGORY = Enum(*chatter.CATEGORIES, name=chatter.CATEGORY_ENUM)  # unchanged by the migration
_TS = DateTime(timezone=True)


class BeforeBase(DeclarativeBase):
    """Metadata of the app version before the migration."""


class AfterBase(DeclarativeBase):
    """Metadata of the app version after the migration."""


class _TemplateColumns:
    """workflow_templates' columns other than workflow_type (and the columns the migration adds); the
    sort_order puts each version's workflow_type after description, where the real schema has it."""

    id: Mapped[str] = mapped_column(String(26), primary_key=True, sort_order=-2)
    created_at: Mapped[datetime] = mapped_column(_TS, server_default=func.now(), sort_order=-2)
    updated_at: Mapped[datetime] = mapped_column(_TS, server_default=func.now(), sort_order=-2)
    owner_id: Mapped[str] = mapped_column(String(26), sort_order=-2)
    name: Mapped[str] = mapped_column(String(255), sort_order=-2)
    description: Mapped[str] = mapped_column(Text, sort_order=-2)
    category: Mapped[str] = mapped_column(_CATEGORY)
    default_params: Mapped[Any] = mapped_column(JSON)
    required_tools: Mapped[Any | None] = mapped_column(JSON)
    required_retrievers: Mapped[Any | None] = mapped_column(JSON)
    base_template_id: Mapped[str | None] = mapped_column(String(26))
    is_builtin: Mapped[bool] = mapped_column(Boolean)
    version: Mapped[int] = mapped_column(Integer)
    is_latest: Mapped[bool] = mapped_column(Boolean)
    changelog: Mapped[str | None] = mapped_column(Text)
    is_public: Mapped[bool] = mapped_column(Boolean)
    rating: Mapped[float | None] = mapped_column(Float)
    rating_count: Mapped[int] = mapped_column(Integer)
    usage_count: Mapped[int] = mapped_column(Integer)
    success_rate: Mapped[float | None] = mapped_column(Float)
    avg_response_time_ms: Mapped[int | None] = mapped_column(Integer)
    last_used_at: Mapped[datetime | None] = mapped_column(_TS)
    total_tokens_used: Mapped[int] = mapped_column(Integer)
    total_cost: Mapped[float] = mapped_column(Float)
    avg_tokens_per_use: Mapped[float | None] = mapped_column(Float)
    tags: Mapped[Any | None] = mapped_column(JSON)
    extra_metadata: Mapped[Any | None] = mapped_column(JSON)
    config_hash: Mapped[str] = mapped_column(String(64))
    estimated_complexity: Mapped[int | None] = mapped_column(Integer)


class _SpecColumns:
    """template_specs' columns other than workflow_type."""

    id: Mapped[str] = mapped_column(String(26), primary_key=True, sort_order=-2)
    created_at: Mapped[datetime] = mapped_column(_TS, server_default=func.now(), sort_order=-2)
    updated_at: Mapped[datetime] = mapped_column(_TS, server_default=func.now(), sort_order=-2)
    owner_id: Mapped[str] = mapped_column(String(26), sort_order=-2)
    name: Mapped[str] = mapped_column(String(255), sort_order=-2)
    description: Mapped[str] = mapped_column(Text, sort_order=-2)
    default_params: Mapped[Any] = mapped_column(JSON)
    required_tools: Mapped[Any | None] = mapped_column(JSON)
    required_retrievers: Mapped[Any | None] = mapped_column(JSON)
    base_template_name: Mapped[str | None] = mapped_column(String(255))
    usage_count: Mapped[int] = mapped_column(Integer)
    last_used_at: Mapped[datetime | None] = mapped_column(_TS)
    tags: Mapped[Any | None] = mapped_column(JSON)
    extra_metadata: Mapped[Any | None] = mapped_column(JSON)


def _old_type() -> Enum:
    return Enum(*OLD_LABELS, name=chatter.ENUM)


class BeforeWorkflowTemplate(_TemplateColumns, BeforeBase):
    __tablename__ = chatter.TEMPLATES
    workflow_type: Mapped[str] = mapped_column(_old_type(), sort_order=-1)


class BeforeTemplateSpec(_SpecColumns, BeforeBase):
    __tablename__ = chatter.SPECS
    workflow_type: Mapped[str] = mapped_column(_old_type(), sort_order=-1)


class AfterWorkflowTemplate(_TemplateColumns, AfterBase):
    __tablename__ = chatter.TEMPLATES
    workflow_type: Mapped[str | None] = mapped_column(String(50), nullable=True, sort_order=-1)
    is_dynamic: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"), sort_order=2)
    execution_pattern: Mapped[str | None] = mapped_column(String(100), sort_order=2)


class AfterTemplateSpec(_SpecColumns, AfterBase):
    __tablename__ = chatter.SPECS
    workflow_type: Mapped[str | None] = mapped_column(String(50), nullable=True, sort_order=-1)


# Every mapped class of either version: each has the `id` and `workflow_type` columns.
AppRow = BeforeWorkflowTemplate | BeforeTemplateSpec | AfterWorkflowTemplate | AfterTemplateSpec


@dataclass(frozen=True)
class Models:
    """One app version's models."""

    version: Version
    WorkflowTemplate: type[BeforeWorkflowTemplate | AfterWorkflowTemplate]
    TemplateSpec: type[BeforeTemplateSpec | AfterTemplateSpec]
    base: type[DeclarativeBase]

    def model(self, table: str) -> type[AppRow]:
        return self.WorkflowTemplate if table == chatter.TEMPLATES else self.TemplateSpec


Before = Models("before", BeforeWorkflowTemplate, BeforeTemplateSpec, BeforeBase)
After = Models("after", AfterWorkflowTemplate, AfterTemplateSpec, AfterBase)
MODELS: dict[str, Models] = {"before": Before, "after": After}


# --- connecting ---------------------------------------------------------------------------------------------

_ASYNCPG_QUERY_KEYS = ("host", "port")


def sqlalchemy_urls(dsn: str) -> dict[str, URL]:
    """A libpq DSN (URL or key=value, e.g. ``postgresql://postgres:@/db?host=/tmp/x``) as SQLAlchemy URLs,
    by driver: ``psycopg`` -> ``postgresql+psycopg://`` (libpq parameters kept), ``asyncpg`` ->
    ``postgresql+asyncpg://`` (host and port kept, ``sslmode`` passed as asyncpg's ``ssl``; other libpq-only
    parameters, which asyncpg.connect would reject, are dropped)."""
    from orchestrator.engine.db import sqlalchemy_url

    psycopg_url = sqlalchemy_url(dsn)
    query = {k: v for k, v in psycopg_url.query.items() if k in _ASYNCPG_QUERY_KEYS}
    if "sslmode" in psycopg_url.query:
        query["ssl"] = psycopg_url.query["sslmode"]
    return {"psycopg": psycopg_url, "asyncpg": psycopg_url.set(drivername="postgresql+asyncpg", query=query)}


def engine_args(driver: Driver, search_path: str) -> dict:
    """``create_async_engine`` keyword arguments for ``driver`` with ``search_path`` (e.g. "chatter_v1,public")
    set at connect and server-side prepared statements in use."""
    if not re.fullmatch(r"[A-Za-z0-9_$, \"]+", search_path):
        raise ValueError(f"search_path {search_path!r}: schema names and commas only")
    if driver == "asyncpg":
        return {"connect_args": {"server_settings": {"search_path": search_path}}}
    if driver == "psycopg":
        return {"connect_args": {"prepare_threshold": 1,
                                 "options": "-csearch_path=" + search_path.replace(" ", "")}}
    raise ValueError(f"unknown driver {driver!r}: one of {', '.join(DRIVERS)}")


def create_engine(dsn: str, driver: Driver, search_path: str = "public", **kw):
    """An asyncio engine on ``driver`` for a libpq DSN (must be created and used inside one event loop)."""
    from sqlalchemy.ext.asyncio import create_async_engine

    args = engine_args(driver, search_path)
    args.update(kw)
    return create_async_engine(sqlalchemy_urls(dsn)[driver], **args)


# --- the workload -------------------------------------------------------------------------------------------

OPERATIONS: tuple[str, ...] = ("get", "filter", "insert", "update", "bulk_update")


@dataclass
class AppError:
    stage: str  # AppInstance.stage when it happened (e.g. "phase 3")
    op: str  # "<table>.<operation>"
    message: str

    def __str__(self) -> str:
        return f"[{self.stage}] {self.op}: {self.message}"


@dataclass
class AppStats:
    ops: Counter = field(default_factory=Counter)  # "<table>.<operation>" -> successful count
    errors: list[AppError] = field(default_factory=list)
    written: dict[str, dict[str, str]] = field(default_factory=lambda: {t: {} for t in TABLES})  # last value
    reads: Counter = field(default_factory=Counter)  # (table, value read) -> count; value None if NULL
    extras_read: Counter = field(default_factory=Counter)  # ("is_dynamic"|"execution_pattern", value) -> n
    foreign_reads: list[tuple[str, str, str, Any]] = field(default_factory=list)  # (stage, table, id, value)
    # read outside the version's vocabulary (the first 100)
    latencies_ms: list[float] = field(default_factory=list)  # every operation, as the app saw it

    @property
    def total(self) -> int:
        return sum(self.ops.values())


class AppInstance:
    """One instance of an app version, running its workload in a thread of its own until stopped or
    ``duration`` seconds have passed.

    ``version`` picks the models ("before" or "after"), ``driver`` the driver ("asyncpg" or "psycopg"),
    ``search_path`` the schema of views it sees (e.g. "chatter_v1,public").  ``prefix`` (up to 8 characters
    A-Z0-9, unique per instance) starts the id of every row it inserts (``id_head``); its updates touch only
    those rows.
    ``vary_extras`` lets the new version write is_dynamic/execution_pattern values other than the default
    and the migration's backfill value.  ``pause`` is the sleep between operations.

    ``start()``, ``stop()`` (waits for the thread), ``wait_ops(n)`` (until n more operations succeeded),
    ``stage`` (a label recorded with each error), ``stats`` (AppStats), ``prepared`` (the connection's
    pg_prepared_statements rows at the end when ``probe_prepared``), ``probe()`` (the same rows now),
    ``ok`` (no error).
    """

    def __init__(self, dsn: str, version: Version, driver: Driver, *, search_path: str = "public",
                 prefix: str = "APP", duration: float = 300.0, pause: float = 0.005, seed: int = 0,
                 pool_size: int = 2, vary_extras: bool = False, probe_prepared: bool = False,
                 sample_ids: int = 200):
        if not re.fullmatch(r"[A-Z0-9]{1,8}", prefix):
            raise ValueError("prefix: 1 to 8 characters among A-Z and 0-9")
        self.dsn, self.version, self.driver, self.search_path = dsn, version, driver, search_path
        self.models = MODELS[version]
        self.prefix, self.duration, self.pause = prefix, duration, pause
        self.pool_size, self.vary_extras, self.probe_prepared = pool_size, vary_extras, probe_prepared
        self.sample_ids = sample_ids
        self.rng = random.Random(f"{seed}:{prefix}:{version}:{driver}")
        self.stage = "start"
        self.stats = AppStats()
        self.prepared: list[tuple] = []
        self._stop = threading.Event()
        self._started = threading.Event()
        self._probe_wanted, self._probe_done = threading.Event(), threading.Event()
        self._probe_result: list[tuple] = []
        self._thread: threading.Thread | None = None
        self._counter = 0
        self._pool: dict[str, list[str]] = {t: [] for t in TABLES}  # ids of other rows to read
        self._lock = threading.Lock()
        self.fatal: BaseException | None = None

    # -- control ------------------------------------------------------------------------------------------
    def start(self) -> AppInstance:
        self._thread = threading.Thread(target=self._thread_main, name=f"app-{self.prefix}", daemon=True)
        self._thread.start()
        if not self._started.wait(30):
            raise RuntimeError(f"app instance {self.prefix} did not start")
        return self

    def stop(self, timeout: float = 60) -> AppStats:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError(f"app instance {self.prefix} did not stop within {timeout}s")
        return self.stats

    def __enter__(self) -> AppInstance:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def ok(self) -> bool:
        return not self.stats.errors and self.fatal is None

    def wait_ops(self, n: int = 20, timeout: float = 60) -> int:
        """Wait until ``n`` more operations succeeded (or errors were recorded); returns the ones done."""
        start = self.stats.total
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.running:
            if self.stats.total - start >= n:
                break
            time.sleep(0.02)
        return self.stats.total - start

    def probe(self, timeout: float = 30) -> list[tuple]:
        """pg_prepared_statements of the instance's connection now, between two operations (see
        ``_prepared_statements``; meaningful with pool_size=1)."""
        self._probe_done.clear()
        self._probe_wanted.set()
        if not self._probe_done.wait(timeout):
            raise RuntimeError(f"app instance {self.prefix} did not answer the probe")
        return self._probe_result

    def errors_text(self, limit: int = 10) -> str:
        lines = [str(e) for e in self.stats.errors[:limit]]
        if self.fatal is not None:
            lines.insert(0, f"fatal: {self.fatal!r}")
        return "\n".join(lines)

    # -- the thread ---------------------------------------------------------------------------------------
    def _thread_main(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as err:  # noqa: BLE001 - reported through .fatal and .ok
            self.fatal = err
        finally:
            self._started.set()

    async def _main(self) -> None:
        from sqlalchemy.ext.asyncio import async_sessionmaker

        engine = create_engine(self.dsn, self.driver, self.search_path, pool_size=self.pool_size,
                               max_overflow=0)
        self.Session = async_sessionmaker(engine, expire_on_commit=False)
        deadline = time.monotonic() + self.duration
        try:
            await self._load_pool()
            self._started.set()
            while not self._stop.is_set() and time.monotonic() < deadline:
                table = self.rng.choice(TABLES)
                op = self.rng.choice(OPERATIONS)
                name = f"{table}.{op}"
                started = time.monotonic()
                try:
                    await getattr(self, f"_{op}")(table)
                except Exception as err:  # noqa: BLE001 - every failure is an app error to report
                    message = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
                    self.stats.errors.append(AppError(self.stage, name, message))
                else:
                    self.stats.ops[name] += 1
                self.stats.latencies_ms.append((time.monotonic() - started) * 1000)
                if self._probe_wanted.is_set():
                    self._probe_result = await self._prepared_statements(engine)
                    self._probe_wanted.clear()
                    self._probe_done.set()
                if self.pause:
                    await asyncio.sleep(self.pause)
            if self.probe_prepared:
                self.prepared = await self._prepared_statements(engine)
        finally:
            await engine.dispose()

    async def _prepared_statements(self, engine) -> list[tuple]:
        """(name, statement, executions) of pg_prepared_statements on the pool's connection (the one the
        workload uses with pool_size=1); executions = generic_plans + custom_plans (PostgreSQL 14+)."""
        async with engine.connect() as conn:
            plans = "generic_plans + custom_plans" if conn.dialect.server_version_info >= (14,) else "NULL"
            res = await conn.execute(text(f"SELECT name, statement, {plans} FROM pg_prepared_statements "
                                          "ORDER BY name"))
            rows = [tuple(r) for r in res.all()]
            await conn.commit()  # not a ROLLBACK: psycopg would forget its prepared statements
        return rows

    async def _load_pool(self) -> None:
        async with self.Session() as s:
            for table in TABLES:
                M = self.models.model(table)
                ids = (await s.execute(select(M.id).order_by(M.id).limit(self.sample_ids))).scalars().all()
                self._pool[table] = list(ids)

    # -- values ---------------------------------------------------------------------------------------------
    @property
    def id_head(self) -> str:
        """How the id of every row this instance inserts starts ('-' is in no prefix: heads never overlap)."""
        return self.prefix + "-"

    def _new_id(self) -> str:
        self._counter += 1
        return self.id_head.ljust(16, "0") + f"{self._counter:010d}"

    def _own(self, table: str) -> list[str]:
        return list(self.stats.written[table])

    def _label(self) -> str:
        return self.rng.choice(vocabulary(self.version))

    def _record_read(self, table: str, obj) -> None:
        self.stats.reads[(table, obj.workflow_type)] += 1
        if obj.workflow_type not in vocabulary(self.version) and len(self.stats.foreign_reads) < 100:
            self.stats.foreign_reads.append((self.stage, table, obj.id, obj.workflow_type))
        if self.version == "after" and table == chatter.TEMPLATES:
            self.stats.extras_read[("is_dynamic", obj.is_dynamic)] += 1
            self.stats.extras_read[("execution_pattern", obj.execution_pattern)] += 1

    # -- operations -------------------------------------------------------------------------------------------
    async def _get(self, table: str) -> None:
        own = self._own(table)
        candidates = own if own and (self.rng.random() < 0.5 or not self._pool[table]) else self._pool[table]
        if not candidates:
            return await self._insert(table)
        id_ = self.rng.choice(candidates)
        async with self.Session() as s, s.begin():  # committed: see "reads commit" in the module's doc
            obj: AppRow | None = await s.get(self.models.model(table), id_)
        if obj is None:
            raise LookupError(f"row {id_} not found")
        self._record_read(table, obj)
        if id_ in self.stats.written[table] and obj.workflow_type != self.stats.written[table][id_]:
            raise AssertionError(f"{table} {id_}: read {obj.workflow_type!r}, wrote "
                                 f"{self.stats.written[table][id_]!r}")

    async def _filter(self, table: str) -> None:
        M = self.models.model(table)
        async with self.Session() as s, s.begin():
            rows = (await s.execute(select(M).where(M.workflow_type == self._label()).limit(20))).scalars().all()
        for obj in rows:
            self._record_read(table, obj)

    async def _insert(self, table: str) -> None:
        id_, label = self._new_id(), self._label()
        if table == chatter.TEMPLATES:
            values = chatter.template_values(id_, label, chatter.OWNERS[self._counter % len(chatter.OWNERS)])
            if self.version == "after":
                values["is_dynamic"] = self.vary_extras and self.rng.random() < 0.5
                values["execution_pattern"] = self.rng.choice(EXECUTION_PATTERNS) if self.vary_extras else "chat"
        else:
            values = chatter.spec_values(id_, label, chatter.OWNERS[self._counter % len(chatter.OWNERS)])
        async with self.Session() as s, s.begin():
            s.add(self.models.model(table)(**values))
        self.stats.written[table][id_] = label

    async def _update(self, table: str) -> None:
        own = self._own(table)
        if not own:
            return await self._insert(table)
        id_, label = self.rng.choice(own), self._label()
        M = self.models.model(table)
        async with self.Session() as s, s.begin():
            res = await s.execute(update(M).where(M.id == id_).values(workflow_type=label, updated_at=func.now()))
        # An ORM UPDATE's result is a CursorResult (SQLAlchemy's docs); the session's stub promises only a Result.
        matched = res.rowcount  # type: ignore[attr-defined]
        if matched != 1:
            raise LookupError(f"update of {table} {id_} matched {matched} rows")
        self.stats.written[table][id_] = label

    async def _bulk_update(self, table: str) -> None:
        old, new = self.rng.sample(vocabulary(self.version), 2)
        M = self.models.model(table)
        stmt = (update(M).where(M.id.startswith(self.id_head, autoescape=True), M.workflow_type == old)
                .values(workflow_type=new, updated_at=func.now()).returning(M.id))
        async with self.Session() as s, s.begin():
            ids = (await s.execute(stmt, execution_options={"synchronize_session": False})).scalars().all()
        for id_ in ids:
            if id_ not in self.stats.written[table]:
                raise AssertionError(f"bulk update of {table} touched {id_}, a row this instance did not write")
            self.stats.written[table][id_] = new
