"""What every phase is: expand, contract and rollback side by side, over a shared context."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from psycopg import sql

from ..catalog import Facts
from ..errors import Refused
from ..executor import Executor
from ..playbook import ColumnMigration, Playbook, _suffixed
from ..sqlkit import I, Q, case_map, column_type, join, row_of, typed_literal
from ..state import State


TRIGGER_PREFIX = "~ec_"  # our sync triggers; see Context.trigger_name


@dataclass
class Context:
    """One column's migration (`m`, with its stored `facts`) and the machinery to run its statements."""

    pb: Playbook
    m: ColumnMigration
    facts: Facts
    x: Executor
    state: State | None  # None only for `plan` against no database
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
    def enum_type(self) -> sql.Identifier:
        return I(self.m.enum_schema, self.m.column.enum_type)

    @property
    def target_type(self) -> sql.Composable:
        return column_type(self.m.target.type, self.m.target.length)

    def fn(self, suffix: str) -> sql.Identifier:
        return I(self.m.table.schema_, _suffixed(f"_ec_{self.m.table.name}_{self.m.column.name}", suffix))

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

    # Expressions
    def forward(self, expr: sql.Composable) -> sql.Composable:
        """map(old label) -> new value."""
        return case_map(expr, self.m.mapping.items())  # compared as the enum: cheaper than via text

    def backward(self, expr: sql.Composable) -> sql.Composable:
        """new value -> enum label (NULL when the value has no label)."""
        return case_map(expr, self.m.reverse.items(), result_type=self.enum_type)

    def no_label(self, *, typed: bool = True) -> sql.Composable:
        """Rows whose app value has no enum label (NULL needs none when the old column allowed it). typed=False
        compares as text, for the reverse migration before its CREATE TYPE."""
        label = self.backward(self.col) if typed else case_map(self.col, self.m.reverse.items())
        cond = Q("{} IS NULL").format(label)
        if not self.facts.not_null:
            cond = Q("{} AND {} IS NOT NULL").format(cond, self.col)
        return cond

    def old_value(self, expr: sql.Composable) -> sql.Composable:
        """What the enum copy holds for a new value: its label; for a value with no label, the fallback label
        under `rollback.unmapped: fallback` (so the old version reads a label), else NULL."""
        rb = self.m.rollback
        if rb.unmapped == "fallback":
            return Q("coalesce({}, {})").format(self.backward(expr), typed_literal(rb.fallback_label, self.enum_type))
        return self.backward(expr)

    def copies_agree(self, col: sql.Composable, shadow: sql.Composable) -> sql.Composable:
        """Before the swap, the two columns of a row agree: the shadow holds map(enum value), or a new value with
        no label that the new version wrote (the enum side then holds the fallback label, or NULL)."""
        rb = self.m.rollback
        unlabeled_old = typed_literal(rb.fallback_label, self.enum_type) if rb.unmapped == "fallback" else Q("NULL")
        return Q("({1} IS NOT DISTINCT FROM {2} OR ({1} IS NOT NULL AND {3} IS NULL AND {0} IS NOT DISTINCT FROM {4}))"
                 ).format(col, shadow, self.forward(col), self.backward(shadow), unlabeled_old)

    @property
    def pk_row(self) -> sql.Composable:
        return row_of(self.facts.pk)

    @property
    def pk_cols(self) -> sql.Composable:
        return join(I(c) for c in self.facts.pk)

    def new_default(self) -> str | None:
        if self.m.target.default is not None:
            return self.m.target.default
        if self.facts.default_label is not None:
            return self.m.mapping[self.facts.default_label]
        return None

    def exists_query(self, kind: str, name: str) -> sql.Composable:
        """`SELECT true` when an object is present: the guard that makes a re-run skip finished work."""
        schema, table = self.table_name
        if kind == "column":
            return Q("""SELECT EXISTS (SELECT FROM pg_attribute WHERE attrelid = to_regclass({})
                        AND attname = {} AND NOT attisdropped)""").format(
                sql.Literal(self.x.render(self.table)), sql.Literal(name))
        if kind == "valid_index":
            return Q("""SELECT EXISTS (SELECT FROM pg_index WHERE indexrelid = to_regclass({}) AND indisvalid)""").format(
                sql.Literal(self.x.render(I(schema, name))))
        if kind == "trigger":
            return Q("""SELECT EXISTS (SELECT FROM pg_trigger WHERE tgrelid = to_regclass({}) AND tgname = {})""").format(
                sql.Literal(self.x.render(self.table)), sql.Literal(name))
        if kind == "constraint":
            return Q("""SELECT EXISTS (SELECT FROM pg_constraint WHERE conrelid = to_regclass({}) AND conname = {})""").format(
                sql.Literal(self.x.render(self.table)), sql.Literal(name))
        raise ValueError(kind)

    def has(self, kind: str, name: str) -> bool:
        return bool(self.x.scalar(self.exists_query(kind, name)))

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
    return Refused(f"{what} would lose {sum(n for _, n, _ in found)} values that have no label in enum "
                   f"{ctxs[0].m.column.enum_type} ({where}); nothing was changed",
                   hint="change those rows, add them to rollback.reverse_mapping, or set rollback.unmapped: "
                        "fallback in the playbook")


class Phase:
    """One step of the migration. Subclasses fill in the three directions and their one-line docs."""

    name: ClassVar[str]
    title: ClassVar[str]
    expand_doc: ClassVar[str]
    contract_doc: ClassVar[str] = "nothing to remove"
    # Undoing the contract step (a rollback after the contract): put back, online, what the contract removed.
    uncontract_doc: ClassVar[str] = "nothing to put back"
    # What `status` says while this undo is done and earlier phases are still contracted, if their row misleads.
    undone_note: ClassVar[str] = ""
    rollback_doc: ClassVar[str]
    locks_doc: ClassVar[str]
    visible_to_app: ClassVar[bool] = False  # its rollback changes what the app sees: ask before doing it

    def expand(self, ctx: Context) -> dict | None:
        raise NotImplementedError

    def rollback(self, ctx: Context) -> None:
        raise NotImplementedError

    def contract(self, ctx: Context) -> None:
        ctx.x.note(f"-- phase {self.name}: {self.contract_doc}")

    def uncontract(self, ctx: Context) -> None:
        ctx.x.note(f"-- phase {self.name}: undo the contract step: {self.uncontract_doc}")

    def check(self, ctx: Context) -> list[str]:
        """Problems left after expand (empty when the phase is really in place)."""
        return []

    def before_expand(self, ctx: Context) -> None:
        """Raise Refused when a precondition the state table cannot see does not hold."""

    # A phase spans every column of the playbook. By default each column is handled on its own, in playbook
    # order (rollbacks in reverse order); a phase that must treat them together (the swap) overrides these.
    def expand_all(self, ctxs: list[Context]) -> dict | None:
        details = {c.m.label: self.expand(c) for c in ctxs}
        details = {k: v for k, v in details.items() if v}
        return {"tables": details} if details else None

    def rollback_all(self, ctxs: list[Context]) -> None:
        for c in reversed(ctxs):
            self.rollback(c)

    def contract_all(self, ctxs: list[Context]) -> None:
        for c in ctxs:
            self.contract(c)

    def uncontract_all(self, ctxs: list[Context]) -> None:
        for c in reversed(ctxs):
            self.uncontract(c)

    def before_rollback_all(self, ctxs: list[Context]) -> None:
        """Before a rollback: raise Refused (nothing changed, the phase's status kept) if it would lose data.
        Every table is checked before any is touched."""

    def before_uncontract_all(self, ctxs: list[Context]) -> None:
        """Before undoing the contract step: raise Refused (nothing changed) if it could not finish."""

    def check_all(self, ctxs: list[Context]) -> list[str]:
        return [f"{c.m.label}: {p}" for c in ctxs for p in self.check(c)]

    def before_contract_all(self, ctxs: list[Context]) -> None:
        """Before the first contract step (after it there is no rollback): raise Refused if unsafe."""

    def before_expand_all(self, ctxs: list[Context]) -> None:
        for c in ctxs:
            self.before_expand(c)
