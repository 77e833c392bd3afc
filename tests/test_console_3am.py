"""The console at 3 a.m. (issue 17): what a DBA sees through make, bin/orch and the CLI when output goes to a
file or a CI log: no password anywhere, exit codes that mean what the README says, hints that name a command
that works in that state, plain full-width output, and `status`, `log` and `plan` that tell the truth."""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from orchestrator.console import output
from orchestrator.lab import server

from .helpers import ROOT, cli, make_playbook, orchestrator, query, real_playbook, seed, seed_chatter
from .test_reliability_secrets import leaks, role_db  # noqa: F401  (fixture)
from .test_reliability_support import Blocker, error_line, orch_cli, password_dsn, playbook_file

VENV = Path(sys.prefix)


def make(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`make ARGS` in the project, with this test run's virtualenv, never reinstalling it."""
    drop = ("DATABASE_URL", "PLAYBOOK", "PGPASSWORD", "MAKEFLAGS", "MAKELEVEL", "MFLAGS", "ORCHESTRATOR_FRONTEND",
            "YES", "PHASE")  # nothing inherited from a surrounding make (`make test`) or shell
    full = {k: v for k, v in os.environ.items() if k not in drop}
    full.update(COLUMNS="80", **(env or {}))
    return subprocess.run(["make", "--no-print-directory", "-o", f"{VENV}/.installed", f"VENV={VENV}", *args],
                          capture_output=True, text=True, timeout=timeout, env=full, cwd=ROOT)


def bin_orch(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "PLAYBOOK", "ORCHESTRATOR_FRONTEND")}
    full.update(VENV=str(VENV), **(env or {}))
    return subprocess.run([str(ROOT / "bin" / "orch"), *args], capture_output=True, text=True, timeout=300,
                          env=full, cwd=ROOT)


def makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    targets: set[str] = set()
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z][\w%\- ]*):(?!=)", line)
        if m:
            targets |= set(m.group(1).split())
    return {t for t in targets if not t.startswith(".")}


pytestmark = pytest.mark.skipif(not (VENV / "bin" / "orchestrator").exists(),
                                reason="needs the package installed in the running virtualenv")


# -- 1. passwords ------------------------------------------------------------------------------------------------

def test_no_make_target_prints_the_database_password(role_db, tmp_path):  # noqa: F811
    admin_dsn, role, password = role_db
    url = password_dsn(admin_dsn, role, password)
    env = {"DATABASE_URL": url}
    seen: list[tuple[str, str]] = []

    def run(*args, code=0, make_code=None):
        r = make(*args, env=env)
        seen.append((" ".join(args), r.stdout + r.stderr))
        expected = code if make_code is None else make_code
        assert r.returncode == expected, (args, r.returncode, r.stdout[-1500:], r.stderr[-1500:])
        return r

    run("demo-db", "ROWS=400")
    run("plan")
    for n in range(1, 4):
        run(f"phase-{n}")
    run("status")
    r = run("phase-6", make_code=2)  # refused (phase 4 pending): make exits 2 and names the code
    assert "orchestrator exit code 3 (refused" in r.stderr, r.stderr
    assert "make phase-4" in error_line(r), r.stderr
    for n in range(4, 7):
        run(f"phase-{n}")
    run("verify")
    run("log", "PHASE=5")
    run("pause")
    run("resume")
    run("rollback-6", "YES=1")
    run("phase-6")
    r = run("contract", make_code=2)  # no terminal, no YES=1
    assert "YES=1" in error_line(r) and "--yes" not in error_line(r), r.stderr
    run("contract-1", "YES=1")
    run("contract", "YES=1")
    run("history")
    run("revisions-check")
    run("help")
    for target, text in seen:
        assert leaks(text, password) == [], (target, text[-2000:])
    assert url not in "".join(text for _, text in seen)
    # Targets too slow or too global to run here (test, bench, rehearse, server-stop...): make's own view of
    # what it would run holds no password either - the DSN is never on a command line.
    for target in sorted(makefile_targets()):
        concrete = target.replace("%", "3")
        r = make("-n", concrete, env=env)
        assert leaks(r.stdout + r.stderr, password) == [], (concrete, r.stdout)


# -- 2. exit codes -----------------------------------------------------------------------------------------------

def test_exit_codes_survive_bin_orch_and_make_names_them(dsn):
    seed_chatter(dsn, rows=200)
    env = {"DATABASE_URL": dsn}
    assert bin_orch("phase-3", env=env).returncode == 3  # refused: phase 1 first
    assert bin_orch("phase-9", env=env).returncode == 2  # bad input
    r = bin_orch("status", "--bogus", env=env)
    assert r.returncode == 2, r.stderr
    assert bin_orch("phase-1", env=env).returncode == 0
    r = bin_orch("contract", env=env)  # refused for its order, before any confirmation
    # the hint names the CLI as it was called: `orchestrator` is not on PATH outside an activated venv
    assert r.returncode == 3 and re.search(r"-> \S*orchestrator run 2$", error_line(r)), error_line(r)
    for n in range(2, 7):
        assert bin_orch(f"phase-{n}", env=env).returncode == 0
    r = bin_orch("contract", env=env)  # in order now: not confirmed
    assert r.returncode == 3 and "--yes" in error_line(r)
    assert bin_orch("contract-1", env={**env, "YES": "1"}).returncode == 0  # YES=1 is --yes
    r = make("rollback-3", env=env)
    assert r.returncode == 2  # GNU make's own status for any failed recipe ...
    assert "orchestrator exit code 3 (refused: nothing was changed)" in r.stderr  # ... the real one is named
    assert "bin/orch rollback-3" in r.stderr
    assert bin_orch("rollback-3", env=env).returncode == 3
    r = make("phase-9", env=env)
    assert r.returncode == 2 and "orchestrator exit code 2 (bad input" in r.stderr
    assert make("status", env=env).returncode == 0


def test_help_lists_the_exit_codes_and_make_help_every_target():
    r = subprocess.run([sys.executable, "-m", "orchestrator", "--help"], capture_output=True, text=True,
                       cwd=ROOT, env={**os.environ, "COLUMNS": "200"})
    text = " ".join(r.stdout.split())
    for part in ("0 done", "1 failure", "2 bad input", "3 refused", "server-stop"):
        assert part in text, part
    r = subprocess.run([sys.executable, "-m", "orchestrator", "run", "--help"], capture_output=True, text=True,
                       cwd=ROOT, env={**os.environ, "COLUMNS": "200"})
    assert "3 refused" in " ".join(r.stdout.split())
    help_text = make("-s", "help").stdout
    for target in makefile_targets():
        if target in ("help",) or target.startswith(VENV.name) or "/" in target:
            continue
        shown = target.replace("%", "N")
        assert f"make {shown}" in help_text or re.search(rf"\b{re.escape(shown)}\b", help_text), target


def test_readme_first_screen_says_where_the_server_runs_and_how_to_call_the_cli():
    first_screen = "\n".join((ROOT / "README.md").read_text().splitlines()[:45])
    for part in ("make server-stop", ".venv/bin/orchestrator", "make log", ".orchestrator/pgdata", "bin/orch"):
        assert part in first_screen, part


# -- 3. hints that are true ------------------------------------------------------------------------------------

def follow(dsn: str, pb: Path, r: subprocess.CompletedProcess, command: tuple[str, ...]) -> subprocess.CompletedProcess:
    """Run the command a refusal's hint names; it must not be refused for the same reason."""
    line = error_line(r)
    hint = line.split(" -> ", 1)[1]
    if hint.startswith("re-run with --yes"):
        nxt = (*command, "--yes")
    else:
        m = re.search(r"orchestrator ((?:run|rollback|contract|status|plan)(?: \d+)?)", hint)
        assert m, f"no command in the hint: {line}"
        nxt = tuple(m.group(1).split())
        if nxt[0] in ("rollback", "contract"):
            nxt = (*nxt, "--yes")
    again = orch_cli(dsn, pb, *nxt)
    assert error_line(again) != line, (nxt, line)
    return again


def test_every_hint_names_a_command_that_helps_in_that_state(dsn, tmp_path):
    seed(dsn, rows=300)
    pb = playbook_file(tmp_path / "pb.yaml", **{"settings.retries": 3})
    # the demo on a database that has the table already: refused, nothing changed, and no "re-run"
    r = orch_cli(dsn, pb, "demo", "--setup-only", "--rows", "10")
    assert r.returncode == 3 and "already exist" in error_line(r) and "re-run" not in error_line(r), r.stderr
    assert follow(dsn, pb, r, ("demo",)).returncode == 0  # orchestrator plan
    assert query(dsn, "SELECT count(*) FROM workflow_templates") == [(300,)]
    # out of order
    r = orch_cli(dsn, pb, "run", "3")
    assert r.returncode == 3 and follow(dsn, pb, r, ("run", "3")).returncode == 0  # run 1
    r = orch_cli(dsn, pb, "run", "3")
    assert r.returncode == 3 and follow(dsn, pb, r, ("run", "3")).returncode == 0  # run 2
    # a contract out of order is refused for its order before any confirmation is asked for
    r2 = orch_cli(dsn, pb, "contract")
    assert r2.returncode == 3 and "-> orchestrator run 3" in error_line(r2), error_line(r2)
    for _ in (3, 4, 5):
        assert follow(dsn, pb, r2, ("contract", "--yes")).returncode == 0
        r2 = orch_cli(dsn, pb, "contract", "--yes")
    assert follow(dsn, pb, r2, ("contract", "--yes")).returncode == 0  # run 6
    # in order now: the confirmation is what is missing, and --yes is what helps
    r = orch_cli(dsn, pb, "contract", "1")
    assert r.returncode == 3 and "re-run with --yes" in error_line(r)
    assert orch_cli(dsn, pb, "rollback", "6").returncode == 0  # not visible to the app: no confirmation
    assert orch_cli(dsn, pb, "run", "6").returncode == 0
    # rollback out of order
    r = orch_cli(dsn, pb, "rollback", "4", "--yes")
    assert r.returncode == 3 and follow(dsn, pb, r, ("rollback", "4")).returncode == 0  # rollback 6
    assert orch_cli(dsn, pb, "run", "6").returncode == 0
    # a lock storm: the hint says to end the blocker and run the same command
    blocker = Blocker(dsn, "ACCESS SHARE")
    try:
        r = orch_cli(dsn, pb, "contract", "1", "--yes")
    finally:
        blocker.release()
    line = error_line(r)
    assert r.returncode == 3 and f"pid {blocker.pid}" in line and "None" not in line, line
    assert "-> end the blocking transaction, then re-run the same command" in line
    assert orch_cli(dsn, pb, "contract", "1", "--yes").returncode == 0
    # partly contracted: a rollback is the undo of the last contract step, "orchestrator rollback 1" helps
    r = orch_cli(dsn, pb, "rollback", "6", "--yes")
    assert r.returncode == 3 and error_line(r).endswith("-> orchestrator rollback 1"), error_line(r)
    assert follow(dsn, pb, r, ("rollback", "6")).returncode == 0
    assert orch_cli(dsn, pb, "contract", "--yes").returncode == 0
    # fully contracted: nothing is left to run, and the hint says to read the status
    r = orch_cli(dsn, pb, "run", "6")
    assert r.returncode == 3 and "contract" not in error_line(r).split(" -> ")[1], error_line(r)
    assert follow(dsn, pb, r, ("run", "6")).returncode == 0  # orchestrator status


def test_hints_under_make_name_make_targets(dsn):
    seed_chatter(dsn, rows=100)
    env = {"DATABASE_URL": dsn}
    line = error_line(make("phase-2", env=env))
    assert "-> make phase-1" in line, line
    orch = orchestrator(real_playbook(), dsn)
    for n in range(1, 7):
        orch.run(n)
    orch.close()
    line = error_line(make("rollback-5", env=env))  # phase 6 first, before any confirmation
    assert "-> make rollback-6" in line, line
    assert make("rollback-6", env=env).returncode == 0 and make("phase-6", env=env).returncode == 0
    line = error_line(make("contract", env=env))
    assert "YES=1" in line and "--yes" not in line and "orchestrator" not in line.split(" -> ")[1], line
    r = make("contract", "YES=1", env=env)  # what the hint says
    assert r.returncode == 0, r.stderr
    assert query(dsn, "SELECT count(*) FROM _orchestrator.phases WHERE status = 'contracted'") == [(6,)]


def test_a_database_error_that_a_rerun_cannot_fix_does_not_say_rerun(monkeypatch, capsys):
    from orchestrator.console import cli

    def broken(self, **kw):
        raise psycopg.errors.InsufficientPrivilege("permission denied for table workflow_templates")
    monkeypatch.setattr(cli.Opts, "orchestrator", broken)
    monkeypatch.setattr(sys, "argv", ["orchestrator", "--dsn", "postgresql://x:SeCrEt@h/db", "status"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    err = capsys.readouterr().err
    assert exit_.value.code == 1
    assert "fix what the database reports" in err and "SeCrEt" not in err

    def lost(self, **kw):
        raise psycopg.OperationalError("server closed the connection unexpectedly")
    monkeypatch.setattr(cli.Opts, "orchestrator", lost)
    with pytest.raises(SystemExit):
        cli.main()
    assert "-> re-run the same command; completed work is kept" in capsys.readouterr().err


def test_a_blocker_invisible_to_a_non_superuser_is_named_without_none(pg_server, tmp_path):
    token = secrets.token_hex(4)
    role, name = f"nonsu_{token}", f"ns_{token}"
    with psycopg.connect(pg_server.dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    admin = server.create_database(pg_server.dsn, name)
    try:
        seed(admin, rows=200)
        with psycopg.connect(admin, autocommit=True) as conn:
            for stmt in ("ALTER TABLE workflow_templates OWNER TO {}", "ALTER TYPE workflowtype OWNER TO {}",
                         "GRANT CREATE ON SCHEMA public TO {}", "CREATE SCHEMA _orchestrator AUTHORIZATION {}"):
                conn.execute(sql.SQL(stmt).format(sql.Identifier(role)))
        dsn = make_conninfo(admin, user=role)
        pb = playbook_file(tmp_path / "pb.yaml", **{"settings.retries": 2})
        blocker = Blocker(admin, "ACCESS SHARE")  # the superuser's session: its query is hidden from the role
        try:
            r = orch_cli(dsn, pb, "run", "1")
        finally:
            blocker.release()
        line = error_line(r)
        assert r.returncode == 3 and f"pid {blocker.pid}" in line, r.stderr
        assert "None" not in line and "<insufficient privilege>" not in line, line
        assert "query not visible to this role" in line and "application 'report'" in line, line
        assert re.search(r"in \d+\.\ds \(budget: at most [\d.]+s\)", line), line
    finally:
        server.drop_database(pg_server.dsn, name)
        with psycopg.connect(pg_server.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


# -- 4. output in a file or a CI log -----------------------------------------------------------------------------

def test_retries_are_one_json_line_per_step_and_never_inside_a_table(dsn, tmp_path):
    seed(dsn, rows=200)
    pb = playbook_file(tmp_path / "pb.yaml", **{"settings.retries": 12, "settings.retry_wait_initial_ms": 10,
                                                "settings.retry_wait_max_ms": 40})
    blocker = Blocker(dsn, "ACCESS SHARE")
    try:
        r = subprocess.run([sys.executable, "-m", "orchestrator", "--dsn", dsn, "--playbook", str(pb), "run", "1"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, timeout=120)
    finally:
        blocker.release()
    assert r.returncode == 3
    lines = r.stdout.splitlines()
    events = [json.loads(ln) for ln in lines if ln.startswith("{")]
    assert all(ln.startswith("{") or ln.startswith("error:") for ln in lines), lines  # one JSON object per line
    retried = [e for e in events if e["event"] == "retried"]
    assert [e for e in events if e["event"] == "retrying"] == []
    assert len(retried) == 1 and retried[0]["retries"] == 12 and retried[0]["step"] == "add columns", events
    assert retried[0]["waited_s"] > 12 * 0.05 and "LockNotAvailable x12" in retried[0]["errors"]


def test_status_and_log_piped_are_plain_and_full_width(dsn, tmp_path):
    seed(dsn, rows=300)
    orch = orchestrator(make_playbook(), dsn)
    for n in range(1, 7):
        orch.run(n)
    orch.close()
    long_error = "x" * 150 + " the end"
    with psycopg.connect(dsn) as conn:
        conn.execute("UPDATE _orchestrator.phases SET error = %s WHERE phase = 6", (long_error,))
    r = cli("status", dsn=dsn, env={"COLUMNS": "80"})
    assert r.returncode == 0, r.stderr
    assert long_error in r.stdout and "…" not in r.stdout
    assert not set("─│┃━┏┡") & set(r.stdout), r.stdout  # no box drawing: plain text
    status_line = [ln for ln in r.stdout.splitlines() if ln.startswith("5 ")][0]
    assert "applied" in status_line.split()
    assert "alembic: no Alembic version table in this database" in r.stdout and "alembic: base" not in r.stdout
    r = cli("log", "--limit", "0", dsn=dsn, env={"COLUMNS": "80"})
    create_function = [ln for ln in r.stdout.splitlines() if "CREATE OR REPLACE FUNCTION" in ln]
    assert create_function and all("RETURN NEW; END" in ln for ln in create_function), r.stdout[:3000]
    assert "…" not in r.stdout and "note:" not in r.stderr


def test_status_says_paused_while_a_paused_backfill_waits(dsn, tmp_path):
    seed(dsn, rows=3000)
    pb = playbook_file(tmp_path / "pb.yaml", **{"settings.batch_size": 100, "settings.min_batch_size": 100,
                                                "settings.max_batch_size": 100, "settings.batch_pause_ms": 50})
    control = tmp_path / "control"
    env = {"ORCHESTRATOR_CONTROL_DIR": str(control)}
    for n in (1, 2):
        assert orch_cli(dsn, pb, "run", str(n), env=env).returncode == 0
    assert orch_cli(dsn, pb, "pause", env=env).returncode == 0
    full = {**os.environ, **env}
    full.pop("DATABASE_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "--dsn", dsn, "--playbook", str(pb), "run", "3"],
                            cwd=ROOT, env=full, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        status = None
        while time.monotonic() < deadline:
            st = json.loads(orch_cli(dsn, pb, "status", "--json", env=env).stdout)
            status = st["phases"][2]["status"]
            if status == "paused":
                break
            time.sleep(0.2)
        assert status == "paused" and st["paused"] is True and st["running_now"] is True, st
        assert orch_cli(dsn, pb, "resume", env=env).returncode == 0
        assert proc.wait(timeout=60) == 0
        st = json.loads(orch_cli(dsn, pb, "status", "--json", env=env).stdout)
        assert st["phases"][2]["status"] == "applied" and st["paused"] is False
    finally:
        if proc.poll() is None:
            proc.kill()


# -- 5. log: every statement, truthful limits ------------------------------------------------------------------

def test_log_records_inserts_and_verify_scans_refuses_missing_phases_and_says_when_it_truncates(dsn):
    seed(dsn, rows=1000)
    orch = orchestrator(make_playbook(**{"settings.verify_chunk_rows": 200}), dsn)
    for n in range(1, 7):
        orch.run(n)
    orch.close()
    rows = json.loads(orch_cli(dsn, None, "log", "--json", "--limit", "0").stdout)
    inserts = [r for r in rows if r["phase"] == 6 and r["statement"].startswith("INSERT INTO")]
    assert len(inserts) == len(make_playbook().seed_rows.rows), [r["statement"][:60] for r in rows if r["phase"] == 6]
    scans = [r for r in rows if r["phase"] == 4 and "count(*) FILTER" in r["statement"]]
    assert scans and all("-- params" in r["statement"] and r["outcome"] == "ok" for r in scans)
    r = orch_cli(dsn, None, "log", "--phase", "9")
    assert r.returncode == 2 and "phase 9 does not exist" in error_line(r)
    r = orch_cli(dsn, None, "log", "--limit", "3")
    assert r.returncode == 0 and "showing the last 3 statements" in r.stderr
    assert "(last 3 statements)" in r.stdout
    assert len([ln for ln in r.stdout.splitlines() if re.match(r"\d\d:\d\d:\d\d\.\d{3} ", ln)]) == 3


# -- 6. plan == run ----------------------------------------------------------------------------------------------

def _norm(statement: str) -> str:
    return " ".join(statement.split("  -- ")[0].split())


LOCK_MODES = {"AccessShareLock": "ACCESS SHARE", "RowShareLock": "ROW SHARE", "RowExclusiveLock": "ROW EXCLUSIVE",
              "ShareUpdateExclusiveLock": "SHARE UPDATE EXCLUSIVE", "ShareLock": "SHARE",
              "ShareRowExclusiveLock": "SHARE ROW EXCLUSIVE", "ExclusiveLock": "EXCLUSIVE",
              "AccessExclusiveLock": "ACCESS EXCLUSIVE"}


STRENGTH = ["ACCESS SHARE", "ROW SHARE", "ROW EXCLUSIVE", "SHARE UPDATE EXCLUSIVE", "SHARE", "SHARE ROW EXCLUSIVE",
            "EXCLUSIVE", "ACCESS EXCLUSIVE"]


def _declared(lock: str) -> set[str]:
    """Lock modes a plan label names (the strongest first: 'SHARE ROW EXCLUSIVE' is not also 'EXCLUSIVE')."""
    found, rest = set(), lock.upper()
    for mode in sorted(LOCK_MODES.values(), key=len, reverse=True):
        if mode in rest:
            found.add(mode)
            rest = rest.replace(mode, "")
    return found


def test_plan_shows_every_statement_run_executes_with_the_lock_postgres_takes(dsn, tmp_path):
    seed(dsn, rows=20_000)
    pb = playbook_file(tmp_path / "pb.yaml", **{"settings.batch_size": 2000, "settings.min_batch_size": 2000,
                                                "settings.max_batch_size": 2000, "settings.verify_chunk_rows": 2000})
    r = orch_cli(dsn, pb, "plan", "--no-lint")
    assert r.returncode == 0, r.stderr
    plan_text = r.stdout
    from orchestrator.run.runner import Orchestrator

    from .test_reliability_support import load_playbook
    dry = Orchestrator(load_playbook(pb), dsn, dry_run=True)
    try:
        plans = dry.plan()
    finally:
        dry.close()
    planned = {}
    for pp in plans:
        for action in ("expand", "contract"):
            for rec in getattr(pp, action):
                planned.setdefault((pp.phase.number, action, _norm(rec.sql)), rec.lock)
                assert _norm(rec.sql) in " ".join(plan_text.split()), rec.sql[:100]
    assert "DROP INDEX CONCURRENTLY IF EXISTS" in plan_text.split("Phase 2:")[0].split("expand")[1]
    verify_plan = plan_text.split("Phase 4:")[1].split("Phase 5:")[0]
    assert "WHERE ctid >= %s::tid AND ctid < %s::tid  -- per range of heap blocks" in verify_plan, verify_plan

    # The real run, with pg_locks sampled: which locks the orchestrator's work session holds on the table.
    samples: list[tuple[str, str, bool]] = []
    stop = threading.Event()

    def sampler():
        with psycopg.connect(dsn, autocommit=True) as conn:
            while not stop.is_set():
                for mode, granted, q in conn.execute(
                        """SELECT l.mode, l.granted, a.query FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
                           WHERE a.application_name LIKE 'orchestrator:main:%'
                             AND l.locktype = 'relation' AND l.relation = 'public.workflow_templates'::regclass
                             AND a.state = 'active'""").fetchall():
                    samples.append((mode, q, granted))
    thread = threading.Thread(target=sampler, daemon=True)
    thread.start()
    try:
        for command in [("run", str(n)) for n in range(1, 7)] + [("contract", "--yes")]:
            r = orch_cli(dsn, pb, *command)
            assert r.returncode == 0, (command, r.stderr[-1500:])
    finally:
        stop.set()
        thread.join()

    log = json.loads(orch_cli(dsn, pb, "log", "--json", "--limit", "0").stdout)
    planned_sql = {(k[0], k[1]): set() for k in planned}
    for (n, action, text) in planned:
        planned_sql[(n, action)].add(text)
    for row in log:
        if row["statement"].startswith("backfill batch"):
            assert any(t.startswith("UPDATE") for t in planned_sql[(3, "expand")])
            continue
        text = _norm(row["statement"])
        assert text in planned_sql.get((row["phase"], row["action"]), set()), (row["phase"], row["action"], text)
    assert any(r["phase"] == 6 for r in log) and any(r["phase"] == 4 for r in log)

    # No lock seen on the table while a planned statement ran is stronger than the strongest its plan line
    # names (a transaction's label covers the locks its earlier statements took and still hold).
    by_text: dict[str, set] = {}
    for (_, _, text), lock in planned.items():
        by_text.setdefault(text, set()).update(_declared(lock))
    checked = set()
    for mode, q, granted in samples:
        text = _norm(re.sub(r"\$\d+", "%s", q))
        if text not in by_text or not granted:
            continue
        checked.add(text[:40])
        held = STRENGTH.index(LOCK_MODES[mode])
        assert by_text[text] and held <= max(STRENGTH.index(m) for m in by_text[text]), (mode, text, by_text[text])
    assert len(checked) >= 2, f"too few planned statements caught by the sampler: {checked}"


def test_drop_trigger_if_exists_takes_access_exclusive_when_the_trigger_exists(dsn):
    """What the phase 2 lock label says, checked on the server: DROP TRIGGER IF EXISTS of an existing trigger
    takes ACCESS EXCLUSIVE on the table; of a missing one, no stronger lock than the CREATE TRIGGER's."""
    seed(dsn, rows=10)
    with psycopg.connect(dsn) as conn:
        conn.execute("CREATE FUNCTION f() RETURNS trigger LANGUAGE plpgsql AS 'BEGIN RETURN NEW; END'")
        conn.commit()
        modes = lambda: {m for (m,) in conn.execute(  # noqa: E731
            "SELECT mode FROM pg_locks WHERE pid = pg_backend_pid() "
            "AND relation = 'workflow_templates'::regclass").fetchall()}
        conn.execute("DROP TRIGGER IF EXISTS t ON workflow_templates")
        assert "AccessExclusiveLock" not in modes()
        conn.rollback()
        conn.execute("CREATE TRIGGER t BEFORE INSERT ON workflow_templates FOR EACH ROW EXECUTE FUNCTION f()")
        assert modes() == {"ShareRowExclusiveLock"}
        conn.commit()
        conn.execute("DROP TRIGGER IF EXISTS t ON workflow_templates")
        assert "AccessExclusiveLock" in modes()
        conn.rollback()
    from orchestrator.kinds.phases.dual_write import DualWrite
    assert "ACCESS EXCLUSIVE" in DualWrite.locks_doc


def test_rollback_lint_reasons_do_not_talk_about_the_contract(dsn):
    from orchestrator.console import lint
    seed(dsn, rows=10)
    from orchestrator.run.runner import Orchestrator
    orch = Orchestrator(make_playbook(), dsn, dry_run=True)
    try:
        plans = orch.plan()
    finally:
        orch.close()
    reasons = [f.accepted for pp in plans for f in lint.lint(pp.phase.number, "rollback", pp.rollback,
                                                               orch.pb.settings) if f.accepted]
    assert reasons and not [r for r in reasons if r.startswith("contract only")], reasons


# -- 7. housekeeping -------------------------------------------------------------------------------------------

def test_server_stop_says_what_it_did(tmp_path, monkeypatch):
    from orchestrator.console import cli
    monkeypatch.setattr(server, "stop_local_server", lambda: False)
    from typer.testing import CliRunner
    r = CliRunner().invoke(cli.app, ["server-stop"])
    assert r.exit_code == 0 and "was not running" in r.output
    monkeypatch.setattr(server, "stop_local_server", lambda: True)
    r = CliRunner().invoke(cli.app, ["server-stop"])
    assert "stopped the local PostgreSQL" in r.output


def test_demo_transcript_piped_to_a_file_reads_cleanly(role_db, tmp_path):  # noqa: F811
    admin_dsn, role, password = role_db
    url = password_dsn(admin_dsn, role, password)
    env = {"DATABASE_URL": url}
    transcript = ""
    for args in (("demo", "ROWS=500"), ("phase-3",), ("rollback-5", "YES=1")):
        r = make(*args, env=env)
        transcript += r.stdout + r.stderr
    (tmp_path / "transcript.txt").write_text(transcript)
    assert leaks(transcript, password) == []
    assert "enum type workflowtype: dropped" in transcript  # the demo ran to the end
    assert "nothing left to run -> nothing left to do: the migration is complete (make status shows it)" in transcript
    assert "undo the contract steps from the last one: phase 6 first -> make rollback-6" in transcript
    assert "orchestrator exit code 3 (refused" in transcript
    for line in transcript.splitlines():
        assert not set("─│┃━┏┡╭") & set(line), line  # no box drawing, no rules
        if line.startswith("{"):
            json.loads(line)  # a log line is one whole JSON object
    assert "make[1]" not in transcript


def test_plain_table_keeps_every_character():
    text = output.plain_table("t", ["a", "statement"], [["1", "x" * 300], ["22", "SELECT\n  1"]])
    assert "x" * 300 in text and "SELECT 1" in text and len(text.splitlines()) == 5  # title, header, rule, 2 rows
