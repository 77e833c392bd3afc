"""Parity check: every row's new value equals the mapping of its old one (or, after the swap, the reverse).

Read in key ranges, one short statement each, so no snapshot is held for the whole table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from psycopg import sql

from .keyset import Keyset
from .phases.base import Context
from .progress import Progress
from .sqlkit import Q


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
        return Q("NOT {}").format(ctx.copies_agree(ctx.col, ctx.shadow)), Q("false")
    back = ctx.backward(ctx.col)
    unmapped = Q("({} IS NULL)").format(back) if ctx.facts.not_null else \
        Q("({} IS NULL AND {} IS NOT NULL)").format(back, ctx.col)  # NULL was a legal old value
    return Q("({} IS NOT NULL AND {} IS DISTINCT FROM {})").format(back, ctx.retired, back), unmapped


def check(ctx: Context, swapped: bool, sample_size: int = 5) -> ParityResult:
    if ctx.x.conn.info.server_version >= 140000:
        return _by_blocks(ctx, swapped, sample_size)
    return _by_keys(ctx, swapped, sample_size)


BLOCK_RANGE = Q("ctid >= %s::tid AND ctid < %s::tid")


def count_statement(ctx: Context, bad: sql.Composable, unmapped: sql.Composable,
                    in_range: sql.Composable) -> sql.Composable:
    return Q("SELECT count(*), count(*) FILTER (WHERE {}), count(*) FILTER (WHERE {}) FROM {} WHERE {}").format(
        bad, unmapped, ctx.table, in_range)


def plan_note(ctx: Context, swapped: bool) -> str:
    """The scan as `run` executes it, for `plan`: per heap-block range on PostgreSQL 14+, else per key range."""
    bad, unmapped = conditions(ctx, swapped)
    if ctx.x.conn.info.server_version >= 140000:
        return (ctx.x.render(count_statement(ctx, bad, unmapped, BLOCK_RANGE))
                + "  -- per range of heap blocks (verify_chunk_rows rows), each its own statement")
    cond, _ = Keyset(ctx.table, ctx.facts.pk).range_condition(["<after>"], ["<upto>"])
    return (ctx.x.render(count_statement(ctx, bad, unmapped, cond))
            + "  -- per key range (verify_chunk_rows rows), each its own statement")


def _tally(ctx: Context, result: ParityResult, in_range: sql.Composable, params: list, bad: sql.Composable,
           unmapped: sql.Composable, keys: Keyset, sample_size: int) -> int:
    n, nbad, nun = ctx.x.logged_query(count_statement(ctx, bad, unmapped, in_range), params)[0]
    result.rows += n
    result.mismatches += nbad
    result.unmapped += nun
    if nbad and len(result.sample) < sample_size:
        ids = ctx.x.logged_query(Q("SELECT {} FROM {} WHERE {} AND {} ORDER BY {} LIMIT {}").format(
            keys.cols, ctx.table, in_range, bad, keys.cols, sql.Literal(sample_size)), params)
        result.sample += [r[0] if len(r) == 1 else tuple(r) for r in ids][: sample_size - len(result.sample)]
    return n


def _by_blocks(ctx: Context, swapped: bool, sample_size: int) -> ParityResult:
    """Ranges of heap blocks (TID range scans, PostgreSQL 14+): one sequential read per chunk, no key lookups.

    A row written while the check runs may move to another block and be seen twice; one moved into a block
    already read went through the sync trigger, so it is in sync by construction (as rows behind a key cursor
    are). Writes that bypass the triggers are caught by the scan the swap runs again.
    """
    keys = Keyset(ctx.table, ctx.facts.pk)
    bad, unmapped = conditions(ctx, swapped)
    rel = sql.Literal(ctx.x.render(ctx.table))
    size = Q("SELECT pg_relation_size({0}::regclass) / current_setting('block_size')::int").format(rel)
    per_block = ctx.x.query(Q("SELECT greatest(reltuples / greatest(relpages, 1), 1)::float8 FROM pg_class "
                              "WHERE oid = {}::regclass").format(rel))[0][0]
    step = max(1, int(ctx.pb.settings.verify_chunk_rows / per_block))
    in_range = BLOCK_RANGE
    result = ParityResult()
    lo = 0
    with Progress("verify", total=None) as progress:
        # The table's size is read again before each chunk: a row moved past the end by an update, or added,
        # while the scan runs is still checked. The scan ends at the end of the table as it is then.
        while lo < ctx.x.scalar(size):
            progress.advance(_tally(ctx, result, in_range, [f"({lo},0)", f"({lo + step},0)"], bad, unmapped,
                                    keys, sample_size))
            lo += step
    return result


def _by_keys(ctx: Context, swapped: bool, sample_size: int) -> ParityResult:
    """Primary-key ranges, for servers without TID range scans."""
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
            progress.advance(_tally(ctx, result, cond, params, bad, unmapped, keys, sample_size))
            after = upto
    return result
