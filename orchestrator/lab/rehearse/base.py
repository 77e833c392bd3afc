"""The ground a rehearsal stands on: the migrated columns as it sees them (Unit), the playbook helpers
(other_policy, fallback_label, ...), and RehearsalBase: the rehearsal's state, its output and what it reads of
the database. checks.py, steps.py and scenario.py build the Rehearsal on it, one class each."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Sequence

import psycopg
from psycopg import sql

from orchestrator.engine import db
from orchestrator.engine.db import safe_dsn
from orchestrator.engine.errors import BadInput
from orchestrator.engine.playbook import ColumnMigration, Playbook
from orchestrator.engine.sqlkit import extra_type, typed_literal
from orchestrator.lab import chatter
from orchestrator.lab.rehearse.model import RehearsalResult
from orchestrator.lab.rehearse.traffic import LockSampler, RehearsalTraffic
from orchestrator.lab.seed import SeedNames
from orchestrator.lab.snapshot import ignoring_column_order, schema_snapshot, snapshot_diff

# --------------------------------------------------------------------------------------------------
# The migrated columns, and the playbook as the rehearsal reads it


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


class RehearsalBase:
    """The rehearsal's state (set up once, for every cycle) and its database helpers."""

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
            return bool(db.scalar(conn, sql.SQL("""
                SELECT EXISTS (SELECT FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                                WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p'))"""),
                (u.m.table.schema_, u.m.table.name)))

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
            return bool(db.scalar(conn, sql.SQL("""
                SELECT EXISTS (SELECT FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
                                WHERE n.nspname = %s AND t.typname = %s)"""), (schema, name)))

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
