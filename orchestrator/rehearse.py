"""Rollback rehearsal under live application traffic.

For every phase k of a playbook: run phases 1..k forward, then roll back k..1, and after each rollback
check that the schema is what it was before that phase (after the last one: the original schema, by
catalog comparison) and that no row was lost or changed (every original row and every row the simulated
application wrote holds the value it should). Then run forward through the contract. The app keeps
writing and reading the whole time; every statement's latency and error is recorded, and the report
(`report.py`) shows per phase and per rollback how long it took and how long the app waited.

The app follows a real rollout: old vocabulary (enum labels) before the swap, the new app (varchar
values, including values with no enum label such as `medical_chat`) right after it, and back to the old
app before the swap is rolled back. Values with no label therefore exist when the swap is rolled back:

* under `rollback.unmapped: refuse` the rollback must refuse and list those rows; the rehearsal checks
  that it did and that nothing changed, then fixes the rows the way a DBA would (an UPDATE to the
  fallback label's new value, recorded in the report) and rolls back again;
* under `rollback.unmapped: fallback` the rollback rewrites them to the fallback label; the rehearsal
  checks that every such row holds it.

The playbook's own policy is exercised first; the last cycle that rolls back the swap uses a copy of the
playbook with the other policy (an extra cycle is added when needed), so every rehearsal shows both.

Row checks need a consistent view of "what the app last wrote": the app is held between two statements
for the moment of the check (no statement is in flight, none is timed), never during a phase or rollback.
"""

from __future__ import annotations

import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Iterator, Sequence

import psycopg
import structlog
from psycopg import sql

from .db import safe_dsn
from .demo import SeedNames, create_seed_schema, insert_rows, schema_snapshot, snapshot_diff
from .errors import BadInput, OrchestratorError, Refused
from .playbook import Playbook
from .runner import Orchestrator
from .state import State
from .traffic import AppTraffic, StatementSample

log = structlog.get_logger()

APP_NAME = "app-traffic"  # the application_name AppTraffic connects with
PAUSE_TIMEOUT_S = 30.0
NEW_ONLY_WAIT_S = 10.0


# --------------------------------------------------------------------------------------------------
# Traffic that can be held between statements, with a live view of what it wrote


class RehearsalTraffic(AppTraffic):
    """AppTraffic plus a gate: `paused()` waits until no app statement is in flight and holds every
    thread before its next one, so `written_now()` matches the database exactly while paused."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._gate = threading.Condition()
        self._held = False
        self._in_flight = 0

    @property
    def t0(self) -> float:
        return self._t0

    def now(self) -> float:
        """Seconds since start(), on the clock of the statement samples."""
        return time.monotonic() - self._t0

    def _step(self, w, vocab) -> None:  # one app statement
        with self._gate:
            while self._held and not self._stop.is_set():
                self._gate.wait(0.05)
            self._in_flight += 1
        try:
            super()._step(w, vocab)
        finally:
            with self._gate:
                self._in_flight -= 1
                self._gate.notify_all()

    @contextmanager
    def paused(self) -> Iterator[None]:
        deadline = time.monotonic() + PAUSE_TIMEOUT_S
        with self._gate:
            self._held = True
            while self._in_flight and time.monotonic() < deadline:
                self._gate.wait(0.05)
            stuck = self._in_flight
        try:
            if stuck:
                raise RuntimeError(f"{stuck} app statements still running after {PAUSE_TIMEOUT_S:.0f} s")
            yield
        finally:
            with self._gate:
                self._held = False
                self._gate.notify_all()

    def written_now(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for w in self._workers:
            out.update(dict(w.written))
        return out

    def samples_now(self) -> list[StatementSample]:
        return [s for w in self._workers for s in list(w.samples)]

    def override_written(self, rid: str, value: str) -> None:
        """Someone else (the DBA, a rollback's fallback) wrote this row last: expect `value` from now on."""
        for w in self._workers:
            if rid in w.written:
                w.written[rid] = value
                return


# --------------------------------------------------------------------------------------------------
# pg_stat_activity sampler: app backends waiting on a lock


@dataclass
class LockSample:
    t: float  # seconds on the traffic clock
    waiting: int  # app backends in a Lock wait
    max_wait_ms: float  # longest of those waits so far (now - query_start)
    events: str


class LockSampler:
    def __init__(self, dsn: str, clock: Callable[[], float], interval_s: float = 0.02):
        self.dsn, self.clock, self.interval_s = dsn, clock, interval_s
        self.samples: list[LockSample] = []
        self.polls = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    _QUERY = sql.SQL("""
        SELECT count(*)::int,
               coalesce(max(extract(epoch FROM clock_timestamp() - query_start)) * 1000, 0)::float8,
               coalesce(string_agg(DISTINCT wait_event, ','), '')
          FROM pg_stat_activity
         WHERE datname = current_database() AND application_name = %s
           AND state = 'active' AND wait_event_type = 'Lock'""")

    def start(self) -> LockSampler:
        self._thread = threading.Thread(target=self._run, name="rehearsal-lock-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        conn = None
        while not self._stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.dsn, autocommit=True, application_name="rehearsal-sampler")
                n, wait_ms, events = conn.execute(self._QUERY, (APP_NAME,)).fetchone()
                self.polls += 1
                if n:
                    self.samples.append(LockSample(self.clock(), n, wait_ms, events))
            except psycopg.Error:
                if conn is not None:
                    conn.close()
                conn = None
            self._stop.wait(self.interval_s)
        if conn is not None:
            conn.close()


# --------------------------------------------------------------------------------------------------
# What the report is made of


@dataclass
class Step:
    n: int
    cycle: str  # "cycle 3", "cycle 6 (fallback)", "forward", "setup"
    action: str  # run | rollback | rollback (refused) | dba fix | contract
    phase: int | None
    name: str
    t0: float
    t1: float = 0.0
    outcome: str = ""
    ok: bool = True
    rows_checked: int | None = None
    schema: str = ""  # "identical" | "differs" | ""
    note: str = ""
    retries: int = 0  # DDL attempts that failed (lock_timeout, ...) and were retried, from the run log

    @property
    def result(self) -> str:
        return self.outcome + (f" ({self.retries} DDL retries)" if self.retries else "")

    @property
    def seconds(self) -> float:
        return max(0.0, self.t1 - self.t0)

    @property
    def label(self) -> str:
        if self.action == "run":
            return f"+{self.phase}"
        if self.action.startswith("rollback"):
            return f"-{self.phase}"
        if self.action == "contract":
            return f"C{self.phase}"
        return "fix" if self.action == "dba fix" else self.action[:3]


@dataclass
class Check:
    name: str
    passed: bool
    detail: str = ""
    step: int | None = None


@dataclass
class RehearsalResult:
    playbook: str
    playbook_source: str
    policy: str
    database: str
    server: str
    rows: int
    writers: int
    readers: int
    started_at: datetime
    finished_at: datetime | None = None
    steps: list[Step] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    samples: list[StatementSample] = field(default_factory=list)
    lock_samples: list[LockSample] = field(default_factory=list)
    lock_polls: int = 0
    notes: list[str] = field(default_factory=list)
    fixes: list[dict] = field(default_factory=list)
    stopped: str | None = None  # why the rehearsal stopped before the end
    report_path: str | None = None

    @property
    def app_errors(self) -> list[StatementSample]:
        return [s for s in self.samples if s.error is not None]

    @property
    def failed_checks(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    @property
    def passed(self) -> bool:
        return bool(self.checks) and not self.failed_checks and not self.app_errors and self.stopped is None

    @property
    def duration_s(self) -> float:
        end = self.finished_at or datetime.now(timezone.utc)
        return (end - self.started_at).total_seconds()


class _Stop(Exception):
    """A check failed in a way that makes later steps meaningless."""


# --------------------------------------------------------------------------------------------------
# The rehearsal


def seed_names(pb: Playbook) -> SeedNames:
    return SeedNames(schema=pb.table.schema_, table=pb.table.name, column=pb.column.name,
                     enum=pb.column.enum_type, labels=tuple(pb.mapping))


def other_policy(pb: Playbook) -> Playbook:
    """A copy of the playbook with the other rollback policy for values that have no enum label."""
    if pb.rollback.unmapped == "refuse":
        rb = pb.rollback.model_copy(update={"unmapped": "fallback", "fallback_label": fallback_label(pb)})
    else:
        rb = pb.rollback.model_copy(update={"unmapped": "refuse"})
    return pb.model_copy(update={"rollback": rb})


def fallback_label(pb: Playbook) -> str:
    return pb.rollback.fallback_label or next(iter(pb.mapping))


class Rehearsal:
    def __init__(self, pb: Playbook, dsn: str, *, rows: int, writers: int, readers: int = 1,
                 cycles: Sequence[int] | None = None, both_policies: bool = True, final: bool = True,
                 dwell_s: float = 0.2, console=None, playbook_source: str = "", server_label: str = "",
                 traffic_seed: int = 0):
        self.pb, self.dsn = pb, dsn
        self.names = seed_names(pb)
        self.rows, self.writers, self.readers = rows, writers, readers
        self.cycles = list(cycles) if cycles else None
        self.both_policies, self.do_final, self.dwell_s = both_policies, final, dwell_s
        self.console = console
        self.traffic_seed = traffic_seed
        self.result = RehearsalResult(
            playbook=pb.name, playbook_source=playbook_source or pb.name, policy=pb.rollback.unmapped,
            database=safe_dsn(dsn), server=server_label, rows=rows, writers=writers, readers=readers,
            started_at=datetime.now(timezone.utc))
        self.traffic: RehearsalTraffic | None = None
        self.sampler: LockSampler | None = None
        self.original: dict[str, str] = {}
        self.original_schema: dict = {}
        self.original_seeds: set[str] = set()
        self.seed_ids = [str(r[pb.seed_rows.key[0]]) for r in pb.seed_rows.rows
                         if pb.seed_rows.key == ["id"] and "id" in r]
        self.swap_phase: int | None = None
        self.policies_done: set[str] = set()
        self.n_phases = 0
        self.current_pb = pb
        self._new_app = False  # the simulated app writes the new vocabulary
        self._log_id = 0  # last run-log row seen

    # -- output ---------------------------------------------------------------------------------
    def say(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text, highlight=False)

    def check(self, name: str, passed: bool, detail: str = "", step: Step | None = None) -> Check:
        c = Check(name, passed, detail, step.n if step else None)
        self.result.checks.append(c)
        if step is not None and not passed:
            step.ok = False
        if not passed:
            self.say(f"  [red]FAILED[/] {name}: {detail}")
            log.warning("rehearsal check failed", check=name, detail=detail)
        return c

    # -- database helpers ---------------------------------------------------------------------------
    def connect(self) -> psycopg.Connection:
        return psycopg.connect(self.dsn, autocommit=True, application_name="rehearsal")

    def snapshot(self) -> dict:
        with self.connect() as conn:
            return schema_snapshot(conn, self.names.schema)

    def table_exists(self) -> bool:
        with self.connect() as conn:
            return conn.execute(sql.SQL("SELECT to_regclass({}) IS NOT NULL").format(
                sql.Literal(self.names.table_ident.as_string(conn)))).fetchone()[0]

    def column_is_enum(self, conn: psycopg.Connection) -> bool:
        row = conn.execute(sql.SQL("""
            SELECT t.typtype = 'e' FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
             WHERE a.attrelid = to_regclass({}) AND a.attname = {} AND NOT a.attisdropped""").format(
            sql.Literal(self.names.table_ident.as_string(conn)), sql.Literal(self.names.column))).fetchone()
        return bool(row and row[0])

    def column_type(self, conn: psycopg.Connection) -> str | None:
        row = conn.execute(sql.SQL("""
            SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a
             WHERE a.attrelid = to_regclass({}) AND a.attname = {} AND NOT a.attisdropped""").format(
            sql.Literal(self.names.table_ident.as_string(conn)), sql.Literal(self.names.column))).fetchone()
        return row[0] if row else None

    def has_retired(self) -> bool:
        with self.connect() as conn:
            return bool(conn.execute(sql.SQL("""
                SELECT EXISTS (SELECT FROM pg_attribute WHERE attrelid = to_regclass({}) AND attname = {}
                               AND NOT attisdropped)""").format(
                sql.Literal(self.names.table_ident.as_string(conn)), sql.Literal(self.pb.retired))).fetchone()[0])

    def values(self, conn: psycopg.Connection) -> dict[str, str]:
        cur = conn.execute(sql.SQL("SELECT id::text, {}::text FROM {}").format(
            sql.Identifier(self.names.column), self.names.table_ident))
        return dict(cur.fetchall())

    def seed_present(self) -> set[str]:
        if not self.seed_ids:
            return set()
        with self.connect() as conn:
            rows = conn.execute(sql.SQL("SELECT id::text FROM {} WHERE id::text = ANY(%s)").format(
                self.names.table_ident), (self.seed_ids,)).fetchall()
        return {r[0] for r in rows}

    def unlabeled(self, values: dict[str, str], enum_state: bool) -> dict[str, str]:
        """Rows whose value has no enum label (only possible while the column is varchar)."""
        if enum_state:
            return {}
        labels, reverse = set(self.pb.mapping), self.pb.reverse
        return {i: v for i, v in values.items() if v not in reverse and v not in labels}

    # -- expectations -----------------------------------------------------------------------------------
    def expected(self, written: dict[str, str]) -> dict[str, str]:
        return {**self.original, **written}

    def right_value(self, value: str, enum_state: bool) -> str | None:
        """What the column must hold for a row whose last write was `value`, in the current column state."""
        if enum_state:
            if value in self.pb.mapping:
                return value
            return self.pb.reverse.get(value)  # None: no label, the row cannot be right
        return self.pb.mapping.get(value, value)  # old labels are translated (trigger or backfill)

    def check_rows(self, step: Step, *, seed_expected: set[str] | None) -> bool:
        """With the app held: every original and app-written row present with the right value."""
        assert self.traffic is not None
        with self.traffic.paused(), self.connect() as conn:
            written = self.traffic.written_now()
            enum_state = self.column_is_enum(conn)
            actual = self.values(conn)
        expected = self.expected(written)
        lost, wrong = [], []
        for rid, value in expected.items():
            got = actual.get(rid)
            if got is None:
                lost.append(rid)
            elif got != self.right_value(value, enum_state):
                wrong.append((rid, value, got))
        extra = set(actual) - set(expected)
        unexpected = sorted(extra - set(self.seed_ids))
        step.rows_checked = len(expected)
        state = "enum labels" if enum_state else "new values"
        ok = True
        ok &= self.check(f"{step.cycle}: {step.action} {step.phase}: no row lost", not lost,
                         f"{len(lost)} of {len(expected):,} rows missing, e.g. {lost[:5]}" if lost else
                         f"{len(expected):,} rows present ({len(self.original):,} original, "
                         f"{len(written):,} written by the app)", step).passed
        ok &= self.check(f"{step.cycle}: {step.action} {step.phase}: every row holds the right value", not wrong,
                         (f"{len(wrong)} rows wrong ({state}), e.g. "
                          + "; ".join(f"{r}: wrote {v!r}, holds {g!r}" for r, v, g in wrong[:5])) if wrong else
                         f"all {len(expected):,} rows hold the value the app last wrote ({state})", step).passed
        if seed_expected is not None:
            seeds = extra & set(self.seed_ids)
            ok &= self.check(f"{step.cycle}: {step.action} {step.phase}: no row left behind",
                             not unexpected and seeds == seed_expected,
                             (f"unexpected rows {unexpected[:5]}" if unexpected else "")
                             + (f" seed rows present {sorted(seeds)} but expected {sorted(seed_expected)}"
                                if seeds != seed_expected else "") or "no unexpected rows", step).passed
        return ok

    def check_schema(self, step: Step, want: dict, what: str) -> bool:
        diff = snapshot_diff(want, self.snapshot())
        step.schema = "differs" if diff else "identical"
        return self.check(f"{step.cycle}: {step.action} {step.phase}: schema identical to {what}", not diff,
                          "; ".join(diff[:6]) + (f" (+{len(diff) - 6} more)" if len(diff) > 6 else "")
                          if diff else "catalog comparison: tables, columns, indexes, constraints, triggers, "
                                       "enums, functions, sequences", step).passed

    # -- steps --------------------------------------------------------------------------------------
    def run_log(self, after: int) -> tuple[int, int]:
        """(last id, statements that failed and were retried since `after`) from the orchestrator's run log."""
        try:
            with self.connect() as conn:
                row = conn.execute(sql.SQL("""SELECT coalesce(max(id), %s), count(*) FILTER (WHERE outcome <> 'ok')
                                              FROM {} WHERE id > %s AND playbook = %s""").format(
                    sql.Identifier(self.pb.settings.state_schema, "run_log")), (after, after, self.pb.name)).fetchone()
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
        if self.has_retired() and (self.swap_phase is None or self.swap_phase == j) and not self._new_app:
            self.swap_phase = j
            self.app_new(step)

    def app_new(self, step: Step) -> None:
        assert self.traffic is not None
        self.traffic.use_new_app(allow_new_only=True)
        self._new_app = True
        step.note = (step.note + " " if step.note else "") + "new app deployed (varchar values, incl. " + \
            ", ".join(self.traffic.new_only_values) + ")"
        # Let the new app write some values that have no enum label, so rolling back the swap meets them.
        deadline = time.monotonic() + NEW_ONLY_WAIT_S
        new_only = set(self.traffic.new_only_values)
        while time.monotonic() < deadline:
            if sum(1 for v in self.traffic.written_now().values() if v in new_only) >= 3:
                break
            time.sleep(0.05)

    def app_old(self, step: Step) -> None:
        assert self.traffic is not None
        self.traffic.use_old_app()
        self._new_app = False
        step.note = (step.note + " " if step.note else "") + "app rolled back to the old version first"

    def roll_back(self, orch: Orchestrator, j: int, cycle: str, policy: str, schemas: dict[int, dict],
                  seeds: dict[int, set[str]]) -> None:
        phase = orch.phase(j)
        unswap = self.swap_phase == j and self.has_retired()
        step = self.begin(cycle, "rollback", j, phase.name)
        if unswap:
            self.app_old(step)
        unlabeled: dict[str, str] = {}
        if unswap:
            assert self.traffic is not None
            with self.traffic.paused(), self.connect() as conn:
                unlabeled = self.unlabeled(self.values(conn), enum_state=self.column_is_enum(conn))
        if unswap and unlabeled and policy == "refuse":
            step.action = "rollback (refused)"
            try:
                orch.rollback(j)
            except Refused as err:
                self.end(step, "refused as designed")
                m = re.search(r"would lose (\d+) values", str(err))
                listed = int(m.group(1)) if m else None
                ids = re.search(r"ids (\[[^\]]*\])", str(err))
                self.check(f"{cycle}: rollback {j} refused as designed", listed is not None and listed > 0,
                           f"rollback refused as designed, {listed} rows listed"
                           + (f" (e.g. ids {ids.group(1)})" if ids else "") + f": {err.one_line()}", step)
                self.say(f"{'':7}rollback refused as designed, {listed} rows listed: {err.one_line()[:160]}")
                self.policies_done.add("refuse")
                self.check_schema(step, schemas[j], "before the refused rollback (nothing changed)")
                ok = self.check_rows(step, seed_expected=None)
                if not ok:
                    raise _Stop("the refused rollback changed rows") from err
                self.dwell()
                self.dba_fix(cycle, j)
                step = self.begin(cycle, "rollback", j, phase.name)
            except OrchestratorError as err:
                self.end(step, "FAILED")
                self.check(f"{cycle}: rollback {j} refused as designed", False,
                           f"expected a refusal naming {len(unlabeled)} rows, got: {err.one_line()}", step)
                raise _Stop(f"rollback {j} failed") from err
            else:
                self.end(step, "rolled back")
                self.check(f"{cycle}: rollback {j} refused as designed", False,
                           f"{len(unlabeled)} rows held values with no enum label (e.g. "
                           f"{list(unlabeled)[:5]}) yet the rollback did not refuse", step)
                self.after_rollback(step, j, schemas, seeds)
                return
        try:
            outcome = orch.rollback(j)
        except OrchestratorError as err:
            self.end(step, "FAILED")
            self.check(f"{cycle}: rollback {j} ({phase.name})", False, err.one_line(), step)
            raise _Stop(f"rollback {j} failed") from err
        self.end(step, outcome)
        if unswap and unlabeled and policy == "fallback":
            self.policies_done.add("fallback")
            self.apply_fallback_expectation(step)
        elif unswap:
            self.policies_done.add(policy)
        self.after_rollback(step, j, schemas, seeds)

    def after_rollback(self, step: Step, j: int, schemas: dict[int, dict], seeds: dict[int, set[str]]) -> None:
        what = "the original" if j == 1 else f"after phase {j - 1}"
        ok = self.check_schema(step, schemas[j - 1], what)
        ok &= self.check_rows(step, seed_expected=seeds[j - 1])
        if not ok:
            raise _Stop(f"rollback of phase {j} did not restore the database")
        self.say(f"{'':7}schema identical to {what}; {step.rows_checked:,} rows present with the right value")
        self.dwell()

    def dba_fix(self, cycle: str, j: int) -> None:
        """What a DBA does after the refusal: give the listed rows a value that has an enum label."""
        assert self.traffic is not None
        label = fallback_label(self.pb)
        value = self.pb.mapping[label]
        step = self.begin(cycle, "dba fix", j, "fix rows")
        col, t = sql.Identifier(self.names.column), self.names.table_ident
        with self.traffic.paused(), self.connect() as conn:
            unlabeled = self.unlabeled(self.values(conn), enum_state=self.column_is_enum(conn))
            ids = sorted(unlabeled)
            with conn.transaction():
                conn.execute(sql.SQL("UPDATE {} SET {} = {} WHERE id::text = ANY(%s)").format(
                    t, col, sql.Literal(value)), (ids,))
            for rid in ids:
                self.traffic.override_written(rid, value)
        by_value: dict[str, int] = {}
        for v in unlabeled.values():
            by_value[v] = by_value.get(v, 0) + 1
        self.result.fixes.append({"cycle": cycle, "rows": len(ids), "from": by_value, "to": value,
                                  "label": label, "ids": ids[:10]})
        step.note = (f"UPDATE {len(ids)} rows ({', '.join(f'{v}: {n}' for v, n in by_value.items())}) "
                     f"SET {self.names.column} = '{value}' (label {label!r}), as the refusal's hint says")
        self.end(step, f"{len(ids)} rows set to {value}")
        self.dwell()

    def apply_fallback_expectation(self, step: Step) -> None:
        """Under the fallback policy the rollback itself rewrote the rows with no label: expect the label."""
        assert self.traffic is not None
        label = fallback_label(self.current_pb)
        with self.traffic.paused():
            written = self.traffic.written_now()
            changed = [rid for rid, v in written.items() if self.right_value(v, True) is None]
            for rid in changed:
                self.traffic.override_written(rid, label)
        step.note = (step.note + " " if step.note else "") + \
            f"fallback policy: {len(changed)} rows with no enum label now hold {label!r}"
        self.check(f"{step.cycle}: rollback {step.phase} applied the fallback label", len(changed) > 0,
                   f"{len(changed)} rows the app wrote with no enum label were rewritten to {label!r} "
                   f"(verified row by row below)", step)

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
        try:
            for j in range(1, self.n_phases + 1):
                self.forward(orch, j, label)
                self.dwell()
            for j in range(1, self.n_phases + 1):
                phase = orch.phase(j)
                step = self.begin(label, "contract", j, phase.name)
                try:
                    outcome = orch.contract(j)[0]
                except OrchestratorError as err:
                    self.end(step, "FAILED")
                    self.check(f"contract {j} ({phase.name})", False, err.one_line(), step)
                    raise _Stop(f"contract {j} failed") from err
                self.end(step, outcome)
                self.dwell()
            step = self.result.steps[-1]
            with self.connect() as conn:
                type_ = self.column_type(conn)
            want = f"character varying({self.pb.target.length})" if self.pb.target.type == "varchar" else "text"
            self.check("after the contract: column has the target type, retired column gone",
                       type_ == want and not self.has_retired(),
                       f"{self.names.column} is {type_}" + ("; retired column still there" if self.has_retired()
                                                            else ""), step)
            self.check_rows(step, seed_expected=set(self.seed_ids))
        finally:
            orch.close()

    # -- entry point --------------------------------------------------------------------------------------
    def prepare(self) -> None:
        with self.connect() as conn:
            if State(conn, self.pb.settings.state_schema, self.pb.name).migration() is not None:
                raise BadInput(f"{self.pb.name} has already started on this database: a rehearsal needs the "
                               "migration not started (or fully rolled back)")
            self.result.server = self.result.server or conn.execute(sql.SQL("SHOW server_version")).fetchone()[0]
        if self.table_exists():
            with self.connect() as conn:
                has_id = conn.execute(sql.SQL("""
                    SELECT EXISTS (SELECT FROM pg_attribute WHERE attrelid = to_regclass({}) AND attname = 'id'
                                   AND NOT attisdropped)""").format(
                    sql.Literal(self.names.table_ident.as_string(conn)))).fetchone()[0]
            if not has_id:
                raise BadInput(f"{self.names.schema}.{self.names.table} has no 'id' column: the app traffic "
                               "simulator writes rows by id")
            self.say(f"using the existing table {self.names.schema}.{self.names.table} (rows not generated)")
            self.result.notes.append("the table existed: its rows were used as they are; no rows were generated")
        else:
            t = time.monotonic()
            with psycopg.connect(self.dsn) as conn:
                create_seed_schema(conn, self.names, enum_default=self.names.labels[0])
                insert_rows(conn, self.rows, self.names)
            self.say(f"seeded {self.names.schema}.{self.names.table} with {self.rows:,} rows "
                     f"in {time.monotonic() - t:.1f} s")
        self.original_schema = self.snapshot()
        with self.connect() as conn:
            self.original = self.values(conn)
        self.result.rows = len(self.original)
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
        self.traffic = RehearsalTraffic(self.dsn, self.names, writers=self.writers, readers=self.readers,
                                        mapping=dict(self.pb.mapping), seed=self.traffic_seed)
        self.traffic.start()
        self.sampler = LockSampler(self.dsn, self.traffic.now).start()
        self.say(f"app traffic: {self.writers} writers, {self.readers} readers")
        time.sleep(self.dwell_s)
        other = other_policy(self.pb)
        self.result.notes.append(
            f"playbook policy rollback.unmapped: {self.pb.rollback.unmapped}. The last cycle that rolls back "
            f"the swap uses a copy of the playbook with rollback.unmapped: {other.rollback.unmapped}, so both "
            f"are exercised.")
        if self.pb.rollback.unmapped == "refuse" or other.rollback.unmapped == "refuse":
            self.result.notes.append(
                f"under 'refuse' the rollback of the swap must refuse while rows hold values with no enum label "
                f"(the new app writes {', '.join(self.traffic.new_only_values)}); the rehearsal then does what "
                f"a DBA would: UPDATE those rows to {self.pb.mapping[fallback_label(self.pb)]!r} (the value of "
                f"label {fallback_label(self.pb)!r}), recorded below, and rolls back again.")
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
        if self.both_policies and self.swap_phase is not None and not self.result.stopped:
            self.check("both rollback policies exercised", {"refuse", "fallback"} <= self.policies_done,
                       f"exercised: {', '.join(sorted(self.policies_done)) or 'none'}")
        return self.result


def rehearse(pb: Playbook, dsn: str | None = None, *, rows: int = 200_000, writers: int = 4, readers: int = 1,
             cycles: Sequence[int] | None = None, both_policies: bool = True, final: bool = True,
             dwell_s: float = 0.2, console=None, playbook_source: str = "") -> RehearsalResult:
    """Run a rehearsal on `dsn` (used as it is: a staging database), or on a scratch database of a
    PostgreSQL started for the occasion (embedded) and thrown away afterwards."""
    from . import server

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
        r = Rehearsal(pb, dsn, rows=rows, writers=writers, readers=readers, cycles=cycles,
                      both_policies=both_policies, final=final, dwell_s=dwell_s, console=console,
                      playbook_source=playbook_source, server_label=label)
        return r.run()
    finally:
        if srv is not None:
            srv.stop()
