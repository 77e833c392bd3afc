"""Staged rollouts of one playbook across a fleet of databases: wave by wave, canary first.

Each target runs through the ordinary Orchestrator API (in threads, `concurrency` at once inside a wave), so
its own state table stays the truth: re-running the same fleet command resumes every target where it stopped
(applied phases answer "already applied"). The first target that fails (any non-zero exit code) stops the
rollout: no further target starts; those already running finish their command (nothing is left half-way);
later waves are not touched. Between two waves the gates must pass: every target of the wave in the state the
command promised (read back from its database), parity verified once the backfill has run, the inventory's
hook command exiting 0, and the soak time elapsed.

No DSN password is ever printed: every message is redacted with every target's secrets.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable

import psycopg
import structlog
from structlog.contextvars import bound_contextvars

from orchestrator.engine import db, health
from orchestrator.engine import playbook as playbook_mod
from orchestrator.engine.db import redact, safe_dsn, secrets_of
from orchestrator.engine.errors import BadInput, Failure, OrchestratorError
from orchestrator.engine.sqlkit import Q, qualified
from orchestrator.engine.state import APPLIED, CONTRACTED, FAILED, PENDING, RUNNING
from orchestrator.fleet import inventory as inventory_mod
from orchestrator.fleet.inventory import Inventory, TargetSpec, Wave
from orchestrator.kinds import phases_for
from orchestrator.run.control import control_dir
from orchestrator.run.runner import Orchestrator

log = structlog.get_logger()

COMMANDS = ("run", "contract", "rollback", "verify")


def _phase(n: int | None) -> int:
    """The phase number of `run N` and `rollback N`, which Fleet.execute refuses without one."""
    if n is None:
        raise RuntimeError("this fleet command needs a phase number")
    return n


@dataclass
class Outcome:
    """What one fleet command did on one target."""

    target: str
    wave: str
    exit_code: int | None  # None: not started (the rollout stopped first)
    result: str = ""
    error: str | None = None
    seconds: float = 0.0
    started_at: float | None = None  # time.time()
    finished_at: float | None = None


@dataclass
class FleetResult:
    command: str
    exit_code: int
    outcomes: list[Outcome] = field(default_factory=list)
    waves_done: list[str] = field(default_factory=list)
    stopped_at: str | None = None  # the wave where it stopped
    reason: str | None = None

    def to_json(self) -> dict:
        return {"command": self.command, "exit_code": self.exit_code, "waves_done": self.waves_done,
                "stopped_at": self.stopped_at, "reason": self.reason, "targets": [asdict(o) for o in self.outcomes]}


class GateFailed(Failure):
    """A gate between two waves did not pass: the next wave does not start."""


class Fleet:
    def __init__(self, inv: Inventory, playbook_path: str | None = None, *, default_env: str | None = None,
                 environ=None, echo: Callable[[str], None] | None = None, journal: Path | None = None):
        self.inv = inv
        self.environ = os.environ if environ is None else environ
        path = inv.playbook or playbook_path
        if not path:
            raise BadInput(f"{inv.source}: no playbook: set 'playbook' in the inventory or pass --playbook")
        self.playbook_path = path
        self.envs = {t.name: t.env if t.env is not None else default_env for t in inv.targets}
        # Every environment the targets name must exist in the playbook: checked now, before anything runs.
        self._pbs: dict[str | None, playbook_mod.Playbook] = {}
        for t in inv.targets:
            env = self.envs[t.name]
            if env not in self._pbs:
                try:
                    self._pbs[env] = playbook_mod.load(path, env)
                except BadInput as err:
                    raise BadInput(f"target {t.name!r}: {err.one_line()}") from None
        self.waves: list[Wave] = inventory_mod.assign(inv.targets, inv.waves)
        self.wave_of = {t.name: w for w in self.waves for t in w.targets}
        self.phases = phases_for(self.playbook().kind)
        self.echo = echo or (lambda line: None)
        self.on_change: Callable[[], None] | None = None  # called after each target's command
        self.journal_path = journal or control_dir() / "fleet" / f"{Path(inv.source).stem}.json"
        self._journal_lock = threading.Lock()
        self._dsns: dict[str, str] = {}
        self.secrets: list[str] = []
        for t in inv.targets:  # whatever can be resolved now, so that every message can be redacted
            try:
                self._dsns[t.name] = inventory_mod.resolve_dsn(t, self.environ)
                self.secrets += secrets_of(self._dsns[t.name])
            except BadInput:
                pass
        self.secrets = sorted(set(self.secrets), key=len, reverse=True)

    # -- plumbing ---------------------------------------------------------------------------------
    def playbook(self, target: TargetSpec | None = None) -> playbook_mod.Playbook:
        return self._pbs[self.envs[target.name] if target else next(iter(self._pbs))]

    def dsn(self, t: TargetSpec) -> str:
        if t.name not in self._dsns:
            inventory_mod.resolve_dsn(t, self.environ)  # raises the one-line BadInput
        return self._dsns[t.name]

    def check_dsns(self) -> None:
        """Every target's DSN must be known before a command changes anything (exit 2 otherwise)."""
        for t in self.inv.targets:
            self.dsn(t)

    def redact(self, text: str) -> str:
        return redact(text, self.secrets)

    def where(self, t: TargetSpec) -> str:
        """The database as people may see it: no password."""
        if t.dsn_env and t.name not in self._dsns:
            return f"${t.dsn_env} (not set)"
        return safe_dsn(self._dsns[t.name]) + (f" (${t.dsn_env})" if t.dsn_env else "")

    def orchestrator(self, t: TargetSpec) -> Orchestrator:
        return Orchestrator(self.playbook(t), self.dsn(t))

    # -- plan ----------------------------------------------------------------------------------------
    def plan(self) -> dict:
        """The waves, their targets and gates as the command would run them. Touches no database."""
        g = self.inv.gates
        return {"playbook": self.playbook().name, "playbook_file": self.playbook_path,
                "phases": [{"phase": p.number, "name": p.name} for p in self.phases],
                "gates": {"hook": g.hook, "soak_s": g.soak_s, "verify": g.verify},
                "waves": [{"wave": w.index, "name": w.name, "rule": w.rule,
                           "concurrency": w.spec.concurrency or self.inv.concurrency,
                           "soak_s": w.spec.soak_s if w.spec.soak_s is not None else g.soak_s,
                           "targets": [{"name": t.name, "env": self.envs[t.name], "labels": t.labels,
                                        "database": self.where(t)} for t in w.targets]}
                          for w in self.waves]}

    def app_sees_rollback(self, n: int) -> list[str]:
        """The targets on which `rollback n` gives the app back the old column, as a dry run sees it now: not
        where it is the undo of a contract step (the new app keeps its column) or has nothing to do. A target
        that cannot be asked, or whose rollback would be refused, counts: the question is asked."""
        if not 1 <= n <= len(self.phases) or not self.phases[n - 1].visible_to_app:
            return []
        names = []
        for t in self.inv.targets:
            orch = None
            try:
                orch = Orchestrator(self.playbook(t), self.dsn(t), dry_run=True)
                if orch.state.migration() is None or orch.undoes_contract(n) or \
                        orch.rollback(n) in ("nothing to do", "contract already undone"):
                    continue
            except (OrchestratorError, psycopg.Error):
                pass
            finally:
                if orch is not None:
                    orch.close()
            names.append(t.name)
        return names

    # -- commands ------------------------------------------------------------------------------------
    def execute(self, command: str, n: int | None = None, *, through: bool = False) -> FleetResult:
        """Run `command` (run N [through], contract [N], rollback N, verify) wave by wave."""
        if command not in COMMANDS:
            raise BadInput(f"unknown fleet command {command!r}")
        if command in ("run", "rollback") and n is None:
            raise BadInput(f"fleet {command} needs a phase number")
        if n is not None and not 1 <= n <= len(self.phases):
            raise BadInput(f"phase {n} does not exist; {self.playbook().name} has phases 1..{len(self.phases)}")
        self.check_dsns()
        what = command + (f" {n}" if n is not None else "") + (" (every phase up to it)" if through else "")
        result = FleetResult(command=what, exit_code=0)
        for w in self.waves:
            self.echo(f"wave {w.index}/{len(self.waves)} {w.name} ({w.rule}): "
                      + ", ".join(t.name for t in w.targets))
            outcomes = self._run_wave(w, command, n, through)
            result.outcomes += outcomes
            failed = [o for o in outcomes if o.exit_code]
            if failed:
                code = failed[0].exit_code
                if code is None:  # never: `failed` holds only outcomes with a non-zero exit code
                    raise RuntimeError(f"{failed[0].target}: failed without an exit code")
                result.exit_code = code
                result.stopped_at = w.name
                result.reason = f"{failed[0].target}: {failed[0].error}"
                untouched = [o.target for o in outcomes if o.exit_code is None]
                later = [t.name for v in self.waves[w.index:] for t in v.targets]
                self.echo(f"stopped in wave {w.name}: {failed[0].target} exited {failed[0].exit_code}; "
                          f"not started: {', '.join(untouched + later) or 'none'}; "
                          "fix it and re-run the same command to resume")
                return result
            if w.index < len(self.waves):
                try:
                    self._gates(w, command, n, outcomes)
                except GateFailed as err:
                    result.exit_code, result.stopped_at = err.exit_code, w.name
                    result.reason = self.redact(err.one_line())
                    self.echo(f"gate after wave {w.name} failed: {result.reason}")
                    return result
            result.waves_done.append(w.name)
        self.echo(f"fleet {what}: done on {len(self.inv.targets)} target(s) in {len(self.waves)} wave(s)")
        return result

    def _run_wave(self, w: Wave, command: str, n: int | None, through: bool) -> list[Outcome]:
        """The wave's targets, `concurrency` at a time; after a failure no new target starts."""
        queue = list(w.targets)
        done: dict[str, Outcome] = {}
        stop = threading.Event()
        lock = threading.Lock()

        def worker() -> None:
            while not stop.is_set():
                with lock:
                    if not queue or stop.is_set():
                        return
                    t = queue.pop(0)
                out = self._run_target(t, w, command, n, through)
                with lock:
                    done[t.name] = out
                    if out.exit_code:
                        stop.set()

        conc = min(w.spec.concurrency or self.inv.concurrency, len(w.targets))
        threads = [threading.Thread(target=worker, name=f"fleet-{w.name}-{i}", daemon=True) for i in range(conc)]
        for th in threads:
            th.start()
        try:
            for th in threads:
                while th.is_alive():
                    th.join(0.2)  # in slices, so that Ctrl-C reaches the main thread
        except KeyboardInterrupt:
            # Ctrl-C: start nothing more, and let the running targets finish their command (a second Ctrl-C
            # abandons them mid-step, like a crash: re-running resumes them).
            stop.set()
            self.echo("interrupted: waiting for the running targets to finish their command "
                      "(Ctrl-C again to abandon them)")
            for th in threads:
                while th.is_alive():
                    th.join(0.2)
            raise
        return [done.get(t.name) or Outcome(t.name, w.name, None, "not started") for t in w.targets]

    def _run_target(self, t: TargetSpec, w: Wave, command: str, n: int | None, through: bool) -> Outcome:
        started = time.time()
        out = Outcome(t.name, w.name, 0, started_at=started)
        orch = None
        with bound_contextvars(target=t.name, wave=w.name):
            try:
                orch = self.orchestrator(t)
                if command == "run":
                    last = _phase(n)
                    results = [orch.run(k) for k in (range(1, last + 1) if through else [last])]
                    out.result = results[-1] if len(set(results)) == 1 else f"phases 1..{n}: " + ", ".join(results)
                elif command == "rollback":
                    out.result = orch.rollback(_phase(n))
                elif command == "contract":
                    out.result = ", ".join(dict.fromkeys(orch.contract(n)))
                else:
                    bad = {table: r.mismatches for table, r in orch.verify().items() if r.mismatches}
                    if bad:
                        raise Failure("parity mismatches: " + ", ".join(f"{k}: {v}" for k, v in bad.items()),
                                      hint="orchestrator --dsn ... verify on that target names the rows")
                    out.result = "parity verified"
            except OrchestratorError as err:
                out.exit_code, out.error = err.exit_code, self.redact(err.one_line())
            except psycopg.Error as err:
                out.exit_code = 1
                out.error = self.redact(f"database error ({type(err).__name__}): {' '.join(str(err).split())}")
            except Exception as err:  # a bug must stop the rollout too, with its reason
                out.exit_code, out.error = 1, self.redact(f"{type(err).__name__}: {' '.join(str(err).split())}")
            finally:
                if orch is not None:
                    orch.close()
        out.finished_at = time.time()
        out.seconds = round(out.finished_at - started, 3)
        self.echo(f"  {t.name}: " + (out.result if not out.exit_code else f"exit {out.exit_code}: {out.error}"))
        self._journal(t.name, command, n, out)
        if self.on_change is not None:
            try:
                self.on_change()  # e.g. rewrite the metrics textfile
            except Exception as err:  # metrics must never stop a rollout
                log.warning("could not update the metrics", error=self.redact(str(err)))
        return out

    # -- gates ---------------------------------------------------------------------------------------
    def _gates(self, w: Wave, command: str, n: int | None, outcomes: list[Outcome]) -> None:
        g = self.inv.gates
        # 1. Every target of the wave is where the command put it, read back from its own database.
        statuses = self._statuses(w.targets)
        undone = {o.target for o in outcomes if o.result in ("contract undone", "contract already undone")}
        for st in statuses:
            problem = self._not_reached(st, command, n, undid_contract=st["name"] in undone)
            if problem:
                raise GateFailed(f"target {st['name']} {problem}")
        # 2. Parity, on every target whose backfill has run and whose retired column still exists.
        backfill = next((p.number for p in self.phases if p.name == "backfill"), None)
        if g.verify and command == "run" and backfill is not None and _phase(n) >= backfill:
            for t in w.targets:
                orch = self.orchestrator(t)
                try:
                    bad = {k: r.mismatches for k, r in orch.verify().items() if r.mismatches}
                except OrchestratorError as err:
                    raise GateFailed(f"verify on {t.name}: {err.one_line()}") from None
                finally:
                    orch.close()
                if bad:
                    raise GateFailed(f"parity mismatches on {t.name}: {bad}")
            self.echo(f"  gate: parity verified on {len(w.targets)} target(s)")
        # 3. The hook.
        if g.hook:
            self._hook(w, command, n)
        # 4. Soak: measured from when the wave's last target finished (from the state table for `run`, so
        # an interrupted soak resumes rather than restarts), skipped when this run changed nothing.
        soak = w.spec.soak_s if w.spec.soak_s is not None else g.soak_s
        if soak:
            changed = [o for o in outcomes if o.result not in ("already applied", "already contracted",
                                                               "contract already undone", "nothing to do",
                                                               "parity verified")]
            finished = [datetime.fromisoformat(str(p["finished_at"])).timestamp() for st in statuses
                        for p in st.get("phases", []) if command == "run" and p["phase"] == n and p["finished_at"]]
            last = max(finished) if finished else (max((o.finished_at or 0) for o in outcomes) if changed else 0)
            remaining = soak - (time.time() - last)
            if remaining > 0:
                self.echo(f"  gate: soaking {remaining:.0f}s after wave {w.name}")
                time.sleep(remaining)

    def _not_reached(self, st: dict, command: str, n: int | None, undid_contract: bool = False) -> str | None:
        """undid_contract: the rollback undid phase n's contract step there (phase n is applied again)."""
        if not st["reachable"]:
            return f"is unreachable: {st['error']}"
        statuses = {p["phase"]: p["status"] for p in st.get("phases", [])}
        if command == "run":
            last = _phase(n)
            for k in range(last, last + 1):
                if statuses.get(k) != APPLIED:
                    return f"phase {k} is {statuses.get(k, PENDING)}, not applied"
        elif command == "contract":
            for k in ([n] if n else range(1, len(self.phases) + 1)):
                if statuses.get(k) != CONTRACTED:
                    return f"phase {k} is {statuses.get(k, PENDING)}, not contracted"
        elif command == "rollback" and undid_contract and statuses.get(n) != APPLIED:
            return f"phase {n} is {statuses.get(n)}, not applied again after the undo of its contract step"
        elif command == "rollback" and not undid_contract and statuses.get(n, PENDING) != PENDING:
            return f"phase {n} is {statuses.get(n)}, not rolled back"
        return None

    def _hook(self, w: Wave, command: str, n: int | None) -> None:
        g = self.inv.gates
        env = {**os.environ, "ORCH_FLEET_WAVE": w.name, "ORCH_FLEET_WAVE_INDEX": str(w.index),
               "ORCH_FLEET_WAVES": str(len(self.waves)), "ORCH_FLEET_COMMAND": command,
               "ORCH_FLEET_PHASE": "" if n is None else str(n),
               "ORCH_FLEET_TARGETS": ",".join(t.name for t in w.targets), "ORCH_PLAYBOOK": self.playbook().name}
        try:
            proc = subprocess.run(g.hook, env=env, capture_output=True, text=True, timeout=g.hook_timeout_s)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise GateFailed(f"gate hook {g.hook[0]} after wave {w.name}: {err}") from None
        if proc.returncode != 0:
            tail = " ".join((proc.stderr or proc.stdout or "").split())[-300:]
            raise GateFailed(f"gate hook {g.hook[0]} after wave {w.name} exited {proc.returncode}"
                             + (f": {tail}" if tail else ""), hint="fix the cause, then re-run the same command")
        self.echo(f"  gate: hook {g.hook[0]} passed")

    # -- journal: what the last fleet command did on each target (status shows failures outside a step) -------
    def _journal(self, name: str, command: str, n: int | None, out: Outcome) -> None:
        with self._journal_lock:
            data = self.journal()
            data[name] = {"command": command + (f" {n}" if n is not None else ""), "exit_code": out.exit_code,
                          "error": out.error, "at": out.finished_at}
            try:
                self.journal_path.parent.mkdir(parents=True, exist_ok=True)
                tmp = self.journal_path.with_suffix(".tmp")
                tmp.write_text(json.dumps(data, indent=1))
                tmp.replace(self.journal_path)
            except OSError:
                log.warning("could not write the fleet journal", path=str(self.journal_path))

    def journal(self) -> dict:
        try:
            return json.loads(self.journal_path.read_text())
        except (OSError, ValueError):
            return {}

    # -- status --------------------------------------------------------------------------------------
    def status(self) -> dict:
        """Every target's phase, state, backfill progress, throttle and last error, with a summary."""
        targets = self._statuses(self.inv.targets)
        by_phase: dict[str, int] = {}
        by_state: dict[str, int] = {}
        for st in targets:
            key = "unreachable" if not st["reachable"] else str(st["phase"])
            by_phase[key] = by_phase.get(key, 0) + 1
            by_state[st["state"]] = by_state.get(st["state"], 0) + 1
        names = {"0": "none"} | {str(p.number): p.name for p in self.phases}
        return {"playbook": self.playbook().name, "inventory": self.inv.source, "targets": targets,
                "summary": {"targets": len(targets), "reachable": sum(1 for t in targets if t["reachable"]),
                            "by_phase": dict(sorted(by_phase.items())), "by_state": by_state,
                            "phase_names": names}}

    def _statuses(self, targets) -> list[dict]:
        targets = list(targets)
        journal = self.journal()
        with ThreadPoolExecutor(max_workers=max(1, min(16, len(targets)))) as pool:
            return list(pool.map(lambda t: self.target_status(t, journal), targets))

    def target_status(self, t: TargetSpec, journal: dict | None = None) -> dict:
        w = self.wave_of[t.name]
        base = {"name": t.name, "wave": w.name, "wave_index": w.index, "env": self.envs[t.name], "labels": t.labels,
                "database": self.where(t), "reachable": True, "running_now": False, "phase": 0, "phase_name": None,
                "state": "pending", "step": None, "backfill": None, "throttles": [], "lock_retries": 0,
                "error": None, "error_at": None, "phases": []}
        j = (journal if journal is not None else self.journal()).get(t.name)
        orch = None
        try:
            orch = self.orchestrator(t)
            st = orch.status()
            extra = self._extras(orch)
            throttles = health.for_status(orch, st["running_now"])
        except (OrchestratorError, psycopg.Error) as err:
            text = err.one_line() if isinstance(err, OrchestratorError) else " ".join(str(err).split())
            return {**base, "reachable": False, "state": "unreachable", "error": self.redact(text),
                    "error_at": time.time()}
        finally:
            if orch is not None:
                orch.close()
        phases = st["phases"]
        phase = 0
        for p in phases:  # the last phase of the unbroken run of applied (or contracted) ones
            if p["status"] not in (APPLIED, CONTRACTED):
                break
            phase = p["phase"]
        statuses = [p["status"] for p in phases]
        busy = next((p for p in phases if p["status"] in (RUNNING, "interrupted", FAILED)
                     or (p["status"] == APPLIED and p["step"] == "contract")
                     or (p["status"] == CONTRACTED and p["step"] == "uncontract")), None)
        if busy is not None:
            state, step = (busy["status"] if busy["status"] not in (APPLIED, CONTRACTED) else
                           ("running" if st["running_now"] else "interrupted")), busy["step"]
        elif all(s == CONTRACTED for s in statuses):
            state, step = "contracted", None
        elif CONTRACTED in statuses:  # part-way through the contract, or part-way back from it
            state, step = ("uncontracting" if st.get("way_back") else "contracting"), None
        else:
            state, step = ("applied" if phase else "pending"), None
        if state == "applied" and st["running_now"]:
            state = "running"
        error = next((p["error"] for p in reversed(phases) if p["error"]), None)
        error_at = (extra["error_at"] or (j["at"] if j and j.get("exit_code") else None)) if error else None
        if error is None and j and j.get("exit_code"):
            error, error_at = j["error"], j["at"]  # a refusal before any step: only the fleet saw it
        bf = self._backfill(st["backfill"])
        return {**base, "running_now": st["running_now"], "phase": phase,
                "phase_name": self.phases[phase - 1].name if phase else None, "state": state, "step": step,
                "backfill": bf, "throttles": [{**h, "since": h["since"].isoformat()} for h in throttles],
                "lock_retries": extra["lock_retries"], "error": self.redact(error) if error else None,
                "error_at": error_at,
                "phases": [{"phase": p["phase"], "name": p["name"], "status": p["status"], "step": p["step"],
                            "finished_at": p["finished_at"].isoformat() if p["finished_at"] else None}
                           for p in phases]}

    @staticmethod
    def _backfill(rows: list[dict]) -> dict | None:
        # The reverse migration's backfill (the undo of contract 5) once it exists, else phase 3's.
        rows = [b for b in rows if b.get("direction") == "reverse"] or [b for b in rows if not b.get("direction")]
        have = [b for b in rows if "rows_done" in b]
        if not have:
            return None
        rates = [b["rows_per_s"] for b in have if b.get("rows_per_s")]
        return {"rows_done": sum(b["rows_done"] for b in have), "rows_scanned": sum(b["rows_scanned"] for b in have),
                "rows_total": sum(b["rows_estimate"] or 0 for b in have), "batches": sum(b["batches"] for b in have),
                "rows_per_s": sum(rates) if rates else None,
                "last_batch_ms": max((b["last_batch_ms"] or 0) for b in have),
                "max_batch_ms": max((b["max_batch_ms"] or 0) for b in have),
                "finished": all(b["finished_at"] is not None for b in have) and len(have) == len(rows),
                "tables": [{"table": b["table"], "rows_done": b["rows_done"], "rows_scanned": b["rows_scanned"],
                            "rows_total": b["rows_estimate"], "finished": b["finished_at"] is not None}
                           for b in have]}

    @staticmethod
    def _extras(orch: Orchestrator) -> dict:
        """Lock retries (statements that gave up on lock_timeout) and when the last failed statement ran."""
        if not orch.state.exists():
            return {"lock_retries": 0, "error_at": None}
        t = qualified(orch.pb.settings.state_schema, "run_log")
        retries, at = db.one(orch.x.conn, Q("""SELECT count(*) FILTER (WHERE outcome = 'LockNotAvailable'),
                                                      max(at) FILTER (WHERE outcome <> 'ok')
                                               FROM {} WHERE playbook = %s""").format(t),
                             (orch.pb.name,))
        return {"lock_retries": retries, "error_at": at.timestamp() if at else None}
