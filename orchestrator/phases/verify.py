"""Phase 4: parity. The swap refuses unless every row holds shadow = map(old value)."""

from __future__ import annotations

from ..errors import Refused
from .base import Context, Phase


class VerifyPhase(Phase):
    name = "verify"
    title = "verify parity of the two columns"
    expand_doc = ("scan in ranges of heap blocks (key ranges before PostgreSQL 14): count rows where shadow IS "
                  "DISTINCT FROM map(column); zero or refuse")
    rollback_doc = "forget the verification result"
    locks_doc = "ACCESS SHARE only (plain reads)"

    def expand(self, ctx: Context) -> dict:
        from .. import parity
        if ctx.x.dry_run:
            ctx.x.note(parity.plan_note(ctx, swapped=False), lock="ACCESS SHARE")
            return {}
        result = parity.check(ctx, swapped=False)
        if result.mismatches:
            raise Refused(f"parity check found {result.mismatches} of {result.rows} rows where "
                          f"{ctx.pb.shadow} differs from the mapping of {ctx.pb.column.name} "
                          f"(e.g. ids {result.sample}); the swap stays blocked",
                          hint="orchestrator rollback 4; orchestrator rollback 3; then run 3 and 4 again: "
                               "the backfill re-checks every row and mends the drifted ones")
        return {"parity": result.to_json()}

    def rollback(self, ctx: Context) -> None:
        ctx.x.note("-- forget the verification result")
