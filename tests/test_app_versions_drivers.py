"""The application's two versions, as SQLAlchemy apps on asyncpg and on psycopg 3 with server-side prepared
statements, through a migration with versioned schemas of views (issue 12).

The old app (orchestrator.appmodels.Before: workflow_type the enum, old labels) reads through
``chatter_v1,public``, the new one (After: varchar(50), new values, is_dynamic/execution_pattern) through
``chatter_v2,public``.  Each test runs real app instances in background threads while the orchestrator
runs, rolls back and contracts, and ends with zero app errors, every value read in its version's
vocabulary and every value written found in the database.

The first tests need only the schema (un-migrated, or migrated without views); the others need the
playbook's ``app_versions`` and skip without it.
"""
from __future__ import annotations

import time

import pytest
from sqlalchemy import Boolean, DateTime, Enum, Float, Integer, String, Text
from sqlalchemy.types import JSON

from orchestrator.engine.playbook import Playbook
from orchestrator.lab import appmodels
from orchestrator.lab.appmodels import DRIVERS, OPERATIONS, TABLES, TO_OLD, AppInstance, as_new, vocabulary
from orchestrator.run.runner import Orchestrator

from .helpers import query, real_playbook, seed_chatter

OLD, NEW = "chatter_v1", "chatter_v2"
OLD_PATH, NEW_PATH = f"{OLD},public", f"{NEW},public"

HAS_APP_VERSIONS = "app_versions" in Playbook.model_fields
needs_views = pytest.mark.skipif(not HAS_APP_VERSIONS, reason="needs the playbook field app_versions (versioned "
                                 "schemas of views, issue 12) in orchestrator.playbook.Playbook")


# --- helpers ------------------------------------------------------------------------------------------------
PAUSE = 0.02  # between an instance's operations: busy, yet leaving the swap a 50 ms lock window on 2 shared cores


def app(dsn: str, version: str, driver: str, prefix: str, **kw) -> AppInstance:
    path = kw.pop("search_path", OLD_PATH if version == "before" else NEW_PATH)
    kw.setdefault("pause", PAUSE)
    return AppInstance(dsn, version, driver, search_path=path, prefix=prefix, **kw)


def assert_ok(*apps: AppInstance) -> None:
    bad = [f"{a.prefix} ({a.version}, {a.driver}): {len(a.stats.errors)} errors\n{a.errors_text()}"
           for a in apps if not a.ok]
    assert not bad, "\n".join(bad)


def progress(*apps: AppInstance, n: int = 25) -> None:
    """Every running app does n more successful operations (none failed meanwhile)."""
    for a in apps:
        done = a.wait_ops(n, timeout=90)
        assert_ok(a)
        assert done >= n, f"{a.prefix} ({a.version}, {a.driver}) did only {done} operations at {a.stage}"


def set_stage(apps, label: str) -> None:
    for a in apps:
        a.stage = label


def assert_vocabulary(*apps: AppInstance) -> None:
    """Each read value is one of its version's (never NULL, never the other version's)."""
    for a in apps:
        bad = {k: n for k, n in a.stats.reads.items() if k[1] not in vocabulary(a.version)}
        assert not bad, (f"{a.prefix} ({a.version}, {a.driver}) read values outside its vocabulary: {bad}; "
                         f"first (stage, table, id, value): {a.stats.foreign_reads[:5]}")
        assert {t for t, _ in a.stats.reads} == set(TABLES), f"{a.prefix} did not read both tables"
        if a.version == "after":
            assert ("is_dynamic", None) not in a.stats.extras_read, f"{a.prefix} read is_dynamic NULL"


def assert_no_write_lost(dsn: str, apps, expect=as_new, column: str = "workflow_type") -> None:
    """Every row an app wrote holds (as expect() maps it) the last value it wrote; no other app row exists."""
    for table in TABLES:
        db = dict(query(dsn, f'SELECT id, "{column}"::text FROM public.{table} WHERE id LIKE %s', ("%-%",)))
        wrote: dict[str, str] = {}
        for a in apps:
            wrote.update({id_: expect(v) for id_, v in a.stats.written[table].items()})
        assert wrote, f"no app wrote to {table}"
        lost = {id_: (v, db.get(id_)) for id_, v in wrote.items() if db.get(id_) != v}
        assert not lost, f"{table}: {len(lost)} writes lost (wrote, found): {dict(list(lost.items())[:10])}"
        assert set(db) == set(wrote), f"{table}: rows no app recorded: {sorted(set(db) - set(wrote))[:10]}"


def assert_all_ops(a: AppInstance) -> None:
    missing = [f"{t}.{op}" for t in TABLES for op in OPERATIONS if not a.stats.ops[f"{t}.{op}"]]
    assert not missing, f"{a.prefix} never ran {missing}"


QUIET_S = 1


def versioned_playbook(**overrides):
    return real_playbook(**{"app_versions": {"old": OLD, "new": NEW}, "settings.old_version_quiet_s": QUIET_S,
                            **overrides})


def views_of(dsn: str, schema: str) -> set[str]:
    return {r[0] for r in query(dsn, "SELECT table_name::text FROM information_schema.views WHERE table_schema = %s",
                                (schema,))}


def new_version_ready(dsn: str, n: int) -> bool:
    """After phase n, whether the new version's views are there (they may come after phase 2: the views show
    the varchar column, which is only complete once the backfill is verified); before the swap in any case."""
    ready = views_of(dsn, NEW) == set(TABLES)
    assert ready or n < 5, f"no views for the new version ({NEW}) after phase {n}"
    return ready


def executions(a: AppInstance) -> dict[tuple[str, str], int]:
    """(name, statement) -> executions of the instance's server-side prepared statements on the workload's
    tables (its one connection, pool_size=1)."""
    return {(n, st): x for n, st, x in a.probe() if " workflow_templates" in st or " template_specs" in st}


def assert_reused(before: dict, after: dict, a: AppInstance) -> None:
    """The statements prepared before a phase were executed again after it: the same server-side prepared
    statements went on working (PostgreSQL re-planned them against the re-pointed views), none re-prepared."""
    assert before, f"{a.prefix} ({a.driver}) had no prepared statement"
    kept = {k for k in before if k in after}
    assert kept == set(before), f"{a.prefix} ({a.driver}) lost prepared statements: {set(before) - kept}"
    reused = [k for k in kept if after[k] is not None and after[k] > before[k]]
    assert len(reused) >= len(kept) // 2, f"{a.prefix} ({a.driver}) reused only {len(reused)} of {len(kept)}"
    for verb in ("SELECT", "INSERT", "UPDATE"):
        assert any(st.startswith(verb) for _, st in reused), f"{a.prefix} ({a.driver}): no {verb} reused"


def quiet_for_the_contract(*new: AppInstance) -> None:
    """The contract needs settings.old_version_quiet_s without an old-version write: the new version goes on."""
    deadline = time.monotonic() + QUIET_S + 0.5
    while time.monotonic() < deadline:
        progress(*new, n=5)


# --- without the views: the models, the drivers, prepared statements -------------------------------------------
def test_both_urls_from_a_libpq_dsn(dsn):
    urls = appmodels.sqlalchemy_urls(dsn)
    assert urls["psycopg"].drivername == "postgresql+psycopg"
    assert urls["asyncpg"].drivername == "postgresql+asyncpg"
    assert urls["psycopg"].database == urls["asyncpg"].database == dsn.split("?")[0].rsplit("/", 1)[1]
    key_value = appmodels.sqlalchemy_urls("host=/tmp/x port=5433 dbname=chatter user=app sslmode=require "
                                          "connect_timeout=3")
    assert dict(key_value["asyncpg"].query) == {"host": "/tmp/x", "port": "5433", "ssl": "require"}
    assert key_value["psycopg"].query["connect_timeout"] == "3"
    with pytest.raises(ValueError, match="search_path"):
        appmodels.engine_args("psycopg", "public; DROP TABLE x")


_SQL_TYPES = {Text: "text", String: "character varying", Integer: "integer", Float: "double precision",
              Boolean: "boolean", DateTime: "timestamp with time zone", JSON: "json"}


def _sql_type(col) -> str:
    if isinstance(col.type, Enum):
        return col.type.name
    for cls, name in _SQL_TYPES.items():
        if isinstance(col.type, cls):
            return name
    raise AssertionError(f"unexpected type {col.type!r}")


def test_before_models_are_the_real_schema(dsn):
    seed_chatter(dsn, rows=10)
    for model in (appmodels.Before.WorkflowTemplate, appmodels.Before.TemplateSpec):
        table = model.__table__
        db = query(dsn, "SELECT column_name, udt_name, data_type, is_nullable = 'YES', character_maximum_length "
                        "FROM information_schema.columns WHERE table_schema = 'public' AND table_name = %s "
                        "ORDER BY ordinal_position", (table.name,))
        assert [r[0] for r in db] == [c.name for c in table.columns]  # the same columns, in the same order
        for name, udt, data_type, nullable, length in db:
            col = table.columns[name]
            assert (data_type if data_type != "USER-DEFINED" else udt) == _sql_type(col), name
            assert nullable == col.nullable, name
            if not isinstance(col.type, Enum):
                assert length == getattr(col.type, "length", None), name
    after = appmodels.After.WorkflowTemplate.__table__.columns
    assert isinstance(after["workflow_type"].type, String) and after["workflow_type"].type.length == 50
    assert after["execution_pattern"].type.length == 100 and after["execution_pattern"].nullable
    assert after["is_dynamic"].default.arg is False and not after["is_dynamic"].nullable
    assert appmodels.Before.base.metadata is not appmodels.After.base.metadata


@pytest.mark.parametrize("driver", DRIVERS)
def test_before_app_on_the_unmigrated_schema_with_prepared_statements(dsn, driver):
    seed_chatter(dsn, rows=300)
    a = app(dsn, "before", driver, "B1", search_path="public", pool_size=1, probe_prepared=True, pause=0)
    with a:
        progress(a, n=400)
    assert_ok(a)
    assert_all_ops(a)
    assert_vocabulary(a)
    assert_no_write_lost(dsn, [a], expect=lambda v: v)
    # server-side prepared statements on the app's own connection: asyncpg names them __asyncpg_stmt_*,
    # psycopg _pg3_* (prepare_threshold=1: from a statement's second execution on)
    names = {"asyncpg": "__asyncpg_stmt_", "psycopg": "_pg3_"}[driver]
    prepared = [s for n, s, _ in a.prepared if n.startswith(names)]
    assert prepared, f"no prepared statement: {a.prepared}"
    joined = "\n".join(prepared)
    for what in ("INSERT INTO workflow_templates", "INSERT INTO template_specs", "UPDATE workflow_templates",
                 "UPDATE template_specs", "WHERE workflow_templates.workflow_type = ",
                 "WHERE template_specs.id = "):
        assert what in joined, f"{what!r} not prepared: {prepared}"


def test_psycopg_prepares_from_the_second_execution(dsn):
    """prepare_threshold=1 as the engine sets it: one execution prepares nothing, the second prepares."""
    import asyncio

    from sqlalchemy import select, text

    seed_chatter(dsn, rows=10)
    M = appmodels.Before.WorkflowTemplate

    async def main():
        engine = appmodels.create_engine(dsn, "psycopg", "public", pool_size=1, max_overflow=0)
        counts = []
        try:
            async with engine.connect() as conn:
                for _ in range(2):
                    await conn.execute(select(M.id).where(M.workflow_type == "rag"))
                    res = await conn.execute(text("SELECT count(*) FROM pg_prepared_statements "
                                                  "WHERE statement LIKE 'SELECT workflow_templates.id %'"))
                    counts.append(res.scalar())
        finally:
            await engine.dispose()
        return counts

    assert asyncio.run(main()) == [0, 1]


@pytest.mark.parametrize("driver", DRIVERS)
def test_after_app_on_the_contracted_schema(dsn, driver):
    """The new version on the schema the migration leaves (run 1..6, contract): its search_path names a schema
    of views that no longer exists and falls through to the public tables."""
    seed_chatter(dsn, rows=300)
    orch = Orchestrator(real_playbook(), dsn)
    try:
        for n in range(1, 7):
            assert orch.run(n) == "applied"
        orch.contract()
    finally:
        orch.close()
    a = app(dsn, "after", driver, "A1", vary_extras=True, pool_size=1, probe_prepared=True, pause=0)
    with a:
        progress(a, n=300)
    assert_ok(a)
    assert_all_ops(a)
    assert_vocabulary(a)
    assert_no_write_lost(dsn, [a])
    assert len({v for k, v in a.stats.extras_read if k == "execution_pattern"}) > 1
    assert a.prepared


# --- with the views (app_versions) ------------------------------------------------------------------------------
@needs_views
@pytest.mark.parametrize("driver", DRIVERS)
def test_both_versions_through_every_phase_and_the_contract(dsn, driver):
    """The old app from before phase 1 until the contract, the new one from the phase that gives it its views
    (phase 2 to 4) and after the contract."""
    seed_chatter(dsn, rows=1000)
    orch = Orchestrator(versioned_playbook(), dsn)
    old = app(dsn, "before", driver, "OLD", pool_size=1).start()
    apps = [old]
    try:
        set_stage(apps, "before phase 1")
        progress(old)
        for n in range(1, 7):
            set_stage(apps, f"phase {n}")
            if n == 5:  # the swap: each version's prepared statements go on through it
                before_swap = {a.prefix: executions(a) for a in apps}
            assert orch.run(n) == "applied"
            if n == 5:
                progress(*apps)
                for a in apps:
                    assert_reused(before_swap[a.prefix], executions(a), a)
            assert views_of(dsn, OLD) == set(TABLES), f"old version's views after phase {n}"  # from phase 1 on
            if len(apps) == 1 and new_version_ready(dsn, n):
                new = app(dsn, "after", driver, "NEW", vary_extras=True, pool_size=1).start()
                new.stage = f"phase {n}"
                apps.append(new)
            progress(*apps)
        set_stage(apps, "old app stopping")
        old.stop()
        quiet_for_the_contract(new)
        for n in range(1, 7):
            set_stage(apps, f"contract {n}")
            before = executions(new)
            orch.contract(n)
            progress(new)
            if n == 2:  # its views dropped: the same statements now reach the tables
                assert_reused(before, executions(new), new)
        set_stage(apps, "after the contract")
        progress(new, n=100)
        new.stop()
    finally:
        for a in apps:
            a.stop()
        orch.close()
    assert_ok(*apps)
    assert_vocabulary(*apps)
    for a in apps:
        assert_all_ops(a)
    assert_no_write_lost(dsn, apps)
    assert query(dsn, "SELECT to_regnamespace(%s), to_regnamespace(%s)", (OLD, NEW)) == [(None, None)]


@needs_views
@pytest.mark.parametrize("driver", DRIVERS)
def test_rolling_back_each_phase_keeps_both_versions_working(dsn, driver):
    """Run 1..6 with both versions (the new one from its views on), then roll back 6..1 with both until the
    rollback that removes the new one's views, with the old one to the end: no error, and the enum column holds
    every value either wrote, in old labels."""
    seed_chatter(dsn, rows=1000)
    orch = Orchestrator(versioned_playbook(), dsn)
    old = app(dsn, "before", driver, "OLD").start()
    apps = [old]
    try:
        new_from = None
        for n in range(1, 7):
            set_stage(apps, f"phase {n}")
            assert orch.run(n) == "applied"
            if new_from is None and new_version_ready(dsn, n):
                new_from = n
                apps.append(app(dsn, "after", driver, "NEW").start())  # defaults only: rollback 1 keeps nothing
                apps[-1].stage = f"phase {n}"
            progress(*apps)
        new = apps[1]
        for n in range(6, 0, -1):
            if n == new_from:  # its views go with this rollback
                set_stage(apps, "new app stopping")
                new.stop()
            set_stage(apps, f"rollback {n}")
            assert orch.rollback(n) == "rolled back"
            assert (views_of(dsn, NEW) == set(TABLES)) == (n > new_from), f"new version's views after rollback {n}"
            assert (views_of(dsn, OLD) == set(TABLES)) == (n > 1), f"old version's views after rollback {n}"
            progress(*[a for a in apps if a.running])
        set_stage(apps, "after the rollback")
        progress(old, n=50)
        old.stop()
    finally:
        for a in apps:
            a.stop()
        orch.close()
    assert_ok(*apps)
    assert_vocabulary(*apps)
    assert_no_write_lost(dsn, apps, expect=lambda v: TO_OLD.get(v, v))
    assert query(dsn, "SELECT to_regnamespace(%s), to_regnamespace(%s)", (OLD, NEW)) == [(None, None)]
    assert query(dsn, "SELECT udt_name FROM information_schema.columns WHERE table_schema = 'public' AND "
                      "column_name = 'workflow_type' ORDER BY table_name") == [("workflowtype",)] * 2


@needs_views
def test_rolling_deploy_across_the_swap(dsn):
    """Three old instances (both drivers) replaced one by one by new ones, the swap in the middle of the deploy:
    zero errors, every read in its version's vocabulary, no write lost."""
    seed_chatter(dsn, rows=1000)
    orch = Orchestrator(versioned_playbook(), dsn)
    drivers = ["asyncpg", "psycopg", "asyncpg"]
    old = [app(dsn, "before", d, f"OLD{i}", seed=i).start() for i, d in enumerate(drivers)]
    new: list[AppInstance] = []
    everyone = list(old)

    def replace(i: int, stage: str) -> None:
        old[i].stop()
        inst = app(dsn, "after", drivers[i - 1], f"NEW{i}", seed=i, vary_extras=True)
        inst.stage = stage
        new.append(inst.start())
        everyone.append(inst)

    try:
        for n in range(1, 5):
            set_stage(everyone, f"phase {n}")
            assert orch.run(n) == "applied"
            progress(*[a for a in everyone if a.running])
        assert new_version_ready(dsn, 4)
        set_stage(everyone, "deploy 1/3")
        replace(0, "deploy 1/3")
        progress(*[a for a in everyone if a.running])
        set_stage(everyone, "phase 5 (swap)")
        assert orch.run(5) == "applied"
        progress(*[a for a in everyone if a.running])
        set_stage(everyone, "deploy 2/3")
        replace(1, "deploy 2/3")
        progress(*[a for a in everyone if a.running])
        set_stage(everyone, "phase 6")
        assert orch.run(6) == "applied"
        progress(*[a for a in everyone if a.running])
        set_stage(everyone, "deploy 3/3")
        replace(2, "deploy 3/3")
        quiet_for_the_contract(*new)
        for n in range(1, 7):
            set_stage(everyone, f"contract {n}")
            orch.contract(n)
            progress(*new)
    finally:
        for a in everyone:
            a.stop()
        orch.close()
    assert_ok(*everyone)
    assert_vocabulary(*everyone)
    assert_no_write_lost(dsn, everyone)
    assert {a.driver for a in new} == {"asyncpg", "psycopg"}
