"""One column's migration and the machinery to run its statements: what every phase and the engine's loops share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from psycopg import sql

from orchestrator.engine import convert
from orchestrator.engine.catalog import Facts
from orchestrator.engine.errors import Refused
from orchestrator.engine.executor import Executor
from orchestrator.engine.playbook import ColumnMigration, Playbook, _suffixed
from orchestrator.engine.sqlkit import I, Q, Stmt, column_type, join, row_of
from orchestrator.engine.state import State

TRIGGER_PREFIX = "~ec_"  # our sync triggers; see Context.trigger_name


@dataclass
class Context:
    """One column's migration (`m`, with its stored `facts`) and the machinery to run its statements."""

    pb: Playbook
    m: ColumnMigration
    facts: Facts
    x: Executor
    state: State  # the runner's, also for `plan`
    hooks: Any = None  # orchestrator.hooks.Hooks: backfill progress events

    # Names, derived once so every phase agrees on them.
    @property
    def table(self) -> sql.Identifier:
        return I(self.m.table.schema_, self.m.table.name)

    @property
    def table_name(self) -> tuple[str, str]:
        return self.m.table.schema_, self.m.table.name

    @property
    def col(self) -> sql.Identifier:
        return I(self.m.column.name)

    @property
    def shadow(self) -> sql.Identifier:
        return I(self.m.shadow)

    @property
    def retired(self) -> sql.Identifier:
        return I(self.m.retired)

    @property
    def changes_type(self) -> bool:
        """kind change_type (up/down expressions), not an enum's label mapping."""
        return self.m.change is not None

    @property
    def enum_type(self) -> sql.Identifier:
        return I(self.m.enum_schema, self.m.column.enum_type)

    @property
    def target_type(self) -> Stmt:
        if self.changes_type:
            return Q(self._fact(self.facts.new_type))  # format_type() text from the catalog, see convert.py
        return column_type(self.m.target.type, self.m.target.length)

    @property
    def old_type(self) -> sql.Composable:
        """The column's type before the migration: the enum, or (change_type) what the catalog said."""
        return Q(self._fact(self.facts.old_type)) if self.changes_type else self.enum_type

    @property
    def new_not_null(self) -> bool:
        """The new column is NOT NULL: as the playbook's target says, or (change_type) as the old column was."""
        return self.facts.not_null if self.changes_type else not self.m.target.nullable

    @property
    def conversion(self) -> convert.Conversion:
        """How values cross between the two types: what only the kind knows (engine/convert.py)."""
        if self.changes_type:
            return convert.Expressions(self.m, self._fact(self.facts.old_type))
        return convert.LabelMap(self.m, self.enum_type)

    @property
    def old_name(self) -> str:
        """What the old values are, in messages: the enum type, or the column's old type."""
        return self.conversion.old_name

    # Words for messages, by kind
    @property
    def old_copy(self) -> str:
        """The old column, once the new one is the app's: 'the enum column', or 'the old copy (timestamp)'."""
        return f"the old copy ({self.old_name})" if self.changes_type else "the enum column"

    @property
    def old_value_word(self) -> str:
        """What a new value must have to go back: 'an enum label', or 'a value down gives back'."""
        return f"a value of {self.old_name} down() gives" if self.changes_type else "an enum label"

    def conversion_of(self, column: str) -> str:
        return f"up({column})" if self.changes_type else f"the mapping of {column}"

    def conversion_back(self, column: str) -> str:
        return f"down({column})" if self.changes_type else f"the reverse mapping of {column}"

    def _fact(self, value: str | None) -> str:
        if value is None:
            raise RuntimeError(f"{self.m.label}: the stored facts lack the column's types")
        return value

    def fn(self, suffix: str) -> sql.Identifier:
        return convert.function(self.m, suffix)

    def trigger_name(self, suffix: str) -> str:
        # PostgreSQL fires a table's triggers in byte order of their names: "~" sorts after every ASCII name,
        # so the sync sees the row as the app's own BEFORE triggers left it (dual_write checks the rest).
        return _suffixed(f"{TRIGGER_PREFIX}{self.m.column.name}", suffix)

    def trigger(self, suffix: str) -> sql.Identifier:
        return I(self.trigger_name(suffix))

    def index(self, name: str) -> sql.Identifier:
        return I(self.m.table.schema_, name)

    def extra_index_name(self, column: str) -> str:
        return _suffixed(f"ix_{self.m.table.name}", f"_{column}") if len(
            f"ix_{self.m.table.name}_{column}".encode()) <= 63 else _suffixed(f"ix_{column}", "_ec")

    # Expressions: the generic part; what differs by kind is the conversion's
    def forward(self, expr: sql.Composable) -> sql.Composed:
        """The new value of an old one: map(old label), up(old value)."""
        return self.conversion.forward(expr)

    def backward(self, expr: sql.Composable) -> sql.Composed:
        """The old value of a new one, NULL when there is none (a value with no enum label, one down fails on)."""
        return self.conversion.backward(expr)

    def no_label(self, *, typed: bool = True) -> sql.Composed:
        """Rows whose app value has no old value (NULL needs none when the old column allowed it). typed=False
        compares as text, for the enum's reverse migration before its CREATE TYPE."""
        cond = Q("{} IS NULL").format(self.conversion.backward(self.col, typed=typed))
        if not self.facts.not_null:
            cond = Q("{} AND {} IS NOT NULL").format(cond, self.col)
        return cond

    def old_value(self, expr: sql.Composable) -> sql.Composed:
        """What the enum copy holds for a new value: its label; for a value with no label, the fallback label
        under `rollback.unmapped: fallback` (so the old version reads a label), else NULL. NULL stays NULL: it
        is no value (and taking it for the fallback label would make an old-version INSERT of that label look
        like a copy that agrees already, leaving the new column empty)."""
        fallback = self.conversion.fallback
        if fallback is not None:
            return Q("CASE WHEN {} IS NULL THEN NULL ELSE coalesce({}, {}) END").format(
                expr, self.backward(expr), fallback)
        return self.backward(expr)

    def copies_agree(self, col: sql.Composable, shadow: sql.Composable) -> sql.Composed:
        """Before the swap, the two columns of a row agree: the shadow holds map(enum value), or a new value with
        no label that the new version wrote (the enum side then holds the fallback label, or NULL)."""
        unlabeled_old = self.conversion.fallback or Q("NULL")
        return Q("({1} IS NOT DISTINCT FROM {2} OR ({1} IS NOT NULL AND {3} IS NULL AND {0} IS NOT DISTINCT FROM {4}))"
                 ).format(col, shadow, self.forward(col), self.backward(shadow), unlabeled_old)

    @property
    def by_position(self) -> bool:
        """No primary key (a history, log or audit table): rows are batched by physical position, heap block
        ranges read by TID range scans (PostgreSQL 14+), and named by ctid."""
        return not self.facts.pk

    @property
    def row_key(self) -> list[str]:
        """What names a row: the primary key, or ctid (where it is now; an update moves it) without one."""
        return list(self.facts.pk) or ["ctid"]

    @property
    def backfill_method(self) -> str:
        """settings.backfill_method for this table: a table without a primary key is backfilled in place
        whatever the setting, since the copy replays its log by key (plan says so)."""
        return "update" if self.by_position else self.pb.settings.backfill_method

    @property
    def pk_row(self) -> sql.Composed:
        return row_of(self.row_key)

    @property
    def pk_cols(self) -> sql.Composed:
        return join(I(c) for c in self.row_key)

    def exists_query(self, kind: str, name: str) -> sql.Composed:
        """`SELECT true` when an object is present: the guard that makes a re-run skip finished work."""
        schema, table = self.table_name
        if kind == "column":
            return Q("""SELECT EXISTS (SELECT FROM pg_attribute WHERE attrelid = to_regclass({})
                        AND attname = {} AND NOT attisdropped)""").format(
                sql.Literal(self.x.render(self.table)), sql.Literal(name))
        if kind == "valid_index":
            return Q("""SELECT EXISTS (SELECT FROM pg_index
                        WHERE indexrelid = to_regclass({}) AND indisvalid)""").format(
                sql.Literal(self.x.render(I(schema, name))))
        if kind == "trigger":
            return Q("""SELECT EXISTS (SELECT FROM pg_trigger
                        WHERE tgrelid = to_regclass({}) AND tgname = {})""").format(
                sql.Literal(self.x.render(self.table)), sql.Literal(name))
        if kind == "constraint":
            return Q("""SELECT EXISTS (SELECT FROM pg_constraint
                        WHERE conrelid = to_regclass({}) AND conname = {})""").format(
                sql.Literal(self.x.render(self.table)), sql.Literal(name))
        raise ValueError(kind)

    def has(self, kind: str, name: str) -> bool:
        return bool(self.x.scalar(self.exists_query(kind, name)))

    def update_in_batches(self, column: sql.Identifier, value: sql.Composable, where: sql.Composable, *,
                          what: str) -> None:
        """SET column = value on the rows matching `where`, a batch per short transaction. `where` again outside
        the subquery: a row an app write changed meanwhile is re-checked, not clobbered."""
        pk = self.pk_row
        stmt = Q("UPDATE {} SET {} = {} WHERE {} IN (SELECT {} FROM {} WHERE {} LIMIT {}) AND {}").format(
            self.table, column, value, pk, pk, self.table, where, sql.Literal(self.pb.settings.batch_size), where)
        while self.x.atomic(stmt, lock="ROW EXCLUSIVE", what=what,
                            skip_if=Q("SELECT NOT EXISTS (SELECT FROM {} WHERE {})").format(self.table, where)):
            pass

    def sample_ids(self, where: sql.Composable, limit: int = 5) -> tuple[int, list]:
        """How many rows match, and a few of their primary keys, for messages that name rows."""
        n = self.x.scalar(Q("SELECT count(*) FROM {} WHERE {}").format(self.table, where))
        ids = self.x.query(Q("SELECT {} FROM {} WHERE {} ORDER BY {} LIMIT {}").format(
            self.pk_cols, self.table, where, self.pk_cols, sql.Literal(limit)))
        return n, [r[0] if len(r) == 1 else tuple(r) for r in ids]


def unlabeled_rows(ctxs: list[Context], *, typed: bool = True) -> list[tuple[Context, int, list]]:
    """Per table, the rows whose value has no enum label: how many, and a few keys to name them."""
    found = []
    for ctx in ctxs:
        n, ids = ctx.sample_ids(ctx.no_label(typed=typed))
        if n:
            found.append((ctx, n, ids))
    return found


def unlabeled_refusal(what: str, ctxs: list[Context], found: list[tuple[Context, int, list]]) -> Refused:
    """One message for every table's unlabeled rows, under rollback.unmapped: refuse."""
    where = "; ".join(f"{ctx.m.label}: {n} rows, e.g. ids {ids}" for ctx, n, ids in found)
    conversion = ctxs[0].conversion
    return Refused(f"{what} would lose {sum(n for _, n, _ in found)} values {conversion.lost} {conversion.old_name} "
                   f"({where}); nothing was changed", hint=conversion.refusal_hint())
