"""The parity scan on several connections (issue 16, item 5: `settings.verify_parallelism`).

Reading block ranges on side connections at once must not change what the scan finds: the same rows, mismatches,
sample of ids and unmapped values as the serial walk (and as the key-range walk of servers before 14), the
serial walk's end rule (rows added past the end while the scan runs are checked), read-only side connections
under the work connection's online timeouts, every chunk in the run log once, and nothing left behind when a
chunk fails."""

from __future__ import annotations

import re
import threading
import time

import psycopg
import pytest

from orchestrator.engine import parity
from orchestrator.engine.errors import BadInput
from orchestrator.lab import chatter
from orchestrator.run.runner import Orchestrator

from .helpers import query, real_playbook, seed_chatter

T, S = "workflow_templates", "template_specs"
LABELS = {T: f"{T}.workflow_type", S: f"{S}.workflow_type"}


def execute(dsn: str, *stmts: str, bypass: bool = False) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        if bypass:  # writes the sync triggers do not see (superuser, as the test server's role is)
            conn.execute("SET session_replication_role = replica")
        for stmt in stmts:
            conn.execute(stmt)


def run(dsn: str, *steps: int | str) -> None:
    o = Orchestrator(real_playbook(), dsn)
    try:
        for s in steps:
            if isinstance(s, str):
                o.rollback(int(s.split()[1]))
            else:
                assert o.run(s) == "applied"
    finally:
        o.close()


def verify(dsn: str, parallelism: int, chunk_rows: int) -> dict[str, tuple]:
    o = Orchestrator(real_playbook(**{"settings.verify_parallelism": parallelism,
                                      "settings.verify_chunk_rows": chunk_rows}), dsn)
    try:
        return {k: (r.rows, r.mismatches, r.sample, r.unmapped) for k, r in o.verify().items()}
    finally:
        o.close()


def ids_spread(dsn: str, table: str, n: int) -> list[str]:
    """n ids spread over the table's blocks (not in key order), so the sample's order is the scan's."""
    rows = query(dsn, f"SELECT id FROM {table} ORDER BY md5(id)")
    return [rows[i * len(rows) // n][0] for i in range(n)]


def in_list(ids: list[str]) -> str:
    return ", ".join(f"'{i}'" for i in ids)


def test_a_parallel_scan_finds_exactly_what_the_serial_and_the_key_walks_find(dsn, monkeypatch):
    seed_chatter(dsn, rows=3000)
    run(dsn, 1, 2, 3)
    execute(dsn, f"ANALYZE {T}", f"ANALYZE {S}")
    # Before the swap: shadows that disagree with the enum, more of them than the sample holds, over many chunks.
    drift_t, drift_s = ids_spread(dsn, T, 12), ids_spread(dsn, S, 3)
    execute(dsn, f"UPDATE {T} SET workflow_type_new = CASE WHEN workflow_type = 'rag' THEN 'simple_chat' "
                 f"ELSE 'rag_chat' END WHERE id IN ({in_list(drift_t)})",
            f"UPDATE {S} SET workflow_type_new = 'advanced_chat' WHERE workflow_type <> 'full' "
            f"AND id IN ({in_list(drift_s)})", bypass=True)
    serial = verify(dsn, 1, 100)
    assert serial[LABELS[T]][:2] == (3000, 12) and len(serial[LABELS[T]][2]) == 5, serial
    assert serial[LABELS[S]][1] == len(query(dsn, f"SELECT 1 FROM {S} WHERE id IN ({in_list(drift_s)}) "
                                                  f"AND workflow_type <> 'full'")), serial
    # The sample is in block order, then key order within a chunk: compared with the serial walk of equal chunks.
    for parallelism, chunk_rows in ((2, 100), (3, 100), (4, 37), (8, 500)):
        same = serial if chunk_rows == 100 else verify(dsn, 1, chunk_rows)
        assert verify(dsn, parallelism, chunk_rows) == same, (parallelism, chunk_rows)
    with monkeypatch.context() as m:  # the walk of servers before 14: the same counts; its sample is in key order
        m.setattr(parity, "_by_blocks", parity._by_keys)
        by_keys = verify(dsn, 3, 100)
    assert {k: (v[0], v[1], v[3]) for k, v in by_keys.items()} == {k: (v[0], v[1], v[3]) for k, v in serial.items()}
    assert set(by_keys[LABELS[T]][2]) <= set(drift_t) and len(by_keys[LABELS[T]][2]) == 5

    # After the swap: enum copies that no longer match, and new values with no label (unmapped).
    run(dsn, "rollback 3", 3, 4, 5)
    bad, unlabeled = ids_spread(dsn, T, 9), ids_spread(dsn, S, 4)
    execute(dsn, f"UPDATE {T} SET workflow_type_old = CASE WHEN workflow_type_old = 'full' THEN 'plain'::workflowtype "
                 f"ELSE 'full'::workflowtype END WHERE id IN ({in_list(bad)})",
            f"UPDATE {S} SET workflow_type = 'medical_chat' WHERE id IN ({in_list(unlabeled)})", bypass=True)
    serial = verify(dsn, 1, 100)
    assert serial[LABELS[T]][:2] == (3000, 9) and serial[LABELS[S]][3] == 4, serial
    for parallelism, chunk_rows in ((2, 100), (3, 41), (6, 100)):
        same = serial if chunk_rows == 100 else verify(dsn, 1, chunk_rows)
        assert verify(dsn, parallelism, chunk_rows) == same, (parallelism, chunk_rows)


@pytest.mark.parametrize("parallelism", [1, 3])
def test_rows_added_past_the_end_while_the_last_ranges_are_read_are_checked(dsn, monkeypatch, parallelism):
    seed_chatter(dsn, rows=3000)
    execute(dsn, f"ALTER TABLE {T} SET (autovacuum_enabled = false)")
    run(dsn, 1, 2, 3)
    execute(dsn, f"VACUUM FULL {T}", f"ANALYZE {T}")  # no free space left in its blocks: new rows go to the end
    real, added = parity._tally, {}
    lock = threading.Lock()

    def tally(ctx, result, in_range, params, *args, **kw):
        end = int(re.match(r"\((\d+),0\)", params[1]).group(1))
        with lock:
            if ctx.m.table.name == T and not added and end >= blocks(dsn):
                # The last range of the table as it is now: the other connections find no block left and stop;
                # then, while this range is read, rows land after it, bypassing the sync.
                time.sleep(0.3)
                added["from_block"] = blocks(dsn)
                with psycopg.connect(dsn, autocommit=True) as conn:
                    conn.execute("SET session_replication_role = replica")
                    for i in range(300):
                        chatter.insert_template(conn, f"LATE{i:022d}", "plain", workflow_type_new="rag_chat")
        return real(ctx, result, in_range, params, *args, **kw)

    monkeypatch.setattr(parity, "_tally", tally)
    got = verify(dsn, parallelism, 100)
    assert added and got[LABELS[T]][:2] == (3300, 300), (added, got)
    late = [int(b) for (b,) in query(dsn, f"SELECT (ctid::text::point)[0] FROM {T} WHERE id LIKE 'LATE%'")]
    assert sum(b >= added["from_block"] for b in late) >= 250  # most really were past the end the scan had seen


def blocks(dsn: str) -> int:
    return query(dsn, f"SELECT pg_relation_size('{T}') / current_setting('block_size')::int")[0][0]


def test_side_connections_are_read_only_under_the_same_timeouts_logged_once_and_closed(dsn, monkeypatch):
    seed_chatter(dsn, rows=3000)
    run(dsn, 1, 2, 3)
    execute(dsn, f"ANALYZE {T}", f"ANALYZE {S}")
    real, seen = parity._tally, {}
    meet = threading.Barrier(2, timeout=20)

    def tally(ctx, *args, **kw):
        pid = ctx.x.conn.info.backend_pid
        if pid not in seen:
            seen[pid] = ctx.x.conn.execute(
                "SELECT current_setting('transaction_read_only'), current_setting('lock_timeout'), "
                "current_setting('statement_timeout'), current_setting('application_name')").fetchone()
            if len(seen) <= 2:
                meet.wait()  # the first chunks of two connections overlap: the scan is really parallel
        return real(ctx, *args, **kw)

    monkeypatch.setattr(parity, "_tally", tally)
    o = Orchestrator(real_playbook(**{"settings.verify_parallelism": 3, "settings.verify_chunk_rows": 100}), dsn)
    try:
        assert o.run(4) == "applied"
        main = o.x.conn.info.backend_pid
        main_limits = o.x.conn.execute("SELECT current_setting('lock_timeout'), "
                                       "current_setting('statement_timeout')").fetchone()
    finally:
        o.close()
    sides = {pid: s for pid, s in seen.items() if pid != main}
    assert main in seen and sides, seen
    for read_only, lock_timeout, statement_timeout, app in sides.values():
        assert read_only == "on" and (lock_timeout, statement_timeout) == main_limits
        assert app.startswith("orchestrator:verify:"), app
    assert seen[main][0] == "off"  # the work connection is not made read-only
    # Every chunk in the run log, exactly once, in contiguous ranges from block 0.
    log = query(dsn, "SELECT statement FROM _orchestrator.run_log WHERE phase = 4 AND statement LIKE "
                     "'SELECT count(*), count(*) FILTER%' ORDER BY id")
    for table in (T, S):
        ranges = sorted(tuple(int(b) for b in re.findall(r"'\((\d+),0\)'", s)) for (s,) in log if f'"{table}"' in s)
        assert ranges and ranges[0][0] == 0 and len(set(ranges)) == len(ranges), ranges
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])), ranges
        assert ranges[-1][1] >= query(dsn, f"SELECT pg_relation_size('{table}') / 8192")[0][0]
    assert not verify_backends(dsn)


def verify_backends(dsn: str, wait_s: float = 5.0) -> list:
    deadline = time.monotonic() + wait_s
    while True:
        rows = query(dsn, "SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'orchestrator:verify:%'")
        if not rows or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def test_a_failing_chunk_stops_the_scan_and_closes_the_side_connections(dsn, monkeypatch):
    seed_chatter(dsn, rows=3000)
    run(dsn, 1, 2, 3)
    execute(dsn, f"ANALYZE {T}")
    real, calls = parity._tally, []

    def tally(ctx, *args, **kw):
        calls.append(threading.current_thread().name)
        if threading.current_thread() is not threading.main_thread():
            raise psycopg.errors.DiskFull("could not read block")  # a side connection's chunk fails
        time.sleep(0.05)
        return real(ctx, *args, **kw)

    monkeypatch.setattr(parity, "_tally", tally)
    o = Orchestrator(real_playbook(**{"settings.verify_parallelism": 3, "settings.verify_chunk_rows": 100}), dsn)
    try:
        with pytest.raises(psycopg.errors.DiskFull):
            o.verify()
        assert o.x.conn.execute("SELECT 1").fetchone() == (1,)  # the work connection is still usable
    finally:
        o.close()
    assert any(name != "MainThread" for name in calls)
    assert not verify_backends(dsn)


def test_side_connections_that_cannot_be_had_only_narrow_the_scan(dsn, monkeypatch):
    seed_chatter(dsn, rows=1500)
    run(dsn, 1, 2, 3)
    execute(dsn, f"ANALYZE {T}", f"ANALYZE {S}")
    execute(dsn, f"UPDATE {T} SET workflow_type_new = 'rag_chat' WHERE workflow_type <> 'rag' "
                 f"AND id IN ({in_list(ids_spread(dsn, T, 7))})", bypass=True)
    serial = verify(dsn, 1, 100)

    def refused(self, conn):
        conn.close()
        raise psycopg.OperationalError("FATAL: sorry, too many clients already")

    monkeypatch.setattr(parity._ScanExecutor, "_online_session", refused)
    assert verify(dsn, 4, 100) == serial
    assert not verify_backends(dsn)


def test_verify_parallelism_is_validated():
    assert real_playbook().settings.verify_parallelism == 2
    assert real_playbook(**{"settings.verify_parallelism": 1}).settings.verify_parallelism == 1
    for bad in (0, -1, 33, "two"):
        with pytest.raises(BadInput, match="verify_parallelism"):
            real_playbook(**{"settings.verify_parallelism": bad})
