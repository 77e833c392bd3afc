"""Secrets: a DSN password and PGPASSWORD never appear in logs (JSON or human), error lines, `plan` output,
`status` (table or JSON), `verify` output, or anything the orchestrator stores in the database.

The test servers trust local connections, so any password is accepted: the point is only that it is never
printed. The password holds characters a URL must encode, so both spellings are looked for.
"""

from __future__ import annotations

import secrets
from urllib.parse import quote

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from orchestrator.lab import server

from .helpers import seed
from .test_reliability_support import Blocker, argv, error_line, orch_cli, password_dsn, playbook_file


@pytest.fixture
def role_db(pg_server):
    """A database and a login role with a password (a superuser here: privileges are another test's topic)."""
    token = secrets.token_hex(4)
    role, password, name = f"dba_{token}", f"Pw-{token}/s3cr@t:%x", f"sec_{token}"
    with psycopg.connect(pg_server.dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN SUPERUSER PASSWORD {}").format(sql.Identifier(role),
                                                                                  sql.Literal(password)))
    dsn = server.create_database(pg_server.dsn, name)
    try:
        yield dsn, role, password
    finally:
        server.drop_database(pg_server.dsn, name)
        with psycopg.connect(pg_server.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def leaks(text: str, password: str) -> list[str]:
    forms = {password, quote(password, safe=""), quote(password)}
    return [f for f in forms if f in text]


def test_passwords_never_printed_or_stored(role_db, tmp_path):
    admin_dsn, role, password = role_db
    seed(admin_dsn, rows=300)
    pb = playbook_file(tmp_path / "pb.yaml", **{"settings.retries": 1})
    url = password_dsn(admin_dsn, role, password)  # postgresql://role:<encoded password>@/db?host=...
    keyvalue = make_conninfo(admin_dsn, user=role, password=password)  # user=... password=...
    wrong_db = password_dsn(server._with_dbname(admin_dsn, "no_such_db"), role, password)
    env_password = f"EnvPw-{secrets.token_hex(4)}"
    outputs: list[tuple[str, str]] = []

    def run(dsn, *args, env=None, code=None, human=False):
        r = orch_cli(dsn, pb, *args, env=env) if not human else _human(dsn, pb, *args, env=env)
        outputs.append((" ".join(args), r.stdout + r.stderr))
        if code is not None:
            assert r.returncode == code, (args, r.returncode, r.stderr[-1500:])
        return r

    run(url, "plan", "--no-lint", code=0)
    run(url, "run", "1", code=0)
    run(keyvalue, "run", "2", code=0, human=True)
    run(url, "status", code=0)
    run(url, "status", "--json", code=0)
    run(url, "run", "5", code=3)  # out of order
    run(url, "run", "9", code=2)  # no such phase
    bad = run(wrong_db, "run", "3", code=2)  # cannot connect: the message shows the DSN, without the password
    assert "cannot connect" in error_line(bad) and "***" in error_line(bad), bad.stderr
    run(url.replace("?host=", "?sslmode=bogus&host="), "status", code=2)  # an invalid DSN parameter
    # a refusal naming a blocker
    blocker = Blocker(admin_dsn, "ACCESS SHARE")
    try:
        r = run(url, "rollback", "2", "--yes", code=3)
        assert f"pid {blocker.pid}" in error_line(r)
    finally:
        blocker.release()
    r = run(url, "run", "3", code=3)  # phase 2's rollback stopped part-way: go forward again first
    assert "it is interrupted (its rollback step stopped part-way) -> orchestrator run 2" in error_line(r)
    run(url, "run", "2", code=0)
    run(url, "run", "3", code=0)
    run(url, "verify", code=0)
    # PGPASSWORD instead of a password in the DSN
    no_pw = password_dsn(admin_dsn, role, "").replace(":@", "@")
    run(no_pw, "status", env={"PGPASSWORD": env_password}, code=0)
    run(no_pw, "run", "4", env={"PGPASSWORD": env_password}, code=0, human=True)
    run(server._with_dbname(no_pw, "no_such_db"), "status", env={"PGPASSWORD": env_password}, code=2)

    for what, text in outputs:
        assert not leaks(text, password), (what, text[-2000:])
        assert env_password not in text, (what, text[-2000:])
    # nothing stored in the database either: state tables, run log, settings of sessions
    with psycopg.connect(admin_dsn) as conn:
        stored = conn.execute("""SELECT string_agg(t::text, ' ') FROM (
                                   SELECT to_jsonb(p)::text AS t FROM _orchestrator.phases p
                                   UNION ALL SELECT to_jsonb(m)::text FROM _orchestrator.migrations m
                                   UNION ALL SELECT to_jsonb(r)::text FROM _orchestrator.run_log r) x""").fetchone()[0]
    assert stored and not leaks(stored, password) and env_password not in stored


def _human(dsn, pb, *args, env=None):
    """Like orch_cli, with human-readable (console) logs."""
    import os
    import subprocess
    import sys

    from .helpers import ROOT
    full = {k: v for k, v in os.environ.items() if not k.startswith(("ORCHESTRATOR_CRASH", "DATABASE_URL",
                                                                     "PGPASSWORD"))}
    full.update(COLUMNS="1000", **(env or {}))
    return subprocess.run([sys.executable, "-m", "orchestrator", "--human-logs", "--dsn", dsn, "--playbook", str(pb),
                           *argv(tuple(args))], capture_output=True, text=True, env=full, cwd=ROOT, timeout=120)
