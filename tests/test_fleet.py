"""Fleet rollouts on six real databases: three waves, a target made to fail in wave two, a resume that completes
the fleet, `fleet status --json` checked at each point, gates, inventory validation and no password anywhere."""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from pathlib import Path

import psycopg
import pytest
import yaml
from psycopg.conninfo import make_conninfo

from orchestrator.engine.errors import BadInput
from orchestrator.fleet import inventory
from orchestrator.fleet import rollout as fleet_mod
from orchestrator.lab import server

from .helpers import cli, reference_dict, seed_chatter

SECRET = "fleet-pw-" + secrets.token_hex(4)  # every DSN carries it (the embedded server trusts local users)
FAST = {"retries": 2, "retry_wait_initial_ms": 10, "retry_wait_max_ms": 50, "lock_timeout_ms": 50}


def with_password(dsn: str, url_form: bool) -> str:
    if url_form:
        return dsn.replace("postgres:@", f"postgres:{SECRET}@", 1)
    return make_conninfo(dsn, password=SECRET)


@pytest.fixture
def six(pg_server):
    """Six databases on one server, each with Chatter's schema and rows; DSNs carry a password."""
    names = [f"f_{secrets.token_hex(4)}_{i}" for i in range(1, 7)]
    dsns = []
    for i, name in enumerate(names):
        d = server.create_database(pg_server.dsn, name)
        seed_chatter(d, 300)
        dsns.append(with_password(d, url_form=i % 2 == 0))
    yield dsns
    for name in names:
        server.drop_database(pg_server.dsn, name)


def write_playbook(tmp_path: Path) -> Path:
    data = reference_dict()
    data["environments"] = {"production": {"settings": FAST}, "staging": {"settings": FAST}}
    path = tmp_path / "playbook.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def write_inventory(tmp_path: Path, dsns: list[str], **extra) -> tuple[Path, dict]:
    """t1 is the canary; wave 2 = 40% of the five others (t2, t3); wave 3 = the rest (t4..t6).
    Odd targets read their DSN from an environment variable, even ones have it inline."""
    env, targets = {}, []
    for i, d in enumerate(dsns, 1):
        t = {"name": f"t{i}", "env": "staging" if i == 1 else "production",
             "labels": {"tier": "canary"} if i == 1 else {"region": "eu" if i % 2 else "us"}}
        if i % 2:
            t["dsn_env"] = f"FLEET_T{i}_URL"
            env[f"FLEET_T{i}_URL"] = d
        else:
            t["dsn"] = d
        targets.append(t)
    data = {"playbook": "playbook.yaml", "concurrency": 2, "targets": targets,
            "waves": [{"name": "canary", "select": {"tier": "canary"}}, {"name": "forty", "percent": 40},
                      {"name": "rest", "rest": True}], **extra}
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path, env


def fleet_cli(inv: Path, env: dict, *args: str, tmp_path: Path):
    proc = cli("fleet", "--inventory", str(inv), *args, env={**env, "ORCHESTRATOR_CONTROL_DIR": str(tmp_path / "ctl")})
    for stream in (proc.stdout, proc.stderr):
        assert SECRET not in stream, f"password printed by fleet {args}"
    return proc


def status_json(inv: Path, env: dict, tmp_path: Path) -> dict:
    proc = fleet_cli(inv, env, "status", "--json", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    st = json.loads(proc.stdout)
    return {"summary": st["summary"], **{t["name"]: t for t in st["targets"]}}


def phase_rows(dsn: str) -> dict[int, str] | None:
    """The target's own state table (None: the orchestrator never touched it)."""
    with psycopg.connect(dsn) as conn:
        if conn.execute("SELECT to_regclass('_orchestrator.phases')").fetchone()[0] is None:
            return None
        return dict(conn.execute("SELECT phase, status FROM _orchestrator.phases").fetchall())


def has_column(dsn: str, table: str, column: str) -> bool:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT EXISTS (SELECT FROM pg_attribute WHERE attrelid = to_regclass(%s) "
                            "AND attname = %s AND NOT attisdropped)", (table, column)).fetchone()[0]


def test_canary_rollout_stops_on_a_failing_target_and_resumes(six, tmp_path):
    write_playbook(tmp_path)
    hook_log = tmp_path / "hook.log"
    hook = tmp_path / "hook.py"
    hook.write_text("import os\nopen(%r, 'a').write(os.environ['ORCH_FLEET_WAVE'] + ' ' + "
                    "os.environ['ORCH_FLEET_TARGETS'] + '\\n')\n" % str(hook_log))
    inv, env = write_inventory(tmp_path, six, gates={"hook": [sys.executable, str(hook)], "verify": True})
    t = {f"t{i}": d for i, d in enumerate(six, 1)}

    plan = fleet_cli(inv, env, "plan", "--json", tmp_path=tmp_path)
    assert plan.returncode == 0, plan.stderr
    waves = [[x["name"] for x in w["targets"]] for w in json.loads(plan.stdout)["waves"]]
    assert waves == [["t1"], ["t2", "t3"], ["t4", "t5", "t6"]]

    st = status_json(inv, env, tmp_path)  # before anything: every target reachable, pending
    assert st["summary"]["by_phase"] == {"0": 6} and st["summary"]["reachable"] == 6
    assert {st[n]["state"] for n in t} == {"pending"}

    # t3 (wave two) is made to fail: another session holds its table longer than the lock budget.
    blocker = psycopg.connect(t["t3"])
    blocker.execute("LOCK TABLE workflow_templates IN ACCESS SHARE MODE")
    try:
        first = fleet_cli(inv, env, "run", "6", "--through", "--json", tmp_path=tmp_path)
    finally:
        blocker.rollback()
        blocker.close()
    assert first.returncode == 3, first.stdout + first.stderr
    res = json.loads(first.stdout)
    by = {o["target"]: o for o in res["targets"]}
    assert res["waves_done"] == ["canary"] and res["stopped_at"] == "forty"
    assert by["t1"]["exit_code"] == 0 and by["t3"]["exit_code"] == 3
    assert "gave up" in by["t3"]["error"] or "lock" in by["t3"]["error"]
    assert set(by) == {"t1", "t2", "t3"}  # wave three was never started
    # The other target of wave two is either done (every phase) or untouched; later waves are untouched.
    rows2 = phase_rows(t["t2"])
    assert rows2 is None or set(rows2.values()) == {"applied"}, rows2
    assert by["t2"]["exit_code"] in (0, None)
    assert (rows2 is None) == (by["t2"]["exit_code"] is None)
    assert set(phase_rows(t["t1"]).values()) == {"applied"}
    assert phase_rows(t["t3"])[1] == "failed" and not has_column(t["t3"], "workflow_templates", "workflow_type_new")
    for n in ("t4", "t5", "t6"):
        assert phase_rows(t[n]) is None and not has_column(t[n], "workflow_templates", "workflow_type_new")
    assert hook_log.read_text().splitlines() == ["canary t1"]  # the gate ran after wave one only

    st = status_json(inv, env, tmp_path)
    assert (st["t1"]["phase"], st["t1"]["state"], st["t1"]["phase_name"]) == (6, "applied", "seed_rows")
    assert (st["t1"]["backfill"]["finished"]
            and st["t1"]["backfill"]["rows_scanned"] == st["t1"]["backfill"]["rows_total"] > 0)
    assert (st["t3"]["phase"], st["t3"]["state"], st["t3"]["step"]) == (0, "failed", "expand")
    assert "attempts" in st["t3"]["error"] and st["t3"]["error_at"] and st["t3"]["lock_retries"] >= 1
    assert st["t2"]["phase"] in (0, 6) and st["t2"]["state"] == ("applied" if st["t2"]["phase"] else "pending")
    for n in ("t4", "t5", "t6"):
        assert (st[n]["phase"], st[n]["state"], st[n]["error"], st[n]["backfill"]) == (0, "pending", None, None)
    done = 1 + (st["t2"]["phase"] == 6)
    assert st["summary"]["by_phase"] == {"0": 6 - done, "6": done}
    assert st["summary"]["by_state"] == {"applied": done, "failed": 1, "pending": 5 - done}
    table = fleet_cli(inv, env, "status", tmp_path=tmp_path)
    assert table.returncode == 0 and "t3" in table.stdout and "failed" in table.stdout

    # Fixed (the blocker is gone): the same command resumes and completes the fleet, wave by wave.
    second = fleet_cli(inv, env, "run", "6", "--through", "--json", tmp_path=tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr
    res = json.loads(second.stdout)
    assert res["waves_done"] == ["canary", "forty", "rest"]
    by = {o["target"]: o for o in res["targets"]}
    assert by["t1"]["result"] == "already applied"
    for a, b in (("t1", "t2"), ("t1", "t3"), ("t2", "t4"), ("t3", "t4"), ("t3", "t6")):  # waves in order
        assert by[a]["finished_at"] <= by[b]["started_at"]
    assert hook_log.read_text().splitlines() == ["canary t1", "canary t1", "forty t2,t3"]
    st = status_json(inv, env, tmp_path)
    assert st["summary"]["by_phase"] == {"6": 6} and st["summary"]["by_state"] == {"applied": 6}
    assert all(st[n]["error"] is None and st[n]["backfill"]["finished"] for n in t)

    verify = fleet_cli(inv, env, "verify", tmp_path=tmp_path)
    assert verify.returncode == 0, verify.stdout + verify.stderr

    refused = fleet_cli(inv, env, "contract", tmp_path=tmp_path)  # no --yes off a terminal: nothing changes
    assert refused.returncode == 3 and "--yes" in refused.stderr
    assert all(set(phase_rows(d).values()) == {"applied"} for d in six)
    contract = fleet_cli(inv, env, "contract", "--yes", tmp_path=tmp_path)
    assert contract.returncode == 0, contract.stdout + contract.stderr
    st = status_json(inv, env, tmp_path)
    assert st["summary"]["by_state"] == {"contracted": 6}
    for d in six:
        assert set(phase_rows(d).values()) == {"contracted"}
        assert not has_column(d, "workflow_templates", "workflow_type_old")

    # After the contract, rollback 6 and 5 undo contract steps: the new app keeps its column, so no question is
    # asked (off a terminal, without --yes), and the same command again finds nothing to do and asks nothing.
    results = []
    for n in (6, 5, 5):
        undo = fleet_cli(inv, env, "rollback", str(n), "--json", tmp_path=tmp_path)
        assert undo.returncode == 0, undo.stdout + undo.stderr
        results.append({o["result"] for o in json.loads(undo.stdout)["targets"]})
    assert results == [{"contract undone"}, {"contract undone"}, {"contract already undone"}]
    assert status_json(inv, env, tmp_path)["summary"]["by_state"] == {"uncontracting": 6}  # 4..1 still contracted
    for d in six:
        assert phase_rows(d)[5] == "applied" and has_column(d, "workflow_templates", "workflow_type_old")
    for f in (tmp_path / "ctl").rglob("*"):
        if f.is_file():
            assert SECRET not in f.read_text()


def _fleet(tmp_path, dsns, monkeypatch, **extra) -> fleet_mod.Fleet:
    monkeypatch.setenv("ORCHESTRATOR_CONTROL_DIR", str(tmp_path / "ctl"))
    write_playbook(tmp_path)
    inv_path, env = write_inventory(tmp_path, dsns, **extra)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    lines: list[str] = []
    f = fleet_mod.Fleet(inventory.load(inv_path), echo=lines.append)
    f.lines = lines
    return f


def test_gates_hook_failure_and_soak_hold_the_next_wave(six, tmp_path, monkeypatch):
    flag = tmp_path / "red"
    flag.write_text("error rate too high")
    hook = tmp_path / "hook.py"
    hook.write_text(f"import pathlib, sys\np = pathlib.Path({str(flag)!r})\n"
                    "sys.exit(p.read_text() if p.exists() else 0)\n")
    f = _fleet(tmp_path, six, monkeypatch, gates={"hook": [sys.executable, str(hook)], "soak_s": 0},
               waves=[{"name": "canary", "count": 1}, {"name": "two", "count": 2, "soak_s": 1.5},
                      {"name": "rest", "rest": True}])
    res = f.execute("run", 1)
    assert res.exit_code == 1 and res.stopped_at == "canary" and "error rate too high" in res.reason
    assert phase_rows(six[0]) == {1: "applied", **{k: "pending" for k in range(2, 7)}}
    assert all(phase_rows(d) is None for d in six[1:])  # the next wave waits for the gate
    flag.unlink()
    started = time.monotonic()
    res = f.execute("run", 1)
    assert res.exit_code == 0, res.reason
    by = {o.target: o for o in res.outcomes}
    assert by["t4"].started_at - max(by["t2"].finished_at, by["t3"].finished_at) >= 1.4  # wave two soaked
    assert time.monotonic() - started >= 1.5
    assert all(phase_rows(d)[1] == "applied" for d in six)
    assert f.status()["summary"]["by_phase"] == {"1": 6}
    assert not any(SECRET in line for line in f.lines)


def test_unreachable_target_is_shown_and_stops_the_rollout(six, tmp_path, monkeypatch):
    dead = f"postgresql://postgres:{SECRET}@127.0.0.1:1/nowhere?connect_timeout=2"
    f = _fleet(tmp_path, [*six[:2], dead], monkeypatch,
               waves=[{"name": "first", "count": 2}, {"name": "rest", "rest": True}])
    st = f.status()
    gone = {t["name"]: t for t in st["targets"]}["t3"]
    assert (gone["reachable"], gone["state"], gone["phase_name"]) == (False, "unreachable", None)
    assert "cannot connect" in gone["error"] and SECRET not in json.dumps(st, default=str)
    assert st["summary"]["by_phase"] == {"0": 2, "unreachable": 1}
    res = f.execute("run", 1)
    assert res.exit_code == 2 and res.stopped_at == "rest" and res.waves_done == ["first"]
    assert SECRET not in json.dumps(res.to_json()) and not any(SECRET in line for line in f.lines)


@pytest.mark.parametrize("change, message", [
    ({"extra": 1}, "inventory field 'extra': unknown key"),
    ({"targets": [{"name": "a", "dsn": "x"}, {"name": "a", "dsn": "y"}]}, "target name 'a' is used twice"),
    ({"targets": [{"name": "a", "dsn": "x", "dsn_env": "A"}]}, "give exactly one of dsn and dsn_env"),
    ({"targets": [{"name": "a"}]}, "give exactly one of dsn and dsn_env"),
    ({"waves": [{"name": "w", "count": 1, "rest": True}]}, "give exactly one of select, count, percent"),
    ({"waves": [{"name": "w", "select": {"tier": "gold"}}, {"name": "r", "rest": True}]}, "selects no target"),
    ({"waves": [{"name": "w", "count": 1}]}, "1 target(s) in no wave (b)"),
    ({"waves": [{"name": "w", "percent": 150}]}, "inventory field 'waves.0.percent'"),
    ({"concurrency": 0}, "inventory field 'concurrency'"),
    ({"targets": [{"name": "a b", "dsn": "x"}]}, "inventory field 'targets.0.name'"),
])
def test_inventory_is_validated_strictly(change, message):
    data = {"targets": [{"name": "a", "dsn": "x"}, {"name": "b", "dsn_env": "B"}],
            "waves": [{"name": "all", "rest": True}], **change}
    with pytest.raises(BadInput) as err:
        inventory.parse(data, "fleet.yaml")
    assert message in err.value.one_line() and "\n" not in err.value.one_line()


def test_bad_inventory_or_missing_variable_exit_2_and_change_nothing(six, tmp_path):
    write_playbook(tmp_path)
    inv, env = write_inventory(tmp_path, six[:3], waves=[{"name": "all", "rest": True}])
    missing = fleet_cli(inv, {}, "run", "1", tmp_path=tmp_path)  # FLEET_T1_URL, FLEET_T3_URL not set
    assert missing.returncode == 2 and "FLEET_T1_URL is not set" in missing.stderr
    bad_env = yaml.safe_load(inv.read_text())
    bad_env["targets"][1]["env"] = "prod"
    inv.write_text(yaml.safe_dump(bad_env))
    proc = fleet_cli(inv, env, "run", "1", tmp_path=tmp_path)
    assert proc.returncode == 2 and "target 't2'" in proc.stderr and "no such environment" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert all(phase_rows(d) is None for d in six[:3])


def test_fleet_rollback_wave_by_wave_and_confirmation(six, tmp_path, monkeypatch):
    f = _fleet(tmp_path, six, monkeypatch)
    assert f.execute("run", 5, through=True).exit_code == 0
    assert f.status()["summary"]["by_phase"] == {"5": 6}
    refused = f.execute("rollback", 1)  # phase 5 is still applied everywhere: the canary refuses, nothing else runs
    assert refused.exit_code == 3 and [o.target for o in refused.outcomes] == ["t1"]
    assert "roll it back before phase 1" in refused.reason
    inv = tmp_path / "fleet.yaml"
    env = {k: v for k, v in os.environ.items() if k.startswith("FLEET_T")}
    proc = fleet_cli(inv, env, "rollback", "5", tmp_path=tmp_path)  # the swap: the app notices, needs --yes
    assert proc.returncode == 3 and "--yes" in proc.stderr and "on every target" in proc.stderr, proc.stderr
    assert all(phase_rows(d)[5] == "applied" for d in six)  # asked before anything ran
    proc = fleet_cli(inv, env, "rollback", "5", "--yes", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for n in (4, 3, 2, 1):
        res = f.execute("rollback", n)
        assert res.exit_code == 0 and res.waves_done == ["canary", "forty", "rest"], res.reason
    st = f.status()
    assert st["summary"]["by_state"] == {"pending": 6}
    for d in six:
        assert not phase_rows(d) and not has_column(d, "workflow_templates", "workflow_type_new")
    proc = fleet_cli(inv, env, "rollback", "5", tmp_path=tmp_path)  # nothing to do anywhere: nothing to confirm
    assert proc.returncode == 0, proc.stdout + proc.stderr
