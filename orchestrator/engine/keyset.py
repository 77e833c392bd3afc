"""Walking a table in primary-key order, a range at a time, without holding any list of keys in memory."""

from __future__ import annotations

from typing import Sequence

from psycopg import sql

from orchestrator.engine.sqlkit import I, Q, join, placeholders, row_of


class Keyset:
    def __init__(self, table: sql.Composable, pk: Sequence[str]):
        self.table, self.pk = table, list(pk)
        self.row = row_of(self.pk)
        self.cols = join(I(c) for c in self.pk)
        self.desc = join(Q("{} DESC").format(I(c)) for c in self.pk)

    def last_key_query(self) -> sql.Composed:
        return Q("SELECT {} FROM {} ORDER BY {} LIMIT 1").format(self.cols, self.table, self.desc)

    def range_condition(self, after: Sequence | None, upto: Sequence) -> tuple[sql.Composed, list]:
        """(pk) > (after) AND (pk) <= (upto), as SQL with parameters."""
        cond = Q("{} <= {}").format(self.row, placeholders(len(self.pk)))
        params = list(upto)
        if after is not None:
            cond = Q("{} > {} AND {}").format(self.row, placeholders(len(self.pk)), cond)
            params = list(after) + params
        return cond, params

    def bound_query(self, after: Sequence | None, end: Sequence, size: int) -> tuple[sql.Composed, list]:
        """The key `size` rows past `after` (or None past the end): the upper bound of the next range."""
        cond, params = self.range_condition(after, end)
        q = Q("SELECT {} FROM {} WHERE {} ORDER BY {} OFFSET {} LIMIT 1").format(
            self.cols, self.table, cond, self.cols, sql.Literal(max(size - 1, 0)))
        return q, params


ROWS_PER_BLOCK_UNKNOWN = 50  # before the table's first ANALYZE; the batch sizing corrects it after one batch


class BlockRanges:
    """Walking a table without a primary key by physical position: ranges of heap blocks, each read by a TID
    range scan (PostgreSQL 14+), the way Keyset walks key ranges. A cursor is a block number.

    Why no row is missed: the walk ends at the table's size when it began; a row written later, or moved by an
    app update (into any block), goes through the sync trigger, which sets its shadow itself; a row version our
    own batch writes into a later block already agrees and is skipped by the batch's condition there."""

    def __init__(self, table: sql.Composable, render):
        self.table, self.pk = table, ["ctid"]
        self.cols = I("ctid")
        self.row = Q("({})").format(self.cols)
        self._rel = sql.Literal(render(table))

    def last_key_query(self) -> sql.Composed:
        """[number of blocks], or no row for an empty table."""
        return Q("SELECT n FROM (SELECT (pg_relation_size({}::regclass) / current_setting('block_size')::int)"
                 "::bigint AS n) AS s WHERE n > 0").format(self._rel)

    def range_condition(self, after: Sequence | None, upto: Sequence) -> tuple[sql.Composed, list]:
        """Blocks [after, upto): ctid >= '(after,0)' AND ctid < '(upto,0)'."""
        lo = int(after[0]) if after is not None else 0
        return Q("{0} >= %s::tid AND {0} < %s::tid").format(self.cols), [f"({lo},0)", f"({int(upto[0])},0)"]

    def bound_query(self, after: Sequence | None, end: Sequence, size: int) -> tuple[sql.Composed, list]:
        """The block about `size` rows past `after` (rows per block from pg_class), never past `end`."""
        lo = int(after[0]) if after is not None else 0
        q = Q("SELECT least(%s + greatest(1, ceil(%s / CASE WHEN reltuples > 0 AND relpages > 0 "
              "THEN reltuples / relpages ELSE {} END))::bigint, %s) FROM pg_class WHERE oid = {}::regclass").format(
            sql.Literal(ROWS_PER_BLOCK_UNKNOWN), self._rel)
        return q, [lo, size, int(end[0])]
