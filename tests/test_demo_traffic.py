"""Seed schema, bulk rows, catalog snapshots and the traffic simulator, on a real server."""

import json
import time

import psycopg
import pytest
from psycopg import sql

from orchestrator.lab.seed import REFERENCE_MAPPING, SeedNames, create_seed_schema, insert_rows
from orchestrator.lab.snapshot import schema_snapshot, snapshot_diff
from orchestrator.lab.traffic import READ_KINDS, WRITE_KINDS, AppTraffic

HOSTILE = SeedNames(schema="Sales Dept", table='work"flow templates', column="Wörk type", enum="wf type")


@pytest.fixture
def conn(dsn):
    with psycopg.connect(dsn, autocommit=True) as c:
        yield c


def _columns(snap: dict, table: str) -> dict[str, dict]:
    (t,) = [t for t in snap["tables"] if t["name"] == table]
    return {c["name"]: c for c in t["columns"]}


def _table_values(conn, names: SeedNames, ids) -> dict[str, str]:
    rows = conn.execute(
        sql.SQL("SELECT id, {}::text FROM {} WHERE id = ANY(%s)").format(sql.Identifier(names.column),
                                                                          names.table_ident),
        [list(ids)],
    ).fetchall()
    return dict(rows)


# --- seed schema ----------------------------------------------------------------


@pytest.mark.parametrize("names", [SeedNames(), HOSTILE], ids=["default", "hostile"])
def test_create_seed_schema(conn, names):
    create_seed_schema(conn, names, enum_default="rag")
    snap = schema_snapshot(conn, names.schema)
    cols = _columns(snap, names.table)
    assert list(cols) == ["id", "owner_id", "name", "description", names.column, "category",
                          "default_params", "created_at", "updated_at"]
    assert cols["id"]["type"] == "character varying(26)"
    assert cols[names.column]["not_null"] and cols[names.column]["default"].startswith("'rag'::")
    assert cols["description"]["not_null"] is False
    assert cols["default_params"]["default"] == "'{}'::jsonb"
    assert [{k: e[k] for k in ("name", "labels")} for e in snap["enums"]] == [
        {"name": names.enum, "labels": list(names.labels)}]
    idx = {i["name"]: i for i in snap["indexes"]}
    assert idx[f"ix_{names.table}_{names.column}"]["valid"]
    assert any(c["type"] == "p" for c in snap["constraints"])
    # the enum lives in the seed schema, not public
    assert conn.execute(
        "SELECT n.nspname FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace WHERE t.typname = %s",
        [names.enum],
    ).fetchall() == [(names.schema,)]


def test_create_seed_schema_without_default(conn):
    create_seed_schema(conn)
    assert _columns(schema_snapshot(conn), "workflow_templates")["workflow_type"]["default"] is None


def test_long_index_name_is_truncated_to_63_bytes(conn):
    names = SeedNames(table="t" * 55, column="ü" * 10)  # ix_ + 55 + _ + 20 bytes > 63
    create_seed_schema(conn, names)
    assert len(names.index_name.encode()) <= 63
    (idx,) = [i["name"] for i in schema_snapshot(conn)["indexes"] if not i["name"].endswith("_pkey")]
    assert idx == names.index_name


# --- bulk rows ------------------------------------------------------------------


@pytest.mark.parametrize("names", [SeedNames(), HOSTILE], ids=["default", "hostile"])
def test_insert_rows(conn, names):
    create_seed_schema(conn, names)
    insert_rows(conn, 2_500, names, batch=1_000)  # several batches
    insert_rows(conn, 500, names)  # a second call must not collide with the first
    t, col = names.table_ident, sql.Identifier(names.column)
    total, distinct, lmin, lmax, owners = conn.execute(
        sql.SQL("SELECT count(*), count(DISTINCT id), min(length(id)), max(length(id)), "
                "count(DISTINCT owner_id) FROM {}")
        .format(t)
    ).fetchone()
    assert (total, distinct, lmin, lmax) == (3_000, 3_000, 26, 26)
    assert 1 < owners <= 50
    assert conn.execute(sql.SQL("SELECT max(length(owner_id)) FROM {}").format(t)).fetchone() == (26,)
    per_label = dict(conn.execute(sql.SQL("SELECT {}::text, count(*) FROM {} GROUP BY 1").format(col, t)).fetchall())
    assert set(per_label) == set(names.labels) and min(per_label.values()) >= 700
    # ANALYZE ran: the planner knows the size
    reltuples = conn.execute(
        "SELECT c.reltuples FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = %s",
        [names.schema, names.table],
    ).fetchone()[0]
    assert reltuples == 3_000


def test_insert_rows_on_transactional_connection_commits(dsn):
    with psycopg.connect(dsn) as c:  # not autocommit
        create_seed_schema(c)
        insert_rows(c, 10)
    with psycopg.connect(dsn) as other:
        assert other.execute("SELECT count(*) FROM workflow_templates").fetchone() == (10,)


# --- snapshots ------------------------------------------------------------------


def _drop_seed(conn, names: SeedNames):
    conn.execute(sql.SQL("DROP TABLE {}").format(names.table_ident))
    conn.execute(sql.SQL("DROP TYPE {}").format(names.enum_ident))


@pytest.mark.parametrize("names", [SeedNames(), HOSTILE], ids=["default", "hostile"])
def test_schema_snapshot_identical_recreation_and_alter(conn, names):
    create_seed_schema(conn, names, enum_default="plain")
    first = schema_snapshot(conn, names.schema)
    json.dumps(first)  # JSON-serialisable
    _drop_seed(conn, names)
    create_seed_schema(conn, names, enum_default="plain")
    second = schema_snapshot(conn, names.schema)
    assert first == second and snapshot_diff(first, second) == []

    # add then drop a column (what a rolled-back expand does): dropped attributes are invisible
    t = names.table_ident
    conn.execute(sql.SQL("ALTER TABLE {} ADD COLUMN shadow varchar(50)").format(t))
    changed = schema_snapshot(conn, names.schema)
    assert changed != first
    assert any("shadow" in line for line in snapshot_diff(first, changed))
    conn.execute(sql.SQL("ALTER TABLE {} DROP COLUMN shadow").format(t))
    assert schema_snapshot(conn, names.schema) == first


def test_schema_snapshot_sees_every_object_kind_but_not_orchestrator_schema(conn):
    create_seed_schema(conn)
    base = schema_snapshot(conn)
    conn.execute("CREATE SCHEMA _orchestrator")
    conn.execute("CREATE TABLE _orchestrator.runs (id int)")
    conn.execute("CREATE FUNCTION _orchestrator.f() RETURNS int LANGUAGE sql AS 'SELECT 1'")
    assert schema_snapshot(conn) == base
    assert schema_snapshot(conn, "_orchestrator")["tables"] == []

    steps = {
        "functions": "CREATE FUNCTION public.sync_wt() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NEW; END$$",
        "triggers": "CREATE TRIGGER wt_sync BEFORE INSERT ON workflow_templates "
                    "FOR EACH ROW EXECUTE FUNCTION sync_wt()",
        "views": "CREATE VIEW wt_view AS SELECT id FROM workflow_templates",
        "constraints": "ALTER TABLE workflow_templates ADD CONSTRAINT name_len CHECK (length(name) > 0) NOT VALID",
        "indexes": "CREATE INDEX ix_extra ON workflow_templates (owner_id)",
        "enums": "ALTER TYPE workflowtype ADD VALUE 'medical'",
        "comments": "COMMENT ON COLUMN workflow_templates.workflow_type IS 'kind'",
        "privileges": "GRANT SELECT (workflow_type) ON workflow_templates TO PUBLIC",
    }
    for key, ddl in steps.items():
        before = schema_snapshot(conn)
        conn.execute(ddl)
        after = schema_snapshot(conn)
        assert before[key] != after[key], key
    enums = schema_snapshot(conn)["enums"]
    assert enums[0]["labels"] == ["plain", "tools", "rag", "full", "medical"]
    (trg,) = schema_snapshot(conn)["triggers"]
    assert trg["name"] == "wt_sync" and "sync_wt" in trg["definition"]


# --- traffic --------------------------------------------------------------------


def _run_traffic(traffic: AppTraffic, seconds: float):
    traffic.start()
    time.sleep(seconds)
    return traffic.stop()


def test_traffic_old_app_zero_errors_and_exact_written(dsn, conn):
    create_seed_schema(conn, enum_default="plain")
    insert_rows(conn, 5_000)
    report = _run_traffic(AppTraffic(dsn, writers=2, readers=1, seed=1), 1.0)

    assert report.errors == [], report.errors[:5]
    assert set(report.by_kind()) == set(WRITE_KINDS) | set(READ_KINDS)
    assert report.count() > 50
    s = report.summary()
    assert s["count"] == report.count() and s["errors"] == 0 and 0 < s["p50"] <= s["p99"] <= s["max"]
    assert report.written and set(report.written.values()) <= set(SeedNames().labels)
    assert _table_values(conn, SeedNames(), report.written) == report.written
    # stop() closed every connection (backends exit asynchronously: poll briefly)
    deadline = time.monotonic() + 5
    while conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'app-traffic'").fetchone()[0]:
        assert time.monotonic() < deadline, "app-traffic connections left open"
        time.sleep(0.05)


def test_traffic_skips_default_insert_when_column_has_no_default(dsn, conn):
    create_seed_schema(conn)
    insert_rows(conn, 500)
    report = _run_traffic(AppTraffic(dsn, seed=2), 0.5)
    assert report.errors == []
    assert "insert_default" not in report.by_kind() and "insert" in report.by_kind()
    assert _table_values(conn, SeedNames(), report.written) == report.written


def test_traffic_hostile_names(dsn, conn):
    create_seed_schema(conn, HOSTILE, enum_default="full")
    insert_rows(conn, 1_000, HOSTILE)
    report = _run_traffic(AppTraffic(dsn, HOSTILE, seed=3), 1.0)
    assert report.errors == [], report.errors[:5]
    assert set(report.by_kind()) == set(WRITE_KINDS) | set(READ_KINDS)
    assert _table_values(conn, HOSTILE, report.written) == report.written


def test_traffic_switches_to_new_app_after_type_change(dsn, conn):
    """A crude stand-in for the swap, done under traffic: the column becomes varchar and a
    trigger maps labels still written by in-flight old-app statements."""
    create_seed_schema(conn, enum_default="plain")
    insert_rows(conn, 2_000)
    cases = sql.SQL(" ").join(
        sql.SQL("WHEN {} THEN {}").format(sql.Literal(old), sql.Literal(new)) for old, new in REFERENCE_MAPPING.items()
    )
    traffic = AppTraffic(dsn, seed=4).start()
    time.sleep(0.4)
    with conn.transaction():
        conn.execute(
            sql.SQL(
                "ALTER TABLE workflow_templates ALTER COLUMN workflow_type DROP DEFAULT, "
                "ALTER COLUMN workflow_type TYPE varchar(50) USING CASE workflow_type::text {} END, "
                "ALTER COLUMN workflow_type SET DEFAULT 'simple_chat', "
                "ADD COLUMN is_dynamic boolean NOT NULL DEFAULT false, "
                "ADD COLUMN execution_pattern varchar(100)"
            ).format(cases)
        )
        conn.execute(
            sql.SQL(
                "CREATE FUNCTION map_old() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN "
                "NEW.workflow_type := CASE NEW.workflow_type {} ELSE NEW.workflow_type END; RETURN NEW; END$$"
            ).format(cases)
        )
        conn.execute("CREATE TRIGGER map_old BEFORE INSERT OR UPDATE ON workflow_templates "
                     "FOR EACH ROW EXECUTE FUNCTION map_old()")
    traffic.use_new_app()
    time.sleep(0.6)
    report = traffic.stop()

    assert report.errors == [], report.errors[:5]
    new_values = set(REFERENCE_MAPPING.values()) | {"medical_chat"}
    assert set(report.written.values()) & new_values  # the new vocabulary was written
    expected = {rid: REFERENCE_MAPPING.get(v, v) for rid, v in report.written.items()}
    assert _table_values(conn, SeedNames(), expected) == expected
    # new-app inserts set execution_pattern
    assert conn.execute(
        "SELECT count(*) FROM workflow_templates WHERE execution_pattern = 'chat'"
    ).fetchone()[0] > 0


def test_traffic_report_statistics():
    from orchestrator.lab.traffic import StatementSample, TrafficReport

    samples = [StatementSample(i / 10, "insert", float(i), None) for i in range(1, 101)]
    samples.append(StatementSample(11.0, "count", 0.5, "QueryCanceled: canceling statement"))
    r = TrafficReport(samples=samples, written={})
    assert r.count() == 101 and len(r.errors) == 1
    assert r.percentile(50) == 50.0 and r.percentile(100) == r.max_latency_ms() == 100.0
    assert r.summary()["by_kind"] == {"insert": 100, "count": 1}
    assert TrafficReport([], {}).percentile(99) == 0.0
