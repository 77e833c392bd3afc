"""Crash anywhere, lose the connection anywhere: the orchestrator is SIGKILLed (or its connection terminated)
right after one chosen statement of a command, in every phase, the contract and every rollback - including
between the statements of one transaction. After each:

* `status` tells the truth: nothing is shown 'running' when no process holds the operator lock; the phase
  that was in progress shows 'interrupted' with the step it was in (expand / rollback / contract);
* running the same command again completes (exit 0);
* the result - schema, every row of the table, the state tables (statuses, the seed rows recorded as ours,
  the backfill's row count) - is exactly what an uninterrupted run leaves; parity has zero mismatches.

The fault is injected by the executor's test-only hook (ORCHESTRATOR_CRASH_AT, see orchestrator/executor.py).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest

from orchestrator.engine import executor
from orchestrator.run.runner import Orchestrator

from .test_reliability_support import (
    BACKWARD,
    FORWARD,
    SETTINGS,
    UNDO,
    Chain,
    argv,
    build_chain,
    clone,
    crash_points,
    drop,
    error_line,
    in_process,
    load_playbook,
    orch_cli,
    outcome,
    outcome_diff,
    playbook_file,
    spread,
    status_json,
)

ACTION = {"run": "expand", "rollback": "rollback", "contract": "contract", "undo": "uncontract"}


@pytest.fixture(scope="module")
def chain(pg_server, tmp_path_factory):
    pb_path = playbook_file(tmp_path_factory.mktemp("crash") / "playbook.yaml", **SETTINGS)
    built = build_chain(pg_server.dsn, pb_path)
    yield built
    built.drop_all()


def raw_phases(dsn: str) -> dict[int, tuple[str, str | None]]:
    with psycopg.connect(dsn) as conn:
        if conn.execute("SELECT to_regclass('_orchestrator.phases') IS NULL").fetchone()[0]:
            return {}
        return {p: (s, st) for p, s, st in conn.execute("SELECT phase, status, step FROM _orchestrator.phases")}


def statuses(chain: Chain, template: str) -> dict[int, str]:
    phases = chain.outcomes[template]["state"].get("phases", [])
    return {row[0]: row[1] for row in phases}


def status_problems(chain: Chain, command: tuple, st: dict, raw: dict, failed: bool = False) -> list[str]:
    """Does `status` tell the truth about a command that was killed part-way?"""
    problems = []
    if st["running_now"]:
        problems.append("status says an orchestrator is running, but the process was killed")
    before, after = statuses(chain, chain.before[command]), statuses(chain, chain.after[command])
    for p in st["phases"]:
        n, shown = p["phase"], p["status"]
        stored, step = raw.get(n, ("pending", None))
        if shown == "running":
            problems.append(f"phase {n} shown 'running' with nobody holding the lock")
        unfinished = stored == "running" or (stored == "applied" and step == "contract") or (
            stored == "contracted" and step == "uncontract")
        if unfinished and shown != "interrupted":
            problems.append(f"phase {n} is stored {stored}/{step} but shown {shown!r}, not 'interrupted'")
        if shown == "interrupted" and p["step"] != ACTION[command[0]]:
            problems.append(f"phase {n} interrupted during {p['step']!r}, but the command was {command}")
        allowed = {before.get(n, "pending"), after.get(n, "pending"), "interrupted", *(["failed"] if failed else [])}
        if shown not in allowed:
            problems.append(f"phase {n} shown {shown!r}; expected one of {sorted(allowed)}")
    return problems


def parity_problems(chain: Chain, command: tuple, dsn: str) -> list[str]:
    """Zero mismatches wherever the backfill is complete and the two columns still both exist."""
    if statuses(chain, chain.after[command]).get(3) != "applied":
        return []
    orch = Orchestrator(load_playbook(chain.pb_path), dsn)
    try:
        result = orch.verify()
    finally:
        orch.close()
    return [f"parity of {table}: {r.mismatches} mismatches, e.g. {r.sample}" for table, r in result.items()
            if r.mismatches]


def interrupt_and_recover(chain: Chain, command: tuple, at: str, mode: str = "kill", light: bool = False) -> list[str]:
    """Clone the state before `command`, run it with a fault at statement `at`, check status, re-run, compare.

    light: `status` and the re-run in this process (same code as the CLI, without starting Python twice more).
    """
    name, dsn = clone(chain.admin, chain.before[command])
    label = f"{' '.join(command)} @ {at!r} ({mode})"
    try:
        r = orch_cli(dsn, chain.pb_path, *argv(command),
                     env={executor.CRASH_AT_ENV: at, executor.CRASH_MODE_ENV: mode})
        problems = []
        if mode == "kill" and r.returncode != -9:
            problems.append(f"expected a SIGKILL, got exit {r.returncode}: {r.stderr[-400:]}")
        if mode == "terminate":
            # A lost connection is retried within the budget (exit 0) or fails cleanly (exit 1, one error line).
            if r.returncode not in (0, 1) or (r.returncode == 1 and not error_line(r)):
                problems.append(f"lost connection: exit {r.returncode}: {r.stderr[-600:]}")
            if "Traceback" in r.stderr:
                problems.append(f"lost connection: a traceback: {r.stderr[-600:]}")
        if light:
            orch = Orchestrator(load_playbook(chain.pb_path), dsn)
            try:
                st = orch.status()
            finally:
                orch.close()
        else:
            st = status_json(dsn, chain.pb_path)
        problems += status_problems(chain, command, st, raw_phases(dsn), failed=r.returncode == 1)
        if light:
            try:
                in_process(dsn, load_playbook(chain.pb_path), command)
            except Exception as err:  # noqa: BLE001 - reported with the case
                problems.append(f"re-run failed: {type(err).__name__}: {err}")
        else:
            again = orch_cli(dsn, chain.pb_path, *argv(command))
            if again.returncode != 0:
                problems.append(f"re-run exited {again.returncode}: {error_line(again) or again.stderr[-600:]}")
        problems += outcome_diff(chain.expected(command), outcome(dsn))
        problems += parity_problems(chain, command, dsn)
        return [f"{label}: {p}" for p in problems]
    finally:
        drop(chain.admin, name)


def run_cases(chain: Chain, cases: list[tuple[tuple, str, str]], light: bool = False) -> list[str]:
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = pool.map(lambda c: interrupt_and_recover(chain, *c, light=light), cases)
    return [p for problems in results for p in problems]


# Named points: the places where a crash is most likely to do harm.
NAMED = [
    (("run", "1"), 'ADD COLUMN IF NOT EXISTS#1'),  # the ALTER ran, its transaction not committed
    (("run", "1"), "CREATE INDEX CONCURRENTLY#2"),  # two of three index builds done
    (("run", "2"), "CREATE TRIGGER#1"),  # between the two CREATE TRIGGERs of one transaction
    (("run", "3"), 'UPDATE "public"."workflow_templates"#3'),  # a batch updated, its cursor not yet
    (("run", "3"), "SET LOCAL lock_timeout#4"),  # three batches committed, between batches
    (("run", "4"), "count(*) FILTER#2"),  # verify half-way
    (("run", "5"), "VALIDATE CONSTRAINT#1"),
    (("run", "5"), "RENAME COLUMN#1"),  # between the statements of the swap transaction
    (("run", "6"), 'INSERT INTO "public"."workflow_templates"#2'),  # a seed row inserted, not yet recorded
    (("contract",), "DROP TRIGGER#1"),  # contract of phase 2, between its two DROP TRIGGERs
    (("contract",), "DROP COLUMN#1"),  # contract of phase 5
    (("rollback", "6"), "DELETE FROM#2"),
    (("rollback", "5"), "RENAME COLUMN#2"),  # between the statements of the swap-back transaction
    (("rollback", "2"), "DROP FUNCTION#1"),
    (("rollback", "1"), "DROP INDEX CONCURRENTLY#2"),
    (("rollback", "1"), "DROP COLUMN#1"),
    (("undo", "5"), "CREATE TYPE#1"),  # the type created, not committed
    (("undo", "5"), "ADD COLUMN#1"),  # the enum column added, its comment and grants not yet
    (("undo", "5"), "CREATE TRIGGER#1"),  # between the two CREATE TRIGGERs
    (("undo", "5"), 'SET "workflow_type_old" =#3'),  # a reverse batch updated, its cursor not yet
    (("undo", "5"), "CREATE INDEX CONCURRENTLY#1"),
    (("undo", "1"), "SET DEFAULT#1"),
]


# The fast set: one kill in each phase's run, in the contract and in two rollbacks, mostly mid-transaction.
FAST = [NAMED[i] for i in (1, 2, 3, 5, 7, 8, 10, 12, 15, 17, 19)]


def test_crash_at_named_points_then_rerun_completes(chain):
    """Kills at the riskiest statements: every phase, the contract, rollbacks and the reverse migration after
    the contract (fast set, 11 points)."""
    assert {c for c, _ in FAST} >= {("run", str(n)) for n in range(1, 7)} | {("contract",)}
    problems = run_cases(chain, [(command, at, "kill") for command, at in FAST])
    assert problems == [], "\n".join(problems)


@pytest.mark.slow
def test_crash_at_every_named_point(chain):
    problems = run_cases(chain, [(command, at, "kill") for command, at in NAMED if (command, at) not in FAST])
    assert problems == [], "\n".join(problems)


@pytest.mark.slow
def test_crash_sweep_over_every_command(chain):
    """Kills right after a change (before its commit) or right after it committed, spread over every
    command: 6 runs, the contract, 6 rollbacks, 6 undos of contract steps - about 80 points per server."""
    cases = []
    for command in FORWARD + BACKWARD + UNDO:
        points = spread(crash_points(chain.statements[command]), 12 if command in (("contract",), ("undo", "5")) else 4)
        cases += [(command, str(n), "kill") for n in points]
    assert len(cases) >= 55
    problems = run_cases(chain, cases, light=True)
    assert problems == [], "\n".join(problems)


@pytest.mark.slow
def test_lost_connection_at_named_points(chain):
    """The server terminates the work connection at the named points: retried within the budget, or a clean
    failure that the re-run completes."""
    problems = run_cases(chain, [(command, at, "terminate") for command, at in NAMED], light=True)
    assert problems == [], "\n".join(problems)


@pytest.mark.slow
def test_lost_connection_sweep_over_every_command(chain):
    cases = []
    for command in FORWARD + BACKWARD + UNDO:
        points = spread(crash_points(chain.statements[command]), 3)
        cases += [(command, str(n), "terminate") for n in points]
    problems = run_cases(chain, cases, light=True)
    assert problems == [], "\n".join(problems)
