"""Bad input through the real CLI: exit 2, one `error:` line naming the culprit, and nothing changed.

Every case is a small edit of the reference playbook (or of the command line) run as `orchestrator ... run 1`
against a database holding the seed schema. Whatever the case, the catalog (every user schema, the list of
schemas, so the state schema was not even created) and the rows must be exactly as before.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import psycopg
import pytest
import yaml
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from orchestrator.lab.seed import SeedNames, create_seed_schema, insert_rows
from orchestrator.lab.snapshot import schema_snapshot, snapshot_diff

REFERENCE = Path(__file__).resolve().parent / "playbooks" / "simple_table.yaml"  # the one-table fixture
REFERENCE_TEXT = REFERENCE.read_text(encoding="utf-8")
PASSWORD = "s3cr3t-pw"
SEED_ROWS = 300


def cli_command() -> list[str]:
    """The installed console script beside this interpreter, as an operator runs it."""
    script = Path(sys.executable).with_name("orchestrator")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from orchestrator.console.cli import main; main()"]


def run_cli(dsn: str, playbook: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "PLAYBOOK", "PGPASSWORD")}
    env.update(COLUMNS="1000", PYTHONIOENCODING="utf-8")  # no wrapping of printed SQL by rich
    return subprocess.run([*cli_command(), "--dsn", dsn, "--playbook", str(playbook), *args],
                          capture_output=True, text=True, encoding="utf-8", env=env, timeout=120)


# -- the database: seed schema, rows, and a canary table named x ---------------------------------

def catalog_state(conn: psycopg.Connection, names: SeedNames = SeedNames()) -> dict:
    schemas = [r[0] for r in conn.execute(
        "SELECT nspname FROM pg_namespace WHERE nspname NOT LIKE 'pg\\_%' AND nspname <> 'information_schema' "
        "ORDER BY 1")]
    state: dict[str, Any] = {"schemas": schemas}
    for s in sorted({*schemas, "_orchestrator"}):
        state[s] = schema_snapshot(conn, s)
    # schema_snapshot never describes the state schema: list what it holds ourselves.
    state["_orchestrator objects"] = [r[0] for r in conn.execute(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = '_orchestrator' ORDER BY 1")]
    state["rows"] = conn.execute(sql.SQL(
        "SELECT count(*), md5(string_agg(id || ':' || {}::text, ',' ORDER BY id)) FROM {}").format(
        sql.Identifier(names.column), names.table_ident)).fetchone()
    return state


@pytest.fixture
def seeded(dsn):
    with psycopg.connect(dsn, autocommit=True) as conn:
        create_seed_schema(conn)
        insert_rows(conn, SEED_ROWS)
        conn.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY)").format(sql.Identifier("x")))
    return dsn


# -- the cases -----------------------------------------------------------------------------------

def reference() -> dict:
    return yaml.safe_load(REFERENCE_TEXT)


def edit(fn: Callable[[dict], Any]) -> Callable[[], str]:
    """A playbook derived from the reference by fn(data) (which edits data in place)."""
    def make() -> str:
        data = copy.deepcopy(reference())
        fn(data)
        return yaml.safe_dump(data, allow_unicode=True, sort_keys=False)
    return make


def text_edit(old: str, new: str) -> Callable[[], str]:
    """A playbook derived from the reference text by replacing old (which must occur) with new."""
    def make() -> str:
        assert old in REFERENCE_TEXT, old
        return REFERENCE_TEXT.replace(old, new, 1)
    return make


def set_(path: str, value: Any) -> Callable[[], str]:
    """Set data[a][b]... = value for path 'a.b'."""
    *parents, last = path.split(".")

    def fn(data: dict) -> None:
        for p in parents:
            data = data.setdefault(p, {})
        data[last] = value
    return edit(fn)


def delete(path: str) -> Callable[[], str]:
    *parents, last = path.split(".")

    def fn(data: dict) -> None:
        for p in parents:
            data = data[p]
        del data[last]
    return edit(fn)


def ddl(statement: str) -> Callable[[psycopg.Connection], None]:
    """Extra set-up: a constant statement (no value is ever formatted into SQL)."""
    return lambda conn: conn.execute(sql.SQL(statement))


def other_dsn(**changes: str) -> Callable[[str], str]:
    """The test server's DSN (key=value form) with some parameters replaced."""
    def make(dsn: str) -> str:
        return make_conninfo(dsn, **changes)
    return make


def other_url(dbname: str) -> Callable[[str], str]:
    """The test server as a postgresql:// URL with a password and another database."""
    def make(dsn: str) -> str:
        host = conninfo_to_dict(dsn)["host"]
        return f"postgresql://postgres:{PASSWORD}@/{dbname}?host={host}"
    return make


@dataclass
class Case:
    id: str
    must_name: tuple[str, ...]  # substrings the error line must contain: the field and/or the object
    playbook: Callable[[], str] | None = lambda: REFERENCE_TEXT  # None: the file does not exist
    args: tuple[str, ...] = ("run", "1")
    setup: Callable[[psycopg.Connection], None] | None = None
    dsn: Callable[[str], str] | None = None
    marks: tuple = field(default=())


LONG_VALUE = "v" * 51  # target is varchar(50)

CASES = [
    # --- the playbook's shape and types ---
    Case("unknown-top-level-key", ("'owner'", "unknown key"), set_("owner", "dba-team")),
    Case("unknown-nested-key", ("'settings.batchsize'", "unknown key"), set_("settings.batchsize", 5000)),
    Case("unknown-key-in-list-item", ("extra_columns.0.indexed", "unknown key"),
         edit(lambda d: d["extra_columns"][0].update(indexed=True))),
    Case("python-attribute-name-as-key", ("table.schema_", "unknown key"),
         edit(lambda d: d["table"].update(schema_=d["table"].pop("schema")))),
    Case("missing-required-table", ("'table'", "missing"), delete("table")),
    Case("batch-size-as-string", ("settings.batch_size", "integer"), set_("settings.batch_size", "5000")),
    Case("lock-timeout-as-list", ("settings.lock_timeout_ms", "integer"), set_("settings.lock_timeout_ms", [50])),
    Case("target-length-as-float", ("target.length", "integer"), set_("target.length", 50.0)),
    Case("target-type-not-allowed", ("target.type", "'varchar'"), set_("target.type", "integer")),
    Case("kind-unknown", ("'kind'",), set_("kind", "enum_to_text")),
    Case("top-level-not-a-mapping", ("expected a mapping",), lambda: "- just\n- a list\n"),
    Case("empty-file", ("expected a mapping",), lambda: ""),
    Case("yaml-syntax-error", ("not valid YAML", "line"), text_edit("  batch_size: 5000", "  batch_size: [5000")),
    Case("yaml-duplicate-key", ("line 24", "duplicate key 'plain'"),
         text_edit("  plain: simple_chat\n", "  plain: simple_chat\n  plain: other_chat\n")),
    Case("playbook-file-missing", ("cannot read playbook", "missing.yaml"), None),
    # --- the mapping ---
    Case("mapping-empty", ("'mapping'",), set_("mapping", {})),
    Case("mapping-missing-a-label", ("mapping", "'full'", "no mapping"), delete("mapping.full")),
    Case("mapping-label-not-in-enum", ("mapping.legacy", "not a label", "workflowtype"),
         set_("mapping.legacy", "legacy_chat")),
    Case("mapping-duplicate-targets", ("mapping.rag", "duplicate", "'simple_chat'"),
         set_("mapping.rag", "simple_chat")),
    Case("mapping-target-is-another-label", ("mapping.plain", "collides", "'rag'"), set_("mapping.plain", "rag")),
    Case("mapping-value-longer-than-varchar", ("mapping.full", "varchar(50)"), set_("mapping.full", LONG_VALUE)),
    Case("mapping-value-not-a-string", ("mapping.full", "string"), set_("mapping.full", 42)),
    Case("mapping-value-with-nul", ("mapping.full", "NUL"), set_("mapping.full", "advanced\x00chat")),
    Case("mapping-label-with-newline", ("mapping.'pl\\nain'", "duplicate target 'simple_chat'"),
         set_("mapping.pl\nain", "simple_chat")),
    Case("target-varchar-without-length", ("target.length", "required"), delete("target.length")),
    Case("target-default-longer-than-varchar", ("target.default",), set_("target.default", LONG_VALUE)),
    # --- settings ---
    Case("lock-timeout-negative", ("settings.lock_timeout_ms", "greater than"), set_("settings.lock_timeout_ms", -1)),
    Case("batch-size-zero", ("settings.batch_size", "greater than"), set_("settings.batch_size", 0)),
    Case("batch-size-enormous", ("settings.batch_size", "less than"), set_("settings.batch_size", 10**12)),
    Case("batch-size-above-max-batch-size", ("settings.batch_size", "max_batch_size"),
         set_("settings.batch_size", 200_000)),
    Case("statement-timeout-negative", ("settings.statement_timeout_ms", "greater than"),
         set_("settings.statement_timeout_ms", -30000)),
    Case("state-schema-too-long", ("settings.state_schema", "63 bytes"), set_("settings.state_schema", "s" * 64)),
    # --- rollback policy ---
    Case("fallback-without-label", ("rollback.fallback_label", "required"),
         edit(lambda d: d["rollback"].update(unmapped="fallback", fallback_label=None))),
    Case("fallback-label-not-a-label", ("rollback.fallback_label", "'medical'"),
         edit(lambda d: d["rollback"].update(unmapped="fallback", fallback_label="medical"))),
    Case("reverse-mapping-to-non-label", ("rollback.reverse_mapping.medical_chat", "'medical'"),
         set_("rollback.reverse_mapping", {"medical_chat": "medical"})),
    Case("reverse-mapping-from-an-enum-label", ("rollback.reverse_mapping.rag", "enum label"),
         set_("rollback.reverse_mapping", {"rag": "plain"})),
    # --- names: hostile strings that name nothing in the database ---
    Case("table-with-semicolon", ("table.name", "workflow_templates; DROP TABLE x", "does not exist"),
         set_("table.name", "workflow_templates; DROP TABLE x")),
    Case("table-with-quote", ("table.name", 'workflow"templates', "does not exist"),
         set_("table.name", 'workflow"templates')),
    Case("table-with-space", ("table.name", "workflow templates", "does not exist"),
         set_("table.name", "workflow templates")),
    Case("table-unicode", ("table.name", "wörkflow_templates", "does not exist"),
         set_("table.name", "wörkflow_templates")),
    Case("table-reserved-word", ("table.name", "select", "does not exist"), set_("table.name", "select")),
    Case("table-name-too-long", ("table.name", "63 bytes"), set_("table.name", "t" * 64)),
    Case("schema-does-not-exist", ("table.schema", "'sales'", "does not exist"), set_("table.schema", "sales")),
    Case("schema-with-injection", ("table.schema", "does not exist"),
         set_("table.schema", "public; DROP SCHEMA public CASCADE")),
    Case("column-does-not-exist", ("column.name", "'kind'"), set_("column.name", "kind")),
    Case("column-with-injection", ("column.name", "has no column", "DROP TABLE x"),
         set_("column.name", 'workflow_type"; DROP TABLE x; --')),
    Case("column-not-an-enum", ("column.name", "'name'", "not an enum"),
         edit(lambda d: (d["column"].update(name="name", shadow=None, retired=None),
                         d["seed_rows"].update(rows=[])))),
    Case("enum-type-wrong", ("column.enum_type", "workflow_kind"), set_("column.enum_type", "workflow_kind")),
    Case("enum-schema-wrong", ("column.enum_schema", "'workflow_type'", "sales.workflowtype"),
         set_("column.enum_schema", "sales")),
    Case("enum-type-with-injection", ("column.enum_type", "DROP TYPE"),
         set_("column.enum_type", "workflowtype; DROP TYPE workflowtype")),
    # --- values the server would refuse phases later (NUL bytes, types, seed rows) ---
    Case("extra-column-backfill-with-nul", ("extra_columns.1.backfill", "NUL"),
         edit(lambda d: d["extra_columns"][1].update(backfill="ch\x00at"))),
    Case("seed-row-with-nul", ("seed_rows.rows.0.description", "NUL"),
         edit(lambda d: d["seed_rows"]["rows"][0].update(description="Basic\x00conversation"))),
    Case("extra-column-default-not-an-integer", ("extra_columns.2.default", "priority", '"high"'),
         edit(lambda d: d["extra_columns"].append({"name": "priority", "type": "integer", "default": "high"}))),
    Case("extra-column-backfill-invalid-json", ("extra_columns.2.backfill", "meta", "json"),
         edit(lambda d: d["extra_columns"].append({"name": "meta", "type": "jsonb", "backfill": "{not json"}))),
    Case("seed-row-unknown-column", ("seed_rows.rows[1]", "'colour'"),
         edit(lambda d: d["seed_rows"]["rows"][1].update(colour="red"))),
    Case("seed-row-missing-required-column", ("seed_rows.rows[0]", "'owner_id'"),
         edit(lambda d: d["seed_rows"]["rows"][0].pop("owner_id"))),
    Case("seed-row-null-in-not-null-column", ("seed_rows.rows[1]", "'is_dynamic'", "NOT NULL"),
         edit(lambda d: d["seed_rows"]["rows"][1].update(is_dynamic=None))),
    Case("seed-row-value-too-long", ("seed_rows.rows[2]", "'id'", "character varying(26)"),
         edit(lambda d: d["seed_rows"]["rows"][2].update(id="X" * 27))),
    Case("seed-row-bad-timestamp", ("seed_rows.rows[3]", "'created_at'", "yesterday-ish"),
         edit(lambda d: d["seed_rows"]["rows"][3].update(created_at="yesterday-ish"))),
    Case("seed-row-extra-column-wrong-type", ("seed_rows.rows[0]", "'is_dynamic'"),
         edit(lambda d: d["seed_rows"]["rows"][0].update(is_dynamic="sometimes"))),
    # --- the database does not allow an online migration ---
    Case("enum-used-by-another-table", ("other_templates", "enum type"),
         setup=ddl("CREATE TABLE other_templates (id int PRIMARY KEY, kind workflowtype)")),
    Case("shadow-column-exists", ("column.shadow", "'workflow_type_new'"),
         setup=ddl("ALTER TABLE workflow_templates ADD COLUMN workflow_type_new text")),
    Case("retired-column-exists", ("column.retired", "'workflow_type_old'"),
         setup=ddl("ALTER TABLE workflow_templates ADD COLUMN workflow_type_old text")),
    Case("extra-column-exists", ("extra_columns.name", "'is_dynamic'"),
         setup=ddl("ALTER TABLE workflow_templates ADD COLUMN is_dynamic boolean")),
    Case("view-on-the-column", ("workflow_templates.workflow_type", "wf_types"),
         setup=ddl("CREATE VIEW wf_types AS SELECT id, workflow_type FROM workflow_templates")),
    Case("partial-index-on-the-column", ("workflow_templates.workflow_type", "ix_wf_partial"),
         setup=ddl("CREATE INDEX ix_wf_partial ON workflow_templates (workflow_type) WHERE workflow_type <> 'plain'")),
    Case("state-schema-holds-an-app-table", ("settings.state_schema", "'migrations'"),
         set_("settings.state_schema", "public"),
         setup=ddl("CREATE TABLE migrations (id int PRIMARY KEY, applied_at timestamptz)")),
    Case("state-schema-holds-an-app-phases-table", ("settings.state_schema", "'phases'"),
         set_("settings.state_schema", "public"),
         setup=ddl("CREATE TABLE phases (id int PRIMARY KEY, title text)")),
    # --- the command line ---
    Case("phase-too-high", ("phase 9",), args=("run", "9")),
    Case("phase-zero", ("phase 0",), args=("run", "0")),
    Case("phase-not-a-number", ("phase",), args=("run", "one")),
    Case("dsn-invalid", ("invalid DSN",), dsn=lambda dsn: "not a dsn"),
    Case("dsn-database-missing", ("no_such_db", "does not exist"),
         dsn=other_dsn(dbname="no_such_db", password=PASSWORD)),
    Case("dsn-url-database-missing", ("no_such_db", "does not exist"), dsn=other_url("no_such_db")),
    Case("dsn-url-unparseable-with-password", ("invalid DSN",),
         dsn=lambda dsn: f"postgresql://postgres:{PASSWORD}@[::1/db"),
    Case("dsn-url-bad-percent-escape-in-password", ("invalid DSN",),
         dsn=lambda dsn: f"postgresql://postgres:{PASSWORD.replace('-', '%zz')}@/db"),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input_exits_2_with_one_line_and_changes_nothing(seeded, tmp_path, case: Case):
    with psycopg.connect(seeded, autocommit=True) as conn:
        if case.setup:
            case.setup(conn)
        before = catalog_state(conn)

    path = tmp_path / "missing.yaml"
    if case.playbook is not None:
        path = tmp_path / "playbook.yaml"
        path.write_text(case.playbook(), encoding="utf-8")
    dsn = case.dsn(seeded) if case.dsn else seeded
    res = run_cli(dsn, path, *case.args)

    output = res.stdout + res.stderr
    assert PASSWORD not in output and PASSWORD.replace("-", "%zz") not in output
    assert "Traceback" not in output, output
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for name in case.must_name:
        assert name in lines[0], f"{name!r} not named in: {lines[0]}"
    assert res.returncode == 2, output

    with psycopg.connect(seeded, autocommit=True) as conn:
        after = catalog_state(conn)
    assert before == after, snapshot_diff(before, after)


def test_cases_are_distinct_and_many():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 30


# -- legal but awkward names pass validation -----------------------------------------------------

LEGAL_NAMES = [
    pytest.param(SeedNames(schema="Sales Dept", table='work"flow templates', column="Wörk type", enum="wf type"),
                 id="quotes-spaces-unicode"),
    pytest.param(SeedNames(schema="MixedCase", table="WorkflowTemplates", column="WorkflowType",
                           enum="WorkflowType"), id="mixed-case"),
    pytest.param(SeedNames(schema="select", table="table", column="user", enum="type"), id="reserved-words"),
]


def playbook_for(names: SeedNames) -> str:
    data = reference()
    data["table"] = {"schema": names.schema, "name": names.table}
    data["column"] = {"name": names.column, "enum_type": names.enum}
    for row in data["seed_rows"]["rows"]:
        row[names.column] = row.pop("workflow_type")
    return yaml.safe_dump(data, allow_unicode=True, sort_keys=False)


@pytest.mark.parametrize("names", LEGAL_NAMES)
def test_legal_awkward_names_pass_validation(dsn, tmp_path, names: SeedNames):
    with psycopg.connect(dsn, autocommit=True) as conn:
        create_seed_schema(conn, names)
        insert_rows(conn, 50, names)
        before = catalog_state(conn, names)
    path = tmp_path / "playbook.yaml"
    path.write_text(playbook_for(names), encoding="utf-8")

    res = run_cli(dsn, path, "plan")

    assert res.returncode == 0, res.stderr
    table = sql.Identifier(names.schema, names.table).as_string(None)
    column = sql.Identifier(names.column).as_string(None)
    shadow = sql.Identifier(names.column + "_new").as_string(None)
    enum = sql.Identifier(names.schema, names.enum).as_string(None)
    assert f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {shadow} varchar(50)" in res.stdout
    assert column in res.stdout and enum in res.stdout
    if names.table == 'work"flow templates':  # spelled out once, not only via psycopg
        assert '"Sales Dept"."work""flow templates"' in res.stdout and '"Wörk type"' in res.stdout
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert catalog_state(conn, names) == before  # plan changes nothing
