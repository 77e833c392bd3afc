"""What the app's own database behaviour does to the migration, and what the migration does to the app's planner
(issue 13, items 4, 5 and 8), on Chatter's real schema (both tables):

* the backfill UPDATEs every row, which fires the app's UPDATE triggers: refused by default naming them;
  `settings.app_triggers: fire` runs them, `skip` runs the batches as a replica (they do not fire), and a role
  that may not set session_replication_role is refused up front;
* online steps (CREATE INDEX CONCURRENTLY waits for every older snapshot) run under their own timeouts: an
  idle REPEATABLE READ transaction on an unrelated table makes the build wait, once, and it completes when the
  transaction ends; with a tiny online timeout the refusal names the session that is still in the way;
* after the backfill the new column has planner statistics.
"""

from __future__ import annotations

import copy
import json
import re
import secrets
import threading
import time

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from orchestrator.lab import chatter
from orchestrator.run.runner import Orchestrator

from .helpers import cli, query, real_playbook, reference_dict, seed_chatter, write_playbook

TABLES = (chatter.TEMPLATES, chatter.SPECS)
OLD_STAMP = "2020-01-01 00:00:00+00"
SHADOW = "workflow_type_new"
BUILD = re.compile(r"CREATE (?:UNIQUE )?INDEX CONCURRENTLY IF NOT EXISTS (\S+)")


# What this module proves is about the in-place backfill (its UPDATEs fire the app's triggers, its index builds
# are CONCURRENTLY ones): the reference playbook's copy is tested in tests/test_copy_backfill.py.
IN_PLACE = {"settings.backfill_method": "update"}


def playbook_file(path, **overrides):
    overrides = {**IN_PLACE, **overrides}
    data = copy.deepcopy(reference_dict())
    for key, value in overrides.items():
        node = data
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return write_playbook(data, path)


def run(dsn: str, *phases: int, **overrides) -> None:
    orch = Orchestrator(real_playbook(**{**IN_PLACE, **overrides}), dsn)
    try:
        for n in phases:
            orch.run(n)
    finally:
        orch.close()


def error_line(r) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    return lines[0]


def add_updated_at_trigger(dsn: str) -> None:
    """The app's classic trigger: every UPDATE stamps updated_at. Existing rows get an old, known stamp first."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("""CREATE FUNCTION touch_updated_at() RETURNS trigger LANGUAGE plpgsql AS
                        $$BEGIN NEW.updated_at := clock_timestamp(); RETURN NEW; END$$""")
        for t in TABLES:
            conn.execute(sql.SQL("UPDATE {} SET updated_at = {}").format(sql.Identifier(t), sql.Literal(OLD_STAMP)))
            conn.execute(sql.SQL("CREATE TRIGGER set_updated_at BEFORE UPDATE ON {} FOR EACH ROW "
                                 "EXECUTE FUNCTION touch_updated_at()").format(sql.Identifier(t)))


def stamps(dsn: str, table: str) -> tuple[int, int]:
    """(rows, rows still carrying the old stamp)."""
    return query(dsn, sql.SQL("SELECT count(*), count(*) FILTER (WHERE updated_at = {}) FROM {}").format(
        sql.Literal(OLD_STAMP), sql.Identifier(table)))[0]


def unsynced(dsn: str, table: str) -> int:
    """Rows whose shadow column does not hold the mapping of the enum value."""
    return query(dsn, sql.SQL("""SELECT count(*) FROM {} WHERE {} IS DISTINCT FROM CASE workflow_type::text
                                 WHEN 'plain' THEN 'simple_chat' WHEN 'rag' THEN 'rag_chat'
                                 WHEN 'tools' THEN 'function_chat' WHEN 'full' THEN 'advanced_chat' END""").format(
        sql.Identifier(table), sql.Identifier(SHADOW)))[0][0]


# -- item 4: the app's triggers during the backfill ---------------------------------------------------------------

def test_app_update_trigger_refused_by_default_then_fired_when_the_playbook_says_so(dsn, tmp_path):
    seed_chatter(dsn, rows=400)
    add_updated_at_trigger(dsn)
    run(dsn, 1, 2)  # phase 2 installs our own sync triggers: they must not be named

    r = cli("run", "3", dsn=dsn, playbook_path=playbook_file(tmp_path / "default.yaml"))
    assert r.returncode == 3, r.stderr[-3000:]
    line = error_line(r)
    assert "set_updated_at" in line and "workflow_templates" in line and "template_specs" in line, line
    assert "app_triggers" in line and "ec_" not in line, line
    for t in TABLES:  # nothing changed: no row touched, no backfill started
        rows, old = stamps(dsn, t)
        assert rows > 0 and old == rows, (t, rows, old)
        assert query(dsn, sql.SQL("SELECT count(*) FROM {} WHERE {} IS NOT NULL").format(
            sql.Identifier(t), sql.Identifier(SHADOW)))[0][0] == 0
    assert query(dsn, "SELECT count(*) FROM _orchestrator.backfills")[0][0] == 0

    # The operator accepts the side effects: a tunable, so the same migration goes on (no fingerprint change).
    r = cli("run", "3", dsn=dsn,
            playbook_path=playbook_file(tmp_path / "fire.yaml", **{"settings.app_triggers": "fire"}))
    assert r.returncode == 0, r.stderr[-3000:]
    for t in TABLES:
        rows, old = stamps(dsn, t)
        assert old == 0, f"{t}: {old} of {rows} rows kept their stamp although the trigger fired"
        assert unsynced(dsn, t) == 0


def test_app_update_trigger_skipped_as_a_replica(dsn):
    seed_chatter(dsn, rows=400)
    add_updated_at_trigger(dsn)
    run(dsn, 1, 2, 3, **{"settings.app_triggers": "skip", "settings.batch_size": 100,
                         "settings.min_batch_size": 100})
    for t in TABLES:
        rows, old = stamps(dsn, t)
        assert rows > 0 and old == rows, f"{t}: the backfill fired the app's trigger on {rows - old} rows"
        assert unsynced(dsn, t) == 0
    # After the backfill the sync trigger and the app's trigger both work again for the app's own writes.
    with psycopg.connect(dsn, autocommit=True) as conn:
        key = conn.execute("SELECT id FROM workflow_templates ORDER BY id LIMIT 1").fetchone()[0]
        conn.execute("UPDATE workflow_templates SET workflow_type = 'rag' WHERE id = %s", (key,))
        new, stamp = conn.execute(sql.SQL("SELECT {}, updated_at::text FROM workflow_templates WHERE id = %s").format(
            sql.Identifier(SHADOW)), (key,)).fetchone()
    assert new == "rag_chat" and not stamp.startswith("2020-01-01"), (new, stamp)


@pytest.fixture
def migrator(pg_server, dsn):
    """(the migrator's DSN, its role): a plain LOGIN role owning what docs/privileges.md lists, no superuser."""
    role = f"migrator_{secrets.token_hex(4)}"
    with psycopg.connect(pg_server.dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    try:
        yield make_conninfo(dsn, user=role), role
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:  # also revokes SET ON PARAMETER (a shared object)
            conn.execute(sql.SQL("REASSIGN OWNED BY {} TO CURRENT_USER").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        with psycopg.connect(pg_server.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def test_skip_needs_the_right_to_set_session_replication_role(dsn, migrator, tmp_path):
    role_dsn, role = migrator
    seed_chatter(dsn, rows=300)
    add_updated_at_trigger(dsn)
    r_ = sql.Identifier(role)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for stmt in ("ALTER TABLE workflow_templates OWNER TO {}", "ALTER TABLE template_specs OWNER TO {}",
                     "ALTER TYPE workflowtype OWNER TO {}", "GRANT CREATE ON SCHEMA public TO {}"):
            conn.execute(sql.SQL(stmt).format(r_))
        conn.execute(sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(sql.Identifier(conn.info.dbname), r_))
    skip = playbook_file(tmp_path / "skip.yaml", **{"settings.app_triggers": "skip"})

    # The default policy does not need it: with everything docs/privileges.md lists, phase 1 runs.
    assert cli("run", "1", dsn=role_dsn, playbook_path=playbook_file(tmp_path / "d.yaml")).returncode == 0
    # skip does: the one thing missing is named, before anything is changed.
    r = cli("run", "2", dsn=role_dsn, playbook_path=skip)
    assert r.returncode == 3, r.stderr[-3000:]
    line = error_line(r)
    assert f"role {role} lacks SET on parameter session_replication_role" in line, line
    assert "GRANT SET ON PARAMETER session_replication_role" in line, line
    assert "ownership" not in line and "CREATE on" not in line, line
    assert query(dsn, "SELECT status FROM _orchestrator.phases WHERE phase = 2")[0][0] == "pending"

    # Granted exactly that (PostgreSQL 15+), the same role backfills without firing the app's trigger.
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("GRANT SET ON PARAMETER session_replication_role TO {}").format(r_))
    for n in ("2", "3"):
        r = cli("run", n, dsn=role_dsn, playbook_path=skip)
        assert r.returncode == 0, r.stderr[-3000:]
    for t in TABLES:
        rows, old = stamps(dsn, t)
        assert old == rows and unsynced(dsn, t) == 0, (t, rows, old)


# -- item 5: online steps wait on their own timeouts --------------------------------------------------------------

class OldSnapshot:
    """A report: an idle REPEATABLE READ transaction that read a table the migration never touches."""

    def __init__(self, dsn: str):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS audit (id int)")
        self.conn = psycopg.connect(dsn, application_name="report")
        self.conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        self.conn.execute("SELECT count(*) FROM audit").fetchall()
        self.pid = self.conn.info.backend_pid

    def end(self) -> None:
        if not self.conn.closed:
            self.conn.rollback()
            self.conn.close()


def builds_in_run_log(dsn: str) -> list[tuple[str, str]]:
    """(index, outcome) of every CREATE INDEX CONCURRENTLY the orchestrator ran, in order."""
    rows = query(dsn, "SELECT statement, outcome FROM _orchestrator.run_log WHERE phase = 1 ORDER BY id")
    return [(m.group(1), outcome) for statement, outcome in rows if (m := BUILD.search(statement))]


def waiting_build(dsn: str, timeout: float = 90) -> int:
    """The pid of a CREATE INDEX CONCURRENTLY waiting for an older transaction."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = query(dsn, """SELECT pid FROM pg_stat_activity WHERE query LIKE 'CREATE %%INDEX CONCURRENTLY%%'
                             AND wait_event = 'virtualxid' AND datname = current_database()""")
        if rows:
            return rows[0][0]
        time.sleep(0.1)
    raise AssertionError("no index build ever waited for the old snapshot")


def test_index_build_waits_once_for_an_old_snapshot_and_completes_when_it_ends(dsn, tmp_path):
    seed_chatter(dsn, rows=1500)
    # A DDL statement_timeout far shorter than the wait: an online step must not be cut by it.
    pb = playbook_file(tmp_path / "pb.yaml", **{"settings.statement_timeout_ms": 1000})
    report = OldSnapshot(dsn)
    result = {}
    worker = threading.Thread(target=lambda: result.update(r=cli("run", "1", dsn=dsn, playbook_path=pb)))
    try:
        worker.start()
        waiting_build(dsn)
        time.sleep(2.5)  # 50x lock_timeout_ms, 2.5x statement_timeout_ms: the build is still waiting, once
        assert worker.is_alive(), result["r"].stderr[-3000:]
        builds = builds_in_run_log(dsn)
        assert builds == [], builds  # nothing finished yet, nothing failed and was rebuilt
    finally:
        report.end()
        worker.join(240)
    r = result["r"]
    assert r.returncode == 0, r.stderr[-3000:]
    assert "online step waiting" in r.stderr and str(report.pid) in r.stderr, r.stderr[-3000:]
    builds = builds_in_run_log(dsn)
    names = [name for name, _ in builds]
    assert len(names) >= 4 and len(names) == len(set(names)), builds  # one build per index, none repeated
    assert all(outcome == "ok" for _, outcome in builds), builds
    invalid = query(dsn, """SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
                            WHERE c.relname IN ('workflow_templates', 'template_specs') AND NOT i.indisvalid""")
    assert invalid[0][0] == 0


def test_online_timeout_refusal_names_the_session_still_in_the_way(dsn, tmp_path):
    seed_chatter(dsn, rows=500)
    pb = playbook_file(tmp_path / "pb.yaml", **{"settings.online_lock_timeout_ms": 1500})
    report = OldSnapshot(dsn)
    try:
        time.sleep(0.2)
        started = time.monotonic()
        r = cli("run", "1", dsn=dsn, playbook_path=pb)
        took = time.monotonic() - started
        still = query(dsn, "SELECT state FROM pg_stat_activity WHERE pid = %s", (report.pid,))
    finally:
        report.end()
    assert r.returncode == 3, r.stderr[-3000:]
    line = error_line(r)
    assert still == [("idle in transaction",)], still
    assert (f"pid {report.pid} (" in line and "idle in transaction" in line
            and "SELECT count(*) FROM audit" in line), line
    assert "virtualxid" in line and "online_lock_timeout_ms=1500ms" in line, line
    assert "no session holds a lock in the way now" not in line, line
    builds = builds_in_run_log(dsn)
    assert len(builds) == 1 and builds[0][1] == "LockNotAvailable", builds  # one build, not rebuilt in a loop
    assert took < 60, took
    invalid = query(dsn, "SELECT count(*) FROM pg_index WHERE NOT indisvalid")
    assert invalid[0][0] == 0  # the given-up build left no INVALID index

    r = cli("run", "1", dsn=dsn, playbook_path=pb)  # the report has ended: the same command completes
    assert r.returncode == 0, r.stderr[-3000:]


# -- item 8: planner statistics for the new column ---------------------------------------------------------------

def stats(dsn: str, table: str) -> list[tuple]:
    return query(dsn, """SELECT most_common_vals::text, histogram_bounds::text FROM pg_stats
                         WHERE schemaname = 'public' AND tablename = %s AND attname = %s""", (table, SHADOW))


def test_backfill_leaves_statistics_on_the_new_column_of_both_tables(dsn):
    seed_chatter(dsn, rows=3000)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for t in TABLES:  # only the orchestrator may analyze here
            conn.execute(sql.SQL("ALTER TABLE {} SET (autovacuum_enabled = false)").format(sql.Identifier(t)))
    run(dsn, 1, 2)
    assert all(stats(dsn, t) == [] for t in TABLES)
    run(dsn, 3)
    for t in TABLES:
        got = stats(dsn, t)
        assert len(got) == 1 and (got[0][0] or got[0][1]), (t, got)
        assert "rag_chat" in (got[0][0] or "") + (got[0][1] or ""), got
    real = query(dsn, "SELECT count(*) FROM workflow_templates WHERE workflow_type_new = 'rag_chat'")[0][0]
    plan = query(dsn, "EXPLAIN (FORMAT JSON) SELECT * FROM workflow_templates WHERE workflow_type_new = 'rag_chat'")
    plan = plan[0][0] if isinstance(plan[0][0], list) else json.loads(plan[0][0])
    estimated = plan[0]["Plan"]["Plan Rows"]
    assert real > 100 and real / 2 <= estimated <= real * 2, (estimated, real)
