"""Chatter's real schema (both tables using the enum type) with the reference playbook, on each major:
every phase and every rollback under app traffic on both tables, a join between the two columns at every
boundary, the catalog restored exactly after each rollback, and no row lost."""

from __future__ import annotations

import psycopg
import pytest
from psycopg import sql

from orchestrator.lab import chatter
from orchestrator.lab.seed import REFERENCE_MAPPING
from orchestrator.lab.snapshot import snapshot_diff
from orchestrator.lab.traffic import AppTraffic, TrafficReport
from orchestrator.run.runner import Orchestrator

from .helpers import cli, query, real_playbook, reference_dict, seed_chatter, snapshot, write_playbook

TABLES = (chatter.TEMPLATES, chatter.SPECS)
REVERSE = {v: k for k, v in REFERENCE_MAPPING.items()}
JOIN = ("SELECT count(*) FROM (SELECT 1 FROM template_specs s JOIN workflow_templates t "
        "ON s.workflow_type = t.workflow_type LIMIT 1000) x")


def values(dsn: str, table: str) -> dict[str, str]:
    return dict(query(dsn, sql.SQL("SELECT id, workflow_type::text FROM {}").format(sql.Identifier(table))))


def column_type(dsn: str, table: str) -> str:
    return query(dsn, """SELECT format_type(atttypid, atttypmod) FROM pg_attribute
                         WHERE attrelid = %s::regclass AND attname = 'workflow_type'""", (table,))[0][0]


def join_works(dsn: str) -> int:
    """The join the app runs between the two columns: fails if their types ever differ."""
    return query(dsn, JOIN)[0][0]


def expected(original: dict[str, str], written: dict[str, str], new_vocabulary: bool) -> dict[str, str]:
    """What each row must hold: the app's last write, else the original value, in the current vocabulary."""
    out = {**original, **written}
    if new_vocabulary:
        return {k: REFERENCE_MAPPING.get(v, v) for k, v in out.items()}
    return {k: REVERSE.get(v, v) for k, v in out.items()}


def check_rows(dsn: str, original: dict, report, new_vocabulary: bool) -> None:
    for table, written in ((chatter.TEMPLATES, report.written), (chatter.SPECS, report.written_specs)):
        now = values(dsn, table)
        want = expected(original[table], written, new_vocabulary)
        missing = [k for k in want if k not in now]
        assert not missing, f"{table}: rows lost, e.g. {missing[:3]}"
        wrong = {k: (now[k], v) for k, v in want.items() if now[k] != v}
        assert not wrong, f"{table}: {len(wrong)} rows with a wrong value, e.g. {list(wrong.items())[:3]}"


def test_every_phase_and_rollback_under_traffic_on_both_tables(dsn):
    seed_chatter(dsn, rows=3000)
    original = {t: values(dsn, t) for t in TABLES}
    snapshots = {0: snapshot(dsn)}
    orch = Orchestrator(real_playbook(), dsn)
    joins, reports = [], []
    try:
        # Forward through the swap and the seed rows, then every rollback, under traffic on both tables.
        traffic = AppTraffic(dsn, chatter.chatter_names(), writers=2, readers=2, chatter=True, new_only_values=())
        with traffic:
            for k in range(1, 7):
                assert orch.run(k) == "applied"
                joins.append(join_works(dsn))
                if k == 3:  # progress per table, each resumable on its own
                    tables = {b["table"]: b for b in orch.status()["backfill"]}
                    assert set(tables) == {"workflow_templates.workflow_type", "template_specs.workflow_type"}
                    assert all(b["finished_at"] is not None and b["rows_scanned"] > 0 for b in tables.values())
                if k == 5:
                    assert {column_type(dsn, t) for t in TABLES} == {"character varying(50)"}
                    traffic.use_new_app(allow_new_only=False)
                snapshots[k] = snapshot(dsn)
            for k in range(6, 0, -1):
                if k == 5:
                    traffic.use_old_app()
                assert orch.rollback(k) == "rolled back"
                joins.append(join_works(dsn))
                diff = snapshot_diff(snapshots[k - 1], snapshot(dsn))
                assert diff == [], f"rollback {k} left the catalog changed: {diff[:5]}"
                if k == 5:
                    assert {column_type(dsn, t) for t in TABLES} == {"workflowtype"}
        reports.append(traffic.stop())
        assert query(dsn, "SELECT count(*) FROM workflow_templates WHERE id LIKE '%%_builtin'") == [(0,)]
        check_rows(dsn, original, reports[0], new_vocabulary=False)
        # Forward again, through the contract.
        traffic = AppTraffic(dsn, chatter.chatter_names(), writers=2, readers=2, chatter=True, new_only_values=(),
                             seed=1)
        with traffic:
            for k in range(1, 7):
                assert orch.run(k) == "applied"
                joins.append(join_works(dsn))
                if k == 5:
                    traffic.use_new_app(allow_new_only=False)
            assert orch.contract(old_version_gone=True) == ["contracted"] * 6
            joins.append(join_works(dsn))
        reports.append(traffic.stop())
    finally:
        orch.close()
    for report in reports:
        assert report.errors == [], report.errors[:5]
        assert report.by_kind().get("join", 0) > 0
    assert all(j > 0 for j in joins)
    assert {column_type(dsn, t) for t in TABLES} == {"character varying(50)"}
    assert query(dsn, "SELECT count(*) FROM pg_type WHERE typname = 'workflowtype'") == [(0,)]
    assert sorted(r[0] for r in query(dsn, "SELECT id FROM workflow_templates WHERE owner_id = 'system'")) == [
        "advanced_chat_builtin", "function_chat_builtin", "rag_chat_builtin", "simple_chat_builtin"]
    both = TrafficReport(samples=[], written={**reports[0].written, **reports[1].written},
                         written_specs={**reports[0].written_specs, **reports[1].written_specs})
    check_rows(dsn, original, both, new_vocabulary=True)


def test_a_playbook_omitting_a_column_of_the_type_is_refused(dsn, tmp_path):
    seed_chatter(dsn, rows=50)
    data = reference_dict()
    data["columns"] = data["columns"][:1]  # workflow_templates only: template_specs still uses the type
    path = write_playbook(data, tmp_path / "one_table.yaml")
    before = snapshot(dsn)
    r = cli("run", "1", dsn=dsn, playbook_path=path)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "template_specs.workflow_type" in r.stderr, r.stderr
    assert snapshot(dsn) == before
    assert query(dsn, "SELECT to_regnamespace('_orchestrator') IS NULL") == [(True,)]
    # Keeping the type is the way to migrate one of its columns alone.
    data["settings"]["drop_enum_type"] = False
    r = cli("run", "1", "--dry-run", dsn=dsn, playbook_path=write_playbook(data, tmp_path / "keep.yaml"))
    assert r.returncode == 0, r.stderr


def test_a_built_in_row_the_table_would_reject_is_refused_before_phase_1(dsn):
    seed_chatter(dsn, rows=50)
    with psycopg.connect(dsn) as conn:
        conn.execute("DELETE FROM users WHERE id = %s", (chatter.SYSTEM_USER,))
    before = snapshot(dsn)
    orch = Orchestrator(real_playbook(), dsn)
    try:
        with pytest.raises(Exception) as err:
            orch.run(1)
    finally:
        orch.close()
    text = str(err.value)
    assert "columns[0].seed_rows.rows[0]" in text and "simple_chat_builtin" in text
    assert "owner_id" in text and "workflow_templates_owner_id_fkey" in text, text
    assert snapshot(dsn) == before


def test_the_swap_changes_both_tables_in_one_transaction(dsn):
    """Between the swap's statements nothing sees one column varchar and the other enum: a session that
    reads both types while the swap runs sees either both old or both new."""
    seed_chatter(dsn, rows=200)
    orch = Orchestrator(real_playbook(), dsn)
    try:
        for k in range(1, 5):
            orch.run(k)
        seen = set()
        import threading
        stop = threading.Event()

        def watch():
            with psycopg.connect(dsn, autocommit=True) as conn:
                while True:  # one read after the swap returned too, however the threads were scheduled
                    last = stop.is_set()
                    seen.add(tuple(r[0] for r in conn.execute(
                        """SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attname = 'workflow_type'
                           AND attrelid IN ('workflow_templates'::regclass, 'template_specs'::regclass)
                           ORDER BY attrelid::regclass::text""").fetchall()))
                    if last:
                        return
        t = threading.Thread(target=watch)
        t.start()
        orch.run(5)
        stop.set()
        t.join()
    finally:
        orch.close()
    assert seen <= {("workflowtype", "workflowtype"), ("character varying(50)", "character varying(50)")}, seen
    assert ("character varying(50)", "character varying(50)") in seen


def test_a_refused_rollback_of_phase_1_changes_no_table(dsn):
    """The refusal (app-written values in a new column of workflow_templates) comes before any table loses its
    columns: template_specs, rolled back first, must keep its shadow column too."""
    seed_chatter(dsn, rows=100)
    orch = Orchestrator(real_playbook(), dsn)
    try:
        orch.run(1)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("UPDATE workflow_templates SET is_dynamic = true WHERE id = (SELECT min(id) FROM "
                         "workflow_templates)")
        before = snapshot(dsn)
        with pytest.raises(Exception, match="nothing was changed"):
            orch.rollback(1)
        assert snapshot_diff(before, snapshot(dsn)) == []
        assert [p["status"] for p in orch.status()["phases"]][0] == "applied"
    finally:
        orch.close()
