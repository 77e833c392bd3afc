"""Health throttles hold the backfill on real signals, and `status` (single and fleet) and the metrics show why:
app backends waiting on locks, WAL generated faster than the limit, autovacuum working on the table."""

from __future__ import annotations

import json
import threading
import time

import psycopg
import pytest
import yaml
from prometheus_client import generate_latest

from orchestrator.engine import health
from orchestrator.engine import playbook as playbook_mod
from orchestrator.engine.errors import OrchestratorError, Refused
from orchestrator.fleet import inventory, metrics
from orchestrator.fleet import rollout as fleet_mod
from orchestrator.run.runner import Orchestrator

from .helpers import cli, reference_dict, seed_chatter

SMALL = {"batch_size": 20, "min_batch_size": 10, "max_batch_size": 20, "batch_pause_ms": 20}


def setup(dsn: str, tmp_path, settings: dict, rows: int = 300):
    seed_chatter(dsn, rows)
    data = reference_dict()
    data["environments"] = {"production": {"settings": {**SMALL, **settings}}}
    path = tmp_path / "playbook.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    pb = playbook_mod.load(path, "production")
    for k in (1, 2):
        o = Orchestrator(pb, dsn)
        o.run(k)
        o.close()
    inv = inventory.parse({"playbook": str(path), "targets": [{"name": "db1", "dsn": dsn, "env": "production"}],
                           "waves": [{"name": "all", "rest": True}]})
    return path, pb, fleet_mod.Fleet(inv, journal=tmp_path / "journal.json")


class Backfill(threading.Thread):
    def __init__(self, pb, dsn):
        super().__init__(daemon=True)
        self.pb, self.dsn, self.result, self.error = pb, dsn, None, None

    def run(self):
        o = Orchestrator(self.pb, self.dsn)
        try:
            self.result = o.run(3)
        except OrchestratorError as err:
            self.error = err
        finally:
            o.close()


def wait_for_throttle(f: fleet_mod.Fleet, kind: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        t = f.status()["targets"][0]
        if any(h["kind"] == kind for h in t["throttles"]):
            return t
        time.sleep(0.1)
    raise AssertionError(f"no {kind} throttle shown in status within {timeout}s: {t}")



def test_a_slow_app_statement_holds_the_backfill_until_it_ends(dsn, tmp_path):
    """max_app_statement_ms: what the app sees. An app statement running past it (one that began recently: not a
    report slow by nature) holds the next batch; when it ends, the backfill goes on by itself."""
    path, pb, f = setup(dsn, tmp_path, {"max_app_statement_ms": 300})
    slow = threading.Thread(target=lambda: psycopg.connect(dsn, autocommit=True).execute("SELECT pg_sleep(4)"),
                            daemon=True)
    slow.start()
    time.sleep(0.5)  # past the limit
    bf = Backfill(pb, dsn)
    bf.start()
    t = wait_for_throttle(f, "app_latency")
    held = next(h for h in t["throttles"] if h["kind"] == "app_latency")
    assert "an app statement has run" in held["reason"] and "max_app_statement_ms 300" in held["reason"]
    assert bf.is_alive()
    slow.join(10)
    bf.join(60)
    assert bf.error is None and bf.result == "applied"


def test_app_lock_waiters_hold_the_backfill_and_status_says_so(dsn, tmp_path):
    path, pb, f = setup(dsn, tmp_path, {"max_lock_waiters": 0})
    holder = psycopg.connect(dsn, autocommit=True)
    holder.execute("CREATE TABLE app_queue (id int)")
    holder.execute("BEGIN")
    holder.execute("LOCK TABLE app_queue IN ACCESS EXCLUSIVE MODE")
    waiter = threading.Thread(target=lambda: psycopg.connect(dsn, autocommit=True).execute(
        "SELECT count(*) FROM app_queue"), daemon=True)
    waiter.start()
    bf = Backfill(pb, dsn)
    bf.start()
    try:
        t = wait_for_throttle(f, "lock_waiters")
        held = next(h for h in t["throttles"] if h["kind"] == "lock_waiters")
        assert "1 app backends waiting on locks > max_lock_waiters 0" in held["reason"]
        assert t["state"] == "running" and t["running_now"] and not t["backfill"]["finished"]
        assert t["backfill"]["rows_scanned"] == 0  # held before its first batch
        single = cli("--dsn", dsn, "--playbook", str(path), "--env", "production", "status", "--json")
        assert single.returncode == 0, single.stderr
        assert [h["kind"] for h in json.loads(single.stdout)["throttles"]] == ["lock_waiters"]
        human = cli("--dsn", dsn, "--playbook", str(path), "--env", "production", "status")
        assert "waiting on locks" in human.stdout
        exporter = metrics.Exporter(f.status, max_age_s=0)
        text = generate_latest(exporter.registry).decode()
        assert 'orchestrator_backfill_throttled{env="production",kind="lock_waiters"' in text
        time.sleep(1.0)
        assert bf.is_alive()  # still held
    finally:
        holder.execute("ROLLBACK")  # the app's lock goes away: the waiter proceeds, so does the backfill
        holder.close()
    bf.join(60)
    waiter.join(10)
    assert bf.error is None and bf.result == "applied"
    t = f.status()["targets"][0]
    assert t["throttles"] == [] and t["backfill"]["finished"] and t["phase"] == 3
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM _orchestrator.throttles").fetchone()[0] == 0


def test_wal_rate_holds_the_backfill_until_it_gives_up_then_resumes(dsn, tmp_path):
    path, pb, f = setup(dsn, tmp_path, {"max_wal_mb_per_s": 1, "throttle_max_wait_s": 3})
    stop = threading.Event()

    def generate_wal():
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE wal_gen (v text)")
            while not stop.is_set():  # about 2 MB a statement
                conn.execute("INSERT INTO wal_gen SELECT repeat(md5(random()::text), 30) FROM generate_series(1, 2000)")
                conn.execute("TRUNCATE wal_gen")

    gen = threading.Thread(target=generate_wal, daemon=True)
    gen.start()
    time.sleep(0.5)
    bf = Backfill(pb, dsn)
    bf.start()
    try:
        t = wait_for_throttle(f, "wal_rate")
        reason = next(h["reason"] for h in t["throttles"] if h["kind"] == "wal_rate")
        assert "WAL generated at" in reason and "> max_wal_mb_per_s 1" in reason
        bf.join(60)
    finally:
        stop.set()
        gen.join(30)
    assert isinstance(bf.error, Refused) and "WAL generated at" in str(bf.error)
    t = f.status()["targets"][0]
    assert (t["state"], t["step"], t["throttles"]) == ("failed", "expand", [])
    assert "backfill held for" in t["error"] and not t["backfill"]["finished"]
    rerun = Backfill(pb, dsn)  # the server has recovered: the same command resumes and finishes
    rerun.start()
    rerun.join(120)
    assert rerun.error is None and rerun.result == "applied"
    assert f.status()["targets"][0]["backfill"]["finished"]


def test_autovacuum_on_the_table_holds_the_backfill(pg_server, dsn, tmp_path):
    path, pb, f = setup(dsn, tmp_path, {"throttle_on_autovacuum": True, "throttle_max_wait_s": 120}, rows=3000)
    admin = psycopg.connect(pg_server.dsn, autocommit=True)
    app = psycopg.connect(dsn, autocommit=True)
    try:
        admin.execute("ALTER SYSTEM SET autovacuum_naptime = 1")
        admin.execute("SELECT pg_reload_conf()")
        # A slow autovacuum on the backfilled table: dead rows, no threshold, the largest cost delay.
        app.execute("ALTER TABLE workflow_templates SET (autovacuum_vacuum_threshold = 0, "
                    "autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_cost_delay = 100, "
                    "autovacuum_vacuum_cost_limit = 1, autovacuum_analyze_threshold = 1000000000)")
        app.execute("UPDATE workflow_templates SET description = description")
        deadline = time.monotonic() + 60
        while not app.execute("""SELECT EXISTS (SELECT FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid
                                 WHERE a.backend_type = 'autovacuum worker'
                                   AND l.relation = 'workflow_templates'::regclass)""").fetchone()[0]:
            if time.monotonic() > deadline:
                pytest.skip("autovacuum did not start on the table within 60s on this server")
            time.sleep(0.2)
        bf = Backfill(pb, dsn)
        bf.start()
        t = wait_for_throttle(f, "autovacuum")
        reason = next(h["reason"] for h in t["throttles"] if h["kind"] == "autovacuum")
        assert "autovacuum is working on workflow_templates" in reason
        assert not t["backfill"]["finished"]
        # Turn it off for the table: the ALTER waits for the worker, which yields to it after deadlock_timeout.
        app.execute("SET lock_timeout = '30s'")
        app.execute("ALTER TABLE workflow_templates SET (autovacuum_enabled = false)")
        bf.join(120)
        assert bf.error is None and bf.result == "applied"
        assert f.status()["targets"][0]["throttles"] == []
    finally:
        admin.execute("ALTER SYSTEM RESET autovacuum_naptime")
        admin.execute("SELECT pg_reload_conf()")
        admin.close()
        app.close()


def test_health_settings_are_validated_per_environment(tmp_path):
    data = reference_dict()
    data["environments"] = {"production": {"settings": {"max_wal_mb_per_s": 0}}}
    with pytest.raises(OrchestratorError) as err:
        playbook_mod.parse(data, "p.yaml", "production")
    assert "environments.production" in err.value.one_line() and "max_wal_mb_per_s" in err.value.one_line()
    data["environments"] = {"production": {"settings": {"max_lock_waiters": 5, "throttle_on_autovacuum": True}},
                            "dev": {}}
    prod, dev = playbook_mod.parse(data, "p", "production"), playbook_mod.parse(data, "p", "dev")
    assert health.enabled(prod.settings) and not health.enabled(dev.settings)
    assert prod.fingerprint() == dev.fingerprint()  # tunables: may change between phases
