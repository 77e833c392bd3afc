"""The backfill engine: keyset batches, each one short transaction that also advances the stored cursor.

Committing the cursor with the batch makes a resume exact: after a crash, kill or Ctrl-C the next run starts
at the last committed batch, so no row is copied twice and none is skipped. Rows the trigger already
synced are skipped by the WHERE clause, and the walk stops at the last key that existed when it began
(rows inserted later are filled by the trigger), so the backfill ends even under heavy inserts.
"""

from __future__ import annotations

import json
import time
from typing import overload

import psycopg
import structlog
from psycopg import errors as pgerr
from psycopg import sql

from orchestrator.engine import health, replica
from orchestrator.engine.context import Context
from orchestrator.engine.errors import Failure, Refused
from orchestrator.engine.keyset import BlockRanges, Keyset
from orchestrator.engine.playbook import ColumnMigration
from orchestrator.engine.progress import Progress
from orchestrator.engine.sqlkit import I, L, Q, join, placeholders

log = structlog.get_logger()


def update_statement(ctx: Context, reverse: bool = False) -> tuple[sql.Composed, sql.Composed]:
    """SET list and the 'still needs it' condition of a batch. `reverse`: after the contract, filling the
    re-added enum column from the varchar one (a reverse migration, phases/restore.py)."""
    if reverse:
        want = ctx.old_value(ctx.col)  # the label, the fallback label, or NULL for a value with none (refused later)
        return Q("{} = {}").format(ctx.retired, want), Q("{} IS DISTINCT FROM {}").format(ctx.retired, want)
    want = ctx.forward(ctx.col)
    # Extra columns need nothing here: their backfill value is a temporary column default (phase 1).
    # Rows the new version wrote (a value with no label) agree already and are left alone.
    return Q("{} = {}").format(ctx.shadow, want), Q("NOT {}").format(ctx.copies_agree(ctx.col, ctx.shadow))


# Our own sync triggers (phases/dual_write.py): named `_ec_...`, or `~ec_...` so that they fire last.
OUR_TRIGGER_PATTERNS = (r"\_ec\_%", r"~ec\_%")


def reverse_key(m: ColumnMigration) -> str:
    return json.dumps([*json.loads(m.key), "reverse"])


def copy_key(m: ColumnMigration) -> str:
    """A table copy's progress (settings.backfill_method: copy), apart from an in-place backfill's."""
    return json.dumps([*json.loads(m.key), "copy"])


def progress_key(ctx: Context, reverse: bool = False) -> str:
    """The backfill's row in the state table: ColumnMigration.key, or its reverse migration's."""
    return reverse_key(ctx.m) if reverse else ctx.m.key


def app_triggers(ctx: Context, column: str | None = None) -> list[tuple[str, str]]:
    """(name, tgenabled) of the app's triggers that an UPDATE of the shadow column fires: not internal (foreign
    keys), not ours, not disabled, on UPDATE (row or statement level), with no `UPDATE OF` list or one that
    names the shadow column. tgenabled: O fires in the default mode, A always, R only as a replica."""
    return [tuple(r) for r in ctx.x.query(Q("""
        SELECT t.tgname, t.tgenabled::text FROM pg_trigger t
        WHERE t.tgrelid = to_regclass({}) AND NOT t.tgisinternal AND t.tgenabled <> 'D'
          AND t.tgtype::int & 16 <> 0
          AND t.tgname NOT LIKE ALL (%s)
          AND (cardinality(t.tgattr::int2[]) = 0 OR EXISTS (
               SELECT FROM pg_attribute a WHERE a.attrelid = t.tgrelid AND a.attname = %s
                 AND a.attnum = ANY (t.tgattr::int2[])))
        ORDER BY t.tgname""").format(L(ctx.x.render(ctx.table))), (list(OUR_TRIGGER_PATTERNS), column or ctx.m.shadow))]


def check_app_triggers(ctxs: list[Context], reverse: bool = False) -> None:
    """Before phase 3: the backfill UPDATEs every row, which fires the app's UPDATE triggers (an updated_at
    rewritten on every row, audit or outbox rows, a trigger rejecting the update). Refuse unless the playbook
    says what to do with them (settings.app_triggers: fire or skip)."""
    policy = ctxs[0].pb.settings.app_triggers
    found = {c.m.label: app_triggers(c, c.m.retired if reverse else None) for c in ctxs}
    if policy == "fire":
        for label, trig in found.items():
            if trig:
                log.warning("the backfill fires the application's triggers (settings.app_triggers: fire)",
                            table=label, triggers=[n for n, _ in trig])
        return
    if policy == "skip":
        # session_replication_role = replica skips triggers enabled the default way (O) only.
        named = _named(found, ("A", "R"))
        if named:
            raise Refused(f"backfill cannot skip triggers enabled ALWAYS or REPLICA (they fire even with "
                          f"session_replication_role = replica): {named}; nothing was changed",
                          hint="disable them for the backfill, or set settings.app_triggers: fire, then re-run "
                               "phase 3")
        return
    named = _named(found, ("O", "A"))
    if named:
        raise Refused(f"the backfill would fire the application's UPDATE triggers on every row ({named}): "
                      f"timestamps rewritten, audit rows written, updates rejected; nothing was changed",
                      hint="set settings.app_triggers: skip (batches run with session_replication_role = replica; "
                           "needs superuser or, on PostgreSQL 15+, GRANT SET ON PARAMETER "
                           "session_replication_role) or fire (accept their effects), then re-run phase 3")


def _named(found: dict[str, list[tuple[str, str]]], enabled: tuple[str, ...]) -> str:
    """'table.column: trigger, trigger; ...' for the triggers whose tgenabled is one of `enabled`."""
    return "; ".join(f"{label}: {', '.join(n for n, e in trig if e in enabled)}" for label, trig in found.items()
                     if any(e in enabled for _, e in trig))


def analyze(ctx: Context, reverse: bool = False) -> None:
    """Planner statistics for the backfilled column (and the new columns): without them, plans right after the
    swap use an empty histogram (measured: 246 estimated rows for ~5,000). SHARE UPDATE EXCLUSIVE: online."""
    names = [ctx.m.retired] if reverse else [ctx.m.shadow, *(c.name for c in ctx.m.extra_columns)]
    cols = join(I(c) for c in names)
    ctx.x.online(Q("ANALYZE {} ({})").format(ctx.table, cols), lock="SHARE UPDATE EXCLUSIVE (reads and writes go on)",
                 what=f"analyze {ctx.m.label}")


class Backfill:
    fires_app_triggers = True  # its statements UPDATE the table (settings.app_triggers applies)

    def __init__(self, ctx: Context, reverse: bool = False):
        """reverse: the enum column re-added after the contract, filled from the varchar one (phase 5's undo)."""
        self.ctx, self.x, self.state = ctx, ctx.x, ctx.state
        self.keys: Keyset | BlockRanges = (BlockRanges(ctx.table, ctx.x.render) if ctx.by_position
                                           else Keyset(ctx.table, ctx.facts.pk))
        self.sets, self.needs = update_statement(ctx, reverse)
        self.key = progress_key(ctx, reverse)
        self.title = f"{'reverse backfill' if reverse else 'backfill'} {ctx.m.label}"
        self.phase, self.action = (5, "uncontract") if reverse else (3, "expand")
        self.rerun = "re-run the same rollback" if reverse else "re-run phase 3"
        self.s = ctx.pb.settings
        self.health = health.Throttle(ctx)
        self.vacuum_table: sql.Composable = ctx.table
        self.replica = replica.LagWatch(self.s, ctx.x)

    def statement(self, cond: sql.Composable) -> sql.Composed:
        return Q("UPDATE {} SET {} WHERE {} AND {}").format(self.ctx.table, self.sets, cond, self.needs)

    def plan(self) -> None:
        if isinstance(self.keys, BlockRanges):
            self.x.note(self.x.render(self.statement(Q("ctid >= '(<from>,0)'::tid AND ctid < '(<to>,0)'::tid")))
                        + "  -- no primary key: repeated per range of heap blocks (TID range scans, about "
                          "batch_size rows each), each in its own transaction with the cursor update",
                        lock="ROW EXCLUSIVE; row locks on one batch only")
            return
        cond, _ = self.keys.range_condition(["<after>"], ["<upto>"])
        self.x.note(self.x.render(self.statement(cond)) + "  -- repeated per key range, each in its own "
                    "transaction with the cursor update", lock="ROW EXCLUSIVE; row locks on one batch only")

    # -- progress row -----------------------------------------------------------------------------
    def _start(self) -> dict:
        st = self.state.backfill(self.key)
        if st is not None:
            return st
        end = self.x.query(self.keys.last_key_query())
        estimate = self.x.scalar(Q("SELECT greatest(reltuples, 0)::bigint FROM pg_class WHERE oid = to_regclass({})")
                                 .format(L(self.x.render(self.ctx.table))))
        self.x.conn.execute(Q("""INSERT INTO {} (playbook, target, cursor, end_key, rows_estimate, batch_size,
                                                  started_at, updated_at)
                                 VALUES (%s, %s, NULL, %s, %s, %s, now(), now())
                                 ON CONFLICT (playbook, target) DO NOTHING""").format(self.state.t("backfills")),
                            (self.state.playbook, self.key, json.dumps(list(end[0]) if end else None, default=str),
                             estimate, self.s.batch_size))
        return self._progress()

    def _progress(self) -> dict:
        """The progress row, which _start has written."""
        st = self.state.backfill(self.key)
        if st is None:
            raise RuntimeError(f"{self.title}: its progress row is missing from the state table")
        return st

    # -- the loop ---------------------------------------------------------------------------------
    def run(self) -> dict:
        st = self._start()
        if st["finished_at"] is not None:
            return st
        end, after = st["end_key"], st["cursor"]
        size = st["batch_size"] or self.s.batch_size
        since_vacuum, every = 0, self.vacuum_every_rows()
        with Progress(self.title, total=st["rows_estimate"] or None, done=st["rows_scanned"]) as progress:
            while end is not None and after != end:
                self.x.wait_while_paused()
                self._throttle()
                if self.s.batch_pause_ms:
                    time.sleep(self.s.batch_pause_ms / 1000)
                after, scanned, size = self._batch(after, end, size)
                self.after_batch(scanned)
                progress.advance(scanned)
                since_vacuum += scanned
                if every is not None and since_vacuum >= every:
                    self.vacuum()
                    since_vacuum = 0
                if self.ctx.hooks is not None:
                    self.ctx.hooks.progress(phase=self.phase, phase_name="swap" if self.phase == 5 else "backfill",
                                            action=self.action, status="running",
                                            table=f"{self.ctx.m.table.schema_}.{self.ctx.m.table.name}",
                                            column=self.ctx.m.column.name,
                                            rows_done=progress.done, rows_total=progress.total,
                                            rows_per_s=progress.rate(), eta_s=progress.eta())
            if every is not None and since_vacuum:
                self.vacuum()
            self.x.conn.execute(Q("UPDATE {} SET finished_at = now() WHERE playbook = %s AND target = %s").format(
                self.state.t("backfills")), (self.state.playbook, self.key))
        return self._progress()

    def _batch(self, after: list | None, end: list, size: int) -> tuple[list, int, int]:
        """One key range in one transaction, with the cursor; returns (new cursor, rows scanned, next size)."""
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
                    # A batch that runs past max_batch_ms holds its row locks too long: cancel, split, retry.
                    limit = min(self.s.statement_timeout_ms, self.s.max_batch_ms)
                    cur.execute(Q("SET LOCAL statement_timeout = {}").format(L(f"{limit}ms")))
                    if self.s.app_triggers == "skip" and self.fires_app_triggers:
                        # The app's triggers do not fire for this batch (nor our sync trigger: the batch
                        # writes the shadow itself). Needs superuser or SET on the parameter (preflight).
                        cur.execute(Q("SET LOCAL session_replication_role = replica"))
                    cur.execute(self.statement(cond), params)
                    changed = cur.rowcount
                    # A full key range holds exactly `size` keys; a block range about `size` rows, the last fewer.
                    full = row is not None and (isinstance(self.keys, Keyset) or upto != end)
                    scanned = sizes[0] if full else changed
                    ms = (time.monotonic() - started) * 1000
                    cur.execute(Q("""UPDATE {} SET cursor = %s, rows_done = rows_done + %s,
                                        rows_scanned = rows_scanned + %s, batches = batches + 1,
                                        batch_size = %s, last_batch_ms = %s, max_batch_ms = greatest(max_batch_ms, %s),
                                        updated_at = now() WHERE playbook = %s AND target = %s""").format(
                                    self.state.t("backfills")),
                                (json.dumps(upto, default=str), changed, scanned, sizes[0], ms, ms,
                                 self.state.playbook, self.key))
            except pgerr.QueryCanceled:
                self._log_batch(after, upto, None, started, "QueryCanceled")
                sizes[0] = max(self.s.min_batch_size, sizes[0] // 2)  # too big for statement_timeout: split
                raise
            except (psycopg.OperationalError, pgerr.DeadlockDetected, pgerr.SerializationFailure) as err:
                self._log_batch(after, upto, None, started, type(err).__name__)
                raise
            except (psycopg.DataError, psycopg.IntegrityError) as err:
                raise self._offender(err, after, upto) from None
            self._log_batch(after, upto, changed, started, "ok")
            return upto, scanned, (time.monotonic() - started) * 1000

        upto, scanned, ms = self.x.with_retries("backfill batch", attempt, expected={
            "QueryCanceled": f"a batch ran past max_batch_ms ({self.s.max_batch_ms} ms) and was cancelled, then "
                             f"run again at half its size (not below min_batch_size, {self.s.min_batch_size})"})
        return upto, scanned, self._next_size(sizes[0], ms)

    def after_batch(self, scanned: int) -> None:
        """After each committed batch (a table copy replays its log here)."""

    def vacuum_every_rows(self) -> int | None:
        return self.s.vacuum_every_rows

    def vacuum(self) -> bool:
        """Online VACUUM of the table between batch ranges (settings.vacuum_every_rows): frees the row versions
        the batches left behind, so later batches reuse their space instead of growing the table, and sets
        hint bits and the visibility map while the pages are fresh in the WAL (verify then writes nothing).
        SHARE UPDATE EXCLUSIVE (reads and writes go on); TRUNCATE false, so no ACCESS EXCLUSIVE at its end.
        Skipped, not retried, when another vacuum holds the table past lock_timeout."""
        opts: list[sql.Composable] = [Q("TRUNCATE false")]
        cleanup = self.s.vacuum_index_cleanup
        if cleanup != "auto" or self.x.conn.info.server_version >= 140000:  # AUTO is PostgreSQL 14+
            opts.append(Q("INDEX_CLEANUP {}").format(Q({"auto": "AUTO", "on": "ON", "off": "OFF"}[cleanup])))
        stmt = Q("VACUUM ({}) {}").format(Q(", ").join(opts), self.vacuum_table)
        started = time.monotonic()
        cur = self.x.conn.cursor()
        try:
            cur.execute(Q("SET lock_timeout = {}").format(L(f"{self.s.lock_timeout_ms}ms")))
            cur.execute(Q("SET statement_timeout = {}").format(L(f"{self.s.online_statement_timeout_ms}ms")))
            cur.execute(stmt)
            outcome = "ok"
        except (pgerr.LockNotAvailable, pgerr.QueryCanceled) as err:  # an aid, never a reason to stop
            outcome = f"{type(err).__name__} (skipped)"
        finally:
            if not self.x.conn.closed and not self.x.conn.broken:
                cur.execute(Q("RESET lock_timeout; RESET statement_timeout"))
        if self.x.on_statement is not None:
            self.x.on_statement(self.x.render(stmt), time.monotonic() - started, outcome)
        log.info("backfill vacuum", table=self.ctx.m.label, outcome=outcome,
                 seconds=round(time.monotonic() - started, 2))
        return outcome == "ok"

    def _log_batch(self, after, upto, changed: int | None, started: float, outcome: str) -> None:
        if self.x.on_statement is not None:
            rows = "" if changed is None else f": {changed} rows"
            unit = "blocks" if isinstance(self.keys, BlockRanges) else "keys"
            self.x.on_statement(f"backfill batch {unit} {_key(after)} .. {_key(upto)}{rows}",
                                time.monotonic() - started, outcome)

    def _next_size(self, size: int, ms: float) -> int:
        """Aim each batch at target_batch_ms, changing by at most 2x a step, within the playbook's bounds."""
        factor = min(2.0, max(0.5, self.s.target_batch_ms / max(ms, 1.0)))
        return int(min(self.s.max_batch_size, max(self.s.min_batch_size, size * factor)))

    def _offender(self, err: psycopg.Error, after: list | None, upto: list) -> Failure:
        """Find the first row of the failed range that the update rejects, so the message names it."""
        reason = " ".join(str(err).split())
        cond, params = self.keys.range_condition(after, upto)
        keys = self.x.conn.execute(Q("SELECT {} FROM {} WHERE {} AND {} ORDER BY {} LIMIT 100000").format(
            self.keys.cols, self.ctx.table, cond, self.needs, self.keys.cols), params)
        for key in keys.fetchall():
            one = Q("{} = {}").format(self.keys.row, placeholders(len(key)))
            try:
                with self.x.conn.transaction(force_rollback=True):  # a probe: never keeps the change
                    if self.s.app_triggers == "skip":
                        self.x.conn.execute(Q("SET LOCAL session_replication_role = replica"))
                    self.x.conn.execute(self.statement(one), list(key))
            except psycopg.Error as row_err:
                named = f"at ctid {key[0]}" if isinstance(self.keys, BlockRanges) else f"with primary key {_key(key)}"
                return Failure(f"backfill stopped: the row {named} cannot be migrated: "
                               f"{' '.join(str(row_err).split())}", hint=f"fix that row, then {self.rerun}")
        between = (f"blocks {_key(after)} and {_key(upto)}" if isinstance(self.keys, BlockRanges)
                   else f"keys {_key(after)} and {_key(upto)}")
        return Failure(f"backfill stopped on bad data between {between}: {reason}",
                       hint=f"fix the data, then {self.rerun}")

    # -- operator and server throttles -------------------------------------------------------------
    def _throttle(self) -> None:
        """Hold the next batch while a replica lags or long transactions pile up (their limits are optional)."""
        if self.s.max_replica_lag_ms is None and self.s.max_replica_lag_bytes is None \
                and self.s.max_long_transactions is None and not health.enabled(self.s):
            return
        waited, shown = 0.0, None
        try:
            while (reason := self._throttle_reason()) is not None:
                if waited == 0.0:
                    log.info("backfill throttled", reason=reason)
                if health.kind_of(reason) != shown:  # recorded for `status`, once per kind of hold
                    self.health.record(reason)
                    shown = health.kind_of(reason)
                if waited >= self.s.throttle_max_wait_s:
                    raise Refused(f"backfill held for {waited:.0f}s: {reason}",
                                  hint=f"{self.rerun} when the server has recovered; it resumes where it stopped")
                time.sleep(0.5)
                waited += 0.5
        finally:
            if shown is not None:
                self.health.record(None)

    def _throttle_reason(self) -> str | None:
        s = self.s
        if (why := self.replica.reason()) is not None:  # max_replica_lag_bytes / max_replica_lag_ms
            return why
        if s.max_long_transactions is not None:
            n = self.x.scalar(Q("""SELECT count(*) FROM pg_stat_activity WHERE pid <> pg_backend_pid()
                                   AND xact_start < now() - make_interval(secs => %s)
                                   AND backend_type = 'client backend'"""), (s.long_transaction_s,))
            if n > s.max_long_transactions:
                return (f"{n} transactions open longer than {s.long_transaction_s}s "
                        f"> max_long_transactions {s.max_long_transactions}")
        return self.health.reason()  # WAL rate, autovacuum on the table, app lock waiters


def _key(key) -> str:
    if key is None:
        return "(start)"
    return str(key[0]) if len(key) == 1 else str(tuple(key))


@overload
def summary(row: dict) -> dict: ...
@overload
def summary(row: None) -> None: ...
def summary(row: dict | None) -> dict | None:
    """The stored progress row plus rate and ETA, for `status` while another process runs the backfill."""
    if row is None:
        return None
    out = dict(row)
    elapsed = ((row["updated_at"] or row["started_at"]) - row["started_at"]).total_seconds() if row["started_at"] else 0
    rate = row["rows_scanned"] / elapsed if elapsed > 0 else None
    remaining = max((row["rows_estimate"] or 0) - row["rows_scanned"], 0)
    out["rows_per_s"] = round(rate) if rate else None
    out["eta_s"] = None if row["finished_at"] or not rate else round(remaining / rate, 1)
    return out
