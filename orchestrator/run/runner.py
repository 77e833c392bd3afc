"""The runner: enforces phase order, holds the operator lock, records state, and drives each phase."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import structlog
from structlog.contextvars import bound_contextvars

from orchestrator.engine import catalog, db, parity, preflight
from orchestrator.engine.backfill import copy_key, reverse_key
from orchestrator.engine.backfill import summary as backfill_summary
from orchestrator.engine.catalog import Facts, facts_from_json, facts_to_json
from orchestrator.engine.context import Context
from orchestrator.engine.db import safe_dsn
from orchestrator.engine.errors import BadInput, Failure, OrchestratorError, Refused
from orchestrator.engine.executor import Executor, Recorded
from orchestrator.engine.playbook import Playbook
from orchestrator.engine.state import APPLIED, CONTRACTED, FAILED, PENDING, RUNNING, OperatorLock, State
from orchestrator.kinds import phases_for
from orchestrator.kinds.phases import versions
from orchestrator.kinds.phases.base import Phase
from orchestrator.run.control import pause_path
from orchestrator.run.hooks import Hooks

log = structlog.get_logger()

# Called with the orchestrator after every command that succeeded, still under the operator lock. The Alembic
# layer registers one (orchestrator.revisions) to keep alembic_version in step: the runner knows nothing of it.
COMMAND_LISTENERS: list[Callable[["Orchestrator"], None]] = []


@dataclass
class PhasePlan:
    phase: Phase
    expand: list[Recorded]
    contract: list[Recorded]
    rollback: list[Recorded]
    uncontract: list[Recorded]  # `rollback N` once phase N is contracted: the undo of its contract step


class Orchestrator:
    def __init__(self, pb: Playbook, dsn: str, *, dry_run: bool = False):
        self.pb, self.dsn, self.dry_run = pb, dsn, dry_run
        self.phases = phases_for(pb.kind)
        self.x = Executor(dsn, pb.settings, dry_run=dry_run)
        self.x.blocking_tables = pb.tables
        self.x.pause_file = pause_path(pb)
        self.hooks = Hooks(pb, safe_dsn(dsn))
        self.state = State(self.x, pb.settings.state_schema, pb.name)
        self._lock: OperatorLock | None = None
        self._current: tuple[int, str] | None = None

    def close(self) -> None:
        self.x.close()

    # -- shared plumbing --------------------------------------------------------------------------
    def phase(self, n: int) -> Phase:
        if not 1 <= n <= len(self.phases):
            raise BadInput(f"phase {n} does not exist; {self.pb.name} has phases 1..{len(self.phases)}")
        return self.phases[n - 1]

    def facts(self, *, register: bool) -> list[Facts]:
        """The original shape of each column: stored at the first run, inspected (and validated) before it."""
        record = self.state.migration()
        if record is None:
            facts = catalog.inspect(self.x.conn, self.pb)
            if register:
                self.state.ensure()
                self.state.register(self.pb.fingerprint(), facts_to_json(self.pb, facts),
                                    [p.name for p in self.phases])
            return facts
        fingerprint, stored = record
        if fingerprint != self.pb.fingerprint():
            raise Refused(f"playbook {self.pb.name!r} was edited after its first phase ran (stored fingerprint "
                          f"{fingerprint}, file {self.pb.fingerprint()})",
                          hint="restore the playbook as it was, or roll back every phase before editing it")
        return facts_from_json(self.pb, stored)

    def contexts(self, facts: list[Facts]) -> list[Context]:
        """One context per column of the playbook, in its order."""
        return [Context(self.pb, m, f, self.x, self.state, hooks=self.hooks)
                for m, f in zip(self.pb.migrations, facts)]

    @contextmanager
    def locked(self) -> Iterator[None]:
        if self.dry_run:
            yield
            return
        with OperatorLock(self.dsn, self.pb.tables) as lock:
            # Every command that changes something starts here: refuse now, naming the missing privilege,
            # rather than half-way through a phase.
            preflight.check(self.x.conn, self.pb)
            self._lock = lock
            self.x.on_statement = self._log_statement
            try:
                yield
            finally:
                self.x.on_statement = None
                self._lock = None
            # Reached only when the command succeeded, still under the operator lock.
            for listener in COMMAND_LISTENERS:
                listener(self)

    def _log_statement(self, statement: str, seconds: float, outcome: str) -> None:
        # Written on the lock's connection: it survives the rollback of a failed DDL transaction.
        if self._lock is not None and self._lock.conn is not None and self._current is not None:
            State(self._lock.conn, self.state.schema, self.pb.name).log_statement(
                self._current[0], self._current[1], statement, seconds, outcome)
            if self._lock.conn.broken or self._lock.conn.closed:
                # The session holding the advisory lock is gone, and the lock with it: another operator could
                # start now. Stop (a statement inside a transaction is rolled back with it).
                raise Failure("lost the connection holding the operator lock; stopped so that two operators "
                              "cannot overlap", hint="re-run the same command")

    def _step(self, n: int, action: str, fn, while_status: str, error_status: str, done_status: str,
              done=lambda result: {}, **start) -> object:
        """The same three state writes around every expand, rollback and contract step."""
        phase = self.phases[n - 1]
        log.info(f"{action} starting", title=phase.title)
        self.state.set(n, while_status, step=action, **start)
        result = self._guarded(n, action, fn, on_error_status=error_status)
        self.state.set(n, done_status, step=None, **done(result))
        log.info(f"{action} done", title=phase.title)
        return result

    def _guarded(self, n: int, action: str, fn, *, on_error_status: str) -> object:
        """Run one step: hooks around it, and a truthful state row whatever happens."""
        self._current = (n, action)
        started = time.monotonic()
        event = {"phase": n, "phase_name": self.phases[n - 1].name, "action": action}
        try:
            self.hooks.fire("on_start", **event, status="starting")
            result = fn()
            self.hooks.fire("on_success", **event, status="done", elapsed_s=round(time.monotonic() - started, 3))
            return result
        except KeyboardInterrupt:
            self._failed(n, action, on_error_status, "interrupted (Ctrl-C); re-run the same command", event, started)
            raise
        except OrchestratorError as err:
            self._failed(n, action, on_error_status, err.one_line(), event, started)
            raise
        except Exception as err:  # an unexpected error still leaves a truthful state row
            self._failed(n, action, on_error_status, f"{type(err).__name__}: {err}", event, started)
            raise Failure(f"{action} of phase {n} failed: {type(err).__name__}: {' '.join(str(err).split())}",
                          hint="fix the cause and re-run the same command") from err
        finally:
            self._current = None

    def _failed(self, n: int, action: str, status: str, message: str, event: dict, started: float) -> None:
        self._mark(n, status, step=action, error=message)
        self.hooks.fire("on_failure", **event, status="failed", error=message,
                        elapsed_s=round(time.monotonic() - started, 3))

    def _mark(self, n: int, status: str, **kw) -> None:
        try:
            self.state.set(n, status, **kw)
        except Exception:  # the database may be what failed; the status will say 'running' then
            log.warning("could not record the phase state", phase=n)

    # -- commands ---------------------------------------------------------------------------------
    def run(self, n: int) -> str:
        phase = self.phase(n)
        with bound_contextvars(playbook=self.pb.name, phase=n, action="expand"), self.locked():
            # Only `run 1` registers the migration: a refused `run 3` on a fresh database must change nothing.
            facts = self.facts(register=not self.dry_run and n == 1)
            rows = self.state.phases()
            contracted = _contracted(rows)
            if contracted:
                done = len(contracted) == len(rows)
                raise Refused(f"{self.pb.name} is {'fully contracted' if done else 'partly contracted'}; there is "
                              f"nothing left to run", hint=_DONE_HINT if done else
                              f"orchestrator contract (to finish), or orchestrator rollback {max(contracted)} (to go "
                              f"back)")
            for k in range(1, n):
                if rows and rows[k].status != APPLIED:
                    raise Refused(f"phase {n} ({phase.name}) needs phase {k} ({self.phases[k - 1].name}) applied "
                                  f"first; it is {_shown(rows[k])}", hint=f"orchestrator run {k}")
                if not rows and not self.dry_run:
                    raise Refused(f"phase {n} needs phase 1 first", hint="orchestrator run 1")
            if rows and rows[n].status == APPLIED:
                if not self.dry_run:
                    phase.reapply_all(self.contexts(facts))
                log.info("already applied; nothing to do")
                return "already applied"
            self._refuse_new_labels()
            ctxs = self.contexts(facts)
            if self.dry_run:
                phase.expand_all(ctxs)
                return "dry run"
            phase.before_expand_all(ctxs)

            def go():
                details = phase.expand_all(ctxs)
                problems = phase.check_all(ctxs)
                if problems:
                    raise Failure(f"phase {n} did not take effect: " + "; ".join(problems))
                return details
            self._step(n, "expand", go, RUNNING, FAILED, APPLIED, lambda details: {
                "details": details or {}, "finished": True}, started=True, env=self.pb.env)
            return "applied"

    def _refuse_new_labels(self) -> None:
        """A label added to the enum type since the playbook was written would be copied as NULL."""
        if self.pb.kind != "enum_to_varchar":
            return
        added = catalog.labels_without_mapping(self.x.conn, self.pb)
        if added:
            column, label = added[0]
            raise Refused(f"enum label {label!r} was added to {'.'.join(self.pb.enum_type)} after the playbook was "
                          f"written and {column} has no mapping for it; nothing was changed",
                          hint=f"add {label!r} to the mapping and roll back to phase 1 to run again, or remove "
                               f"the label if no row uses it")

    def rollback(self, n: int) -> str:
        phase = self.phase(n)
        with bound_contextvars(playbook=self.pb.name, phase=n, action="rollback"), self.locked():
            if self.state.migration() is None and not self.dry_run:
                log.info("nothing to roll back: no phase of this playbook has run")
                return "nothing to do"
            facts = self.facts(register=False)
            rows = self.state.phases()
            contracted = _contracted(rows)
            undone = _undone(rows)
            if undone and n == min(undone) and (contracted or any(rows[k].status != PENDING for k in rows if k > n)):
                # The same command again after its undo finished (a crash after the commit, a lost connection):
                # done already. Its ordinary rollback is not possible yet anyway.
                nxt = max(contracted) if contracted else max(k for k in rows if rows[k].status != PENDING)
                log.info("contract step already undone; nothing to do", next=f"orchestrator rollback {nxt}")
                return "contract already undone"
            if contracted:  # contract steps are undone from the last one: each is a reverse migration step
                last = max(contracted)
                if n != last:
                    raise Refused(f"phase {last} ({self.phases[last - 1].name}) is contracted; undo the contract "
                                  f"steps from the last one: phase {last} first",
                                  hint=f"orchestrator rollback {last}")
                return self._uncontract(n, facts)
            for k in range(len(self.phases), n, -1):  # the last one first: that is the one to roll back now
                if rows and rows[k].status != PENDING:
                    raise Refused(f"phase {k} ({self.phases[k - 1].name}) is {_shown(rows[k])}; roll it back before "
                                  f"phase {n}", hint=f"orchestrator rollback {k}")
            if rows and rows[n].status == PENDING:
                if not self.dry_run and all(r.status == PENDING for r in rows.values()):
                    self.state.forget()  # a run stopped between the last rollback and forgetting the record
                log.info("phase not applied; nothing to roll back")
                return "nothing to do"
            ctxs = self.contexts(facts)
            if self.dry_run:
                phase.rollback_all(ctxs)
                return "dry run"
            phase.before_rollback_all(ctxs)  # a refusal here changes nothing, the status included
            self._step(n, "rollback", lambda: phase.rollback_all(ctxs), RUNNING, RUNNING, PENDING,
                       lambda _: {"replace_details": True})
            if all(r.status == PENDING for k, r in self.state.phases().items()):
                self.state.forget()  # fully rolled back: the playbook may now be edited freely
            return "rolled back"

    def _uncontract(self, n: int, facts: list[Facts]) -> str:
        """Undo phase n's contract step (phases after it are undone already): online, resumable, and itself
        undone by `contract n`."""
        phase = self.phases[n - 1]
        ctxs = self.contexts(facts)
        if self.dry_run:
            phase.uncontract_all(ctxs)
            return "dry run"
        phase.before_uncontract_all(ctxs)
        self._step(n, "uncontract", lambda: phase.uncontract_all(ctxs), CONTRACTED, CONTRACTED, APPLIED,
                   lambda details: {"details": {**(details or {}), "contract_undone": True}})
        return "contract undone"

    def undoes_contract(self, n: int) -> bool:
        """Whether `rollback n` now is the undo of a contract step (which the app does not see)."""
        return n in _contracted(self.state.phases())

    def contract(self, n: int | None = None, *, old_version_gone: bool = False) -> list[str]:
        """old_version_gone: contract although the old app version wrote within settings.old_version_quiet_s."""
        numbers = [n] if n is not None else list(range(1, len(self.phases) + 1))
        return [self._contract_one(k, old_version_gone) for k in numbers]

    def _contract_one(self, n: int, old_version_gone: bool = False) -> str:
        phase = self.phase(n)
        with bound_contextvars(playbook=self.pb.name, phase=n, action="contract"), self.locked():
            facts = self.facts(register=False) if self.state.migration() else None
            rows = self.state.phases()
            not_done = [k for k, r in rows.items() if r.status not in (APPLIED, CONTRACTED)]
            if facts is None or not_done:
                k = not_done[0] if not_done else 1
                raise Refused(f"contract needs every phase applied and verified first; phase {k} "
                              f"({self.phases[k - 1].name}) is {_shown(rows[k]) if rows else 'pending'}",
                              hint=f"orchestrator run {k}")
            for k in range(1, n):
                if rows[k].status != CONTRACTED:
                    raise Refused(f"contract the phases in order: phase {k} ({self.phases[k - 1].name}) first",
                                  hint=f"orchestrator contract {k}")
            if rows[n].status == CONTRACTED and rows[n].step != "uncontract":  # an undo stopped part-way: redo
                return "already contracted"
            ctxs = self.contexts(facts)
            if self.dry_run:
                phase.contract_all(ctxs)
                return "dry run"
            if all(r.status == APPLIED for r in rows.values()):  # the first contract step: no way back after it
                if not old_version_gone:
                    versions.refuse_if_old_version_active(self.x.conn, self.pb)
                for p in self.phases:
                    p.before_contract_all(ctxs)
            self._step(n, "contract", lambda: phase.contract_all(ctxs), APPLIED, APPLIED, CONTRACTED,
                       lambda _: {"details": {"contract_undone": False}})
            return "contracted"

    def verify(self) -> dict[str, parity.ParityResult]:
        """Parity of every column now, by table.column."""
        out = {}
        for ctx in self.contexts(self.facts(register=False)):
            swapped = ctx.has("column", ctx.m.retired)
            if not ctx.has("column", ctx.m.shadow) and not swapped:
                raise Refused(f"nothing to verify: the shadow column of {ctx.m.label} does not exist yet",
                              hint="orchestrator run 1")
            out[ctx.m.label] = parity.check(ctx, swapped=swapped)
        return out

    def plan(self) -> list[PhasePlan]:
        """Every phase's SQL, as `run`, `contract` and `rollback` would execute it; changes nothing."""
        if not self.dry_run:
            raise ValueError("plan needs a dry-run orchestrator")
        ctxs = self.contexts(self.facts(register=False))
        out = []
        for phase in self.phases:
            steps = {}
            for action in ("expand", "contract", "rollback", "uncontract"):
                self.x.recorded = []
                getattr(phase, f"{action}_all")(ctxs)
                steps[action] = self.x.recorded
            out.append(PhasePlan(phase, **steps))
        return out

    def status(self) -> dict:
        rows = self.state.phases()
        lock = OperatorLock(self.dsn, self.pb.tables)
        busy = lock.is_held_elsewhere(self.x.conn)
        phases = []
        for p in self.phases:
            r = rows.get(p.number)
            status = r.status if r else PENDING
            # A contract step in progress leaves its phase 'applied' with step 'contract' until it finishes, an
            # undo of one leaves it 'contracted' with step 'uncontract'.
            if _stopped_part_way(r) and not busy:
                status = "interrupted"  # nobody holds the lock: a crash or kill; re-running resumes
            phases.append({"phase": p.number, "name": p.name, "status": status,
                           "step": r.step if r else None, "started_at": r.started_at if r else None,
                           "finished_at": r.finished_at if r else None, "run_by": r.run_by if r else None,
                           "host": r.host if r else None, "env": r.env if r else None,
                           "error": r.error if r else None})
        progress = self.state.backfills()
        backfills = [{"table": m.label, **(backfill_summary(progress[m.key]) if m.key in progress else {})}
                     for m in self.pb.migrations if copy_key(m) not in progress]
        # A table copy's (settings.backfill_method: copy) in its place.
        backfills += [{"table": m.label, "method": "copy", **backfill_summary(progress[key])}
                      for m in self.pb.migrations if (key := copy_key(m)) in progress]
        # The reverse migration's (the undo of contract 5), while it exists.
        backfills += [{"table": m.label, "direction": "reverse", **backfill_summary(progress[key])}
                      for m in self.pb.migrations if (key := reverse_key(m)) in progress]
        out = {"playbook": self.pb.name, "running_now": busy, "phases": phases,
               "tables": [m.label for m in self.pb.migrations], "backfill": backfills}
        way_back = _way_back(rows, self.phases)
        if way_back:
            out["way_back"] = way_back
        hints = versions.connection_hints(self.pb)
        if hints is not None and self.pb.app_versions is not None:  # hints: only with app_versions
            seen = versions.old_last_seen(self.x.conn, self.pb)
            present = {v: bool(db.scalar(self.x.conn, "SELECT to_regnamespace(%s) IS NOT NULL",
                                         (hints[v]["schema"],))) for v in ("old", "new")}
            out["app_versions"] = {**hints, "old_last_write": seen.isoformat() if seen else None,
                                   "views_present": present["new"], "old_present": present["old"]}
        return out


_DONE_HINT = "nothing left to do: the migration is complete (orchestrator status shows it)"


def _stopped_part_way(row) -> bool:
    """Running, or in a contract step or its undo, as the state row says (a live command, or a stopped one)."""
    return row is not None and (row.status == RUNNING or (row.status == APPLIED and row.step == "contract")
                                or (row.status == CONTRACTED and row.step == "uncontract"))


def _way_back(rows: dict, phases: list) -> dict | None:
    """Part-way through undoing the contract (some contract steps undone, earlier ones not yet): which, what
    comes next, and what the phase rows alone would not tell."""
    contracted = _contracted(rows)
    undone = _undone(rows)
    if not contracted or not undone:
        return None
    return {"undone": sorted(undone, reverse=True), "contracted": sorted(contracted, reverse=True),
            "next": f"orchestrator rollback {max(contracted)}",
            "notes": [f"phase {k}: {phases[k - 1].undone_note}" for k in sorted(undone, reverse=True)
                      if phases[k - 1].undone_note]}


def _undone(rows: dict) -> list[int]:
    """Phases whose contract step was undone (applied again, the way back after the contract)."""
    return [k for k, r in rows.items() if r.status == APPLIED and (r.details or {}).get("contract_undone")]


def _contracted(rows: dict) -> list[int]:
    """Phases whose contract step ran, even part-way (its undo is idempotent, so it is what mends both)."""
    return [k for k, r in rows.items() if r.status == CONTRACTED or (r.status == APPLIED and r.step == "contract")]


def _shown(row) -> str:
    """A phase's status as an order message shows it. We hold the operator lock, so a phase stored as
    'running' is not running: a command stopped part-way through it."""
    if _stopped_part_way(row):
        return f"interrupted (its {row.step or 'last'} step stopped part-way)"
    return row.status
