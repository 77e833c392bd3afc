"""Parity check: every row's new value equals the mapping of its old one (or, after the swap, the reverse).

Read in key ranges, one short statement each, so no snapshot is held for the whole table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from psycopg import sql

from .keyset import Keyset
from .phases.base import Context
from .progress import Progress
from .sqlkit import I, Q


@dataclass
class ParityResult:
    rows: int = 0
    mismatches: int = 0
    sample: list = field(default_factory=list)
    unmapped: int = 0  # after the swap: values with no enum label (a rollback must refuse or fall back)

    def to_json(self) -> dict:
        return {"rows": self.rows, "mismatches": self.mismatches, "sample": [str(s) for s in self.sample],
                "unmapped": self.unmapped}


def conditions(ctx: Context, swapped: bool) -> tuple[sql.Composable, sql.Composable]:
    """(mismatch condition, unmapped condition)."""
    if not swapped:
        bad = [Q("{} IS DISTINCT FROM {}").format(ctx.shadow, ctx.forward(ctx.col))]
        bad += [Q("{} IS NULL").format(I(c.name)) for c in ctx.pb.extra_columns if c.backfill is not None]
        return Q("({})").format(Q(" OR ").join(bad)), Q("false")
    back = ctx.backward(ctx.col)
    unmapped = Q("({} IS NULL)").format(back) if ctx.facts.not_null else \
        Q("({} IS NULL AND {} IS NOT NULL)").format(back, ctx.col)  # NULL was a legal old value
    return Q("({} IS NOT NULL AND {} IS DISTINCT FROM {})").format(back, ctx.retired, back), unmapped


def check(ctx: Context, swapped: bool, sample_size: int = 5) -> ParityResult:
    keys = Keyset(ctx.table, ctx.facts.pk)
    bad, unmapped = conditions(ctx, swapped)
    end = ctx.x.query(keys.last_key_query())
    result = ParityResult()
    if not end:
        return result
    end, after = list(end[0]), None
    chunk = ctx.pb.settings.verify_chunk_rows
    with Progress("verify", total=None) as progress:
        while after != end:
            q, params = keys.bound_query(after, end, chunk)
            row = ctx.x.query(q, params)
            upto = list(row[0]) if row else end
            cond, params = keys.range_condition(after, upto)
            n, nbad, nun = ctx.x.query(Q("SELECT count(*), count(*) FILTER (WHERE {}), count(*) FILTER (WHERE {}) "
                                         "FROM {} WHERE {}").format(bad, unmapped, ctx.table, cond), params)[0]
            result.rows += n
            result.mismatches += nbad
            result.unmapped += nun
            if nbad and len(result.sample) < sample_size:
                ids = ctx.x.query(Q("SELECT {} FROM {} WHERE {} AND {} ORDER BY {} LIMIT {}").format(
                    keys.cols, ctx.table, cond, bad, keys.cols, sql.Literal(sample_size)), params)
                result.sample += [r[0] if len(r) == 1 else tuple(r) for r in ids][: sample_size - len(result.sample)]
            progress.advance(n)
            after = upto
    return result
