"""Footprint settings (issue 16): index builds after the backfill, and an online VACUUM between batch ranges.

Each keeps every guarantee of the phases (order, rollback, contract, the final schema) and does what it says:
the builds move from phase 1 to phase 3 (and `plan` shows them there), and the table stops doubling."""

from __future__ import annotations

import secrets

import psycopg
import pytest

from orchestrator.engine import executor
from orchestrator.lab import server
from orchestrator.run.runner import Orchestrator

from . import helpers
from .helpers import query, reference_dict, seed_chatter, write_playbook
from .helpers import run_steps as run
from .test_reliability_support import orch_cli

NEW_INDEXES = {"workflow_templates": {"ix_workflow_templates_workflow_type_ecnew", "ix_workflow_templates_is_dynamic",
                                      "ix_workflow_templates_execution_pattern"},
               "template_specs": {"ix_template_specs_workflow_type_ecnew"}}
DEFER = {"settings.indexes_after_backfill": True}


def real_playbook(**overrides):
    """The reference playbook with its phase 3 in place: the settings tested here are the in-place backfill's
    (the reference playbook's copy: tests/test_copy_backfill.py)."""
    return helpers.real_playbook(**{"settings.backfill_method": "update", **overrides})

REINDEX = {"settings.reindex_on_contract": True}


def valid_indexes(dsn: str) -> dict[str, set[str]]:
    rows = query(dsn, """SELECT c.relname, i.relname FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
                         JOIN pg_class c ON c.oid = x.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace
                         WHERE n.nspname = 'public' AND x.indisvalid""")
    out: dict[str, set[str]] = {}
    for table, index in rows:
        out.setdefault(table, set()).add(index)
    return out


def ours_present(dsn: str) -> set[str]:
    have = valid_indexes(dsn)
    return {ix for t, names in NEW_INDEXES.items() for ix in names if ix in have.get(t, set())}


def index_defs(dsn: str) -> list[tuple]:
    return query(dsn, "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' "
                      "ORDER BY 1, 2")


def test_plan_shows_the_index_builds_in_phase_3_with_indexes_after_backfill(dsn):
    seed_chatter(dsn, 200)
    for settings, where in (({}, 1), (DEFER, 3)):
        o = Orchestrator(real_playbook(**settings), dsn, dry_run=True)
        try:
            plans = {p.phase.number: p for p in o.plan()}
        finally:
            o.close()
        builds = {n: [r.sql for r in p.expand if "CREATE INDEX CONCURRENTLY" in r.sql] for n, p in plans.items()}
        assert len(builds[where]) == 4, builds
        assert all(not v for n, v in builds.items() if n != where), builds
    o = Orchestrator(real_playbook(**REINDEX), dsn, dry_run=True)
    try:  # with reindex_on_contract, contract 3 shows its rebuilds; no other step does
        rebuilds = {p.phase.number: [r.sql for r in p.contract if "REINDEX" in r.sql] for p in o.plan()}
    finally:
        o.close()
    assert len(rebuilds[3]) == 2 and all(not v for n, v in rebuilds.items() if n != 3), rebuilds


def test_indexes_after_backfill_phase_1_leaves_them_phase_3_builds_them_rollback_and_contract_hold(dsn, pg_server):
    seed_chatter(dsn, 2000)
    pb = real_playbook(**DEFER)
    run(pb, dsn, 1, 2)
    assert ours_present(dsn) == set()  # phase 1 built none: the batches maintain fewer indexes
    run(pb, dsn, 3)
    assert ours_present(dsn) == set().union(*NEW_INDEXES.values())
    run(pb, dsn, "rollback 3")  # what phase 3 built goes with it: back to phase 2's state
    assert ours_present(dsn) == set()
    run(pb, dsn, 3, 4, 5, 6, "contract")
    # The same schema, index for index, as the default order gives on an identical database.
    other = server.create_database(pg_server.dsn, f"t_{secrets.token_hex(6)}")
    try:
        seed_chatter(other, 2000)
        run(real_playbook(), other, 1, 2, 3, 4, 5, 6, "contract")
        assert index_defs(dsn) == index_defs(other)
    finally:
        server.drop_database(pg_server.dsn, psycopg.conninfo.conninfo_to_dict(other)["dbname"])
    assert query(dsn, "SELECT count(*) FROM workflow_templates WHERE workflow_type IS NULL")[0][0] == 0


def test_rollback_of_phase_1_after_a_deferred_build_leaves_nothing(dsn):
    seed_chatter(dsn, 500)
    pb = real_playbook(**DEFER)
    run(pb, dsn, 1, 2, 3, "rollback 3", "rollback 2", "rollback 1")
    assert ours_present(dsn) == set()
    assert query(dsn, "SELECT count(*) FROM information_schema.columns WHERE column_name IN "
                      "('workflow_type_new', 'is_dynamic', 'execution_pattern')")[0][0] == 0


def _backfilled_table_size(dsn: str, settings: dict) -> tuple[int, int, list[str]]:
    seed_chatter(dsn, 3000)
    with psycopg.connect(dsn, autocommit=True) as c:
        for t in ("workflow_templates", "template_specs"):
            c.execute(f"ALTER TABLE {t} SET (autovacuum_enabled = off)")
            c.execute(f"VACUUM (FREEZE) {t}")
    pb = real_playbook(**{"settings.batch_size": 200, "settings.min_batch_size": 200,
                          "settings.max_batch_size": 200, **settings})
    run(pb, dsn, 1, 2, 3)
    size = query(dsn, "SELECT pg_relation_size('workflow_templates')")[0][0]
    log = [r[0] for r in query(dsn, "SELECT statement FROM _orchestrator.run_log WHERE statement LIKE 'VACUUM%%' "
                                    "AND outcome = 'ok' ORDER BY id")]
    vacuums = sum(1 for s in log if '"workflow_templates"' in s)
    return size, vacuums, log


def test_vacuum_every_rows_lets_later_batches_reuse_the_space(dsn, pg_server):
    with_vacuum, vacuums, log = _backfilled_table_size(dsn, {"settings.vacuum_every_rows": 500})
    assert vacuums == 5, log  # once 500 rows were walked since the last one, in whole batches of 200: at 600, ..., 3000
    assert all("TRUNCATE false" in s for s in log), log  # never the ACCESS EXCLUSIVE of a truncation
    other = server.create_database(pg_server.dsn, f"t_{secrets.token_hex(6)}")
    try:
        without, none, _ = _backfilled_table_size(other, {})
    finally:
        server.drop_database(pg_server.dsn, psycopg.conninfo.conninfo_to_dict(other)["dbname"])
    assert none == 0
    # Without it every row's old version stays: the table about doubles. With it, it grows by about one range.
    assert with_vacuum < 0.75 * without, (with_vacuum, without)


def test_wal_compression_the_server_lacks_is_skipped_not_fatal(dsn):
    methods = query(dsn, "SELECT enumvals FROM pg_settings WHERE name = 'wal_compression'")[0][0]
    missing = next((m for m in ("lz4", "zstd") if m not in methods), None)
    seed_chatter(dsn, 300)
    pb = real_playbook(**{"settings.wal_compression": missing or "pglz"})
    run(pb, dsn, 1, 2, 3)  # a method this server was built without: a warning, the backfill goes on uncompressed
    assert query(dsn, "SELECT count(*) FROM workflow_templates WHERE workflow_type_new IS NULL")[0][0] == 0
    assert query(dsn, "SELECT bool_and(finished_at IS NOT NULL) FROM _orchestrator.backfills")[0][0] is True



def index_oids(dsn: str) -> dict[str, int]:
    return dict(query(dsn, """SELECT i.relname, i.oid::int FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
                              WHERE x.indrelid IN ('workflow_templates'::regclass, 'template_specs'::regclass)"""))


def index_bytes(dsn: str) -> int:
    return query(dsn, "SELECT pg_indexes_size('workflow_templates') + pg_indexes_size('template_specs')")[0][0]


def test_reindex_on_contract_packs_every_index_again_and_keeps_what_they_enforce(dsn, pg_server):
    """Contract 3 rebuilds each index of both tables (REINDEX INDEX CONCURRENTLY): new storage, the same names
    and definitions, the primary keys and foreign keys still enforced, and the indexes smaller than the
    backfill left them; with the setting off, contract 3 touches no index."""
    seed_chatter(dsn, 3000)
    pb = real_playbook(**REINDEX)
    run(pb, dsn, 1, 2, 3, 4, 5, 6)
    before, defs, bloated = index_oids(dsn), index_defs(dsn), index_bytes(dsn)
    o = Orchestrator(pb, dsn)
    try:
        assert o.contract(1) == ["contracted"] and o.contract(2) == ["contracted"] and o.contract(3) == ["contracted"]
        details = o.state.details(3)
    finally:
        o.close()
    after = index_oids(dsn)
    retired = {n for n in before if n.endswith("_ecold")}  # the swap's contract drops them: not rebuilt
    assert retired and set(after) == set(before)
    assert all(after[n] != before[n] for n in set(before) - retired), "an index was not rebuilt"
    assert all(after[n] == before[n] for n in retired)
    assert index_defs(dsn) == defs
    assert index_bytes(dsn) < bloated
    assert sorted(details["reindexed"]["workflow_templates.workflow_type"]) == sorted(
        n for n in before if n not in retired and n in valid_indexes(dsn)["workflow_templates"])
    with psycopg.connect(dsn) as c:  # the rebuilt primary key still enforces, and the foreign key still uses it
        for bad in ("INSERT INTO workflow_templates SELECT * FROM workflow_templates LIMIT 1",
                    "UPDATE workflow_templates SET base_template_id = 'no_such_template' WHERE id IN "
                    "(SELECT id FROM workflow_templates LIMIT 1)"):
            try:
                c.execute(bad)
            except (psycopg.errors.UniqueViolation, psycopg.errors.ForeignKeyViolation):
                c.rollback()
            else:
                raise AssertionError(f"not refused: {bad}")
    run(pb, dsn, "contract")
    assert query(dsn, "SELECT count(*) FROM pg_index WHERE NOT indisvalid")[0][0] == 0

    other = server.create_database(pg_server.dsn, f"t_{secrets.token_hex(6)}")
    try:
        seed_chatter(other, 300)
        run(real_playbook(), other, 1, 2, 3, 4, 5, 6)
        kept = index_oids(other)
        o = Orchestrator(real_playbook(), other)
        try:
            o.contract(1), o.contract(2), o.contract(3)
        finally:
            o.close()
        assert index_oids(other) == kept
    finally:
        server.drop_database(pg_server.dsn, psycopg.conninfo.conninfo_to_dict(other)["dbname"])


def test_reindex_drops_an_invalid_copy_a_stopped_rebuild_left_and_a_rerun_goes_on(dsn, tmp_path):
    """A rebuild stopped part-way leaves `<name>_ccnew` INVALID: the next attempt drops it first. A re-run of
    contract 3 after a kill goes on from the indexes recorded as rebuilt (not rebuilt again)."""
    seed_chatter(dsn, 500)
    pb = real_playbook(**REINDEX)
    run(pb, dsn, 1, 2, 3, 4, 5, 6)
    o = Orchestrator(pb, dsn)
    try:
        o.contract(1), o.contract(2)
    finally:
        o.close()
    # What a REINDEX CONCURRENTLY stopped by a lock timeout leaves: an INVALID copy named <name>_ccnew (here made
    # INVALID by a unique build that fails on duplicates: the same catalog state).
    leftover = "ix_workflow_templates_owner_id_ccnew"
    with psycopg.connect(dsn, autocommit=True) as c:
        with pytest.raises(psycopg.errors.UniqueViolation):
            c.execute(f"CREATE UNIQUE INDEX CONCURRENTLY {leftover} ON workflow_templates (is_builtin)")
    before = index_oids(dsn)
    assert leftover in before
    data = reference_dict()
    data.setdefault("settings", {})["reindex_on_contract"] = True
    path = write_playbook(data, tmp_path / "pb.yaml")
    killed = orch_cli(dsn, path, "contract", "3", "--yes", env={executor.CRASH_AT_ENV: "REINDEX INDEX CONCURRENTLY#3"})
    assert killed.returncode != 0
    o = Orchestrator(pb, dsn)
    try:
        recorded = o.state.details(3)["reindexed"]["workflow_templates.workflow_type"]
    finally:
        o.close()
    middle = index_oids(dsn)
    assert len(recorded) == 2 and all(middle[n] != before[n] for n in recorded)
    assert sum(middle.get(n) != before[n] for n in before) == 3 + (leftover not in middle)  # the third: unrecorded
    again = orch_cli(dsn, path, "contract", "3", "--yes")
    assert again.returncode == 0, again.stderr
    after = index_oids(dsn)
    assert leftover not in after  # dropped before its index's rebuild
    assert all(after[n] == middle[n] for n in recorded), "a recorded rebuild was done again"
    assert all(after[n] != before[n] for n in before if n != leftover and not n.endswith("_ecold"))
    assert query(dsn, "SELECT count(*) FROM pg_index WHERE NOT indisvalid")[0][0] == 0


@pytest.mark.parametrize("blocker", ["SHARE UPDATE EXCLUSIVE", "old snapshot"])
def test_a_blocked_rebuild_gives_up_cleanly_without_stalling_the_app(dsn, tmp_path, blocker):
    """Contract 3's REINDEX blocked past the online lock timeout (a VACUUM-like lock on the table, or a report's
    old snapshot, which the rebuild waits for after creating its INVALID copy): exit 3 naming the blocker, the
    app's writes never stalled, no INVALID index and no change left; once the blocker is gone it completes."""
    from orchestrator.lab.snapshot import snapshot_diff

    from .helpers import seed, snapshot
    from .test_reliability_support import (
        FORWARD,
        SETTINGS,
        AppWriter,
        Blocker,
        error_line,
        in_process,
        load_playbook,
        playbook_file,
    )
    seed(dsn, rows=500)
    path = playbook_file(tmp_path / "pb.yaml", **SETTINGS, **REINDEX)
    pb = load_playbook(path)
    for command in [*FORWARD[:-1], ("contract", "1"), ("contract", "2")]:
        in_process(dsn, pb, command)
    if blocker == "old snapshot":
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute("CREATE TABLE audit (id int)")
    before = snapshot(dsn)
    if blocker == "old snapshot":
        report = psycopg.connect(dsn, application_name="report")
        report.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        report.execute("SELECT count(*) FROM audit").fetchall()
        pid, release = report.info.backend_pid, lambda: (report.rollback(), report.close())
    else:
        lock = Blocker(dsn, blocker)
        pid, release = lock.pid, lock.release
    app = AppWriter(dsn)
    try:
        app.start()
        r = orch_cli(dsn, path, "contract", "3", "--yes")
    finally:
        worst = app.stop()
        after = snapshot(dsn)
        release()
    line = error_line(r)
    assert r.returncode == 3 and "rebuild index" in line and f"pid {pid}" in line, r.stderr[-1500:]
    assert "INVALID" not in line, line
    assert app.errors == [] and len(app.latencies) > 10, app.errors[:3]
    assert worst < 0.050 + 0.150, f"an app statement waited {worst * 1000:.0f} ms"
    assert snapshot_diff(before, after) == []
    assert query(dsn, "SELECT count(*) FROM pg_index WHERE NOT indisvalid")[0][0] == 0
    again = orch_cli(dsn, path, "contract", "3", "--yes")
    assert again.returncode == 0, again.stderr[-1500:]
