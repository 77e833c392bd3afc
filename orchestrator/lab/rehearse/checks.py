"""The checks a rehearsal evaluates: every row present with the right value, the schema identical to an
earlier state's, refusals that name the right rows, the enum column back after the swap's undo, the fallback
label, zero app errors, the JOIN probe and the rolling deploy. Each one is recorded as a Check (model.py)."""

from __future__ import annotations

import ast
import re
from typing import Sequence

import structlog
from psycopg import sql

from orchestrator.engine import db
from orchestrator.engine.errors import Refused
from orchestrator.lab import chatter
from orchestrator.lab.rehearse.base import RehearsalBase, Unit, fallback_label
from orchestrator.lab.rehearse.model import Check, Step
from orchestrator.lab.traffic import StatementSample

log = structlog.get_logger()


class Checks(RehearsalBase):
    """The rehearsal's checks: each records a Check in the result and says what failed."""

    def check(self, name: str, passed: bool, detail: str = "", step: Step | None = None) -> Check:
        c = Check(name, passed, detail, step.n if step else None)
        self.result.checks.append(c)
        if step is not None and not passed:
            step.ok = False
        if not passed:
            self.say(f"  [red]FAILED[/] {name}: {detail}")
            log.warning("rehearsal check failed", check=name, detail=detail)
        return c

    # -- checks ---------------------------------------------------------------------------------------
    def check_rows(self, step: Step, *, seed_expected: dict[str, set[str]] | None) -> bool:
        """With the app held: in every table, every original and app-written row present with the right
        value; with `seed_expected`, no other row but exactly the expected built-in rows."""
        assert self.traffic is not None
        seen: list[tuple[Unit, dict[str, str], bool, dict[str, str]]] = []
        with self.traffic.paused(), self.connect() as conn:
            for u in self.units:
                seen.append((u, self.traffic.written_now(u.written_key), self.column_is_enum(conn, u),
                             self.values(conn, u)))
        prefix = f"{step.cycle}: {step.action} {step.phase}"
        ok = True
        step.rows_checked, step.rows_by_table = 0, {}
        for u, written, enum_state, actual in seen:
            expected = {**u.original, **written}
            lost, wrong = [], []
            for rid, value in expected.items():
                got = actual.get(rid)
                if got is None:
                    lost.append(rid)
                elif got != u.right_value(value, enum_state):
                    wrong.append((rid, value, got))
            extra = set(actual) - set(expected)
            # the rolling deploy's instances write rows of their own (checked in finish_rolling_deploy)
            deployed = {i for i in extra if i.startswith(("RDOLD", "RDNEW"))}
            unexpected = sorted(extra - set(u.seed_ids) - deployed)
            step.rows_by_table[u.label] = len(expected)
            step.rows_checked += len(expected)
            state = "enum column: old labels" if enum_state else "varchar column: new values"
            ok &= self.check(f"{prefix}: {u.label}: no row lost", not lost,
                             f"{len(lost)} of {len(expected):,} rows missing, e.g. {lost[:5]}" if lost else
                             f"{len(expected):,} rows present ({len(u.original):,} original, "
                             f"{len(written):,} written by the app)", step).passed
            ok &= self.check(f"{prefix}: {u.label}: every row holds the right value", not wrong,
                             (f"{len(wrong)} rows wrong ({state}), e.g. "
                              + "; ".join(f"{r}: wrote {v!r}, holds {g!r}" for r, v, g in wrong[:5])) if wrong else
                             f"all {len(expected):,} rows hold the value the app last wrote ({state})", step).passed
            if seed_expected is not None:
                seeds = extra & set(u.seed_ids)
                want = seed_expected.get(u.label, set())
                problems = ([f"unexpected rows {unexpected[:5]}"] if unexpected else []) + (
                    [f"built-in rows present {sorted(seeds)} but expected {sorted(want)}"] if seeds != want else [])
                ok &= self.check(f"{prefix}: {u.label}: no row left behind, built-in rows as expected",
                                 not problems, "; ".join(problems) or (
                                     "no unexpected rows" + (f"; {len(seeds)} of {len(u.seed_ids)} built-in rows "
                                                             "present, as expected" if u.seed_ids else "")),
                                 step).passed
        return ok

    def check_schema(self, step: Step, want: dict, what: str, *, ignore_order: bool = False) -> bool:
        diff = self.schema_diff(want, self.snapshot(), ignore_order=ignore_order)
        step.schema = "differs" if diff else "identical"
        what += " (ignoring column order)" if ignore_order else ""
        return self.check(f"{step.cycle}: {step.action} {step.phase}: schema identical to {what}", not diff,
                          "; ".join(diff[:6]) + (f" (+{len(diff) - 6} more)" if len(diff) > 6 else "")
                          if diff else "catalog comparison of " + ", ".join(self.schemas) + ": tables ("
                          + ", ".join(t for _, t in self.pb.tables) + "), columns, indexes, constraints, "
                          "triggers, enums, functions, sequences", step).passed

    def check_refusal(self, step: Step, j: int, err: Refused, unlabeled: dict[str, dict[str, str]], *,
                      what: str = "", expect: Sequence[str] = ()) -> list[Unit]:
        """The refusal must name, per table, rows that hold values with no label, and count them right (and
        say every phrase of `expect`). Returns the units it names."""
        text = str(err)
        named = re.findall(r"([\w.\"]+): (\d+) rows, e\.g\. ids (\[[^\]]*\])", text)
        units, problems = [], []
        if not named:
            problems.append("the refusal names no table with a count and ids")
        problems += [f"the refusal does not say {phrase!r}" for phrase in expect if phrase not in text]
        for label, count, ids_text in named:
            unit = next((u for u in self.units if u.label == label), None)
            try:
                ids = [str(i) for i in ast.literal_eval(ids_text)]
            except (ValueError, SyntaxError):
                ids = []
            if unit is None or not ids or not set(ids) <= set(unlabeled.get(label, {})):
                problems.append(f"{label}: ids {ids} are not its rows with no enum label")
                continue
            units.append(unit)
            listed = int(count)
            lo, hi = len(self.still_unlabeled(unit, unlabeled[label])), len(unlabeled[label])
            if not lo <= listed <= hi:
                problems.append(f"{listed} rows of {label} listed, but it had {hi} such rows before the rollback "
                                f"and still has at least {lo}")
        where = ", ".join(u.label for u in units) or "?"
        self.check(f"{step.cycle}: {what or f'rollback {j}'} refused as designed ({where})", not problems,
                   "; ".join(problems) + f": {err.one_line()}" if problems else
                   f"rollback refused as designed, naming the rows of {where}: {err.one_line()}", step)
        self.say(f"{'':7}rollback refused as designed, rows of {where} listed: {err.one_line()[:140]}")
        return units

    def check_enum_back(self, step: Step) -> bool:
        """After the swap's undo: the enum type and, in every table, the enum column beside the varchar one."""
        found = {}
        with self.connect() as conn:
            for u in self.units:
                info = self.column_info(conn, u, u.m.retired)
                found[u.label] = info[1] if info and info[0] else None
        return self.check(f"{step.cycle}: rollback {step.phase} (undo of contract {step.phase}): the enum column is "
                          f"back in every table", all(found.values()),
                          ", ".join(f"{t}: {u_retired} {v or 'missing'}" for (t, v), u_retired in
                                    zip(found.items(), (u.m.retired for u in self.units))), step).passed

    def check_fallback_copy(self, step: Step) -> bool:
        """Under `fallback`, the reverse migration's enum copy holds the fallback label for every value with no
        label (the varchar column keeps it until the swap is rolled back)."""
        label = fallback_label(self.current_pb)
        counts: dict[str, tuple[int, int]] = {}
        with self.connect() as conn:
            for u in self.units:
                no_label = sql.SQL("{} IS NOT NULL AND NOT ({}::text = ANY(%s))").format(u.col, u.col)
                total, wrong = db.one(conn, sql.SQL(
                    "SELECT count(*), count(*) FILTER (WHERE {}::text IS DISTINCT FROM %s) FROM {} WHERE {}").format(
                    sql.Identifier(u.m.retired), u.ident, no_label), (label, sorted(u.m.reverse)))
                counts[u.label] = (total, wrong)
        return self.check(f"{step.cycle}: rollback {step.phase} (undo of contract {step.phase}): the enum copy "
                          f"holds the fallback label", not any(w for _, w in counts.values()),
                          ", ".join(f"{t}: {n} rows with no enum label, {w} without {label!r} in the enum copy"
                                    for t, (n, w) in counts.items()), step).passed

    def check_app_clean(self, step: Step) -> bool:
        """No app statement that overlapped the step failed."""
        assert self.traffic is not None
        during = [s for s in self.traffic.samples_now() if s.t <= step.t1 and s.t + s.latency_ms / 1000 >= step.t0]
        errors = [s for s in during if s.error]
        return self.check(f"{step.cycle}: {step.action} {step.phase}: zero app errors during the step", not errors,
                          f"{len(errors)} of {len(during):,} app statements failed, e.g. "
                          + "; ".join(f"{e.kind}: {e.error}" for e in errors[:3]) if errors else
                          f"{len(during):,} app statements, none failed", step).passed

    def finish_rolling_deploy(self, deploy, step: Step) -> None:
        ids = deploy.written_ids()
        rows: dict = {}
        with self.connect() as conn:
            for table, wrote in ids.items():
                rows[table] = dict(conn.execute(sql.SQL("SELECT id, workflow_type::text FROM {} WHERE id = ANY(%s)")
                                                .format(sql.Identifier(table)), (sorted(wrote),)).fetchall())
        problems = deploy.problems(rows)
        self.result.rolling_deploy = deploy.latency()
        old, new = self.result.rolling_deploy["old"], self.result.rolling_deploy["new"]
        self.check("rolling deploy: both app versions side by side, zero errors, own vocabulary, no write lost",
                   not problems and old["ops"] > 0 and new["ops"] > 0,
                   "; ".join(problems) if problems else
                   f"old app {old['ops']:,} operations (p99 {old['p99_ms']} ms), new app {new['ops']:,} "
                   f"(p99 {new['p99_ms']} ms), {sum(len(v) for v in ids.values()):,} rows written, all found", step)

    def check_join_probe(self, samples: list[StatementSample]) -> None:
        """Chatter's app joins template_specs to workflow_templates on the migrated column: it must work in
        every state (both enum, both varchar), so it must never fail, in any step."""
        joins = [s for s in samples if s.kind == "join"]
        failed = [s for s in joins if s.error]
        bad_steps = sorted({st.n for st in self.result.steps for s in failed
                            if s.t <= st.t1 and s.t + s.latency_ms / 1000 >= st.t0})
        covered = sum(1 for st in self.result.steps
                      if any(s.t <= st.t1 and s.t + s.latency_ms / 1000 >= st.t0 for s in joins))
        self.check(f"JOIN probe {chatter.SPECS} x {chatter.TEMPLATES} on {chatter.COLUMN}: zero errors at every step",
                   bool(joins) and not failed,
                   (f"{len(failed)} of {len(joins):,} JOIN statements failed, in steps {bad_steps[:10]}, e.g. "
                    + "; ".join(f"at {e.t:.2f}s: {e.error}" for e in failed[:3])) if failed else
                   f"{len(joins):,} JOIN statements, none failed; they ran during {covered} of "
                   f"{len(self.result.steps)} steps" if joins else "the app never ran the JOIN probe")
