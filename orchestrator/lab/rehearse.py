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
changing nothing; the DBA resets them and it runs), each compared with the catalog after that phase of the final cycle, column order aside (the enum
column comes back as the last one); then forward through the contract again, whose catalog must be the first
contract's.

Row checks need a consistent view of "what the app last wrote": the app is held between two statements
for the moment of the check (no statement is in flight, none is timed), never during a phase or rollback.
"""

from __future__ import annotations

import ast
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

from orchestrator.engine.db import safe_dsn
from orchestrator.engine.errors import BadInput, OrchestratorError, Refused
from orchestrator.engine.playbook import ColumnMigration, Playbook
from orchestrator.engine.sqlkit import extra_type, typed_literal
from orchestrator.engine.state import State
from orchestrator.kinds.phases.shadow import AddShadowColumn
from orchestrator.lab import chatter
from orchestrator.lab.seed import SeedNames, create_seed_schema, insert_rows
from orchestrator.lab.snapshot import ignoring_column_order, schema_snapshot, snapshot_diff
from orchestrator.lab.traffic import AppTraffic, StatementSample
from orchestrator.run.runner import Orchestrator

log = structlog.get_logger()

APP_NAME = "app-traffic"  # the application_name AppTraffic connects with
PAUSE_TIMEOUT_S = 30.0
NEW_ONLY_WAIT_S = 10.0
AFTER_CONTRACT = "after contract"  # the cycle that takes the contracted migration all the way back and forward


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

    def written_now(self, key: str = "written") -> dict[str, str]:
        """id -> last value the app wrote, for one table: key "written" (workflow_templates, or the fixture
        table) or "written_specs" (template_specs, Chatter mode)."""
        out: dict[str, str] = {}
        for w in self._workers:
            out.update(dict(getattr(w, key)))
        return out

    def samples_now(self) -> list[StatementSample]:
        return [s for w in self._workers for s in list(w.samples)]

    def override_written(self, rid: str, value: str, key: str = "written") -> None:
        """Someone else (the DBA, a rollback's fallback) wrote this row last: expect `value` from now on."""
        for w in self._workers:
            written = getattr(w, key)
            if rid in written:
                written[rid] = value
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
    cycle: str  # "cycle 3", "cycle 6 (fallback)", "final: forward + contract", "after contract"
    action: str  # run | rollback | rollback (refused) | dba fix | contract | undo contract | undo contract (refused)
    phase: int | None
    name: str
    t0: float
    t1: float = 0.0
    outcome: str = ""
    ok: bool = True
    rows_checked: int | None = None  # over every migrated table
    rows_by_table: dict[str, int] = field(default_factory=dict)  # table.column -> rows checked
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
        if self.action.startswith("undo contract"):
            return f"-C{self.phase}"
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
    tables: list[str] = field(default_factory=list)  # table.column of every migrated column
    rows_by_table: dict[str, int] = field(default_factory=dict)  # original rows per table.column
    builtin_by_table: dict[str, int] = field(default_factory=dict)  # built-in (seed) rows per table.column
    schema_source: str = ""  # what the rows and schema are: Chatter's schema, the fixture, an existing database
    rolling_deploy: dict | None = None  # per app version: instances, operations, errors, latency (app_versions)

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


@dataclass
class Unit:
    """One migrated column as the rehearsal sees it: its table, where the app's writes to it are recorded,
    its built-in (seed) rows and its original rows."""

    m: ColumnMigration
    written_key: str  # the traffic's record of app writes to this table: "written" | "written_specs"
    seed_ids: list[str]
    original: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.m.label

    @property
    def ident(self) -> sql.Identifier:
        return sql.Identifier(self.m.table.schema_, self.m.table.name)

    @property
    def col(self) -> sql.Identifier:
        return sql.Identifier(self.m.column.name)

    def has_label(self, value: str) -> bool:
        """Whether a value can go back into the enum column (an old label, or a new value with one)."""
        return value in self.m.mapping or value in self.m.reverse

    def right_value(self, value: str, enum_state: bool) -> str | None:
        """What the column must hold for a row whose last write was `value`, in the current column state."""
        if enum_state:
            if value in self.m.mapping:
                return value
            return self.m.reverse.get(value)  # None: no label, the row cannot be right
        return self.m.mapping.get(value, value)  # old labels are translated (trigger or backfill)


def seed_names(pb: Playbook) -> SeedNames:
    """The simplified fixture's names for a one-column playbook."""
    m = pb.migrations[0]
    return SeedNames(schema=m.table.schema_, table=m.table.name, column=m.column.name,
                     enum=m.column.enum_type, labels=tuple(m.mapping))


def chatter_problem(pb: Playbook) -> str | None:
    """Why the rehearsal cannot run a Chatter playbook on Chatter's schema (None: it can)."""
    tables = {t for _, t in pb.tables}
    schemas = {s for s, _ in pb.tables}
    if tables != {chatter.TEMPLATES, chatter.SPECS}:
        return (f"Chatter's enum {chatter.ENUM} is used by {chatter.TEMPLATES} and {chatter.SPECS}: the playbook "
                f"must list both columns (it lists {', '.join(m.label for m in pb.migrations)})")
    if len(schemas) != 1:
        return f"Chatter's tables live in one schema; the playbook names {sorted(schemas)}"
    wrong = [m.label for m in pb.migrations if m.column.name != chatter.COLUMN or m.column.enum_type != chatter.ENUM]
    if wrong:
        return f"Chatter's tables migrate {chatter.COLUMN} of enum {chatter.ENUM}; the playbook names {wrong}"
    return None


def other_policy(pb: Playbook) -> Playbook:
    """A copy of the playbook with the other rollback policy for values that have no enum label."""
    if pb.rollback.unmapped == "refuse":
        rb = pb.rollback.model_copy(update={"unmapped": "fallback", "fallback_label": fallback_label(pb)})
    else:
        rb = pb.rollback.model_copy(update={"unmapped": "refuse"})
    out = pb.model_copy(update={"rollback": rb})
    out.__dict__.pop("migrations", None)  # a cached_property: rebuild the units with the copy's policy
    return out


def fallback_label(pb: Playbook) -> str:
    return pb.rollback.fallback_label or next(iter(pb.migrations[0].mapping))


def _count_by_value(values: dict[str, str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values.values():
        out[v] = out.get(v, 0) + 1
    return out


class Rehearsal:
    def __init__(self, pb: Playbook, dsn: str, *, rows: int, writers: int, readers: int = 1,
                 cycles: Sequence[int] | None = None, both_policies: bool = True, final: bool = True,
                 after_contract: bool = True, dwell_s: float = 0.2, console=None, playbook_source: str = "",
                 server_label: str = "", traffic_seed: int = 0):
        self.pb, self.dsn = pb, dsn
        self.chatter = chatter.is_chatter(pb)
        if self.chatter:
            problem = chatter_problem(pb)
            if problem:
                raise BadInput(f"cannot rehearse {pb.name} on Chatter's schema: {problem}")
            self.names = chatter.chatter_names(pb.migrations[0].table.schema_)
            keys = {chatter.TEMPLATES: "written", chatter.SPECS: "written_specs"}
        elif len(pb.migrations) == 1:
            self.names = seed_names(pb)
            keys = {}
        else:
            raise BadInput(f"cannot rehearse {pb.name}: the simulated app writes Chatter's two tables or one "
                           f"table, not {', '.join(m.label for m in pb.migrations)}")
        self.units = [Unit(m, keys.get(m.table.name, "written"),
                           [str(r["id"]) for r in m.seed_rows.rows if m.seed_rows.key == ["id"] and "id" in r])
                      for m in pb.migrations]
        self.schemas = list(dict.fromkeys([s for s, _ in pb.tables] + [pb.enum_type[0]]))
        self.rows, self.writers, self.readers = rows, writers, readers
        self.cycles = list(cycles) if cycles else None
        self.both_policies, self.do_final, self.dwell_s = both_policies, final, dwell_s
        self.do_after_contract = after_contract
        self.console = console
        self.traffic_seed = traffic_seed
        self.result = RehearsalResult(
            playbook=pb.name, playbook_source=playbook_source or pb.name, policy=pb.rollback.unmapped,
            database=safe_dsn(dsn), server=server_label, rows=rows, writers=writers, readers=readers,
            started_at=datetime.now(timezone.utc), tables=[u.label for u in self.units])
        self.traffic: RehearsalTraffic | None = None
        self.sampler: LockSampler | None = None
        self.original_schema: dict = {}
        self.original_seeds: dict[str, set[str]] = {}
        self.swap_phase: int | None = None
        self.policies_done: set[str] = set()
        self.n_phases = 0
        self.current_pb = pb
        self._new_app = False  # the simulated app writes the new vocabulary
        self._log_id = 0  # last run-log row seen
        # the final cycle's catalog after each phase, after each contract step (0: before the first), and its
        # built-in rows after each phase: what the "after contract" cycle's undo and rollbacks must restore
        self.forward_schemas: dict[int, dict] = {}
        self.forward_seeds: dict[int, dict[str, set[str]]] = {}
        self.contract_schemas: dict[int, dict] = {}

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

    def snapshot(self) -> dict[str, dict]:
        """Catalog snapshot of every schema the migration touches (its tables' and the enum type's)."""
        with self.connect() as conn:
            return {s: schema_snapshot(conn, s) for s in self.schemas}

    def schema_diff(self, want: dict[str, dict], got: dict[str, dict], *, ignore_order: bool = False) -> list[str]:
        """ignore_order: compare each table's columns by name (after the undo of the swap's contract the enum
        column is back as the table's last column)."""
        out: list[str] = []
        for s in self.schemas:
            a, b = want.get(s, {}), got.get(s, {})
            if ignore_order:
                a, b = (ignoring_column_order(x) if x else x for x in (a, b))
            diff = snapshot_diff(a, b)
            out += [f"{s}: {d}" for d in diff] if len(self.schemas) > 1 else diff
        return out

    def column_info(self, conn: psycopg.Connection, u: Unit, column: str) -> tuple[bool, str] | None:
        """(is an enum, formatted type) of a live column of the unit's table; None when there is none."""
        row = conn.execute(sql.SQL("""
            SELECT t.typtype = 'e', format_type(a.atttypid, a.atttypmod)
              FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
              JOIN pg_namespace n ON n.oid = c.relnamespace JOIN pg_type t ON t.oid = a.atttypid
             WHERE n.nspname = %s AND c.relname = %s AND a.attname = %s AND a.attnum > 0
               AND NOT a.attisdropped"""), (u.m.table.schema_, u.m.table.name, column)).fetchone()
        return (bool(row[0]), row[1]) if row else None

    def column_is_enum(self, conn: psycopg.Connection, u: Unit) -> bool:
        info = self.column_info(conn, u, u.m.column.name)
        return bool(info and info[0])

    def table_exists(self, u: Unit) -> bool:
        with self.connect() as conn:
            return bool(conn.execute(sql.SQL("""
                SELECT EXISTS (SELECT FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                                WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p'))"""),
                (u.m.table.schema_, u.m.table.name)).fetchone()[0])

    def has_retired(self, u: Unit) -> bool:
        with self.connect() as conn:
            return self.column_info(conn, u, u.m.retired) is not None

    def swapped_all(self) -> bool:
        return all(self.has_retired(u) for u in self.units)

    def swapped_any(self) -> bool:
        return any(self.has_retired(u) for u in self.units)

    def enum_exists(self) -> bool:
        schema, name = self.pb.enum_type
        with self.connect() as conn:
            return bool(conn.execute(sql.SQL("""
                SELECT EXISTS (SELECT FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
                                WHERE n.nspname = %s AND t.typname = %s)"""), (schema, name)).fetchone()[0])

    def values(self, conn: psycopg.Connection, u: Unit) -> dict[str, str]:
        cur = conn.execute(sql.SQL("SELECT id::text, {}::text FROM {}").format(u.col, u.ident))
        return dict(cur.fetchall())

    def seed_present(self) -> dict[str, set[str]]:
        """Per table.column: which of its built-in rows are there."""
        out: dict[str, set[str]] = {}
        with self.connect() as conn:
            for u in self.units:
                if u.seed_ids:
                    rows = conn.execute(sql.SQL("SELECT id::text FROM {} WHERE id::text = ANY(%s)").format(
                        u.ident), (u.seed_ids,)).fetchall()
                    out[u.label] = {r[0] for r in rows}
        return out

    def unlabeled(self, u: Unit, values: dict[str, str], enum_state: bool) -> dict[str, str]:
        """Rows whose value has no enum label (only possible while the column is varchar)."""
        if enum_state:
            return {}
        return {i: v for i, v in values.items() if not u.has_label(v)}

    def unlabeled_now(self) -> dict[str, dict[str, str]]:
        """With the app held: per table.column, the rows holding a value with no enum label."""
        assert self.traffic is not None
        with self.traffic.paused(), self.connect() as conn:
            return {u.label: self.unlabeled(u, self.values(conn, u), self.column_is_enum(conn, u))
                    for u in self.units}

    def still_unlabeled(self, u: Unit, before: dict[str, str]) -> list[str]:
        """Rows of `before` the app has not rewritten with a value that has a label since: they certainly
        still have none (after the app went back to the old version, nothing else writes them)."""
        assert self.traffic is not None
        written = self.traffic.written_now(u.written_key)
        return sorted(rid for rid, v in before.items() if not u.has_label(written.get(rid, v)))

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
            return {u.label: sum(1 for v in self.traffic.written_now(u.written_key).values() if v in new_only)
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
        for unit in units or [None]:
            self.dba_fix(cycle, j, unit)
        return self.unlabeled_now()

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

    def extra_values(self) -> dict[tuple[str, str], dict[str, str]]:
        """(table.column, extra column) -> {id: value} of rows whose extra column (is_dynamic, execution_pattern)
        holds a value the app wrote (neither its default nor its backfill value): the rollback that drops the
        extra columns refuses to lose them. Only the rolling deploy's new app writes them."""
        out: dict[tuple[str, str], dict[str, str]] = {}
        with self.connect() as conn:
            for u in self.units:
                for c in u.m.extra_columns:
                    if self.column_info(conn, u, c.name) is None:
                        continue
                    ours = [typed_literal(v, extra_type(c)) for v in (c.default, c.backfill) if v is not None]
                    where = sql.SQL("{} IS NOT NULL").format(sql.Identifier(c.name))
                    if ours:
                        where = sql.SQL("{} AND {} NOT IN ({})").format(where, sql.Identifier(c.name),
                                                                       sql.SQL(", ").join(ours))
                    rows = conn.execute(sql.SQL("SELECT id::text, {}::text FROM {} WHERE {}").format(
                        sql.Identifier(c.name), u.ident, where)).fetchall()
                    if rows:
                        out[(u.label, c.name)] = dict(rows)
        return out

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
                total, wrong = conn.execute(sql.SQL(
                    "SELECT count(*), count(*) FILTER (WHERE {}::text IS DISTINCT FROM %s) FROM {} WHERE {}").format(
                    sql.Identifier(u.m.retired), u.ident, no_label), (label, sorted(u.m.reverse))).fetchone()
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

    def finish_rolling_deploy(self, deploy, step: Step) -> None:
        ids = deploy.written_ids()
        rows = {}
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

    # -- entry point --------------------------------------------------------------------------------------
    def prepare(self) -> None:
        with self.connect() as conn:
            if State(conn, self.pb.settings.state_schema, self.pb.name).migration() is not None:
                raise BadInput(f"{self.pb.name} has already started on this database: a rehearsal needs the "
                               "migration not started (or fully rolled back)")
            self.result.server = self.result.server or conn.execute(sql.SQL("SHOW server_version")).fetchone()[0]
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
        r = Rehearsal(pb, dsn, rows=rows, writers=writers, readers=readers, cycles=cycles,
                      both_policies=both_policies, final=final, after_contract=after_contract, dwell_s=dwell_s,
                      console=console,
                      playbook_source=playbook_source, server_label=label)
        return r.run()
    finally:
        if srv is not None:
            srv.stop()
