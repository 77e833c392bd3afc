"""pgbench, a client nobody here wrote, as the application: its stock schema (`pgbench -i --foreign-keys`) and
`-M prepared` clients through every phase of widening pgbench_accounts.aid with pgbench_history.aid, a table
with no primary key (batched by heap block ranges). pgbench's own failure count must stay 0 and its balances
consistent; after the contract an aid past 2^31 inserts."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading

import psycopg
import pytest
import yaml

from orchestrator.engine import executor, playbook
from orchestrator.engine.errors import BadInput
from orchestrator.lab import server
from orchestrator.lab.snapshot import ignoring_column_order, schema_snapshot, snapshot_diff
from orchestrator.run.runner import Orchestrator

from .helpers import ROOT, cli, query

PLAYBOOK = ROOT / "tests" / "playbooks" / "pgbench_aid_to_bigint.yaml"
INT_MAX = 2**31 - 1


def pgbench_binary() -> str:
    found = shutil.which("pgbench") or next(
        (str(d / "pgbench") for _, d in sorted(server.find_pg_bin_dirs().items(), reverse=True)
         if (d / "pgbench").exists()), None)
    if found is None:
        pytest.skip("pgbench is not installed (Debian: postgresql-client)")
    return found


class Pgbench:
    """pgbench -M prepared in back-to-back runs of a few seconds each, until stopped: every run's summary
    (transactions, failed transactions) is kept, and a run that aborts counts as failed."""

    def __init__(self, dsn: str, clients: int = 2, search_path: str | None = None, script: str | None = None):
        self.dsn, self.clients, self.binary = dsn, clients, pgbench_binary()
        self.script = ["-f", script] if script else []  # a custom transaction instead of pgbench's own
        # an app version: its connections' search_path puts its version views first
        self.env = {**os.environ, "PGOPTIONS": f"-c search_path={search_path}"} if search_path else None
        self.transactions = self.failed = 0
        self.outputs: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> Pgbench:
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            r = subprocess.run([self.binary, "-n", "-M", "prepared", "-c", str(self.clients), "-T", "2",
                                *self.script, self.dsn], capture_output=True, text=True, env=self.env)
            done = re.search(r"number of transactions actually processed: (\d+)", r.stdout)
            failed = re.search(r"number of failed transactions: (\d+)", r.stdout)
            self.transactions += int(done.group(1)) if done else 0
            self.failed += int(failed.group(1)) if failed else 0
            if r.returncode != 0 or done is None:
                self.failed += 1
                self.outputs.append((r.stdout + r.stderr)[-2000:])

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def init_pgbench(dsn: str) -> None:
    subprocess.run([pgbench_binary(), "-i", "--foreign-keys", "-q", "-s", "1", dsn], check=True,
                   capture_output=True)
    # history rows to migrate: pgbench inserts one per transaction
    subprocess.run([pgbench_binary(), "-n", "-c", "2", "-t", "2000", dsn], check=True, capture_output=True)


def balances(dsn: str) -> tuple:
    return query(dsn, "SELECT (SELECT sum(abalance) FROM pgbench_accounts), (SELECT sum(tbalance) FROM "
                      "pgbench_tellers), (SELECT sum(bbalance) FROM pgbench_branches), "
                      "(SELECT sum(delta) FROM pgbench_history)")[0]


def orchestrator(dsn: str, method: str) -> Orchestrator:
    data = yaml.safe_load(PLAYBOOK.read_text())
    data["settings"]["backfill_method"] = method
    return Orchestrator(playbook.parse(data), dsn)


def column_type(dsn: str, table: str, column: str) -> str:
    return query(dsn, "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = %s::regclass "
                      "AND attname = %s", (table, column))[0][0]


@pytest.mark.parametrize("method", ["update", "copy"])
def test_pgbench_runs_through_every_phase_with_no_failure(dsn, method):
    init_pgbench(dsn)
    orch = orchestrator(dsn, method)
    app = Pgbench(dsn).start()
    try:
        for n in range(1, 6):
            assert orch.run(n) == "applied"
        assert orch.contract(old_version_gone=True) == ["contracted"] * 5
    finally:
        app.stop()
        orch.close()
    assert (app.failed, app.outputs[:2]) == (0, [])
    assert app.transactions > 0
    a, t, b, delta = balances(dsn)
    assert a == t == b == delta
    assert [column_type(dsn, t, "aid") for t in ("pgbench_accounts", "pgbench_history")] == ["bigint", "bigint"]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO pgbench_accounts (aid, bid, abalance, filler) VALUES (%s, 1, 0, '')",
                     (INT_MAX + 5,))
        conn.execute("INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (1, 1, %s, 0, now())",
                     (INT_MAX + 5,))
    assert query(dsn, "SELECT count(*) FROM pgbench_history WHERE aid = %s", (INT_MAX + 5,)) == [(1,)]


@pytest.mark.parametrize("after_contract", [False, True], ids=["from-the-swap", "after-the-contract"])
def test_rolled_back_the_catalog_and_history_are_as_before(dsn, after_contract):
    """Every rollback, and the way back after the contract (its reverse backfill of the keyless history table
    by block ranges too): the catalog as it was, every history row with its aid."""
    init_pgbench(dsn)
    with psycopg.connect(dsn) as conn:
        before = ignoring_column_order(schema_snapshot(conn))
    history = query(dsn, "SELECT tid, bid, aid, delta, mtime FROM pgbench_history ORDER BY 1, 2, 3, 4, 5")
    orch = orchestrator(dsn, "update")
    try:
        for n in range(1, 6):
            assert orch.run(n) == "applied"
        if after_contract:
            orch.contract(old_version_gone=True)
            for n in range(5, 0, -1):
                assert orch.rollback(n) == "contract undone"
        for n in range(5, 0, -1):
            assert orch.rollback(n) == "rolled back"
    finally:
        orch.close()
    with psycopg.connect(dsn) as conn:
        assert snapshot_diff(before, ignoring_column_order(schema_snapshot(conn))) == []
    assert query(dsn, "SELECT tid, bid, aid, delta, mtime FROM pgbench_history ORDER BY 1, 2, 3, 4, 5") == history


def test_plan_says_which_backfill_each_table_gets_and_why(dsn, tmp_path):
    init_pgbench(dsn)
    data = yaml.safe_load(PLAYBOOK.read_text())
    data["settings"]["backfill_method"] = "copy"
    path = tmp_path / "pgbench.yaml"
    path.write_text(yaml.safe_dump(data))
    r = cli("plan", "--no-lint", dsn=dsn, playbook_path=path, env={"COLUMNS": "400"})
    assert r.returncode == 0, r.stderr
    out = " ".join(r.stdout.split())
    assert "pgbench_accounts.aid: copied into a new table (settings.backfill_method: copy)" in out
    assert ("pgbench_history.aid: updated in place, per range of heap blocks (no primary key, by which the "
            "copy replays its log)") in out
    assert "ctid >= '(<from>,0)'::tid AND ctid < '(<to>,0)'::tid" in out


def test_a_keyless_table_published_for_update_without_replica_identity_is_refused(dsn):
    """The server refuses every UPDATE of such a table: the backfill would fail at its first batch."""
    init_pgbench(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE PUBLICATION bench_pub FOR TABLE pgbench_history")
    orch = orchestrator(dsn, "update")
    try:
        with pytest.raises(BadInput, match=r"pgbench_history has no primary key nor replica identity and is "
                                           r"published for UPDATE \(bench_pub\)"):
            orch.run(1)
    finally:
        orch.close()
    assert column_type(dsn, "pgbench_history", "aid") == "integer"
    assert query(dsn, "SELECT count(*) FROM pg_attribute WHERE attrelid = 'pgbench_history'::regclass "
                      "AND attname LIKE '%%aid%%'") == [(1,)]


def test_a_keyless_backfill_killed_part_way_resumes_where_it_stopped_and_verifies(dsn, tmp_path):
    """Killed after its third block-range UPDATE (before that batch commits) while pgbench writes; run again, the
    backfill goes on from the committed cursor, and phase 4 finds every row of both tables migrated."""
    init_pgbench(dsn)
    data = yaml.safe_load(PLAYBOOK.read_text())
    data["settings"]["batch_size"] = data["settings"]["min_batch_size"] = 300
    data["settings"]["max_batch_size"] = 300
    path = tmp_path / "pgbench.yaml"
    path.write_text(yaml.safe_dump(data))
    app = Pgbench(dsn).start()
    try:
        for n in (1, 2):
            assert cli("run", str(n), dsn=dsn, playbook_path=path).returncode == 0
        killed = cli("run", "3", dsn=dsn, playbook_path=path,
                     env={executor.CRASH_AT_ENV: 'UPDATE "public"."pgbench_history"#3'})
        assert killed.returncode == -9, killed.stderr
        cursor = query(dsn, "SELECT cursor FROM _orchestrator.backfills WHERE target LIKE '%%pgbench_history%%'")
        assert cursor and cursor[0][0] is not None  # two batches committed
        resumed = cli("run", "3", dsn=dsn, playbook_path=path)
        assert resumed.returncode == 0, resumed.stderr
        verified = cli("run", "4", dsn=dsn, playbook_path=path)
        assert verified.returncode == 0, verified.stdout + verified.stderr
    finally:
        app.stop()
    assert (app.failed, app.outputs[:2]) == (0, [])
    assert query(dsn, "SELECT count(*) FROM pgbench_history WHERE aid_new IS DISTINCT FROM aid") == [(0,)]


def test_a_column_pgbench_reads_back_widens_through_the_version_views(dsn):
    """abalance becomes bigint while pgbench (-M prepared) reads it back: the old version through its views sees
    integer all along, the new version (after the swap) bigint; neither fails, the balances add up."""
    init_pgbench(dsn)
    data = yaml.safe_load(PLAYBOOK.read_text())
    data["name"] = "pgbench_abalance_to_bigint"
    data["columns"] = [{"table": "pgbench_accounts", "column": "abalance", "type": "bigint",
                        "up": "abalance::bigint", "down": "abalance::integer"}]
    data["app_versions"] = {"old": "pgb_v1", "new": "pgb_v2"}
    orch = Orchestrator(playbook.parse(data), dsn)
    old = Pgbench(dsn, search_path="pgb_v1,public").start()
    new = None
    try:
        for n in range(1, 6):
            assert orch.run(n) == "applied"
        new = Pgbench(dsn, search_path="pgb_v2,public").start()
        old.stop()
        assert orch.contract(old_version_gone=True) == ["contracted"] * 5
    finally:
        old.stop()
        if new is not None:
            new.stop()
        orch.close()
    assert (old.failed, old.outputs[:2]) == (0, []) and new is not None and (new.failed, new.outputs[:2]) == (0, [])
    assert old.transactions > 0 and new.transactions > 0
    a, t, b, delta = balances(dsn)
    assert a == t == b == delta
    assert column_type(dsn, "pgbench_accounts", "abalance") == "bigint"


# pgbench's own transaction writes pgbench_accounts, then pgbench_branches; this one the other way round.
PARENT_FIRST = """\\set aid random(1, 100000)
\\set bid random(1, 1)
\\set delta random(-5000, 5000)
BEGIN;
UPDATE pgbench_branches SET bbalance = bbalance + :delta WHERE bid = :bid;
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
UPDATE pgbench_tellers SET tbalance = tbalance + :delta WHERE tid = 1;
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (1, :bid, :aid, :delta, CURRENT_TIMESTAMP);
END;
"""


@pytest.mark.parametrize("order", ["table-then-parent", "parent-then-table"])
def test_the_copy_swaps_under_four_clients_whatever_order_they_lock_the_parent_in(dsn, tmp_path, order):
    """pgbench -c 4 writes pgbench_accounts and pgbench_branches (the table its foreign key points at) in one
    transaction: the copy's swap, which locks both, gets them within a few attempts in either order, and so does
    the column swap of phase 5; pgbench sees no failure."""
    init_pgbench(dsn)
    data = yaml.safe_load(PLAYBOOK.read_text())
    data["name"] = "pgbench_abalance_to_bigint"
    data["columns"] = [{"table": "pgbench_accounts", "column": "abalance", "type": "bigint",
                        "up": "abalance::bigint", "down": "abalance::integer"}]
    data["settings"].update(backfill_method="copy", lock_timeout_ms=50, retries=6)
    # pgbench reads abalance back (-M prepared): it is the old version, through its views, or phase 5's type
    # change fails its prepared SELECT ("cached plan must not change result type").
    data["app_versions"] = {"old": "pgb_v1", "new": "pgb_v2"}
    script = None
    if order == "parent-then-table":
        script = str(tmp_path / "parent_first.sql")
        (tmp_path / "parent_first.sql").write_text(PARENT_FIRST)
    orch = Orchestrator(playbook.parse(data), dsn)
    app = Pgbench(dsn, clients=4, script=script, search_path="pgb_v1,public")
    try:
        assert [orch.run(n) for n in (1, 2)] == ["applied"] * 2
        app.start()
        assert [orch.run(n) for n in (3, 4, 5)] == ["applied"] * 3
    finally:
        app.stop()
        orch.close()
    assert (app.failed, app.outputs[:2]) == (0, []), "\n".join(app.outputs[:2])
    assert app.transactions > 0
    a, t, b, delta = balances(dsn)
    assert a == t == b == delta
    assert column_type(dsn, "pgbench_accounts", "abalance") == "bigint"
