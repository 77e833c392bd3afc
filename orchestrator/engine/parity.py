"""Parity check: every row's new value equals the mapping of its old one (or, after the swap, the reverse).

Read in ranges of heap blocks (key ranges before PostgreSQL 14), one short statement each, on up to
`verify_parallelism` connections at once, so no snapshot is held for the whole table.
"""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass, field, replace

import psycopg
import structlog
from psycopg import sql

from orchestrator.engine import db
from orchestrator.engine.context import Context
from orchestrator.engine.errors import BadInput
from orchestrator.engine.executor import Executor
from orchestrator.engine.keyset import Keyset
from orchestrator.engine.progress import Progress
from orchestrator.engine.sqlkit import Q, Stmt

log = structlog.get_logger()


@dataclass
class ParityResult:
    rows: int = 0
    mismatches: int = 0
    sample: list = field(default_factory=list)
    unmapped: int = 0  # after the swap: values with no enum label (a rollback must refuse or fall back)
    # change_type before the swap: old values down(up(x)) does not give back (the rollback would change them)
    lossy: int = 0
    lossy_sample: list = field(default_factory=list)  # (key, value, down(up(value))) as text

    def to_json(self) -> dict:
        return {"rows": self.rows, "mismatches": self.mismatches, "sample": [str(s) for s in self.sample],
                "unmapped": self.unmapped, "lossy": self.lossy}


def conditions(ctx: Context, swapped: bool) -> tuple[sql.Composed, Stmt]:
    """(mismatch condition, unmapped condition)."""
    if not swapped:
        return Q("NOT {}").format(ctx.copies_agree(ctx.col, ctx.shadow)), Q("false")
    back = ctx.backward(ctx.col)
    unmapped = Q("({} IS NULL)").format(back) if ctx.facts.not_null else \
        Q("({} IS NULL AND {} IS NOT NULL)").format(back, ctx.col)  # NULL was a legal old value
    # A row whose new value is up(old copy) agrees too: the old version wrote a value down(up(x)) does not give
    # back (a DST-gap time), which the sync keeps as written for the rollback.
    return Q("({0} IS NOT NULL AND {1} IS DISTINCT FROM {0} AND {2} IS DISTINCT FROM {3})").format(
        back, ctx.retired, ctx.col, ctx.forward(ctx.retired)), unmapped


def lossy_condition(ctx: Context, swapped: bool) -> Stmt:
    """change_type, before the swap: the old value does not come back through down(up(x)), so the rollback
    window cannot give it back. down is inlined here (a plain expression, no call per row); where down fails on
    up(x) the statement fails, and lossy_rows() names the rows another way."""
    if swapped or not ctx.changes_type:
        return Q("false")
    return Q("({0} IS NOT NULL AND {1} IS DISTINCT FROM {0})").format(ctx.col, ctx.conversion.round_trip(ctx.col))


def lossy_rows(ctx: Context, limit: int = 5) -> list[tuple]:
    """(key, value, what comes back) of the first rows down(up(x)) does not give back, through `back` (NULL where
    down fails): slower, for the refusal after a scan that failed on such a value."""
    back = ctx.backward(ctx.forward(ctx.col))
    rows = ctx.x.query(Q("SELECT {}, {}::text, {}::text FROM {} WHERE {} IS NOT NULL AND {} IS DISTINCT FROM {} "
                         "ORDER BY {} LIMIT {}").format(ctx.pk_cols, ctx.col, back, ctx.table, ctx.col, back, ctx.col,
                                                        ctx.pk_cols, sql.Literal(limit)))
    n = len(ctx.row_key)
    return [(r[0] if n == 1 else tuple(r[:n]), r[n], r[n + 1]) for r in rows]


def check(ctx: Context, swapped: bool, sample_size: int = 5) -> ParityResult:
    if ctx.x.conn.info.server_version >= 140000:
        return _by_blocks(ctx, swapped, sample_size)
    return _by_keys(ctx, swapped, sample_size)


LOSSY_SAMPLE = 5  # rows named in a refusal of values down(up(x)) does not give back
BLOCK_RANGE = Q("ctid >= %s::tid AND ctid < %s::tid")


def count_statement(ctx: Context, bad: sql.Composable, unmapped: sql.Composable,
                    in_range: sql.Composable, lossy: sql.Composable = Q("false")) -> sql.Composed:
    return Q("SELECT count(*), count(*) FILTER (WHERE {}), count(*) FILTER (WHERE {}), count(*) FILTER (WHERE {}) "
             "FROM {} WHERE {}").format(bad, unmapped, lossy, ctx.table, in_range)


def plan_note(ctx: Context, swapped: bool) -> str:
    """The scan as `run` executes it, for `plan`: per heap-block range on PostgreSQL 14+, else per key range."""
    bad, unmapped = conditions(ctx, swapped)
    lossy = lossy_condition(ctx, swapped)
    if ctx.x.conn.info.server_version >= 140000:
        return (ctx.x.render(count_statement(ctx, bad, unmapped, BLOCK_RANGE, lossy))
                + "  -- per range of heap blocks (verify_chunk_rows rows), each its own statement, on up to "
                  "verify_parallelism connections at once (the side ones read-only)")
    cond, _ = Keyset(ctx.table, ctx.row_key).range_condition(["<after>"], ["<upto>"])
    return (ctx.x.render(count_statement(ctx, bad, unmapped, cond, lossy))
            + "  -- per key range (verify_chunk_rows rows), each its own statement")


def _tally(ctx: Context, result: ParityResult, in_range: sql.Composable, params: list, bad: sql.Composable,
           unmapped: sql.Composable, keys: Keyset, sample_size: int, lossy: sql.Composable = Q("false")) -> int:
    n, nbad, nun, nlossy = ctx.x.logged_query(count_statement(ctx, bad, unmapped, in_range, lossy), params)[0]
    result.rows += n
    result.mismatches += nbad
    result.unmapped += nun
    result.lossy += nlossy
    if nlossy and len(result.lossy_sample) < LOSSY_SAMPLE:
        named = Q("SELECT {}, {}::text, {}::text FROM {} WHERE {} AND {} ORDER BY {} LIMIT {}")
        rows = ctx.x.logged_query(named.format(
            keys.cols, ctx.col, ctx.conversion.round_trip(ctx.col), ctx.table, in_range, lossy, keys.cols,
            sql.Literal(LOSSY_SAMPLE)), params)
        k = len(ctx.row_key)
        result.lossy_sample += [(r[0] if k == 1 else tuple(r[:k]), r[k], r[k + 1])
                                for r in rows][: LOSSY_SAMPLE - len(result.lossy_sample)]
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

    With `verify_parallelism` above 1 the ranges are read on that many connections at once (the work connection
    and read-only side connections, one chunk per statement each, under the same online timeouts), the way
    PostgreSQL's parallel workers would read one big scan; the result is the same as the serial walk's (counts,
    and the sample in block order). Blocks ahead of the serial cursor are read sooner: a row written meanwhile
    that bypasses the triggers and lands in free space of a block already read is missed, as by the serial walk
    behind its cursor; rows past the end are read by both (see _Ranges).
    """
    keys = Keyset(ctx.table, ctx.row_key)
    bad, unmapped = conditions(ctx, swapped)
    lossy = lossy_condition(ctx, swapped)
    rel = sql.Literal(ctx.x.render(ctx.table))
    size = Q("SELECT pg_relation_size({0}::regclass) / current_setting('block_size')::int").format(rel)
    per_block = ctx.x.query(Q("SELECT greatest(reltuples / greatest(relpages, 1), 1)::float8 FROM pg_class "
                              "WHERE oid = {}::regclass").format(rel))[0][0]
    step = max(1, int(ctx.pb.settings.verify_chunk_rows / per_block))
    in_range = BLOCK_RANGE
    with Progress("verify", total=None) as progress:
        blocks = ctx.x.scalar(size)
        # No more connections than chunks: a table of one chunk is read on the work connection alone.
        parallel = min(ctx.pb.settings.verify_parallelism, -(-blocks // step))
        if parallel > 1:
            return _by_blocks_parallel(ctx, parallel, size, step, blocks, bad, unmapped, keys, sample_size, progress,
                                       lossy)
        result = ParityResult()
        lo = 0
        # The table's size is read again before each chunk: a row moved past the end by an update, or added,
        # while the scan runs is still checked. The scan ends at the end of the table as it is then.
        while lo < (blocks if lo == 0 else ctx.x.scalar(size)):
            progress.advance(_tally(ctx, result, in_range, [f"({lo},0)", f"({lo + step},0)"], bad, unmapped,
                                    keys, sample_size, lossy=lossy))
            lo += step
    return result


class _ScanExecutor(Executor):
    """A side connection of a parallel verify scan: read-only, named as the orchestrator's, and with the work
    connection's online session timeouts (set again on every reconnect)."""

    def _online_session(self, conn) -> None:
        super()._online_session(conn)
        conn.execute(Q("SET default_transaction_read_only = on"))
        conn.execute(Q("SET application_name = {}").format(
            sql.Literal(f"{db.APP_NAME}:verify:{socket.gethostname()}:{os.getpid()}"[:63])))


class _Ranges:
    """Hands out block ranges in order to the scanning connections, with the serial walk's end rule: every claim
    reads the table's size first, and a connection stops only when that read shows no block left. The last one
    to finish a range reads it after every range was counted, so a row added or moved past the end while the scan
    runs is checked, as in the serial walk."""

    def __init__(self, step: int, blocks: int):
        self.step, self.next_lo = step, 0
        self.blocks: int | None = blocks  # the size read before the scan, for the first claim only
        self.error: BaseException | None = None
        self.lock = threading.Lock()

    def claim(self, read_size) -> int | None:
        with self.lock:
            if self.error is not None:
                return None
            blocks, self.blocks = (self.blocks, None) if self.blocks is not None else (read_size(), None)
            if self.next_lo >= blocks:
                return None
            lo, self.next_lo = self.next_lo, self.next_lo + self.step
            return lo

    def fail(self, exc: BaseException) -> None:
        with self.lock:
            if self.error is None:
                self.error = exc


def _by_blocks_parallel(ctx: Context, parallel: int, size: sql.Composed, step: int, blocks: int,
                        bad: sql.Composable, unmapped: sql.Composable, keys: Keyset, sample_size: int,
                        progress: Progress, lossy: sql.Composable = Q("false")) -> ParityResult:
    chunks: dict[int, ParityResult] = {}  # by first block: merged in block order, so the sample is the serial one
    ranges = _Ranges(step, blocks)
    hook_lock = threading.Lock()
    hook = ctx.x.on_statement

    def logged(text: str, seconds: float, outcome: str) -> None:  # the run log's writer is one connection
        if hook is None:  # never: installed only when there is a hook (below)
            raise RuntimeError("no run log hook to forward the statement to")
        with hook_lock:
            hook(text, seconds, outcome)

    sides = [_ScanExecutor(ctx.x.dsn, ctx.x.settings, on_statement=logged if hook else None)
             for _ in range(parallel - 1)]

    def scan(x: Executor) -> None:
        if x is not ctx.x:
            try:  # connected in its own thread, while the work connection already scans
                x.conn  # noqa: B018
            except (BadInput, psycopg.Error) as exc:  # one connection fewer narrows the scan, nothing more
                log.warning("verify: a side connection failed; scanning on fewer connections", wanted=parallel,
                            reason=str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
                return
        try:
            wctx = replace(ctx, x=x)
            while (lo := ranges.claim(lambda: x.scalar(size))) is not None:
                with ranges.lock:  # mismatches already counted in earlier blocks: fetch ids only if still needed
                    earlier = sum(r.mismatches for k, r in chunks.items() if k < lo)
                chunk = ParityResult()
                # Lossy rows are sampled in each chunk holding some (a refusal follows), merged in block order.
                n = _tally(wctx, chunk, BLOCK_RANGE, [f"({lo},0)", f"({lo + step},0)"], bad, unmapped, keys,
                           sample_size if earlier < sample_size else 0,
                           lossy=lossy)
                with ranges.lock:
                    chunks[lo] = chunk
                    progress.advance(n)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            ranges.fail(exc)

    threads = [threading.Thread(target=scan, args=(side,), name=f"orchestrator-verify-{i}", daemon=True)
               for i, side in enumerate(sides, 1)]
    ctx.x.on_statement = logged if hook else None
    try:
        for t in threads:
            t.start()
        scan(ctx.x)  # the work connection scans too, in this thread (Ctrl-C cancels its statement)
    except BaseException as exc:
        ranges.fail(exc)
    finally:
        ctx.x.on_statement = hook
        for t in threads:  # after a failure each side connection stops once its current chunk (short) is read
            t.join()
        for side in sides:
            side.close()
    if ranges.error is not None:
        raise ranges.error
    result = ParityResult()
    for lo in sorted(chunks):
        r = chunks[lo]
        result.rows += r.rows
        result.mismatches += r.mismatches
        result.unmapped += r.unmapped
        result.sample += r.sample[: sample_size - len(result.sample)]
        result.lossy += r.lossy
        result.lossy_sample += r.lossy_sample[: LOSSY_SAMPLE - len(result.lossy_sample)]
    return result


def _by_keys(ctx: Context, swapped: bool, sample_size: int) -> ParityResult:
    """Primary-key ranges, for servers without TID range scans."""
    keys = Keyset(ctx.table, ctx.row_key)
    bad, unmapped = conditions(ctx, swapped)
    lossy = lossy_condition(ctx, swapped)
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
            progress.advance(_tally(ctx, result, cond, params, bad, unmapped, keys, sample_size, lossy=lossy))
            after = upto
    return result
