"""Chatter's real schema (orchestrator/sql/chatter_schema.sql), its bulk rows, single-row helpers and the
Chatter mode of the traffic simulator, on a real server."""

import json
import re
import time
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from orchestrator.lab import chatter
from orchestrator.lab.chatter import (
    CATEGORIES,
    ENUM,
    LABELS,
    OWNERS,
    SPECS,
    SYSTEM_USER,
    TEMPLATES,
    create_chatter_schema,
    insert_chatter_rows,
    insert_spec,
    insert_template,
    spec_values,
    template_values,
)
from orchestrator.lab.seed import REFERENCE_MAPPING, SeedNames
from orchestrator.lab.snapshot import schema_snapshot
from orchestrator.lab.traffic import CHATTER_READ_KINDS, CHATTER_WRITE_KINDS, AppTraffic, new_ulid

ODD_SCHEMA = 'Chatter "Data"'
ID_RE = re.compile(r"^[0-9A-HJKMNP-TV-Z]{26}$")  # Crockford base32, like a ULID

TEMPLATE_COLUMNS = [
    "id", "created_at", "updated_at", "owner_id", "name", "description", "workflow_type", "category",
    "default_params", "required_tools", "required_retrievers", "base_template_id", "is_builtin", "version",
    "is_latest", "changelog", "is_public", "rating", "rating_count", "usage_count", "success_rate",
    "avg_response_time_ms", "last_used_at", "total_tokens_used", "total_cost", "avg_tokens_per_use", "tags",
    "extra_metadata", "config_hash", "estimated_complexity",
]
SPEC_COLUMNS = [
    "id", "created_at", "updated_at", "owner_id", "name", "description", "workflow_type", "default_params",
    "required_tools", "required_retrievers", "base_template_name", "usage_count", "last_used_at", "tags",
    "extra_metadata",
]
TEMPLATE_CHECKS = {
    "check_version_positive", "check_rating_range", "check_rating_count_non_negative",
    "check_usage_count_non_negative", "check_total_tokens_used_non_negative", "check_total_cost_non_negative",
    "check_success_rate_range", "check_avg_response_time_ms_positive", "check_name_not_empty",
    "check_description_not_empty",
}


@pytest.fixture
def conn(dsn):
    with psycopg.connect(dsn, autocommit=True) as c:
        yield c


def _columns(conn, schema: str, table: str) -> list[tuple[str, bool, bool]]:
    """(name, not null, has default) in column order."""
    return conn.execute(
        """SELECT a.attname, a.attnotnull, a.atthasdef FROM pg_attribute a
           JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE n.nspname = %s AND c.relname = %s AND a.attnum > 0 AND NOT a.attisdropped
           ORDER BY a.attnum""", [schema, table]).fetchall()


def _count(conn, query: str, *params) -> int:
    return conn.execute(query, params or None).fetchone()[0]


# --- schema -----------------------------------------------------------------------


def test_packaged_file_is_the_seed_file():
    text = chatter.schema_sql()
    assert text.startswith("-- Chatter's database before phase 2")
    seed = Path("/work/shared/seed/chatter-schema.sql")
    if seed.exists():
        assert text == seed.read_text()
    # shipped as package data
    pyproject = (Path(__file__).parent.parent / "pyproject.toml").read_text()
    assert '"orchestrator.lab" = ["sql/*.sql"]' in pyproject


@pytest.mark.parametrize("schema", ["public", ODD_SCHEMA], ids=["public", "odd-schema"])
def test_create_chatter_schema_matches_file(conn, schema):
    create_chatter_schema(conn, schema)
    snap = schema_snapshot(conn, schema)
    assert [t["name"] for t in snap["tables"]] == ["template_specs", "users", "workflow_templates"]
    assert [c[0] for c in _columns(conn, schema, TEMPLATES)] == TEMPLATE_COLUMNS
    assert [c[0] for c in _columns(conn, schema, SPECS)] == SPEC_COLUMNS
    # 18 NOT NULL columns in workflow_templates, only created_at/updated_at have a default
    tcols = _columns(conn, schema, TEMPLATES)
    assert sum(nn for _, nn, _ in tcols) == 18
    assert {n for n, nn, d in tcols if d} == {"created_at", "updated_at"}

    indexes = {i["name"]: i for i in snap["indexes"]}
    t_idx = {n for n, i in indexes.items() if i["table"] == TEMPLATES}
    file_idx = set(re.findall(r"CREATE INDEX (\w+) ON workflow_templates", chatter.schema_sql()))
    assert len(t_idx) == 10 and t_idx == file_idx | {"workflow_templates_pkey"}
    assert all(i["valid"] for i in indexes.values())
    assert {n for n, i in indexes.items() if i["table"] == SPECS} == {
        "template_specs_pkey", "ix_template_specs_owner_id", "ix_template_specs_name",
        "ix_template_specs_workflow_type", "ix_template_specs_base_template_name"}

    assert [{k: e[k] for k in ("name", "labels")} for e in snap["enums"]] == [
        {"name": "templatecategory", "labels": list(CATEGORIES)}, {"name": ENUM, "labels": list(LABELS)}]
    # the enum is used by TWO columns, and its type lives in the schema created
    users_of_enum = conn.execute(
        """SELECT c.relname, a.attname FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
           JOIN pg_type t ON t.oid = a.atttypid JOIN pg_namespace n ON n.oid = t.typnamespace
           WHERE n.nspname = %s AND t.typname = %s AND c.relkind = 'r' AND NOT a.attisdropped
           ORDER BY 1""", [schema, ENUM]).fetchall()
    assert users_of_enum == [(SPECS, "workflow_type"), (TEMPLATES, "workflow_type")]

    cons = {(c["table"], c["name"]): c for c in snap["constraints"]}
    assert {n for (t, n), c in cons.items() if t == TEMPLATES and c["type"] == "c"} == TEMPLATE_CHECKS
    assert len([1 for (t, _), c in cons.items() if t == SPECS and c["type"] == "c"]) == 3
    fks = sorted((t, c["definition"]) for (t, _), c in cons.items() if c["type"] == "f")
    assert [t for t, _ in fks] == [SPECS, TEMPLATES, TEMPLATES]
    assert any("(base_template_id) REFERENCES" in d and "workflow_templates(id)" in d for _, d in fks)

    users = dict(conn.execute(sql.SQL("SELECT id, username FROM {}").format(sql.Identifier(schema, "users"))))
    assert users[SYSTEM_USER] == SYSTEM_USER and set(OWNERS) < set(users) and len(users) == 1 + len(OWNERS)


def test_public_and_other_schema_get_identical_objects(conn):
    create_chatter_schema(conn)
    create_chatter_schema(conn, ODD_SCHEMA)
    a, b = schema_snapshot(conn), schema_snapshot(conn, ODD_SCHEMA)
    # objects of another schema show qualified in definitions and type names: unqualify them
    odd = sql.Identifier(ODD_SCHEMA).as_string(conn) + "."
    plain = lambda snap: json.loads(json.dumps({k: v for k, v in snap.items() if k != "schema"})  # noqa: E731
                                    .replace(json.dumps(odd)[1:-1], "").replace("public.", ""))
    assert plain(a) == plain(b)
    assert plain(a) != {k: v for k, v in a.items() if k != "schema"}  # the normalisation did something
    # nothing of the odd schema leaked into public, and the session's search_path is back
    assert _count(conn, "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                        "WHERE n.nspname = 'public' AND c.relkind = 'r'") == 3
    assert "public" in conn.execute("SHOW search_path").fetchone()[0]


def test_create_on_transactional_connection_commits(dsn):
    with psycopg.connect(dsn) as c:  # not autocommit
        create_chatter_schema(c)
        insert_chatter_rows(c, 40)
    with psycopg.connect(dsn) as other:
        assert other.execute("SELECT count(*) FROM workflow_templates").fetchone() == (40,)
        assert other.execute("SELECT count(*) FROM template_specs").fetchone() == (10,)


# --- bulk rows --------------------------------------------------------------------


@pytest.mark.parametrize("schema", ["public", ODD_SCHEMA], ids=["public", "odd-schema"])
def test_generated_rows_are_valid_and_plausible(conn, schema):
    create_chatter_schema(conn, schema)
    insert_chatter_rows(conn, 3_000, schema=schema, batch=1_000)  # several batches
    t, s, u = (sql.Identifier(schema, n) for n in (TEMPLATES, SPECS, "users"))

    def q(query: str) -> list[tuple]:
        return conn.execute(sql.SQL(query).format(t=t, s=s, u=u)).fetchall()

    assert q("SELECT count(*), count(DISTINCT id) FROM {t}") == [(3_000, 3_000)]
    assert q("SELECT count(*), count(DISTINCT id) FROM {s}") == [(750, 750)]  # templates // 4
    for table in (t, s):
        ids = [r[0] for r in conn.execute(sql.SQL("SELECT id FROM {}").format(table))]
        assert all(ID_RE.match(i) for i in ids), [i for i in ids if not ID_RE.match(i)][:3]

    # every column, nullable ones too, is filled somewhere; NOT NULL ones everywhere
    for name, cols in ((TEMPLATES, TEMPLATE_COLUMNS), (SPECS, SPEC_COLUMNS)):
        table = sql.Identifier(schema, name)
        counts = conn.execute(sql.SQL("SELECT {} FROM {}").format(
            sql.SQL(", ").join(sql.SQL("count({})").format(sql.Identifier(c)) for c in cols), table)).fetchone()
        filled = dict(zip(cols, counts))
        assert min(filled.values()) > 0, {c: n for c, n in filled.items() if n == 0}
        total = 3_000 if name == TEMPLATES else 750
        for col, nn, _ in _columns(conn, schema, name):
            if nn:
                assert filled[col] == total, col

    # the CHECK constraints, re-stated as queries, and plausibility beyond them
    assert q("""SELECT count(*) FROM {t} WHERE NOT (version > 0 AND rating_count >= 0 AND usage_count >= 0
               AND total_tokens_used >= 0 AND total_cost >= 0 AND name <> '' AND description <> ''
               AND (rating IS NULL OR rating BETWEEN 0 AND 5)
               AND (success_rate IS NULL OR success_rate BETWEEN 0 AND 1)
               AND (avg_response_time_ms IS NULL OR avg_response_time_ms > 0))""") == [(0,)]
    assert q("SELECT count(*) FROM {s} WHERE NOT (name <> '' AND description <> '' AND usage_count >= 0)") == [(0,)]
    assert q("SELECT count(*) FROM {t} WHERE updated_at < created_at OR updated_at > now() "
             "OR length(config_hash) <> 64") == [(0,)]
    assert q("SELECT count(*) FROM {t} WHERE rating IS NOT NULL AND rating_count = 0") == [(0,)]
    # labels over both tables, categories over templatecategory
    for table in ("{t}", "{s}"):
        per_label = dict(q(f"SELECT workflow_type::text, count(*) FROM {table} GROUP BY 1"))
        assert set(per_label) == set(LABELS)
        assert min(per_label.values()) >= max(per_label.values()) * 0.9
    assert {r[0] for r in q("SELECT DISTINCT category::text FROM {t}")} == set(CATEGORIES)
    # about 10% derived from an earlier template of the same table, spread over the labels
    based = q("""SELECT c.workflow_type::text, c.id > p.id AND c.created_at > p.created_at
                 FROM {t} c JOIN {t} p ON p.id = c.base_template_id""")
    assert 0.08 * 3_000 <= len(based) <= 0.12 * 3_000
    assert q("SELECT count(*) FROM {t} WHERE base_template_id IS NOT NULL") == [(len(based),)]  # all resolve
    assert all(earlier for _, earlier in based) and {l for l, _ in based} == set(LABELS)
    # owners are the app users; builtin rows are the migration's business, not ours
    for table in ("{t}", "{s}"):
        assert {r[0] for r in q(f"SELECT DISTINCT owner_id FROM {table}")} == set(OWNERS)
    assert q("SELECT count(*) FROM {t} WHERE is_builtin") == [(0,)]
    # ANALYZE ran on both tables
    reltuples = dict(conn.execute(
        "SELECT c.relname, c.reltuples FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname IN (%s, %s)", [schema, TEMPLATES, SPECS]).fetchall())
    assert reltuples == {TEMPLATES: 3_000, SPECS: 750}


def test_generated_rows_pass_the_constraints_when_revalidated(conn):
    create_chatter_schema(conn)
    insert_chatter_rows(conn, 1_000)
    for table in (TEMPLATES, SPECS):
        for name, definition in conn.execute(
                "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
                "WHERE conrelid = %s::regclass AND contype IN ('c', 'f')", [table]).fetchall():
            t = sql.Identifier(table)
            conn.execute(sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(t, sql.Identifier(name)))
            # re-adding a constraint scans every row and fails on the first violation
            conn.execute(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(
                t, sql.Identifier(name), sql.SQL(definition)))


def test_repeated_calls_do_not_collide(conn):
    create_chatter_schema(conn)
    insert_chatter_rows(conn, 500)
    insert_chatter_rows(conn, 500, 7)
    insert_chatter_rows(conn, 0)  # nothing at all
    assert conn.execute("SELECT count(*), count(DISTINCT id) FROM workflow_templates").fetchone() == (1_000, 1_000)
    assert conn.execute("SELECT count(*), count(DISTINCT id) FROM template_specs").fetchone() == (132, 132)
    assert conn.execute("SELECT count(*) FROM users").fetchone() == (1 + len(OWNERS),)  # users not duplicated


# --- single rows ------------------------------------------------------------------


def test_values_give_every_not_null_column(conn):
    create_chatter_schema(conn)
    for table, values in ((TEMPLATES, template_values("X" * 26, "rag", OWNERS[1])),
                          (SPECS, spec_values("Y" * 26, "rag", OWNERS[1]))):
        cols = _columns(conn, "public", table)
        assert list(values) == [c for c, _, _ in cols]  # all columns, in table order
        assert all(values[c] is not None for c, nn, _ in cols if nn)
    v = template_values("Z" * 26, "full", SYSTEM_USER, category="research", is_builtin=True, execution_pattern="chat")
    assert (v["owner_id"], v["category"], v["is_builtin"], v["execution_pattern"]) == (
        SYSTEM_USER, "research", True, "chat")


@pytest.mark.parametrize("schema", ["public", ODD_SCHEMA], ids=["public", "odd-schema"])
def test_insert_template_and_spec(conn, schema):
    create_chatter_schema(conn, schema)
    parent = insert_template(conn, new_ulid(), "tools", schema=schema)
    child = insert_template(conn, new_ulid(), "rag", OWNERS[2], schema=schema, base_template_id=parent["id"],
                            tags=["x", {"y": 1}], default_params={"temperature": 0.1})
    spec = insert_spec(conn, new_ulid(), "full", SYSTEM_USER, schema=schema, base_template_name=child["name"])
    for table, v in ((TEMPLATES, parent), (TEMPLATES, child), (SPECS, spec)):
        row = conn.execute(sql.SQL("SELECT {} FROM {} WHERE id = %s").format(
            sql.SQL(", ").join(map(sql.Identifier, v)), sql.Identifier(schema, table)), [v["id"]]).fetchone()
        assert dict(zip(v, row)) == v
    # the constraints are live: a bad override is refused
    with pytest.raises(psycopg.errors.CheckViolation):
        insert_template(conn, new_ulid(), "plain", schema=schema, version=0)
    with pytest.raises(psycopg.errors.ForeignKeyViolation):
        insert_spec(conn, new_ulid(), "plain", "nobody", schema=schema)
    with pytest.raises(psycopg.errors.InvalidTextRepresentation):  # not an enum label (before the swap)
        insert_spec(conn, new_ulid(), "medical_chat", schema=schema)


def test_insert_helpers_use_the_callers_transaction(dsn):
    with psycopg.connect(dsn) as c:
        create_chatter_schema(c)
        insert_template(c, new_ulid(), "plain")
        c.rollback()
        assert c.execute("SELECT count(*) FROM workflow_templates").fetchone() == (0,)


# --- traffic in Chatter mode ------------------------------------------------------


def _values(conn, table: str, ids) -> dict[str, str]:
    return dict(conn.execute(sql.SQL("SELECT id, workflow_type::text FROM {} WHERE id = ANY(%s)").format(
        sql.Identifier(table)), [list(ids)]).fetchall())


def test_chatter_traffic_zero_errors_and_exact_written(dsn, conn):
    create_chatter_schema(conn)
    insert_chatter_rows(conn, 4_000)
    traffic = AppTraffic(dsn, writers=2, readers=1, seed=5, chatter=True).start()
    time.sleep(2.0)
    report = traffic.stop()

    assert report.errors == [], report.errors[:5]
    # workflow_type has no default in Chatter's schema: no insert relying on it
    assert set(report.by_kind()) == (set(CHATTER_WRITE_KINDS) - {"insert_default"}) | set(CHATTER_READ_KINDS)
    assert report.written and report.written_specs
    assert set(report.written.values()) | set(report.written_specs.values()) == set(LABELS)
    assert _values(conn, TEMPLATES, report.written) == report.written
    assert _values(conn, SPECS, report.written_specs) == report.written_specs
    # seed rows were updated in both tables (not only the app's own inserts)
    seeded = {r[0] for r in conn.execute("SELECT id FROM workflow_templates WHERE owner_id = ANY(%s) "
                                         "AND name NOT LIKE 'App template %%'", [list(OWNERS)])}
    assert set(report.written) & seeded
    # app rows are full, valid rows: counted and owned by the app users, some derived from a template
    new_t = _count(conn, "SELECT count(*) FROM workflow_templates WHERE name LIKE 'App template %'")
    new_s = _count(conn, "SELECT count(*) FROM template_specs WHERE name LIKE 'App spec %'")
    assert new_t == report.by_kind()["insert"] and new_s == report.by_kind()["insert_spec"]
    assert _count(conn, "SELECT count(*) FROM workflow_templates WHERE name LIKE 'App template %' "
                        "AND base_template_id IS NOT NULL") > 0
    assert _count(conn, "SELECT count(*) FROM workflow_templates WHERE updated_at > created_at") > 0


def test_chatter_traffic_switches_to_new_app_after_both_columns_change(dsn, conn):
    """A crude stand-in for the swap of BOTH tables in one transaction, under traffic; triggers map
    labels still written by in-flight old-app statements."""
    create_chatter_schema(conn)
    insert_chatter_rows(conn, 2_000)
    cases = sql.SQL(" ").join(
        sql.SQL("WHEN {} THEN {}").format(sql.Literal(o), sql.Literal(n)) for o, n in REFERENCE_MAPPING.items())
    traffic = AppTraffic(dsn, seed=6, chatter=True).start()
    time.sleep(0.4)
    with conn.transaction():
        # Lock both tables up front, in the order the app's JOIN probe takes them (template_specs, then
        # workflow_templates): ALTERing workflow_templates first and then template_specs deadlocks with it.
        conn.execute("LOCK TABLE template_specs, workflow_templates IN ACCESS EXCLUSIVE MODE")
        conn.execute(sql.SQL(
            "CREATE FUNCTION map_old() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN "
            "NEW.workflow_type := CASE NEW.workflow_type {} ELSE NEW.workflow_type END; RETURN NEW; END$$"
        ).format(cases))
        for table in (TEMPLATES, SPECS):
            t = sql.Identifier(table)
            extra = sql.SQL(", ADD COLUMN is_dynamic boolean NOT NULL DEFAULT false, "
                            "ADD COLUMN execution_pattern varchar(100)") if table == TEMPLATES else sql.SQL("")
            conn.execute(sql.SQL(
                "ALTER TABLE {} ALTER COLUMN workflow_type TYPE varchar(50) USING CASE workflow_type::text {} END{}"
            ).format(t, cases, extra))
            conn.execute(sql.SQL("CREATE TRIGGER map_old BEFORE INSERT OR UPDATE ON {} "
                                 "FOR EACH ROW EXECUTE FUNCTION map_old()").format(t))
    traffic.use_new_app()
    time.sleep(0.8)
    report = traffic.stop()

    assert report.errors == [], report.errors[:5]
    new_values = set(REFERENCE_MAPPING.values()) | {"medical_chat"}
    assert set(report.written.values()) & new_values and set(report.written_specs.values()) & new_values
    for table, written in ((TEMPLATES, report.written), (SPECS, report.written_specs)):
        expected = {rid: REFERENCE_MAPPING.get(v, v) for rid, v in written.items()}
        assert _values(conn, table, expected) == expected
    assert _count(conn, "SELECT count(*) FROM workflow_templates WHERE execution_pattern = 'chat'") > 0
    assert "join" in report.by_kind()


def test_chatter_mode_needs_the_chatter_table():
    with pytest.raises(ValueError, match="chatter mode"):
        AppTraffic("postgresql://unused", SeedNames(table="other"), chatter=True)
