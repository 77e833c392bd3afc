"""Privileges: a role lacking what docs/privileges.md lists is refused up front - exit 3, one line naming what is
missing, nothing changed - instead of failing half-way through a phase. Granted exactly the documented minimum,
a non-superuser role runs every phase, the contract and every rollback."""

from __future__ import annotations

import secrets

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from orchestrator.lab import server
from orchestrator.lab.snapshot import snapshot_diff

from .helpers import seed, snapshot
from .test_reliability_support import argv, orch_cli, playbook_file, state_summary


@pytest.fixture
def migrator(pg_server):
    """(admin DSN of a fresh database, the migrator's DSN, the migrator role): a plain LOGIN role."""
    token = secrets.token_hex(4)
    role, name = f"migrator_{token}", f"priv_{token}"
    with psycopg.connect(pg_server.dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    admin = server.create_database(pg_server.dsn, name)
    try:
        yield admin, make_conninfo(admin, user=role), role
    finally:
        server.drop_database(pg_server.dsn, name)
        with psycopg.connect(pg_server.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def admin_exec(admin: str, statement: str, role: str) -> None:
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL(statement).format(role=sql.Identifier(role)))


def refused_for(admin: str, dsn: str, pb, *args: str) -> str:
    schema, state = snapshot(admin), state_summary(admin)
    with psycopg.connect(admin) as conn:
        schemas = conn.execute("SELECT array_agg(nspname ORDER BY nspname) FROM pg_namespace").fetchone()[0]
    r = orch_cli(dsn, pb, *argv(args))
    assert r.returncode == 3, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert snapshot_diff(schema, snapshot(admin)) == [] and state_summary(admin) == state
    with psycopg.connect(admin) as conn:
        assert conn.execute("SELECT array_agg(nspname ORDER BY nspname) FROM pg_namespace").fetchone()[0] == schemas
    assert "docs/privileges.md" in lines[0]
    return lines[0]


def test_missing_privileges_refused_up_front_and_the_documented_minimum_suffices(migrator, tmp_path):
    admin, dsn, role = migrator
    seed(admin, rows=300)  # table, enum type and index owned by the superuser
    pb = playbook_file(tmp_path / "pb.yaml")

    # Not the table's owner: ALTER TABLE, CREATE INDEX and CREATE TRIGGER would fail in phase 1.
    admin_exec(admin, "GRANT SELECT, INSERT, UPDATE, DELETE ON workflow_templates TO {role}", role)
    line = refused_for(admin, dsn, pb, "run", "1")
    assert "ownership of table public.workflow_templates (owned by postgres" in line, line
    assert "TRIGGER on table" in line, line

    # The table's owner, but no CREATE on the database (state schema), none on schema public (indexes and
    # trigger functions; PostgreSQL 15+ grants it to nobody by default), and the enum type is not its own.
    admin_exec(admin, "ALTER TABLE workflow_templates OWNER TO {role}", role)
    line = refused_for(admin, dsn, pb, "run", "1")
    assert "ownership of table" not in line, line
    assert "CREATE on database" in line and "CREATE on schema public" in line, line
    assert "ownership of type public.workflowtype" in line, line

    admin_exec(admin, "ALTER TYPE workflowtype OWNER TO {role}", role)
    admin_exec(admin, "GRANT CREATE ON SCHEMA public TO {role}", role)
    line = refused_for(admin, dsn, pb, "run", "1")
    assert line.count("CREATE on") == 1 and "CREATE on database" in line, line

    # The state schema created for the role by a DBA instead of CREATE on the database: enough for every phase,
    # the rollback of the swap and the contract (all rollbacks: test_documented_minimum_runs_every_rollback).
    admin_exec(admin, "CREATE SCHEMA _orchestrator AUTHORIZATION {role}", role)
    for command in [("run", str(n)) for n in range(1, 7)] + [("rollback", "6"), ("rollback", "5"), ("run", "5"),
                                                             ("run", "6"), ("contract",)]:
        r = orch_cli(dsn, pb, *argv(command))
        assert r.returncode == 0, (command, r.stderr[-2000:])
    with psycopg.connect(admin) as conn:
        assert conn.execute("SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = "
                            "'workflow_templates'::regclass AND attname = 'workflow_type'").fetchone()[0] \
            == "character varying(50)"


def test_state_schema_of_another_role_needs_grants(migrator, tmp_path):
    admin, dsn, role = migrator
    seed(admin, rows=100)
    pb = playbook_file(tmp_path / "pb.yaml", **{"settings.drop_enum_type": False})
    for statement in ("ALTER TABLE workflow_templates OWNER TO {role}", "GRANT CREATE ON SCHEMA public TO {role}",
                      "CREATE SCHEMA _orchestrator"):  # owned by the superuser, no grant
        admin_exec(admin, statement, role)
    line = refused_for(admin, dsn, pb, "run", "1")
    assert "USAGE on schema _orchestrator" in line, line
    admin_exec(admin, "GRANT USAGE ON SCHEMA _orchestrator TO {role}", role)
    line = refused_for(admin, dsn, pb, "run", "1")
    assert "CREATE on schema _orchestrator" in line, line
    admin_exec(admin, "GRANT CREATE ON SCHEMA _orchestrator TO {role}", role)
    r = orch_cli(dsn, pb, "run", "1")
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.slow
def test_documented_minimum_runs_every_rollback(migrator, tmp_path):
    admin, dsn, role = migrator
    seed(admin, rows=300)
    pb = playbook_file(tmp_path / "pb.yaml")
    for statement in ("ALTER TABLE workflow_templates OWNER TO {role}", "ALTER TYPE workflowtype OWNER TO {role}",
                      "GRANT CREATE ON SCHEMA public TO {role}", "GRANT CREATE ON DATABASE " + admin_dbname(admin)
                      + " TO {role}"):
        admin_exec(admin, statement, role)
    for command in [("run", str(n)) for n in range(1, 7)] + [("rollback", str(n)) for n in range(6, 0, -1)]:
        r = orch_cli(dsn, pb, *argv(command))
        assert r.returncode == 0, (command, r.stderr[-2000:])
    with psycopg.connect(admin) as conn:
        assert conn.execute("SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = "
                            "'workflow_templates'::regclass AND attname = 'workflow_type'").fetchone()[0] \
            == "workflowtype"


def admin_dbname(admin: str) -> str:
    with psycopg.connect(admin) as conn:
        return sql.Identifier(conn.info.dbname).as_string(conn)
