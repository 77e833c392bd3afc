"""Phase 3: copy map(old value) into the shadow column for every existing row, in resumable batches."""

from __future__ import annotations

from ..sqlkit import Q
from .base import Context, Phase


class BackfillPhase(Phase):
    name = "backfill"
    title = "backfill the shadow column in batches"
    expand_doc = ("UPDATE ... SET shadow = map(column) WHERE pk in (next key range) AND shadow IS DISTINCT FROM "
                  "map(column); one short transaction per batch, cursor committed with it (resumable)")
    rollback_doc = "forget the backfill cursor (values in the shadow column go with phase 1's rollback)"
    contract_doc = "nothing to remove"
    locks_doc = ("ROW EXCLUSIVE; row locks on one batch at a time (target_batch_ms), each waiting at most lock_timeout; "
                 "then ANALYZE of the new columns (SHARE UPDATE EXCLUSIVE, online)")

    def before_expand_all(self, ctxs: list[Context]) -> None:
        from ..backfill import check_app_triggers
        check_app_triggers(ctxs)  # refuse (naming them) unless settings.app_triggers says fire or skip

    def expand(self, ctx: Context) -> dict:
        from ..backfill import Backfill, analyze  # the engine imports the phase context; import late (cycle)
        engine = Backfill(ctx)
        if ctx.x.dry_run:
            engine.plan()
            analyze(ctx)
            return {}
        st = engine.run()
        analyze(ctx)  # again on a re-run: cheap, and the statistics are then fresh
        return {"rows_done": st["rows_done"], "batches": st["batches"], "max_batch_ms": st["max_batch_ms"]}

    def expand_all(self, ctxs: list[Context]) -> dict:
        tables = {c.m.label: self.expand(c) for c in ctxs}
        if ctxs[0].x.dry_run:
            return {}
        return {"rows_done": sum(t["rows_done"] for t in tables.values()),
                "batches": sum(t["batches"] for t in tables.values()),
                "max_batch_ms": max((t["max_batch_ms"] or 0 for t in tables.values()), default=0), "tables": tables}

    def rollback(self, ctx: Context) -> None:
        ctx.x.note("-- forget the backfill cursor")
        if ctx.state is not None and not ctx.x.dry_run:
            ctx.x.conn.execute(Q("DELETE FROM {} WHERE playbook = %s AND target = %s").format(
                ctx.state.t("backfills")), (ctx.state.playbook, ctx.m.key))
