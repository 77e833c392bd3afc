"""The backfill engine on a real server: resumable after SIGKILL, survives a killed connection, waits
politely on row locks, ends under inserts, names the row that cannot be migrated, honours pause."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import psycopg
import pytest

from orchestrator.engine.errors import Failure, Refused
from orchestrator.lab.traffic import AppTraffic
from orchestrator.run import control

from .helpers import ROOT, make_playbook, orchestrator, query, seed, simple_dict, write_playbook

SLOW_BATCHES = {"settings.batch_size": 200, "settings.min_batch_size": 200, "settings.max_batch_size": 200,
                "settings.batch_pause_ms": 15}


def ready_for_backfill(dsn, pb):
    orch = orchestrator(pb, dsn)
    orch.run(1)
    orch.run(2)
    return orch


def execute(dsn, stmt, params=None):
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(stmt, params)


def backfill_row(dsn) -> dict | None:
    with psycopg.connect(dsn) as conn:
        cur = conn.cursor(row_factory=psycopg.rows.dict_row)
        return cur.execute("SELECT * FROM _orchestrator.backfills").fetchone()


def mismatches(dsn) -> int:
    return query(dsn, """SELECT count(*) FROM workflow_templates WHERE workflow_type_new IS DISTINCT FROM
        CASE workflow_type::text WHEN 'plain' THEN 'simple_chat' WHEN 'rag' THEN 'rag_chat'
        WHEN 'tools' THEN 'function_chat' WHEN 'full' THEN 'advanced_chat' END""")[0][0]


def count_backfill_updates(dsn):
    """Every committed backfill write of a row is recorded, to prove nothing is redone after a resume."""
    execute(dsn, """CREATE TABLE bf_writes (id varchar(26));
        CREATE FUNCTION bf_count() RETURNS trigger LANGUAGE plpgsql AS
          $$BEGIN INSERT INTO bf_writes VALUES (NEW.id); RETURN NEW; END$$;
        CREATE TRIGGER bf_count AFTER UPDATE OF workflow_type_new ON workflow_templates
          FOR EACH ROW EXECUTE FUNCTION bf_count();""")


def wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def test_sigkill_mid_backfill_resumes_without_redoing_or_skipping_rows(dsn, tmp_path):
    rows = 20_000
    seed(dsn, rows=rows)
    data = simple_dict()
    data["settings"].update(batch_size=200, min_batch_size=200, max_batch_size=200, batch_pause_ms=15,
                            app_triggers="fire")  # bf_count, the test's counting trigger, must fire
    path = write_playbook(data, tmp_path / "pb.yaml")
    orch = ready_for_backfill(dsn, make_playbook(**SLOW_BATCHES))
    orch.close()
    count_backfill_updates(dsn)
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "--dsn", dsn, "--playbook", str(path), "run", "3"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: (backfill_row(dsn) or {}).get("rows_done", 0) >= 3000)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    at_kill = backfill_row(dsn)
    assert at_kill["finished_at"] is None and 0 < at_kill["rows_done"] < rows

    rerun = subprocess.run([sys.executable, "-m", "orchestrator", "--dsn", dsn, "--playbook", str(path), "run", "3"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    done = backfill_row(dsn)
    assert done["finished_at"] is not None
    assert done["rows_done"] == rows
    assert mismatches(dsn) == 0
    assert query(dsn, "SELECT count(*), count(DISTINCT id) FROM bf_writes") == [(rows, rows)]


def test_killed_connection_is_retried_and_the_backfill_completes(dsn):
    seed(dsn, rows=10_000)
    orch = ready_for_backfill(dsn, make_playbook(**SLOW_BATCHES))
    errors = []
    worker = threading.Thread(target=lambda: _capture(errors, orch.run, 3))
    worker.start()
    wait_for(lambda: (backfill_row(dsn) or {}).get("rows_done", 0) >= 1000)
    killed = query(dsn, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE application_name LIKE 'orchestrator:main%%'")
    assert killed and all(k for (k,) in killed)
    worker.join(120)
    orch.close()
    assert errors == []
    assert backfill_row(dsn)["finished_at"] is not None and mismatches(dsn) == 0


def test_a_row_lock_makes_one_batch_wait_at_most_lock_timeout_then_retry(dsn, tmp_path):
    seed(dsn, rows=6000)
    data = simple_dict()
    data["settings"].update(batch_size=500, min_batch_size=500, max_batch_size=500, lock_timeout_ms=50,
                            retries=100, retry_wait_initial_ms=20, retry_wait_max_ms=100)
    path = write_playbook(data, tmp_path / "pb.yaml")
    ready_for_backfill(dsn, make_playbook()).close()
    middle = query(dsn, "SELECT id FROM workflow_templates ORDER BY id OFFSET 3000 LIMIT 1")[0][0]
    holder = psycopg.connect(dsn)
    holder.execute("SELECT 1 FROM workflow_templates WHERE id = %s FOR UPDATE", (middle,))
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "--json-logs", "--dsn", dsn, "--playbook",
                             str(path), "run", "3"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    wait_for(lambda: (backfill_row(dsn) or {}).get("rows_done", 0) >= 2500)
    time.sleep(1.0)  # the batch holding `middle` is now retrying
    held = backfill_row(dsn)["rows_done"]
    assert held < 6000
    holder.rollback()
    holder.close()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    # Off a terminal the retries of a step are one summary line (count, total wait), not a line per attempt.
    retries = [json.loads(line) for line in err.splitlines() if '"retried"' in line]
    assert len(retries) == 1 and retries[0]["step"] == "backfill batch", retries
    assert retries[0]["errors"] == f"LockNotAvailable x{retries[0]['retries']}" and retries[0]["waited_s"] >= 0.9
    assert '"retrying"' not in err
    assert mismatches(dsn) == 0


def test_backfill_terminates_while_the_app_inserts(dsn):
    seed(dsn, rows=10_000)
    orch = ready_for_backfill(dsn, make_playbook(**{"settings.batch_size": 300, "settings.min_batch_size": 100}))
    traffic = AppTraffic(dsn, writers=3, readers=0, pause_s=0.0).start()
    try:
        time.sleep(0.3)
        assert orch.run(3) == "applied"
        assert orch.run(4) == "applied"  # parity holds even for rows inserted during the backfill
    finally:
        report = traffic.stop()
        orch.close()
    assert report.errors == [] and report.by_kind().get("insert", 0) > 10
    assert mismatches(dsn) == 0


def test_a_row_that_cannot_be_migrated_is_named(dsn):
    seed(dsn, rows=3000)
    orch = ready_for_backfill(dsn, make_playbook(**{"settings.batch_size": 1000}))
    bad = query(dsn, "SELECT id FROM workflow_templates ORDER BY id OFFSET 1700 LIMIT 1")[0][0]
    with psycopg.connect(dsn, autocommit=True) as conn:  # behind the sync, which would fill its copy now
        conn.execute("SET session_replication_role = replica")
        conn.execute("UPDATE workflow_templates SET category = 'legacy' WHERE id = %s", (bad,))
    execute(dsn, "ALTER TABLE workflow_templates ADD CONSTRAINT legacy_stays_untyped "
                 "CHECK (category <> 'legacy' OR workflow_type_new IS NULL)")
    try:
        with pytest.raises(Failure, match=f"primary key {bad} cannot be migrated"):
            orch.run(3)
        st = backfill_row(dsn)
        assert st["finished_at"] is None and st["rows_done"] == 1000  # the batches before it are kept
    finally:
        orch.close()


def test_pause_file_holds_the_backfill_between_batches(dsn, tmp_path, monkeypatch):
    monkeypatch.setenv("ORCHESTRATOR_CONTROL_DIR", str(tmp_path))
    seed(dsn, rows=4000)
    pb = make_playbook(**{"settings.batch_size": 500, "settings.min_batch_size": 500,
                          "settings.max_batch_size": 500})
    orch = ready_for_backfill(dsn, pb)
    control.pause(pb)
    errors = []
    worker = threading.Thread(target=lambda: _capture(errors, orch.run, 3))
    worker.start()
    time.sleep(1.5)
    assert (backfill_row(dsn) or {}).get("rows_done", 0) == 0
    assert control.resume(pb)
    worker.join(60)
    orch.close()
    assert errors == [] and backfill_row(dsn)["rows_done"] == 4000


def test_composite_primary_key(dsn):
    execute(dsn, """CREATE TYPE kind AS ENUM ('a', 'b');
        CREATE TABLE items (tenant int, n int, k kind NOT NULL, PRIMARY KEY (tenant, n));
        INSERT INTO items SELECT t, n, (CASE WHEN n % 2 = 0 THEN 'a' ELSE 'b' END)::kind
          FROM generate_series(1, 7) t, generate_series(1, 700) n;""")
    from orchestrator.engine import playbook
    pb = playbook.parse({"name": "items_kind", "table": {"name": "items"}, "column": {"name": "k", "enum_type": "kind"},
                         "target": {"type": "varchar", "length": 10}, "mapping": {"a": "alpha", "b": "beta"},
                         "settings": {"batch_size": 333, "min_batch_size": 100}})
    orch = orchestrator(pb, dsn)
    try:
        for n in range(1, 7):
            orch.run(n)
        orch.contract()
    finally:
        orch.close()
    assert query(dsn, "SELECT k, count(*) FROM items GROUP BY k ORDER BY k") == [("alpha", 2450), ("beta", 2450)]


def _capture(errors, fn, *args):
    try:
        fn(*args)
    except Exception as exc:  # surfaced by the test's assertion
        errors.append(exc)


def test_ddl_cancels_an_autovacuum_that_would_outlast_every_lock_timeout(dsn, pg_server):
    seed(dsn, rows=20_000)
    execute(dsn, "ALTER TABLE workflow_templates SET (autovacuum_vacuum_threshold = 0, "
                 "autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_cost_delay = 100, "
                 "autovacuum_vacuum_cost_limit = 1)")  # a vacuum that crawls, holding its lock for minutes
    execute(dsn, "UPDATE workflow_templates SET updated_at = now()")
    admin = pg_server.dsn
    execute(admin, "ALTER SYSTEM SET autovacuum_naptime = '1s'")
    execute(admin, "SELECT pg_reload_conf()")
    try:
        wait_for(lambda: query(dsn, "SELECT count(*) FROM pg_stat_activity WHERE backend_type = "
                                    "'autovacuum worker' AND query LIKE '%%workflow_templates%%'")[0][0] > 0, 60)
        settings = {"settings.retries": 10, "settings.retry_wait_max_ms": 200}
        polite = orchestrator(make_playbook(**settings, **{"settings.cancel_autovacuum": False}), dsn)
        try:
            with pytest.raises(Refused, match="autovacuum"):
                polite.run(1)  # without cancelling, the crawling vacuum outlasts the whole budget
        finally:
            polite.close()
        orch = orchestrator(make_playbook(**settings), dsn)
        try:
            assert orch.run(1) == "applied"
        finally:
            orch.close()
    finally:
        execute(admin, "ALTER SYSTEM RESET autovacuum_naptime")
        execute(admin, "SELECT pg_reload_conf()")
        execute(dsn, "ALTER TABLE workflow_templates "
                     "RESET (autovacuum_vacuum_cost_delay, autovacuum_vacuum_cost_limit)")


def test_a_batch_split_for_running_past_max_batch_ms_is_said_as_info_not_a_warning(dsn, tmp_path):
    """A batch cancelled at max_batch_ms is split and run again by design: the log says so in those words, at
    info, not as a `retried ... QueryCanceled` warning a newcomer reads as an error."""
    seed(dsn, rows=2000)
    data = simple_dict()
    data["settings"].update(batch_size=1000, min_batch_size=1, max_batch_size=1000, max_batch_ms=400,
                            target_batch_ms=50, app_triggers="fire", retries=60)
    path = write_playbook(data, tmp_path / "pb.yaml")
    ready_for_backfill(dsn, make_playbook()).close()
    # A slow app trigger (1 ms a row): a batch of 1000 rows runs past max_batch_ms, one of 100 does not.
    execute(dsn, "CREATE FUNCTION slow_row() RETURNS trigger LANGUAGE plpgsql AS "
                 "'BEGIN PERFORM pg_sleep(0.001); RETURN NEW; END'")
    execute(dsn, "CREATE TRIGGER slow BEFORE UPDATE ON workflow_templates FOR EACH ROW EXECUTE FUNCTION slow_row()")
    r = subprocess.run([sys.executable, "-m", "orchestrator", "--json-logs", "--dsn", dsn, "--playbook", str(path),
                        "run", "3"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stderr.splitlines() if line.startswith("{")]
    split = [e for e in events if e["event"] == "backfill batch retried as designed"]
    assert split and all(e["level"] == "info" for e in split), events
    assert "ran past max_batch_ms (400 ms)" in split[0]["why"] and "half its size" in split[0]["why"]
    assert [e for e in events if e["event"] == "retried"] == []
    assert mismatches(dsn) == 0
