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
