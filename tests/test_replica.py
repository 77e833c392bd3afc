"""A real streaming standby (pg_basebackup -R from the server's own binaries): the replica-lag throttle holds
the backfill while the standby is behind (WAL replay paused on it) and lets it go on once it has caught up."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

from orchestrator.engine import health
from orchestrator.engine.errors import OrchestratorError
from orchestrator.lab import server
from orchestrator.run.runner import Orchestrator

from .helpers import query, real_playbook, seed_chatter

ROWS = 3000
SMALL = {"settings.batch_size": 50, "settings.min_batch_size": 50, "settings.max_batch_size": 50,
         "settings.throttle_max_wait_s": 120, "settings.batch_pause_ms": 50}


@pytest.fixture
def standby(pg_server):
    if pg_server.bin_dir is None:
        pytest.skip(f"no binaries to start a standby of a {pg_server.kind} server")
    sb = server.start_standby(pg_server)
    try:
        yield sb
    finally:
        sb.stop()


def lag_bytes(dsn: str) -> float:
    return query(dsn, "SELECT max(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn))::float8 "
                      "FROM pg_stat_replication")[0][0] or 0.0


def wait_until(what: str, cond, timeout: float = 60.0, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (v := cond()):
            return v
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout:.0f}s")


class Backfill(threading.Thread):
    def __init__(self, pb, dsn):
        super().__init__(daemon=True)
        self.pb, self.dsn, self.error, self.done_at = pb, dsn, None, None

    def run(self):
        o = Orchestrator(self.pb, self.dsn)
        try:
            o.run(3)
        except OrchestratorError as err:
            self.error = err
        finally:
            self.done_at = time.monotonic()
            o.close()


def holding(dsn: str, name: str) -> list[dict]:
    with psycopg.connect(dsn, autocommit=True) as c:
        return health.holding(c, "_orchestrator", name)


def progress(dsn: str) -> tuple[int, bool]:
    rows = query(dsn, "SELECT coalesce(sum(rows_scanned), 0)::int, bool_and(finished_at IS NOT NULL) "
                      "FROM _orchestrator.backfills")
    return rows[0][0], bool(rows[0][1])


@pytest.mark.parametrize("limit", [{"settings.max_replica_lag_bytes": 64 * 1024},
                                   {"settings.max_replica_lag_ms": 500}], ids=["bytes", "ms"])
def test_lag_throttle_holds_the_backfill_while_replay_is_paused(dsn, standby, limit):
    seed_chatter(dsn, ROWS)
    pb = real_playbook(**SMALL, **limit)
    o = Orchestrator(pb, dsn)
    try:
        o.run(1)
        o.run(2)
    finally:
        o.close()
    wait_until("standby caught up", lambda: lag_bytes(dsn) == 0)
    with psycopg.connect(standby.dsn, autocommit=True) as sb:
        sb.execute("SELECT pg_wal_replay_pause()")
        wait_until("replay paused", lambda: sb.execute("SELECT pg_get_wal_replay_pause_state()").fetchone()[0]
                   == "paused")
        bf = Backfill(pb, dsn)
        bf.start()
        try:
            held = wait_until("replica_lag throttle recorded", lambda: [
                h for h in holding(dsn, pb.name) if h["kind"] == "replica_lag"], timeout=60)
            assert "replica replay lag" in held[0]["reason"]
            rows_held, finished = progress(dsn)
            time.sleep(2.0)  # held: not one more batch while the standby stays behind
            assert progress(dsn) == (rows_held, False)
            assert not finished and bf.is_alive() and bf.error is None
            assert rows_held < ROWS
            assert lag_bytes(dsn) > 0
        finally:
            resumed = time.monotonic()
            sb.execute("SELECT pg_wal_replay_resume()")
        bf.join(120)
    assert not bf.is_alive(), "backfill still held 120 s after the standby resumed replay"
    assert bf.error is None, bf.error
    rows, finished = progress(dsn)
    assert finished and rows >= ROWS
    assert query(dsn, "SELECT count(*) FROM workflow_templates WHERE workflow_type_new IS NULL")[0][0] == 0
    assert bf.done_at - resumed < 60
    assert holding(dsn, pb.name) == []  # released once it went on
    # The standby replays the backfill: the same values there.
    wait_until("standby caught up after the backfill", lambda: lag_bytes(dsn) == 0)
    mine = query(dsn, "SELECT count(*) FILTER (WHERE workflow_type_new = 'simple_chat') FROM workflow_templates")
    dbname = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    theirs = query(standby.dsn_for(dbname),
                   "SELECT count(*) FILTER (WHERE workflow_type_new = 'simple_chat') FROM workflow_templates")
    assert mine == theirs and mine[0][0] > 0


def test_start_standby_streams_and_stops(pg_server):
    if pg_server.bin_dir is None:
        pytest.skip("no binaries")
    sb = server.start_standby(pg_server)
    try:
        with psycopg.connect(sb.dsn, autocommit=True) as c:
            assert c.execute("SELECT pg_is_in_recovery()").fetchone()[0] is True
        assert query(pg_server.dsn, "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'")[0][0] >= 1
        assert query(pg_server.dsn, "SELECT count(*) FROM pg_replication_slots WHERE active AND slot_name LIKE "
                                    "'orch_standby_%%'")[0][0] == 1
    finally:
        sb.stop()
    wait_until("walsender gone", lambda: query(pg_server.dsn, "SELECT count(*) FROM pg_stat_replication")[0][0] == 0,
               timeout=30)
    assert query(pg_server.dsn, "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'orch_standby_%%'"
                 )[0][0] == 0  # its slot is gone with it: the primary keeps no WAL for it
