"""The backfill engine: keyset batches, each one short transaction that also advances the stored cursor.

Committing the cursor with the batch makes a resume exact: after a crash, kill or Ctrl-C the next run starts
at the last committed batch, so no row is copied twice and none is skipped. Rows the trigger already
synced are skipped by the WHERE clause, and the walk stops at the last key that existed when it began
(rows inserted later are filled by the trigger), so the backfill ends even under heavy inserts.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import psycopg
import structlog
from psycopg import errors as pgerr
from psycopg import sql

from .keyset import Keyset
from .phases.base import Context
from .progress import Progress
from .sqlkit import I, L, Q, extra_type, join, typed_literal

log = structlog.get_logger()


def update_statement(ctx: Context) -> tuple[sql.Composable, sql.Composable]:
    """SET list and the 'still needs it' condition of a batch."""
    want = ctx.forward(ctx.col)
    sets = [Q("{} = {}").format(ctx.shadow, want)]
    needs = [Q("{} IS DISTINCT FROM {}").format(ctx.shadow, want)]
    for c in ctx.pb.extra_columns:
        if c.backfill is not None:
            sets.append(Q("{0} = coalesce({0}, {1})").format(I(c.name), typed_literal(c.backfill, extra_type(c))))
            needs.append(Q("{} IS NULL").format(I(c.name)))
    return join(sets), Q("({})").format(Q(" OR ").join(needs))


class Backfill:
    def __init__(self, ctx: Context, pause_file: Path | None = None):
        self.ctx, self.x, self.state = ctx, ctx.x, ctx.state
        self.keys = Keyset(ctx.table, ctx.facts.pk)
        self.sets, self.needs = update_statement(ctx)
        self.s = ctx.pb.settings
        self.pause_file = pause_file

    def statement(self, cond: sql.Composable) -> sql.Composable:
        return Q("UPDATE {} SET {} WHERE {} AND {}").format(self.ctx.table, self.sets, cond, self.needs)

    def plan(self) -> None:
        cond, _ = self.keys.range_condition(["<after>"], ["<upto>"])
        self.x.note(self.x.render(self.statement(cond)) + "  -- repeated per key range, each in its own "
                    "transaction with the cursor update", lock="ROW EXCLUSIVE; row locks on one batch only")

    # -- progress row -----------------------------------------------------------------------------
    def _start(self) -> dict:
        st = self.state.backfill()
        if st is not None:
            return st
        end = self.x.query(self.keys.last_key_query())
        estimate = self.x.scalar(Q("SELECT greatest(reltuples, 0)::bigint FROM pg_class WHERE oid = to_regclass({})")
                                 .format(L(self.x.render(self.ctx.table))))
        self.x.conn.execute(Q("""INSERT INTO {} (playbook, cursor, end_key, rows_estimate, batch_size, started_at,
                                                  updated_at) VALUES (%s, NULL, %s, %s, %s, now(), now())
                                 ON CONFLICT (playbook) DO NOTHING""").format(self.state.t("backfill")),
                            (self.state.playbook, json.dumps(list(end[0]) if end else None), estimate,
                             self.s.batch_size))
        return self.state.backfill()

    # -- the loop ---------------------------------------------------------------------------------
    def run(self) -> dict:
        st = self._start()
        if st["finished_at"] is not None:
            return st
        end, after = st["end_key"], st["cursor"]
        size = st["batch_size"] or self.s.batch_size
        done = st["rows_done"]
        with Progress("backfill", total=st["rows_estimate"] or None, done=done) as progress:
            while end is not None and after != end:
                self._wait_if_paused()
                if self.s.batch_pause_ms:
                    time.sleep(self.s.batch_pause_ms / 1000)
                upto, changed, scanned, ms, size = self._batch(after, end, size)
                after, done = upto, done + changed
                progress.advance(scanned, changed=done)
            self.x.conn.execute(Q("UPDATE {} SET finished_at = now() WHERE playbook = %s").format(
                self.state.t("backfill")), (self.state.playbook,))
        return self.state.backfill()

    def _batch(self, after: list | None, end: list, size: int) -> tuple[list, int, int, float, int]:
        sizes = [size]

        def attempt():
            q, params = self.keys.bound_query(after, end, sizes[0])
            row = self.x.conn.execute(q, params).fetchone()
            upto = list(row) if row else end
            cond, params = self.keys.range_condition(after, upto)
            started = time.monotonic()
            try:
                with self.x.conn.transaction():
                    cur = self.x.conn.cursor()
                    cur.execute(Q("SET LOCAL lock_timeout = {}").format(L(f"{self.s.lock_timeout_ms}ms")))
                    cur.execute(Q("SET LOCAL statement_timeout = {}").format(L(f"{self.s.statement_timeout_ms}ms")))
                    cur.execute(self.statement(cond), params)
                    changed = cur.rowcount
                    cur.execute(Q("""UPDATE {} SET cursor = %s, rows_done = rows_done + %s, batches = batches + 1,
                                        batch_size = %s, last_batch_ms = %s,
                                        max_batch_ms = greatest(max_batch_ms, %s), updated_at = now()
                                     WHERE playbook = %s""").format(self.state.t("backfill")),
                                (json.dumps(upto, default=str), changed, sizes[0],
                                 (time.monotonic() - started) * 1000, (time.monotonic() - started) * 1000,
                                 self.state.playbook))
            except pgerr.QueryCanceled:
                sizes[0] = max(self.s.min_batch_size, sizes[0] // 2)  # too big for statement_timeout: split
                raise
            except psycopg.DataError as err:
                raise _data_error(err, after, upto) from None
            scanned = sizes[0] if row else changed  # a full range holds exactly `size` keys
            return upto, changed, scanned, (time.monotonic() - started) * 1000

        upto, changed, scanned, ms = self.x.with_retries("backfill batch", attempt)
        return upto, changed, scanned, ms, self._next_size(sizes[0], ms)

    def _next_size(self, size: int, ms: float) -> int:
        """Aim each batch at target_batch_ms, changing by at most 2x a step, within the playbook's bounds."""
        factor = min(2.0, max(0.5, self.s.target_batch_ms / max(ms, 1.0)))
        return int(min(self.s.max_batch_size, max(self.s.min_batch_size, size * factor)))

    def _wait_if_paused(self) -> None:
        if self.pause_file is None or not self.pause_file.exists():
            return
        log.info("backfill paused", pause_file=str(self.pause_file))
        while self.pause_file.exists():
            time.sleep(0.5)
        log.info("backfill resumed")


def _data_error(err: psycopg.DataError, after, upto):
    from .errors import Failure
    return Failure(f"backfill stopped on bad data between keys {after} and {upto}: {' '.join(str(err).split())}")
