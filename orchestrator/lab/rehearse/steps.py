"""The steps of a rehearsal: run a phase, roll one back (under either policy for values with no enum
label), the DBA's fixes after a refusal, and the after-contract cycle's steps (undo a contract step, the refused
rollback that would drop the new app's values, the DBA's reset of them). Each step is recorded as a Step
(model.py) and checked (checks.py) before the next one."""

from __future__ import annotations

import time
from typing import Sequence

import psycopg
from psycopg import sql

from orchestrator.engine import db
from orchestrator.engine.errors import OrchestratorError, Refused
from orchestrator.engine.sqlkit import extra_type, typed_literal
from orchestrator.lab.rehearse.base import Unit, _count_by_value, fallback_label
from orchestrator.lab.rehearse.checks import Checks
from orchestrator.lab.rehearse.model import Step, _Stop
from orchestrator.run.runner import Orchestrator

NEW_ONLY_WAIT_S = 10.0


class Steps(Checks):
    """The rehearsal's steps: each begins and ends a Step, and checks the database after it."""

    # -- steps --------------------------------------------------------------------------------------
    def run_log(self, after: int) -> tuple[int, int]:
        """(last id, statements that failed and were retried since `after`) from the orchestrator's run log."""
        try:
            with self.connect() as conn:
                row = db.one(conn, sql.SQL("""SELECT coalesce(max(id), %s), count(*) FILTER (WHERE outcome <> 'ok')
                                              FROM {} WHERE id > %s AND playbook = %s""").format(
                    sql.Identifier(self.pb.settings.state_schema, "run_log")), (after, after, self.pb.name))
            return int(row[0]), int(row[1])
        except psycopg.Error:  # no run log (yet): nothing to count
            return after, 0

    def begin(self, cycle: str, action: str, phase: int | None, name: str) -> Step:
        assert self.traffic is not None
        self._log_id = self.run_log(self._log_id)[0]
        step = Step(len(self.result.steps) + 1, cycle, action, phase, name, self.traffic.now())
        self.result.steps.append(step)
        return step

    def end(self, step: Step, outcome: str) -> None:
        assert self.traffic is not None
        step.t1 = self.traffic.now()
        self._log_id, step.retries = self.run_log(self._log_id)
        step.outcome = outcome
        samples = [s for s in self.traffic.samples_now() if s.t <= step.t1 and s.t + s.latency_ms / 1000 >= step.t0]
        worst = max((s.latency_ms for s in samples), default=0.0)
        errors = sum(1 for s in samples if s.error)
        self.say(f"  {step.label:>4} {step.name:<17.17} {step.seconds:6.2f}s  app max {worst:6.1f}ms  "
                 f"err {errors}  {step.result}")

    def dwell(self) -> None:
        time.sleep(self.dwell_s)

    def forward(self, orch: Orchestrator, j: int, cycle: str) -> None:
        phase = orch.phase(j)
        step = self.begin(cycle, "run", j, phase.name)
        try:
            outcome = orch.run(j)
        except OrchestratorError as err:
            self.end(step, "FAILED")
            self.check(f"{cycle}: run {j} ({phase.name})", False, err.one_line(), step)
            raise _Stop(f"phase {j} failed to run") from err
        self.end(step, outcome)
        if (self.swap_phase is None or self.swap_phase == j) and not self._new_app and self.swapped_all():
            self.swap_phase = j
            self.app_new(step)

    def app_new(self, step: Step) -> None:
        """Deploy the new app (every table swapped), and let it write values with no enum label into every
        table, so rolling back the swap meets them in each."""
        assert self.traffic is not None
        self.traffic.use_new_app(allow_new_only=True)
        self._new_app = True
        new_only = set(self.traffic.new_only_values)
        step.note = (step.note + " " if step.note else "") + "new app deployed (varchar values, incl. " + \
            ", ".join(self.traffic.new_only_values) + ")"

        def counts() -> dict[str, int]:
            traffic = self.traffic
            assert traffic is not None  # this check runs while the rehearsal's traffic does
            return {u.label: len([v for v in traffic.written_now(u.written_key).values() if v in new_only])
                    for u in self.units}
        deadline = time.monotonic() + NEW_ONLY_WAIT_S
        while time.monotonic() < deadline and min(counts().values()) < 3:
            time.sleep(0.05)
        got = counts()
        self.check(f"{step.cycle}: new app wrote values with no enum label into every table",
                   min(got.values()) > 0,
                   ", ".join(f"{label}: {n}" for label, n in got.items()) + " rows hold "
                   + "/".join(sorted(new_only)), step)

    def app_old(self, step: Step) -> None:
        assert self.traffic is not None
        self.traffic.use_old_app()
        self._new_app = False
        step.note = (step.note + " " if step.note else "") + "app rolled back to the old version first"

    def roll_back(self, orch: Orchestrator, j: int, cycle: str, policy: str, schemas: dict[int, dict],
                  seeds: dict[int, dict[str, set[str]]], *, ignore_order: bool = False) -> None:
        """ignore_order: compare the catalog with `schemas` column order aside (after the contract was undone)."""
        phase = orch.phase(j)
        unswap = self.swap_phase == j and self.swapped_any()
        step = self.begin(cycle, "rollback", j, phase.name)
        if unswap:
            self.app_old(step)
        unlabeled = self.unlabeled_now() if unswap else {}
        refusals = 0
        while unswap and policy == "refuse" and any(unlabeled.values()):
            step.action = "rollback (refused)"
            try:
                orch.rollback(j)
            except Refused as err:
                refusals += 1
                unlabeled = self.refused_then_fixed(step, err, j, cycle, unlabeled, refusals, schemas[j],
                                                    kind="rollback", ignore_order=ignore_order)
                step = self.begin(cycle, "rollback", j, phase.name)
            except OrchestratorError as err:
                self.end(step, "FAILED")
                self.check(f"{cycle}: rollback {j} refused as designed", False,
                           "expected a refusal naming the rows with no enum label ("
                           + ", ".join(f"{k}: {len(v)}" for k, v in unlabeled.items()) + f"), got: {err.one_line()}",
                           step)
                raise _Stop(f"rollback {j} failed") from err
            else:
                step.action = "rollback"
                self.end(step, "rolled back")
                missed = False
                for u in self.units:
                    still = self.still_unlabeled(u, unlabeled.get(u.label, {}))
                    if still:
                        missed = True
                        self.check(f"{cycle}: rollback {j} refused as designed ({u.label})", False,
                                   f"{len(still)} rows held values with no enum label (e.g. {still[:5]}) yet the "
                                   "rollback did not refuse", step)
                if not missed:  # the app rewrote every such row before the rollback looked: nothing to refuse
                    step.note += " (the app had rewritten every row with no label before the rollback looked)"
                self.after_rollback(step, j, schemas, seeds, ignore_order=ignore_order)
                return
        try:
            outcome = orch.rollback(j)
        except OrchestratorError as err:
            self.end(step, "FAILED")
            self.check(f"{cycle}: rollback {j} ({phase.name})", False, err.one_line(), step)
            raise _Stop(f"rollback {j} failed") from err
        self.end(step, outcome)
        if unswap and policy == "fallback" and any(unlabeled.values()):
            self.policies_done.add("fallback")
            self.apply_fallback_expectation(step, unlabeled)
        self.after_rollback(step, j, schemas, seeds, ignore_order=ignore_order)

    def refused_then_fixed(self, step: Step, err: Refused, j: int, cycle: str, unlabeled: dict[str, dict[str, str]],
                           refusals: int, schema: dict, *, kind: str, what: str = "", expect: Sequence[str] = (),
                           ignore_order: bool = False) -> dict[str, dict[str, str]]:
        """A refusal the rehearsal expected (values with no enum label): it must name the rows and change
        nothing; then the DBA fixes the rows it names, as a team would. Returns the rows still unlabeled."""
        self.end(step, "refused as designed")
        units = self.check_refusal(step, j, err, unlabeled, what=what, expect=expect)
        self.policies_done.add("refuse")
        ok = self.check_schema(step, schema, f"before the refused {kind} (nothing changed)", ignore_order=ignore_order)
        ok &= self.check_rows(step, seed_expected=None)
        if not ok:
            raise _Stop(f"the refused {kind} changed the database") from err
        if refusals > len(self.units):
            self.check(f"{cycle}: rollback {j}: the DBA fixes let the {kind} through", False,
                       f"still refused after {refusals} fixes", step)
            raise _Stop(f"rollback {j} ({kind}) kept refusing") from err
        self.dwell()
        todo: list[Unit | None] = list(units) if units else [None]
        for unit in todo:
            self.dba_fix(cycle, j, unit)
        return self.unlabeled_now()

    def after_rollback(self, step: Step, j: int, schemas: dict[int, dict],
                       seeds: dict[int, dict[str, set[str]]], *, ignore_order: bool = False) -> None:
        what = "the original" if j == 1 else f"after phase {j - 1}"
        ok = self.check_schema(step, schemas[j - 1], what, ignore_order=ignore_order)
        ok &= self.check_rows(step, seed_expected=seeds[j - 1])
        if not ok:
            raise _Stop(f"rollback of phase {j} did not restore the database")
        self.say(f"{'':7}schema identical to {what}{' (column order aside)' if ignore_order else ''}; rows "
                 "present with the right value: "
                 + ", ".join(f"{label} {n:,}" for label, n in step.rows_by_table.items()))
        self.dwell()

    def dba_fix(self, cycle: str, j: int, unit: Unit | None) -> None:
        """What a DBA does after the refusal: give the listed table's rows with no enum label a value that
        has one (every table's when the refusal named no table)."""
        assert self.traffic is not None
        label = fallback_label(self.current_pb)
        units = [unit] if unit is not None else self.units
        step = self.begin(cycle, "dba fix", j, "fix " + (unit.m.table.name if unit else "rows"))
        notes, total = [], 0
        with self.traffic.paused(), self.connect() as conn:
            for u in units:
                value = u.m.mapping[label]
                unlabeled = self.unlabeled(u, self.values(conn, u), enum_state=self.column_is_enum(conn, u))
                ids = sorted(unlabeled)
                if not ids:
                    continue
                with conn.transaction():
                    conn.execute(sql.SQL("UPDATE {} SET {} = {} WHERE id::text = ANY(%s)").format(
                        u.ident, u.col, sql.Literal(value)), (ids,))
                for rid in ids:
                    self.traffic.override_written(rid, value, u.written_key)
                by_value = _count_by_value(unlabeled)
                total += len(ids)
                self.result.fixes.append({"cycle": cycle, "table": u.label, "rows": len(ids), "from": by_value,
                                          "to": value, "label": label, "ids": ids[:10]})
                notes.append(f"UPDATE {u.m.table.name} SET {u.m.column.name} = '{value}' (label {label!r}) on "
                             f"{len(ids)} rows ({', '.join(f'{v}: {n}' for v, n in by_value.items())})")
        step.note = "; ".join(notes) + ", as the refusal's hint says" if notes else "nothing to fix"
        self.end(step, f"{total} rows set to {self.units[0].m.mapping[label]}")
        self.dwell()

    def apply_fallback_expectation(self, step: Step, unlabeled: dict[str, dict[str, str]]) -> None:
        """Under the fallback policy the rollback itself rewrote the rows with no label: expect the label."""
        assert self.traffic is not None
        label = fallback_label(self.current_pb)
        per_table: dict[str, int] = {}
        with self.traffic.paused():
            for u in self.units:
                written = self.traffic.written_now(u.written_key)
                changed = [rid for rid, v in written.items() if u.right_value(v, True) is None]
                for rid in changed:
                    self.traffic.override_written(rid, label, u.written_key)
                per_table[u.label] = len(changed)
        detail = ", ".join(f"{t}: {n}" for t, n in per_table.items())
        step.note = (step.note + " " if step.note else "") + \
            f"fallback policy: rows with no enum label now hold {label!r} ({detail})"
        self.check(f"{step.cycle}: rollback {step.phase} applied the fallback label", sum(per_table.values()) > 0,
                   f"rows the app wrote with no enum label were rewritten to {label!r}: {detail} (before the "
                   "rollback: " + ", ".join(f"{t}: {len(v)}" for t, v in unlabeled.items())
                   + "; verified row by row below)", step)

    # -- steps of the after-contract cycle ----------------------------------------------------------------------
    def undo_contract(self, orch: Orchestrator, j: int, cycle: str) -> None:
        """`rollback j` on a contracted phase: the undo of its contract step, with the new app still running.
        Under `refuse`, values with no enum label stop the swap's undo (the reverse migration) before it starts:
        the team first stops the new app writing them, the refusal must name the rows and change nothing, the
        DBA fixes them, and the undo runs again. Under `fallback` the enum copy gets the fallback label."""
        assert self.traffic is not None
        phase = orch.phase(j)
        policy = self.current_pb.rollback.unmapped
        reverse = j == self.swap_phase  # the undo that brings the enum column back
        step = self.begin(cycle, "undo contract", j, phase.name)
        unlabeled: dict[str, dict[str, str]] = {}
        if reverse and policy == "refuse":
            self.traffic.use_new_app(allow_new_only=False)
            step.note = ("the new app stays but stops writing values with no enum label ("
                         + ", ".join(self.traffic.new_only_values) + ") before going back to the enum")
            unlabeled = self.unlabeled_now()
        refusals = 0
        while True:
            before = self.snapshot() if unlabeled and any(unlabeled.values()) else None
            try:
                outcome = orch.rollback(j)
            except Refused as err:
                if before is None:
                    self.end(step, "FAILED")
                    self.check(f"{cycle}: rollback {j} (undo of contract {j}, {phase.name})", False, err.one_line(),
                               step)
                    raise _Stop(f"the undo of contract {j} was refused") from err
                step.action = "undo contract (refused)"
                refusals += 1
                unlabeled = self.refused_then_fixed(
                    step, err, j, cycle, unlabeled, refusals, before, kind="undo of the contract",
                    what=f"rollback {j} (undo of contract {j})",
                    expect=("reverse migration would lose", "nothing was changed"))
                step = self.begin(cycle, "undo contract", j, phase.name)
                continue
            except OrchestratorError as err:
                self.end(step, "FAILED")
                self.check(f"{cycle}: rollback {j} (undo of contract {j}, {phase.name})", False, err.one_line(), step)
                raise _Stop(f"the undo of contract {j} failed") from err
            break
        self.end(step, outcome)
        if outcome != "contract undone":
            self.check(f"{cycle}: rollback {j} undid contract {j}", False, f"rollback {j} answered {outcome!r}", step)
            raise _Stop(f"rollback {j} did not undo contract {j}")
        still = {u.label: self.still_unlabeled(u, unlabeled.get(u.label, {})) for u in self.units}
        if any(still.values()):
            self.check(f"{cycle}: rollback {j} (undo of contract {j}) refused as designed", False,
                       "rows held values with no enum label yet the reverse migration did not refuse: "
                       + "; ".join(f"{t}: {len(v)}, e.g. {v[:5]}" for t, v in still.items() if v), step)
        ok = True
        if reverse:
            ok &= self.check_enum_back(step)
            if policy == "fallback":
                self.policies_done.add("fallback")
                ok &= self.check_fallback_copy(step)
        if j == 1:
            # In between, the catalog is no earlier state: the swap's undo brings back the sync triggers that
            # contract 2 dropped (the reverse backfill needs them), and the undo of contract 2 then keeps them.
            ok &= self.check_schema(step, self.contract_schemas[0], "before the contract", ignore_order=True)
        ok &= self.check_rows(step, seed_expected=self.forward_seeds[self.n_phases])
        ok &= self.check_app_clean(step)
        if not ok:
            raise _Stop(f"the undo of contract {j} did not restore the database")
        self.dwell()

    def refused_for_new_values(self, orch: Orchestrator, j: int, cycle: str) -> None:
        """`rollback j` would drop the new columns holding the new app's values: it must refuse, say so, and
        change nothing on any table (every table is checked before any is touched)."""
        step = self.begin(cycle, "rollback (refused)", j, orch.phase(j).name)
        before = self.snapshot()
        try:
            orch.rollback(j)
        except Refused as err:
            self.end(step, "refused as designed")
            text = err.one_line()
            self.check(f"{cycle}: rollback {j} refuses to drop the new app's values",
                       "the application wrote" in text and "nothing was changed" in text, text, step)
            diff = self.schema_diff(before, self.snapshot())
            if not self.check(f"{cycle}: rollback {j} refused: no table changed", not diff, "; ".join(diff[:5]),
                              step).passed:
                raise _Stop(f"the refused rollback {j} changed the database") from err
        except OrchestratorError as err:
            self.end(step, "FAILED")
            self.check(f"{cycle}: rollback {j} refuses to drop the new app's values", False, err.one_line(), step)
            raise _Stop(f"rollback {j} failed") from err
        else:
            self.end(step, "rolled back")
            self.check(f"{cycle}: rollback {j} refuses to drop the new app's values", False,
                       "it dropped them without refusing", step)
            raise _Stop(f"rollback {j} dropped the new app's values")
        self.dwell()

    def reset_extra_values(self, j: int, cycle: str) -> None:
        """Before `rollback j` drops the extra columns (is_dynamic, execution_pattern), which hold the new app's
        values after a contract (the rolling deploy's new instances wrote them): the rollback would refuse to
        lose them (refused_for_new_values), so the DBA copies them elsewhere (here: the report) and sets them
        back to the default."""
        step = self.begin(cycle, "dba fix", j, "reset new columns")
        notes, total = [], 0
        assert self.traffic is not None
        with self.traffic.paused(), self.connect() as conn:
            for (label, col), rows in self.extra_values().items():
                u = next(u for u in self.units if u.label == label)
                c = next(c for c in u.m.extra_columns if c.name == col)
                value = c.default if c.default is not None else c.backfill
                new = typed_literal(value, extra_type(c)) if value is not None else sql.SQL("NULL")
                conn.execute(sql.SQL("UPDATE {} SET {} = {} WHERE id::text = ANY(%s)").format(
                    u.ident, sql.Identifier(col), new), (sorted(rows),))
                total += len(rows)
                notes.append(f"UPDATE {u.m.table.name} SET {col} = {value if value is not None else 'NULL'} on "
                             f"{len(rows)} rows ({', '.join(f'{v}: {n}' for v, n in _count_by_value(rows).items())}; "
                             f"e.g. ids {sorted(rows)[:3]})")
        step.note = ("; ".join(notes) + f": rollback {j} drops these columns and refuses to lose the new app's "
                     "values; they were copied elsewhere first")
        self.result.notes.append(f"{cycle}: before rollback {j} dropped the new columns, the DBA copied the new "
                                 f"app's values in them elsewhere and reset them: {'; '.join(notes)}")
        self.end(step, f"{total} values reset")
        self.dwell()
