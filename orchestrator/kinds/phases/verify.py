"""Phase 4: parity. The swap refuses unless every row holds shadow = map(old value)."""

from __future__ import annotations

from orchestrator.engine import parity
from orchestrator.engine.context import Context
from orchestrator.engine.errors import Refused
from orchestrator.kinds.phases import versions
from orchestrator.kinds.phases.base import Phase


class VerifyPhase(Phase):
    name = "verify"
    title = "verify parity of the two columns"
    expand_doc = ("scan in ranges of heap blocks (key ranges before PostgreSQL 14): count rows where shadow IS "
                  "DISTINCT FROM map(column); zero or refuse")
    rollback_doc = "forget the verification result"
    locks_doc = "ACCESS SHARE only (plain reads)"

    def expand(self, ctx: Context) -> dict:
        if ctx.x.dry_run:
            ctx.x.note(parity.plan_note(ctx, swapped=False), lock="ACCESS SHARE")
            return {}
        result = parity.check(ctx, swapped=False)
        if result.mismatches:
            raise Refused(f"parity check found {result.mismatches} of {result.rows} rows of {ctx.m.table.name} where "
                          f"{ctx.m.shadow} differs from the mapping of {ctx.m.column.name} "
                          f"(e.g. ids {result.sample}); the swap stays blocked",
                          hint="orchestrator rollback 4; orchestrator rollback 3; then run 3 and 4 again: "
                               "the backfill re-checks every row and mends the drifted ones")
        return {"parity": result.to_json()}

    def expand_all(self, ctxs: list[Context]) -> dict:
        tables = {c.m.label: self.expand(c) for c in ctxs}
        if ctxs[0].x.dry_run:
            return {}
        total = {"rows": sum(t["parity"]["rows"] for t in tables.values()),
                 "mismatches": sum(t["parity"]["mismatches"] for t in tables.values())}
        versions.install_views(ctxs, ("new",))  # parity holds: the new version can read every row
        return {"parity": total, "tables": tables}

    def rollback_all(self, ctxs: list[Context]) -> None:
        versions.remove_views(ctxs, ("new",))
        super().rollback_all(ctxs)

    def before_contract_all(self, ctxs: list[Context]) -> None:
        """The contract ends the rollback window: scan again, so a verdict made stale by writes that bypassed the
        triggers (session_replication_role = replica, disabled triggers) stops it, naming rows."""
        for ctx in ctxs:
            if not ctx.has("column", ctx.m.retired):
                continue
            result = parity.check(ctx, swapped=True)
            if result.mismatches:
                raise Refused(f"cannot contract: {result.mismatches} rows of {ctx.m.label} have an enum copy that "
                              f"no longer matches (e.g. ids {result.sample}): writes bypassed the sync since the "
                              f"swap; nothing was changed",
                              hint=f"touch those rows (UPDATE ... SET {ctx.m.column.name} = {ctx.m.column.name} "
                                   f"WHERE ...): the sync trigger repairs their copy; then re-run the contract")

    def rollback(self, ctx: Context) -> None:
        ctx.x.note("-- forget the verification result")
