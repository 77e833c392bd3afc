"""Rollback rehearsal under live application traffic.

For every phase k of a playbook: run phases 1..k forward, then roll back k..1, and after each rollback
check that the schema is what it was before that phase (after the last one: the original schema, by
catalog comparison) and that no row was lost or changed in ANY migrated table (every original row and every
row the simulated application wrote holds the value it should; built-in rows present exactly when the seed
phase is applied).

The database: for a playbook on Chatter's tables (`chatter.is_chatter`: both columns of the enum
`workflowtype`, workflow_templates.workflow_type and template_specs.workflow_type) Chatter's real schema
(`chatter.create_chatter_schema` + `insert_chatter_rows`) and the app in Chatter mode (`AppTraffic(...,
chatter=True)`: full rows into both tables and a JOIN probe between them on the enum column, which must
never fail); for a one-column playbook the simplified one-table fixture (`seed.create_seed_schema`).

Then run forward through the contract. The app keeps writing and reading the whole time; every statement's
latency and error is recorded, and the report (`report.py`) shows per phase and per rollback how long it took
and how long the app waited.

The app follows a real rollout: old vocabulary (enum labels) before the swap, the new app (varchar
values, including values with no enum label such as `medical_chat`) right after it, and back to the old
app before the swap is rolled back. Values with no label therefore exist when the swap is rolled back:

* under `rollback.unmapped: refuse` the rollback must refuse and list those rows (of the first table that
  has some); the rehearsal checks that it did, that the ids it lists are rows of that table with no label
  and that nothing changed, then fixes that table's rows the way a DBA would (an UPDATE to the fallback
  label's new value, recorded in the report) and rolls back again: refused again for the next table that
  has such rows, until none is left;
* under `rollback.unmapped: fallback` the rollback rewrites them to the fallback label in every table; the
  rehearsal checks that every such row holds it.

The playbook's own policy is exercised first; the last cycle that rolls back the swap uses a copy of the
playbook with the other policy (an extra cycle is added when needed), so every rehearsal shows both.

After the contract, the "after contract" cycle takes the migration all the way back under the same traffic:
`rollback n`..`1` undo each contract step (the swap's undo is the reverse migration; the new app stays, but
under `refuse` it first stops writing values with no label, the undo must refuse naming the rows and change
nothing, the DBA fixes them and it runs again; under `fallback` the enum copy must hold the fallback label),
then the ordinary rollbacks n..1 (rollback 1 must refuse to drop the new app's values in the extra columns,
changing nothing; the DBA resets them and it runs), each compared with the catalog after that phase of the
final cycle, column order aside (the enum column comes back as the last one); then forward through the contract
again, whose catalog must be the first contract's.

Row checks need a consistent view of "what the app last wrote": the app is held between two statements
for the moment of the check (no statement is in flight, none is timed), never during a phase or rollback.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Sequence

import psycopg
import structlog
from psycopg import sql

from orchestrator.engine import db
from orchestrator.engine.errors import BadInput, OrchestratorError
from orchestrator.engine.playbook import Playbook
from orchestrator.engine.state import State
from orchestrator.kinds.phases.shadow import AddShadowColumn
from orchestrator.lab import chatter
from orchestrator.lab.rehearse.base import fallback_label, other_policy
from orchestrator.lab.rehearse.change_type import ChangeTypeRehearsal
from orchestrator.lab.rehearse.model import AFTER_CONTRACT, RehearsalResult, _Stop
from orchestrator.lab.rehearse.steps import Steps
from orchestrator.lab.rehearse.traffic import LockSampler, RehearsalTraffic
from orchestrator.lab.seed import create_seed_schema, insert_rows
from orchestrator.run.runner import Orchestrator

log = structlog.get_logger()


# --------------------------------------------------------------------------------------------------
# The rehearsal


class Rehearsal(Steps):
    """The rehearsal run: set-up (prepare), the cycles, the final forward + contract and the after-contract
    cycle, under the app's traffic (run). The state is RehearsalBase's (base.py), the checks Checks' (checks.py),
    the steps Steps' (steps.py)."""

    # -- cycles ---------------------------------------------------------------------------------------
    def cycle(self, k: int, pb: Playbook, label: str) -> None:
        self.current_pb = pb
        self.say(f"[bold]{label}[/]: phases 1..{k} forward, then roll back {k}..1"
                 + (f"   (rollback.unmapped: {pb.rollback.unmapped})" if pb is not self.pb else ""))
        orch = Orchestrator(pb, self.dsn)
        schemas, seeds = {0: self.original_schema}, {0: self.original_seeds}
        try:
            for j in range(1, k + 1):
                self.forward(orch, j, label)
                schemas[j], seeds[j] = self.snapshot(), self.seed_present()
                self.dwell()
            for j in range(k, 0, -1):
                self.roll_back(orch, j, label, pb.rollback.unmapped, schemas, seeds)
        finally:
            orch.close()

    def final(self) -> None:
        label = "final: forward + contract"
        self.current_pb = self.pb
        self.say(f"[bold]{label}[/]: every phase, then the contract")
        orch = Orchestrator(self.pb, self.dsn)
        deploy = self.start_rolling_deploy()
        self.forward_schemas, self.forward_seeds = {0: self.original_schema}, {0: self.original_seeds}
        try:
            for j in range(1, self.n_phases + 1):
                if deploy is not None:
                    deploy.stage(f"phase {j}")
                self.forward(orch, j, label)
                if deploy is not None:
                    for done in deploy.after_phase(j):
                        self.say(f"{'':7}rolling deploy: {done}")
                    deploy.settle()
                self.forward_schemas[j], self.forward_seeds[j] = self.snapshot(), self.seed_present()
                self.dwell()
            self.contract_schemas = {0: self.forward_schemas[self.n_phases]}
            self.contract_through(orch, label, deploy, first=True)
        finally:
            if deploy is not None:
                deploy.stop()
            orch.close()
        if deploy is not None:
            self.finish_rolling_deploy(deploy, self.result.steps[-1])

    def contract_through(self, orch: Orchestrator, label: str, deploy=None, *, first: bool = True) -> None:
        """contract 1..n, then the checks of a contracted migration: target type, retired column and enum type
        gone, every row with the mapped value of what the app last wrote. Keeps the catalog after each contract
        step (self.contract_schemas[j]) when it is the first contract, for the undo of each step to compare with."""
        for j in range(1, self.n_phases + 1):
            phase = orch.phase(j)
            if deploy is not None:
                deploy.stage(f"contract {j}")
            step = self.begin(label, "contract", j, phase.name)
            try:
                # The rehearsal compresses the rolling deploy: its old instances stopped a moment ago.
                outcome = orch.contract(j, old_version_gone=True)[0]
            except OrchestratorError as err:
                self.end(step, "FAILED")
                self.check(f"contract {j} ({phase.name})", False, err.one_line(), step)
                raise _Stop(f"contract {j} failed") from err
            self.end(step, outcome)
            if first:
                self.contract_schemas[j] = self.snapshot()
            self.dwell()
        step = self.result.steps[-1]
        prefix = "after the contract" if first else f"{label}: after the contract"
        with self.connect() as conn:
            for u in self.units:
                want = (f"character varying({u.m.target.length})" if u.m.target.type == "varchar" else "text")
                info = self.column_info(conn, u, u.m.column.name)
                retired = self.column_info(conn, u, u.m.retired) is not None
                self.check(f"{prefix}: {u.label} has the target type, retired column gone",
                           info is not None and info[1] == want and not retired,
                           f"{u.label} is {info[1] if info else 'missing'} (want {want})"
                           + ("; retired column still there" if retired else "; retired column gone"), step)
        if self.pb.settings.drop_enum_type:
            present = self.enum_exists()
            self.check(f"{prefix}: enum type {self.pb.enum_type[1]} dropped", not present,
                       "still there" if present else "no column uses it any more and it is gone", step)
        if not first:  # the same contracted catalog as the first time, but for the order of the columns
            self.check_schema(step, self.contract_schemas[self.n_phases], "the first contract's", ignore_order=True)
        if deploy is not None:  # the new app ran through the contract; stopped before the last row check
            deploy.settle()
            deploy.stop()
        self.check_rows(step, seed_expected={u.label: set(u.seed_ids) for u in self.units if u.seed_ids})

    # -- after the contract: all the way back, then forward again ---------------------------------------------
    def after_contract(self) -> None:
        """The contracted migration taken all the way back under the same traffic: every contract step undone,
        the last one first (the swap's undo is the online reverse migration; the new app stays), then the
        ordinary rollbacks 6..1 (the old app back before the swap's), to the original schema (column order
        aside) and rows; then forward again through the contract."""
        label = AFTER_CONTRACT
        pb = self.current_pb = self.pb  # the contracted migration's own playbook (its fingerprint is stored)
        self.say(f"[bold]{label}[/]: undo contract {self.n_phases}..1, roll back {self.n_phases}..1, then every "
                 f"phase and the contract again   (rollback.unmapped: {pb.rollback.unmapped})")
        orch = Orchestrator(pb, self.dsn)
        try:
            for j in range(self.n_phases, 0, -1):
                self.undo_contract(orch, j, label)
            for j in range(self.n_phases, 0, -1):
                # the new app's data in the new columns: the rollback that drops them must refuse
                if isinstance(orch.phase(j), AddShadowColumn) and self.extra_values():
                    self.refused_for_new_values(orch, j, label)
                    self.reset_extra_values(j, label)
                self.roll_back(orch, j, label, pb.rollback.unmapped, self.forward_schemas, self.forward_seeds,
                               ignore_order=True)
                self.check_app_clean(self.result.steps[-1])
            for j in range(1, self.n_phases + 1):
                self.forward(orch, j, label)
                self.dwell()
            self.contract_through(orch, label, first=False)
        finally:
            orch.close()

    def start_rolling_deploy(self):
        """With app_versions: SQLAlchemy instances of the old app (asyncpg, psycopg) through its version's views,
        replaced one by one by the new app as the phases go (orchestrator/rolling_deploy.py)."""
        if self.pb.app_versions is None or not self.units or len(self.units) != 2:
            return None
        from orchestrator.lab.rolling_deploy import RollingDeploy
        self.say(f"{'':7}rolling deploy: 3 instances of the old app (asyncpg, psycopg, asyncpg) through "
                 f"{self.pb.app_versions.old}, replaced after phases 4, 5 and 6 by the new app through "
                 f"{self.pb.app_versions.new}")
        return RollingDeploy(self.pb, self.dsn).start()

    # -- entry point --------------------------------------------------------------------------------------
    def prepare(self) -> None:
        with self.connect() as conn:
            if State(conn, self.pb.settings.state_schema, self.pb.name).migration() is not None:
                raise BadInput(f"{self.pb.name} has already started on this database: a rehearsal needs the "
                               "migration not started (or fully rolled back)")
            self.result.server = self.result.server or db.scalar(conn, sql.SQL("SHOW server_version"))
        existing = [u for u in self.units if self.table_exists(u)]
        if existing:
            missing = [u.label for u in self.units if u not in existing]
            if missing:
                raise BadInput(f"{', '.join(missing)}: table missing while {existing[0].label}'s exists; a rehearsal "
                               "needs every table of the playbook (a staging copy) or none (it creates them)")
            for u in self.units:
                with self.connect() as conn:
                    if self.column_info(conn, u, "id") is None:
                        raise BadInput(f"{u.m.table.schema_}.{u.m.table.name} has no 'id' column: the app traffic "
                                       "simulator writes rows by id")
            tables = ", ".join(f"{s}.{t}" for s, t in self.pb.tables)
            self.say(f"using the existing tables {tables} (rows not generated)")
            self.result.notes.append(f"the tables existed ({tables}): their rows were used as they are; no rows "
                                     "were generated")
            self.result.schema_source = "existing tables, rows used as they are"
        elif self.chatter:
            t = time.monotonic()
            schema = self.names.schema
            with psycopg.connect(self.dsn) as conn:
                chatter.create_chatter_schema(conn, schema)
                chatter.insert_chatter_rows(conn, self.rows, schema=schema)
            self.say(f"created Chatter's schema in {schema} with {self.rows:,} {chatter.TEMPLATES} rows (and "
                     f"{chatter.SPECS} rows) in {time.monotonic() - t:.1f} s")
            self.result.schema_source = ("Chatter's schema (users, workflow_templates, template_specs) with "
                                         "generated rows")
        else:
            t = time.monotonic()
            with psycopg.connect(self.dsn) as conn:
                create_seed_schema(conn, self.names, enum_default=self.names.labels[0])
                insert_rows(conn, self.rows, self.names)
            self.say(f"seeded {self.names.schema}.{self.names.table} with {self.rows:,} rows "
                     f"in {time.monotonic() - t:.1f} s")
            self.result.schema_source = "the simplified one-table fixture with generated rows"
        self.original_schema = self.snapshot()
        with self.connect() as conn:
            for u in self.units:
                u.original = self.values(conn, u)
        self.result.rows = sum(len(u.original) for u in self.units)
        self.result.rows_by_table = {u.label: len(u.original) for u in self.units}
        self.result.builtin_by_table = {u.label: len(u.seed_ids) for u in self.units}
        self.original_seeds = self.seed_present()
        probe = Orchestrator(self.pb, self.dsn, dry_run=True)
        try:
            self.n_phases = len(probe.phases)
        finally:
            probe.close()

    def run(self) -> RehearsalResult:
        self.prepare()
        for k in self.cycles or ():
            if not 1 <= k <= self.n_phases:
                raise BadInput(f"phase {k} does not exist; {self.pb.name} has phases 1..{self.n_phases}")
        m0 = self.units[0].m
        self.traffic = RehearsalTraffic(self.dsn, self.names, writers=self.writers, readers=self.readers,
                                        mapping=dict(m0.mapping), seed=self.traffic_seed, chatter=self.chatter)
        self.traffic.start()
        self.sampler = LockSampler(self.dsn, self.traffic.now).start()
        self.say(f"app traffic: {self.writers} writers, {self.readers} readers"
                 + (f" on {chatter.TEMPLATES} and {chatter.SPECS}, with a JOIN probe between them"
                    if self.chatter else ""))
        time.sleep(self.dwell_s)
        other = other_policy(self.pb)
        self.result.notes.append(
            "migrated columns: " + ", ".join(f"{u.label} ({len(u.original):,} rows"
                                             + (f", {len(u.seed_ids)} built-in rows" if u.seed_ids else "") + ")"
                                             for u in self.units)
            + f"; every one is checked row by row after every rollback ({self.result.schema_source}).")
        self.result.notes.append(
            f"playbook policy rollback.unmapped: {self.pb.rollback.unmapped}. The last cycle that rolls back "
            f"the swap uses a copy of the playbook with rollback.unmapped: {other.rollback.unmapped}, so both "
            f"are exercised.")
        if self.pb.rollback.unmapped == "refuse" or other.rollback.unmapped == "refuse":
            label = fallback_label(self.pb)
            self.result.notes.append(
                f"under 'refuse' the rollback of the swap must refuse while rows of any table hold values with no "
                f"enum label (the new app writes {', '.join(self.traffic.new_only_values)} into "
                f"{' and '.join(t for _, t in self.pb.tables)}); it names the rows of one table at a time, and the "
                f"rehearsal then does what a DBA would: UPDATE that table's rows to {m0.mapping[label]!r} (the "
                f"value of label {label!r}), recorded below, and rolls back again.")
        report = None
        try:
            queue = list(self.cycles or range(1, self.n_phases + 1))
            while queue:
                k = queue.pop(0)
                swap_in = self.swap_phase is not None and k >= self.swap_phase
                later = any(self.swap_phase is not None and q >= self.swap_phase for q in queue)
                use_other = (self.both_policies and swap_in and not later
                             and self.pb.rollback.unmapped in self.policies_done
                             and other.rollback.unmapped not in self.policies_done)
                pb = other if use_other else self.pb
                self.cycle(k, pb, f"cycle {k}" + (f" ({other.rollback.unmapped})" if use_other else ""))
                if (not queue and self.both_policies and self.swap_phase is not None and k >= self.swap_phase
                        and other.rollback.unmapped not in self.policies_done):
                    queue.append(k)  # one more cycle, with the other policy
            if self.do_final:
                self.final()
                if self.do_after_contract:
                    self.after_contract()
        except _Stop as stop:
            self.result.stopped = f"{stop}; later steps were not run (the database no longer matches the original)"
            self.say(f"[red]stopped[/]: {self.result.stopped}")
        except Exception as err:  # noqa: BLE001 - the report must still say what happened
            if self.result.steps and not self.result.steps[-1].t1:
                self.end(self.result.steps[-1], "FAILED")
                self.result.steps[-1].ok = False
            detail = f"{type(err).__name__}: {' '.join(str(err).split())}"
            self.check("the rehearsal ran to the end", False, detail)
            self.result.stopped = f"unexpected error: {detail}"
            log.exception("rehearsal aborted")
        finally:
            self.sampler.stop()
            report = self.traffic.stop()
            self.result.samples = report.samples
            self.result.lock_samples = self.sampler.samples
            self.result.lock_polls = self.sampler.polls
            self.result.finished_at = datetime.now(timezone.utc)
        errors = self.result.app_errors
        self.check("zero app errors over the whole rehearsal", not errors,
                   f"{len(errors)} of {len(report.samples):,} statements failed, e.g. "
                   + "; ".join(f"{e.kind} at {e.t:.2f}s: {e.error}" for e in errors[:3]) if errors else
                   f"{len(report.samples):,} app statements, none failed")
        if self.chatter:
            self.check_join_probe(report.samples)
        if self.both_policies and self.swap_phase is not None and not self.result.stopped:
            self.check("both rollback policies exercised", {"refuse", "fallback"} <= self.policies_done,
                       f"exercised: {', '.join(sorted(self.policies_done)) or 'none'}")
        return self.result


def rehearse(pb: Playbook, dsn: str | None = None, *, rows: int = 200_000, writers: int = 4, readers: int = 1,
             cycles: Sequence[int] | None = None, both_policies: bool = True, final: bool = True,
             after_contract: bool = True, dwell_s: float = 0.2, console=None,
             playbook_source: str = "") -> RehearsalResult:
    """Run a rehearsal on `dsn` (used as it is: a staging database), or on a scratch database of a
    PostgreSQL started for the occasion (embedded) and thrown away afterwards."""
    from orchestrator.lab import server

    srv = None
    label = ""
    if dsn is None:
        srv = server.provide()
        if srv.kind == "external":
            dsn = srv.dsn
        else:
            dsn = server.create_database(srv.dsn, "rehearsal")
            label = f"PostgreSQL {srv.major} ({srv.kind}, scratch, removed afterwards)"
            if console is not None:
                console.print(f"started {label}", highlight=False)
    try:
        if pb.kind == "change_type":
            return ChangeTypeRehearsal(pb, dsn, rows=rows, writers=writers, cycles=cycles,
                                       after_contract=after_contract, dwell_s=dwell_s, console=console,
                                       playbook_source=playbook_source, server_label=label).run()
        r = Rehearsal(pb, dsn, rows=rows, writers=writers, readers=readers, cycles=cycles,
                      both_policies=both_policies, final=final, after_contract=after_contract, dwell_s=dwell_s,
                      console=console,
                      playbook_source=playbook_source, server_label=label)
        return r.run()
    finally:
        if srv is not None:
            srv.stop()
