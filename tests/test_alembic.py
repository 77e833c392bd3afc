"""Alembic-native playbooks (issue 5): every phase is a revision in revisions/, on a real server.

Runs on Chatter's real schema (orchestrator.chatter: users, workflow_templates and template_specs, both using the
enum `workflowtype`) with the reference playbook, which migrates both columns. `alembic upgrade head` reaches the
final schema of both tables, step-by-step downgrades restore the original one exactly, the CLI and Alembic can be
mixed freely, the files follow the playbook, and the chain sits beside an app's history. The simplified one-table
fixture only serves the test of the one-column playbook shape.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from alembic import command
from alembic.config import Config
from alembic.util import CommandError
from psycopg import sql
from typer.testing import CliRunner

from orchestrator import revisions as ec
from orchestrator.console.cli import app
from orchestrator.engine.playbook import load
from orchestrator.engine.state import APPLIED, CONTRACTED, PENDING
from orchestrator.lab import chatter
from orchestrator.lab.seed import REFERENCE_MAPPING, SeedNames, create_seed_schema, insert_rows
from orchestrator.lab.snapshot import ignoring_column_order, schema_snapshot, snapshot_diff
from orchestrator.run import runner
from orchestrator.run.runner import Orchestrator

ROOT = Path(__file__).resolve().parents[1]
INI = ROOT / "alembic.ini"
PLAYBOOK = ROOT / "playbooks" / "workflow_type_enum_to_varchar.yaml"
PB = load(PLAYBOOK)
STEPS = ec.chain(PB)
EXPAND = [s.revision for s in STEPS if s.action == "expand"]
CONTRACT = [s.revision for s in STEPS if s.action == "contract"]
SIMPLE_PLAYBOOK = ROOT / "tests" / "playbooks" / "simple_table.yaml"
TABLES = [chatter.TEMPLATES, chatter.SPECS]
ROWS = 400                      # workflow_templates rows; template_specs gets ROWS // 4
SPEC_ROWS = ROWS // 4
SEEDS = {m.table.name: [r["id"] for r in m.seed_rows.rows] for m in PB.migrations if m.seed_rows.rows}
SEED_IDS = SEEDS[chatter.TEMPLATES]
ORCHESTRATOR_BIN = Path(sys.executable).with_name("orchestrator")


# -- helpers ------------------------------------------------------------------------------------------------
@pytest.fixture
def seeded(dsn):
    """Chatter's real schema with ROWS templates and SPEC_ROWS specs, every label on both tables."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        chatter.create_chatter_schema(conn)
        chatter.insert_chatter_rows(conn, ROWS, SPEC_ROWS)
    return dsn


@pytest.fixture
def simple_seeded(dsn):
    """The simplified one-table fixture, for the one-column playbook shape."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        create_seed_schema(conn, SeedNames(), enum_default="plain")
        insert_rows(conn, ROWS)
    return dsn


def config(dsn: str, ini: Path = INI) -> Config:
    cfg = Config(str(ini))
    cfg.attributes["dsn"] = dsn
    cfg.attributes["configure_logger"] = False
    return cfg


def version_rows(dsn: str) -> list[str] | None:
    """alembic_version as stored, read directly (None: no version table)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        if not conn.execute("SELECT to_regclass('alembic_version') IS NOT NULL").fetchone()[0]:
            return None
        return sorted(r[0] for r in conn.execute("SELECT version_num FROM alembic_version"))


def statuses(dsn: str, pb=PB) -> list[str]:
    orch = Orchestrator(pb, dsn)
    try:
        return [p["status"] for p in orch.status()["phases"]]
    finally:
        orch.close()


def snapshot(dsn: str) -> dict:
    """The public schema without Alembic's own bookkeeping table (which stays, empty, at base)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        snap = schema_snapshot(conn, "public")
    for key, items in snap.items():
        if isinstance(items, list):
            snap[key] = [i for i in items if "alembic_version" not in (i.get("name"), i.get("table"))
                         and not i.get("name", "").startswith("alembic_version_")]
    return snap


def values(dsn: str, tables: list[str] = TABLES) -> dict[str, dict[str, str]]:
    """table -> {id: workflow_type as text}, for every migrated table."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        return {t: dict(conn.execute(sql.SQL("SELECT id, {}::text FROM {}").format(
            sql.Identifier("workflow_type"), sql.Identifier("public", t))).fetchall()) for t in tables}


def alembic_cli(dsn: str, *args: str, ini: Path = INI) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    return subprocess.run([sys.executable, "-m", "alembic", "-c", str(ini), "-x", f"dsn={dsn}", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def orchestrator_cli(dsn: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "ALEMBIC_CONFIG")}
    return subprocess.run([str(ORCHESTRATOR_BIN), "--dsn", dsn, "--playbook", str(PLAYBOOK), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def orchestrator_cli_json(dsn: str, *args: str) -> str:
    proc = orchestrator_cli(dsn, *args)
    ok(proc)
    return proc.stdout


def columns(snap: dict, table: str = "workflow_templates") -> dict[str, dict]:
    (t,) = [t for t in snap["tables"] if t["name"] == table]
    return {c["name"]: c for c in t["columns"]}


# -- the chain ------------------------------------------------------------------------------------------------
def test_chain_is_stable_and_ordered():
    assert len(STEPS) == 12 and [s.action for s in STEPS] == ["expand"] * 6 + ["contract"] * 6
    assert [s.phase for s in STEPS] == [1, 2, 3, 4, 5, 6] * 2
    assert [s.down_revision for s in STEPS] == [None] + [s.revision for s in STEPS[:-1]]
    assert all(s.revision.startswith("ec_") and len(s.revision) == 13 for s in STEPS)
    assert len({s.revision for s in STEPS}) == 12
    assert ec.chain(load(PLAYBOOK)) == STEPS  # derived from (playbook name, step) only
    assert STEPS[2].message == "workflow_type_enum_to_varchar phase 3: backfill the shadow column in batches"


def test_history_lists_the_phases_with_readable_messages():
    out = ok(subprocess.run([sys.executable, "-m", "alembic", "-c", str(INI), "history"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120))
    for s in STEPS:
        assert s.message in out
    assert "workflow_type_enum_to_varchar phase 1: add the shadow column, the new columns and their indexes" in out
    assert "workflow_type_enum_to_varchar phase 5: swap the columns" in out
    assert "<base> -> " + EXPAND[0] in out
    heads = ok(subprocess.run([sys.executable, "-m", "alembic", "-c", str(INI), "heads"], cwd=ROOT,
                              capture_output=True, text=True, timeout=120))
    assert heads.split() == [CONTRACT[-1], "(workflow_type_enum_to_varchar)", "(head)"]


# -- alembic upgrade / downgrade on a real server ------------------------------------------------------------
def test_upgrade_head_reaches_the_final_schema(seeded):
    dsn = seeded
    before = values(dsn)
    assert {t: len(v) for t, v in before.items()} == {chatter.TEMPLATES: ROWS, chatter.SPECS: SPEC_ROWS}
    assert {t: set(v.values()) for t, v in before.items()} == {t: set(chatter.LABELS) for t in TABLES}
    command.upgrade(config(dsn), "head")

    assert version_rows(dsn) == [CONTRACT[-1]]
    assert statuses(dsn) == [CONTRACTED] * 6
    snap = snapshot(dsn)
    for table in TABLES:                      # both columns of the enum type: varchar(50), no leftovers
        cols = columns(snap, table)
        # nullable, as the seed made it (target.nullable: true in the reference playbook)
        assert cols["workflow_type"]["type"] == "character varying(50)" and not cols["workflow_type"]["not_null"], table
        assert "workflow_type_new" not in cols and "workflow_type_old" not in cols, table
        assert [i["name"] for i in snap["indexes"] if i["table"] == table and "workflow_type" in i["definition"]
                ] == [f"ix_{table}_workflow_type"], table
    tmpl = columns(snap, chatter.TEMPLATES)   # the extra columns go to workflow_templates only
    assert tmpl["is_dynamic"]["type"] == "boolean" and tmpl["is_dynamic"]["not_null"]
    assert tmpl["execution_pattern"]["type"] == "character varying(100)"
    assert "is_dynamic" not in columns(snap, chatter.SPECS) and "execution_pattern" not in columns(snap, chatter.SPECS)
    assert [e["name"] for e in snap["enums"]] == [chatter.CATEGORY_ENUM]  # workflowtype dropped, the other kept
    assert not any(t["name"].startswith(("_ec_", "~ec_")) for t in snap["triggers"])
    assert not any(f["name"].startswith("_ec_") for f in snap["functions"])

    after = values(dsn)
    for table in TABLES:                      # every row of both tables mapped
        assert {k: after[table][k] for k in before[table]} == {
            k: REFERENCE_MAPPING[v] for k, v in before[table].items()}, table
    assert set(after[chatter.TEMPLATES]) == set(before[chatter.TEMPLATES]) | set(SEED_IDS)
    assert set(after[chatter.SPECS]) == set(before[chatter.SPECS])  # no seed rows for template_specs
    with psycopg.connect(dsn, autocommit=True) as conn:  # the built-in templates, owned by the system user
        builtins = conn.execute(sql.SQL(
            "SELECT id, {}, owner_id, is_builtin, execution_pattern, is_dynamic FROM {} WHERE id = ANY(%s) "
            "ORDER BY id").format(sql.Identifier("workflow_type"), sql.Identifier("public", chatter.TEMPLATES)),
            (SEED_IDS,)).fetchall()
        assert builtins == sorted((r["id"], r["workflow_type"], chatter.SYSTEM_USER, True, "chat", False)
                                  for m in PB.migrations for r in m.seed_rows.rows)
        assert conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE {} IS DISTINCT FROM 'chat'").format(
            sql.Identifier("public", chatter.TEMPLATES), sql.Identifier("execution_pattern"))).fetchone()[0] == 0

    # head again: nothing to do; one contract revision down undoes that contract step, and up does it again
    command.upgrade(config(dsn), "head")
    assert version_rows(dsn) == [CONTRACT[-1]] and statuses(dsn) == [CONTRACTED] * 6
    command.downgrade(config(dsn), "-1")
    assert version_rows(dsn) == [CONTRACT[-2]] and statuses(dsn) == [CONTRACTED] * 5 + [APPLIED]
    command.upgrade(config(dsn), "head")
    assert version_rows(dsn) == [CONTRACT[-1]] and statuses(dsn) == [CONTRACTED] * 6
    assert snapshot(dsn) == snap


def old_version_quiet_since(dsn: str, seconds: int) -> None:
    """What `orchestrator contract --old-version-gone` says, for the Alembic path: the old version's last write
    (app_versions) was `seconds` ago."""
    from orchestrator.kinds.phases import versions
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("SELECT setval({}::regclass, extract(epoch FROM now())::bigint - %s)").format(
            sql.Literal(versions.sequence(PB).as_string(conn))), (seconds,))


def test_downgrade_base_from_head_restores_the_original_and_upgrade_head_runs_again(seeded):
    """The seed's "complete downgrade path to restore the enum": after the contract, `alembic downgrade base`
    undoes every contract step (the swap's is an online reverse migration) and then every phase, revision by
    revision, with alembic_version and the state table in step, under app traffic on both tables; then
    `upgrade head` runs it all again."""
    from orchestrator.lab.traffic import AppTraffic, TrafficReport

    from .test_real_schema import check_rows

    dsn = seeded
    before, original = snapshot(dsn), values(dsn)
    reports = []
    traffic = AppTraffic(dsn, chatter.chatter_names(), writers=2, readers=1, chatter=True, new_only_values=())
    with traffic:
        command.upgrade(config(dsn), EXPAND[4])  # through the swap: the app moves to the new column
        traffic.use_new_app(allow_new_only=False)
        old_version_quiet_since(dsn, 400)  # the rolling deploy finished long enough ago for the contract
        command.upgrade(config(dsn), "head")
        assert statuses(dsn) == [CONTRACTED] * 6
        for n in range(6, 0, -1):  # each contract revision down: that contract step undone
            command.downgrade(config(dsn), "-1")
            assert version_rows(dsn) == [CONTRACT[n - 2] if n > 1 else EXPAND[-1]]
            assert statuses(dsn) == [CONTRACTED] * (n - 1) + [APPLIED] * (7 - n)
        command.downgrade(config(dsn), EXPAND[4])  # the built-in rows go; the app moves back before the swap back
        traffic.use_old_app()
        command.downgrade(config(dsn), "base")
    reports.append(traffic.stop())
    assert version_rows(dsn) == [] and statuses(dsn) == [PENDING] * 6
    after = snapshot(dsn)
    assert ignoring_column_order(after) == ignoring_column_order(before), "\n".join(snapshot_diff(
        ignoring_column_order(before), ignoring_column_order(after)))
    check_rows(dsn, original, reports[0], new_vocabulary=False)

    traffic = AppTraffic(dsn, chatter.chatter_names(), writers=2, readers=1, chatter=True, new_only_values=(), seed=1)
    with traffic:
        command.upgrade(config(dsn), EXPAND[4])
        traffic.use_new_app(allow_new_only=False)
        old_version_quiet_since(dsn, 400)
        command.upgrade(config(dsn), "head")
    reports.append(traffic.stop())
    assert version_rows(dsn) == [CONTRACT[-1]] and statuses(dsn) == [CONTRACTED] * 6
    assert {c["type"] for t in TABLES for n, c in columns(snapshot(dsn), t).items() if n == "workflow_type"} == {
        "character varying(50)"}
    for report in reports:
        assert report.errors == [], report.errors[:5]
    both = TrafficReport(samples=[], written={**reports[0].written, **reports[1].written},
                         written_specs={**reports[0].written_specs, **reports[1].written_specs})
    check_rows(dsn, original, both, new_vocabulary=True)


def test_downgrade_step_by_step_restores_the_original_schema(seeded):
    dsn = seeded
    before, before_values = snapshot(dsn), values(dsn)
    command.upgrade(config(dsn), EXPAND[-1])
    assert version_rows(dsn) == [EXPAND[-1]] and statuses(dsn) == [APPLIED] * 6
    mid = snapshot(dsn)
    for table in TABLES:  # swapped on both tables, the enum column kept as the retired one for the rollback
        cols = columns(mid, table)
        assert cols["workflow_type"]["type"] == "character varying(50)", table
        assert cols["workflow_type_old"]["type"] == "workflowtype", table
    assert set(SEED_IDS) <= set(values(dsn)[chatter.TEMPLATES])

    for n in range(6, 0, -1):
        command.downgrade(config(dsn), "-1")
        assert version_rows(dsn) == ([EXPAND[n - 2]] if n > 1 else [])
        assert statuses(dsn) == [APPLIED] * (n - 1) + [PENDING] * (7 - n)

    after = snapshot(dsn)
    assert after == before, "\n".join(snapshot_diff(before, after))
    assert {t["name"] for t in after["tables"]} >= {chatter.USERS, *TABLES}
    assert values(dsn) == before_values


def test_alembic_holds_no_lock_while_the_orchestrator_works(seeded, monkeypatch):
    """The Alembic connection is idle (autocommit) during a phase: nothing to self-deadlock against."""
    dsn = seeded
    seen: list[list] = []

    def spy(fn):
        def wrapper(self, *args, **kw):
            with psycopg.connect(dsn, autocommit=True) as c:
                seen.append(c.execute(
                    """SELECT a.pid, a.state, l.locktype, l.relation::regclass::text, l.mode
                       FROM pg_stat_activity a LEFT JOIN pg_locks l ON l.pid = a.pid AND l.locktype <> 'virtualxid'
                       WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()
                         AND a.backend_type = 'client backend'
                         AND (l.pid IS NOT NULL OR a.state <> 'idle')""").fetchall())
            return fn(self, *args, **kw)
        return wrapper

    monkeypatch.setattr(Orchestrator, "run", spy(Orchestrator.run))
    monkeypatch.setattr(Orchestrator, "rollback", spy(Orchestrator.rollback))
    command.upgrade(config(dsn), EXPAND[2])
    command.downgrade(config(dsn), "base")
    assert len(seen) == 6
    assert seen == [[]] * 6, seen


# -- mixing the two entry points -----------------------------------------------------------------------------
def test_mixing_cli_and_alembic_stays_consistent(seeded):
    dsn = seeded
    before, before_values = snapshot(dsn), values(dsn)

    ok(orchestrator_cli(dsn, "run", "1"))                         # make phase-1
    ok(alembic_cli(dsn, "upgrade", "+1"))                         # continues with phase 2
    assert statuses(dsn) == [APPLIED, APPLIED] + [PENDING] * 4
    assert version_rows(dsn) == [EXPAND[1]]

    ok(orchestrator_cli(dsn, "rollback", "2"))
    assert statuses(dsn) == [APPLIED] + [PENDING] * 5
    assert EXPAND[0] in ok(alembic_cli(dsn, "current"))
    assert version_rows(dsn) == [EXPAND[0]]

    ok(alembic_cli(dsn, "upgrade", EXPAND[2]))                    # phases 2 and 3 through Alembic
    ok(orchestrator_cli(dsn, "run", "4"))                         # phase 4 through the CLI
    assert statuses(dsn) == [APPLIED] * 4 + [PENDING] * 2
    st = json.loads(orchestrator_cli_json(dsn, "status", "--json"))
    assert [p["status"] for p in st["phases"]] == [APPLIED] * 4 + [PENDING] * 2
    assert st["tables"] == [f"{t}.workflow_type" for t in TABLES]
    assert st["alembic"]["revision"] == st["alembic"]["expected"] == EXPAND[3]  # the CLI adds Alembic's view
    assert st["alembic"]["in_sync"] is True and st["alembic"]["message"] == STEPS[3].message
    assert version_rows(dsn) == [EXPAND[3]]

    ok(alembic_cli(dsn, "downgrade", "base"))                     # 4 (CLI's) .. 1, all through Alembic
    assert statuses(dsn) == [PENDING] * 6
    assert version_rows(dsn) == []
    after = snapshot(dsn)
    assert after == before, "\n".join(snapshot_diff(before, after))
    assert values(dsn) == before_values

    ok(alembic_cli(dsn, "upgrade", "head"))
    assert statuses(dsn) == [CONTRACTED] * 6 and version_rows(dsn) == [CONTRACT[-1]]


def test_the_cli_moves_the_alembic_version_table(seeded):
    """Without any Alembic command in between: the runner calls sync_alembic_version after each step."""
    dsn = seeded
    ok(orchestrator_cli(dsn, "run", "1"))
    assert version_rows(dsn) is None  # a database that never saw Alembic gets no version table from the CLI
    ok(orchestrator_cli(dsn, "rollback", "1"))
    command.stamp(config(dsn), "base")  # now it has one (empty), as an app that uses Alembic would
    assert version_rows(dsn) == []
    ok(orchestrator_cli(dsn, "run", "1"))
    assert version_rows(dsn) == [EXPAND[0]]
    ok(orchestrator_cli(dsn, "run", "2"))
    assert version_rows(dsn) == [EXPAND[1]]
    ok(orchestrator_cli(dsn, "rollback", "2"))
    assert version_rows(dsn) == [EXPAND[0]]
    ok(orchestrator_cli(dsn, "rollback", "1"))
    assert version_rows(dsn) == []


def test_importing_revisions_registers_the_runner_listener(seeded, monkeypatch):
    """The runner knows nothing of Alembic: `import orchestrator.revisions` hooks the sync into every command,
    and `runner.status()` carries no Alembic view (the CLI adds it)."""
    assert ec._after_command in runner.COMMAND_LISTENERS
    assert runner.COMMAND_LISTENERS.count(ec._after_command) == 1
    dsn = seeded
    monkeypatch.setenv("ALEMBIC_CONFIG", str(INI))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    command.stamp(config(dsn), "base")
    orch = Orchestrator(PB, dsn)
    try:
        assert "alembic" not in orch.status()
        for n in range(1, 4):                                   # the runner alone moves alembic_version
            orch.run(n)
            assert version_rows(dsn) == [EXPAND[n - 1]]
        orch.rollback(3)
        assert version_rows(dsn) == [EXPAND[1]]
        st = ec.alembic_status(orch.x.conn, PB, orch.state.phases(), config(dsn))
        assert (st["revision"], st["expected"], st["in_sync"]) == (EXPAND[1], EXPAND[1], True)

        monkeypatch.setattr(runner, "COMMAND_LISTENERS", [])  # without the listener the ledgers drift apart
        orch.run(3)
        assert version_rows(dsn) == [EXPAND[1]]
        st = ec.alembic_status(orch.x.conn, PB, orch.state.phases(), config(dsn))
        assert (st["revision"], st["expected"], st["in_sync"]) == (EXPAND[1], EXPAND[2], False)
    finally:
        orch.close()
    command.upgrade(config(dsn), "+1")  # env.py reconciles first: phase 3 is recorded, then phase 4 runs
    assert version_rows(dsn) == [EXPAND[3]] and statuses(dsn) == [APPLIED] * 4 + [PENDING] * 2


def test_sync_and_status_follow_the_state(seeded):
    dsn = seeded
    cfg = config(dsn)
    orch = Orchestrator(PB, dsn)
    try:
        orch.run(1)
        orch.run(2)
        assert version_rows(dsn) is None  # the runner's sync leaves a database without a version table alone
        assert ec.sync_alembic_version(dsn, PB, config=cfg, raise_errors=True) is None
        res = ec.sync_alembic_version(dsn, PB, config=cfg, create=True, raise_errors=True)
        assert res.after == EXPAND[1] and version_rows(dsn) == [EXPAND[1]]
        orch.rollback(2)
        res = ec.sync_alembic_version(dsn, PB, config=cfg, raise_errors=True)
        assert (res.after, version_rows(dsn)) == (EXPAND[0], [EXPAND[0]])
        assert not ec.sync_alembic_version(dsn, PB, config=cfg, raise_errors=True).changed
        st = ec.alembic_status(orch.x.conn, PB, orch.state.phases(), cfg)
        assert st["revision"] == st["expected"] == EXPAND[0] and st["in_sync"] is True
        assert st["message"] == STEPS[0].message

        with psycopg.connect(dsn, autocommit=True) as c:  # someone stamps by hand: status shows the drift
            c.execute("UPDATE alembic_version SET version_num = %s", (EXPAND[3],))
        st = ec.alembic_status(orch.x.conn, PB, orch.state.phases(), cfg)
        assert (st["revision"], st["expected"], st["in_sync"]) == (EXPAND[3], EXPAND[0], False)
        assert ec.sync_alembic_version(dsn, PB, config=cfg).after == EXPAND[0]
        assert version_rows(dsn) == [EXPAND[0]]
    finally:
        orch.close()


# -- generate / check ----------------------------------------------------------------------------------------
def _project(tmp_path: Path, playbook: Path = PLAYBOOK) -> tuple[Path, Path]:
    (tmp_path / "revisions").mkdir()
    for name in ("env.py", "script.py.mako"):
        shutil.copy(ROOT / "revisions" / name, tmp_path / "revisions" / name)
    (tmp_path / "playbooks").mkdir()
    pb = tmp_path / "playbooks" / playbook.name
    shutil.copy(playbook, pb)
    return tmp_path / "revisions", pb


def _invoke(*args: str):
    result = CliRunner().invoke(app, list(args))
    text = result.output + (getattr(result, "stderr", "") if result.stderr_bytes is not None else "")
    return result.exit_code, text


def test_committed_revisions_match_the_playbook():
    assert ec.check(ROOT / "revisions") == []
    code, text = _invoke("revisions", "check", "--dir", str(ROOT / "revisions"))
    assert code == 0, text


def test_generate_is_a_noop_the_second_time_and_check_catches_an_edit(tmp_path):
    script, pb = _project(tmp_path)
    code, text = _invoke("revisions", "generate", "--playbook", str(pb), "--dir", str(script))
    assert code == 0 and "12 written, 0 unchanged" in text, text
    files = sorted((script / "versions").glob("*.py"))
    assert [f.name for f in files] == sorted(s.filename for s in STEPS)
    # same playbook path relative to the project: byte-identical to the committed files
    for f in files:
        assert f.read_text() == (ROOT / "revisions" / "versions" / f.name).read_text()
    stamp = {f: f.stat().st_mtime_ns for f in files}

    code, text = _invoke("revisions", "generate", "--playbook", str(pb), "--dir", str(script))
    assert code == 0 and "0 written, 12 unchanged, 0 removed" in text, text
    assert {f: f.stat().st_mtime_ns for f in files} == stamp
    assert _invoke("revisions", "check", "--dir", str(script))[0] == 0

    pb.write_text(pb.read_text().replace("batch_size: 5000", "batch_size: 4000"))
    code, text = _invoke("revisions", "check", "--dir", str(script))
    assert code == 1
    assert "edited after the file was generated" in text and "orchestrator revisions generate" in text
    problems = ec.check(script)
    assert len(problems) == 12

    ec.generate(pb, script)
    assert ec.check(script) == []
    assert [s.revision for s in ec.chain(load(pb))] == [s.revision for s in STEPS]  # ids survive an edit

    (script / "versions" / STEPS[3].filename).unlink()
    (script / "versions" / "workflow_type_enum_to_varchar_13_phase7_extra.py").write_text(
        (script / "versions" / STEPS[4].filename).read_text().replace(STEPS[4].revision, "ec_0000000000"))
    problems = ec.check(script)
    assert any("missing" in p and STEPS[3].filename in p for p in problems)
    assert any("stale" in p and "phase7_extra" in p for p in problems)
    res = ec.generate(pb, script)
    assert [p.name for p in res.written] == [STEPS[3].filename] and [p.name for p in res.removed] == [
        "workflow_type_enum_to_varchar_13_phase7_extra.py"]
    assert ec.check(script) == []


def test_a_revision_refuses_a_playbook_edited_after_generation(seeded, tmp_path):
    dsn = seeded
    script, pb = _project(tmp_path)
    ec.generate(pb, script)
    ini = _ini(tmp_path)
    pb.write_text(pb.read_text().replace("batch_size: 5000", "batch_size: 4000"))
    with pytest.raises(CommandError, match="edited after its revisions were generated"):
        command.upgrade(config(dsn, ini), "+1")
    assert statuses(dsn) == [PENDING] * 6


def test_a_one_column_playbook_runs_through_alembic_too(simple_seeded, tmp_path):
    """The old `table`/`column` shape on the simplified table: same chain, one table migrated and restored."""
    dsn = simple_seeded
    script, pb_path = _project(tmp_path, SIMPLE_PLAYBOOK)
    ec.generate(pb_path, script)
    assert ec.check(script) == []
    pb = load(pb_path)
    assert len(pb.migrations) == 1 and pb.tables == [("public", "workflow_templates")]
    assert [s.revision for s in ec.chain(pb)] == [s.revision for s in STEPS]  # ids: playbook name and step only
    ini = _ini(tmp_path)
    before, before_values = snapshot(dsn), values(dsn, ["workflow_templates"])

    command.upgrade(config(dsn, ini), EXPAND[-1])
    assert statuses(dsn, pb) == [APPLIED] * 6 and version_rows(dsn) == [EXPAND[-1]]
    assert columns(snapshot(dsn))["workflow_type"]["type"] == "character varying(50)"
    command.downgrade(config(dsn, ini), "base")
    assert statuses(dsn, pb) == [PENDING] * 6 and version_rows(dsn) == []
    after = snapshot(dsn)
    assert after == before, "\n".join(snapshot_diff(before, after))
    assert values(dsn, ["workflow_templates"]) == before_values

    command.upgrade(config(dsn, ini), "head")
    assert statuses(dsn, pb) == [CONTRACTED] * 6 and version_rows(dsn) == [CONTRACT[-1]]
    snap = snapshot(dsn)
    assert columns(snap)["workflow_type"]["type"] == "character varying(50)" and snap["enums"] == []
    final = values(dsn, ["workflow_templates"])["workflow_templates"]
    assert {k: final[k] for k in before_values["workflow_templates"]} == {
        k: REFERENCE_MAPPING[v] for k, v in before_values["workflow_templates"].items()}
    assert {r["id"] for r in pb.seed_rows.rows} <= set(final)


# -- beside an application's own history ---------------------------------------------------------------------
APP_REVISION = '''"""app: create the things table

Revision ID: app_0001
Revises:
"""
from alembic import op
import sqlalchemy as sa

revision = "app_0001"
down_revision = None
branch_labels = ("app",)
depends_on = None


def upgrade() -> None:
    op.create_table("things", sa.Column("id", sa.Integer, primary_key=True), sa.Column("name", sa.Text))


def downgrade() -> None:
    op.drop_table("things")
'''


def _ini(tmp_path: Path) -> Path:
    ini = tmp_path / "alembic.ini"
    ini.write_text("[alembic]\nscript_location = %(here)s/revisions\npath_separator = os\n")
    return ini


def test_beside_an_application_history(seeded, tmp_path, monkeypatch):
    dsn = seeded
    script, pb = _project(tmp_path)
    monkeypatch.setenv("ALEMBIC_CONFIG", str(tmp_path / "alembic.ini"))  # the app's config, for the runner too
    (script / "versions").mkdir()
    (script / "versions" / "app_0001_create_things.py").write_text(APP_REVISION)
    res = ec.generate(pb, script, depends_on=["app_0001"])
    assert len(res.written) == 12
    root_file = (script / "versions" / STEPS[0].filename).read_text()
    assert "depends_on = 'app_0001'" in root_file and "branch_labels = ('workflow_type_enum_to_varchar',)" in root_file
    assert ec.generate(pb, script).written == []  # the anchor is kept when regenerating without options
    assert ec.check(script) == []
    ini = _ini(tmp_path)
    cfg = lambda: config(dsn, ini)  # noqa: E731

    command.upgrade(cfg(), "app@head")
    before = snapshot(dsn)
    assert "things" in {t["name"] for t in before["tables"]}

    command.upgrade(cfg(), "workflow_type_enum_to_varchar@" + EXPAND[2])
    assert statuses(dsn) == [APPLIED] * 3 + [PENDING] * 3
    orch = Orchestrator(PB, dsn)
    try:
        orch.run(4)                                              # the CLI's way, then the sync the runner does
        assert ec.sync_alembic_version(dsn, PB, config=Config(str(ini)), raise_errors=True).after == EXPAND[3]
    finally:
        orch.close()
    assert EXPAND[3] in version_rows(dsn)

    command.downgrade(cfg(), "workflow_type_enum_to_varchar@base")
    assert statuses(dsn) == [PENDING] * 6
    assert version_rows(dsn) == ["app_0001"]                     # the app's history is untouched
    after = snapshot(dsn)
    assert after == before, "\n".join(snapshot_diff(before, after))

    orch, ini_cfg = Orchestrator(PB, dsn), Config(str(ini))
    try:
        orch.run(1)                                              # from the branch's base, the CLI's way
        assert ec.sync_alembic_version(dsn, PB, config=ini_cfg, raise_errors=True).after == EXPAND[0]
        assert EXPAND[0] in version_rows(dsn)
        orch.rollback(1)
        assert ec.sync_alembic_version(dsn, PB, config=ini_cfg, raise_errors=True).after is None
        assert version_rows(dsn) == ["app_0001"]

        with psycopg.connect(dsn, autocommit=True) as c:         # Alembic no longer knows app_0001 is applied:
            c.execute("DELETE FROM alembic_version")             # recording phase 1 would claim it is
        orch.run(1)                                              # (the runner's own sync logs and gives up)
        with pytest.raises(CommandError, match="depend on app_0001"):
            ec.sync_alembic_version(dsn, PB, config=ini_cfg, raise_errors=True)
        assert version_rows(dsn) == []
        orch.rollback(1)
    finally:
        orch.close()
    command.stamp(cfg(), "app_0001")

    command.upgrade(cfg(), "heads")
    assert statuses(dsn) == [CONTRACTED] * 6
    assert CONTRACT[-1] in version_rows(dsn)


def test_the_anchor_comes_from_the_command_line_the_playbook_or_the_files():
    class WithSection:  # a playbook whose model has the `alembic:` section (branch_label, depends_on)
        name = PB.name
        alembic = type("Spec", (), {"branch_label": "wf", "depends_on": ["app_0001"]})()

    assert ec.resolve_anchor(PB) == ec.Anchor(PB.name, ())
    assert ec.resolve_anchor(WithSection()) == ec.Anchor("wf", ("app_0001",))
    assert ec.resolve_anchor(WithSection(), depends_on=["app_0002"], branch_label="x") == ec.Anchor("x", ("app_0002",))
    assert ec.resolve_anchor(PB, {"branch_label": "kept", "depends_on": ("app_0001",)}) == ec.Anchor(
        "kept", ("app_0001",))
    with pytest.raises(Exception, match="not an Alembic revision"):
        ec.resolve_anchor(PB, depends_on=["x'; DROP"])


def test_a_change_type_playbook_as_revisions_upgrade_head_and_downgrade_base(dsn, tmp_path):
    """The key family (kind change_type) as Alembic revisions: `upgrade head` makes it bigint with its keys,
    foreign keys and sequence; `downgrade base` brings back the integer catalog (the re-added columns last)."""
    from orchestrator.lab import shop
    with psycopg.connect(dsn) as conn:
        shop.create_shop(conn, accounts=300)
    script, pb_path = _project(tmp_path, ROOT / "playbooks" / "account_id_to_bigint.yaml")
    pb_path.write_text(pb_path.read_text().replace("settings:\n", "settings:\n  old_version_quiet_s: 0\n"))
    ec.generate(pb_path, script)
    pb = load(pb_path)
    ini = _ini(tmp_path)
    before = snapshot(dsn)
    command.upgrade(config(dsn, ini), "head")
    assert statuses(dsn, pb) == [CONTRACTED] * 5
    assert columns(snapshot(dsn), "orders")["account_id"]["type"] == "bigint"
    assert query_one(dsn, "SELECT format_type(seqtypid, NULL) FROM pg_sequence "
                          "WHERE seqrelid = 'accounts_id_seq'::regclass") == "bigint"
    command.downgrade(config(dsn, ini), "base")
    assert statuses(dsn, pb) == [PENDING] * 5 and version_rows(dsn) == []
    after = snapshot(dsn)
    assert ignoring_column_order(after) == ignoring_column_order(before), "\n".join(snapshot_diff(before, after))


def query_one(dsn: str, stmt: str):
    with psycopg.connect(dsn) as conn:
        return conn.execute(stmt).fetchone()[0]
