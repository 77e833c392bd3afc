"""Phase 3: copy map(old value) into the shadow column for every existing row, in resumable batches."""

from __future__ import annotations

from contextlib import contextmanager

import psycopg
import structlog

from orchestrator.engine.backfill import Backfill, analyze, check_app_triggers, copy_key
from orchestrator.engine.context import Context
from orchestrator.engine.sqlkit import L, Q
from orchestrator.engine.state import APPLIED
from orchestrator.kinds.phases.base import Phase
from orchestrator.kinds.phases.copy import TableCopy
from orchestrator.kinds.phases.reindex import rebuild_indexes
from orchestrator.kinds.phases.shadow import build_indexes, index_names

log = structlog.get_logger()


@contextmanager
def _wal_compression(ctx: Context):
    """settings.wal_compression for this session while phase 3 writes; never a reason to stop."""
    method = ctx.pb.settings.wal_compression
    applied = False
    if method is not None:
        try:
            ctx.x.conn.execute(Q("SET wal_compression = {}").format(L(method)))
            applied = True
        except psycopg.Error as err:
            log.warning("wal_compression not applied", method=method, error=" ".join(str(err).split()))
    try:
        yield
    finally:
        if applied and not ctx.x.conn.closed and not ctx.x.conn.broken:
            ctx.x.conn.execute(Q("RESET wal_compression"))


@contextmanager
def _one_core(ctx: Context):
    """The copy's index builds and foreign-key validations would take parallel workers too: a core each,
    measured as app statements waiting for CPU on a small server. One process, the app keeps the rest."""
    conn = ctx.x.conn
    conn.execute(Q("SET max_parallel_maintenance_workers = 0; SET max_parallel_workers_per_gather = 0"))
    try:
        yield
    finally:
        if not conn.closed and not conn.broken:
            conn.execute(Q("RESET max_parallel_maintenance_workers; RESET max_parallel_workers_per_gather"))


def method_reason(ctx: Context) -> str:
    """Which backfill a table gets, and why, for plan."""
    if ctx.backfill_method == "copy":
        return "copied into a new table (settings.backfill_method: copy)"
    if not ctx.by_position:
        return "updated in place, per primary-key range (settings.backfill_method: update)"
    why = ("no primary key, by which the copy replays its log" if ctx.pb.settings.backfill_method == "copy"
           else "no primary key")
    return f"updated in place, per range of heap blocks ({why})"


class BackfillPhase(Phase):
    name = "backfill"
    title = "backfill the shadow column in batches"
    expand_doc = ("UPDATE ... SET shadow = map(column) WHERE pk in (next key range) AND shadow IS DISTINCT FROM "
                  "map(column); one short transaction per batch, cursor committed with it (resumable); with "
                  "settings.vacuum_every_rows an online VACUUM between ranges; with indexes_after_backfill the "
                  "CREATE INDEX CONCURRENTLY of phase 1 after the batches")
    rollback_doc = ("forget the backfill cursor (values in the shadow column go with phase 1's rollback); with "
                    "settings.indexes_after_backfill DROP INDEX CONCURRENTLY the indexes it built")
    contract_doc = ("nothing to remove; with settings.reindex_on_contract REINDEX INDEX CONCURRENTLY each index of "
                    "the table but the retired column's, packed again (the backfill left them half empty)")
    locks_doc = ("ROW EXCLUSIVE; row locks on one batch at a time (target_batch_ms), each waiting at most "
                 "lock_timeout; then ANALYZE of the new columns (SHARE UPDATE EXCLUSIVE, online)")
    copy_title = "copy each table with the shadow column filled, then swap the copy in"
    copy_doc = ("CREATE TABLE copy (the table's columns and the shadow); INSERT INTO copy SELECT ... per key range "
                "(reads only: no row of the table is updated), the rows the app writes meanwhile noted by an AFTER "
                "trigger in a log and copied again; the indexes built once on the copy; then one short transaction "
                "takes the table's lock, replays the last of the log and swaps the copy in by renames (a table "
                "without a primary key is updated in place, per range of heap blocks)")

    def described(self, settings) -> tuple[str, str]:
        if settings.backfill_method == "copy":
            return self.copy_title, self.copy_doc
        return self.title, self.expand_doc

    def before_expand_all(self, ctxs: list[Context]) -> None:
        for ctx in ctxs:  # every table checked before any is touched
            if ctx.backfill_method == "copy":
                TableCopy(ctx).refuse_unsupported()
        # The copy does not UPDATE the table: the app's triggers do not fire. An in-place backfill's do: refuse
        # (naming them) unless settings.app_triggers says fire or skip.
        in_place = [ctx for ctx in ctxs if ctx.backfill_method == "update"]
        if in_place:
            check_app_triggers(in_place)

    def expand(self, ctx: Context) -> dict:
        if ctx.x.dry_run:
            ctx.x.note(f"-- {ctx.m.label}: {method_reason(ctx)}")
        if ctx.backfill_method == "copy":
            return self._copy(ctx)
        engine = Backfill(ctx)
        s = ctx.pb.settings
        if ctx.by_position and ctx.pb.settings.backfill_method == "copy":
            log.info("backfill in place: no primary key to replay the copy's log by", table=ctx.m.label)
        if ctx.x.dry_run:
            engine.plan()
            if s.vacuum_every_rows is not None:
                ctx.x.note(f"VACUUM (TRUNCATE false, INDEX_CLEANUP {s.vacuum_index_cleanup.upper()}) "
                           f"{ctx.x.render(ctx.table)}  -- after every {s.vacuum_every_rows} rows and at the end",
                           lock="SHARE UPDATE EXCLUSIVE (reads and writes go on); skipped past lock_timeout")
            if s.indexes_after_backfill:
                build_indexes(ctx)
            analyze(ctx)
            return {}
        with _wal_compression(ctx):
            st = engine.run()
            # With settings.indexes_after_backfill phase 1 left the index builds to here; without it they exist
            # already and each build is skipped (so a setting changed between phases still ends with every index).
            build_indexes(ctx)
        analyze(ctx)  # again on a re-run: cheap, and the statistics are then fresh
        return {"rows_done": st["rows_done"], "batches": st["batches"], "max_batch_ms": st["max_batch_ms"]}

    @staticmethod
    def _copy(ctx: Context) -> dict:
        tc = TableCopy(ctx)
        if ctx.x.dry_run:
            tc.plan()
            analyze(ctx)
            return {}
        with _one_core(ctx):
            if not tc.exchanged():
                tc.prepare()
                with _wal_compression(ctx):
                    tc.copy_rows()
                    tc.build_indexes()
                tc.exchange()
            else:
                tc.finish_exchange()  # a run stopped after the swap: what follows it
        build_indexes(ctx)  # built on the copy already: each skipped, unless dropped since
        analyze(ctx)
        st = ctx.state.backfill(copy_key(ctx.m)) or {}
        return {"rows_done": st.get("rows_done", 0), "batches": st.get("batches", 0),
                "max_batch_ms": st.get("max_batch_ms"), "method": "copy"}

    def expand_all(self, ctxs: list[Context]) -> dict:
        tables = {c.m.label: self.expand(c) for c in ctxs}
        if ctxs[0].x.dry_run:
            return {}
        return {"rows_done": sum(t["rows_done"] for t in tables.values()),
                "batches": sum(t["batches"] for t in tables.values()),
                "max_batch_ms": max((t["max_batch_ms"] or 0 for t in tables.values()), default=0), "tables": tables}

    def check(self, ctx: Context) -> list[str]:
        return [f"index {n!r} missing or invalid" for n in index_names(ctx) if not ctx.has("valid_index", n)]

    def contract_all(self, ctxs: list[Context]) -> None:
        if not ctxs[0].pb.settings.reindex_on_contract:
            return super().contract_all(ctxs)
        state = ctxs[0].state
        # The indexes rebuilt so far, by table: a re-run after a crash goes on with the next one.
        done = dict(state.details(self.number).get("reindexed", {})) if state is not None else {}
        for ctx in ctxs:
            def record(names: list[str], label: str = ctx.m.label) -> None:
                done[label] = names
                state.set(self.number, APPLIED, step="contract", details={"reindexed": done})
            rebuild_indexes(ctx, done.get(ctx.m.label, []), record)

    def rollback(self, ctx: Context) -> None:
        if ctx.backfill_method == "copy":
            TableCopy(ctx).discard()  # before the exchange: the copy goes; after it, nothing of it is left
        if ctx.pb.settings.defers_indexes:  # the indexes this phase built: back to phase 2's state
            for name in index_names(ctx):
                ctx.x.concurrently(Q("DROP INDEX CONCURRENTLY IF EXISTS {}").format(ctx.index(name)),
                                   lock="SHARE UPDATE EXCLUSIVE", what=f"drop index {name}")
        ctx.x.note("-- forget the backfill cursor")
        if ctx.state is not None and not ctx.x.dry_run:
            ctx.x.conn.execute(Q("DELETE FROM {} WHERE playbook = %s AND target = %s").format(
                ctx.state.t("backfills")), (ctx.state.playbook, ctx.m.key))
