"""Phase 4: parity. The swap refuses unless every row holds shadow = map(old value)."""

from __future__ import annotations

import psycopg

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
        result = scan_before_swap(ctx)
        if result.mismatches:
            raise Refused(f"parity check found {result.mismatches} of {result.rows} rows of {ctx.m.table.name} where "
                          f"{ctx.m.shadow} differs from {ctx.conversion_of(ctx.m.column.name)} "
                          f"(e.g. ids {result.sample}); the swap stays blocked",
                          hint="orchestrator rollback 4; orchestrator rollback 3; then run 3 and 4 again: "
                               "the backfill re-checks every row and mends the drifted ones")
        refuse_lossy(ctx, result, "the swap stays blocked")
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
                # The hint names no no-op UPDATE: the sync recomputes a copy only from a column that changed.
                col, retired = ctx.m.column.name, ctx.m.retired
                raise Refused(f"cannot contract: {result.mismatches} rows of {ctx.m.label} hold in {ctx.old_copy} "
                              f"{retired!r} a value that is not {ctx.conversion_back(col)}, while {col!r} is not "
                              f"{ctx.conversion_of(retired)} either (e.g. ids {result.sample}): written since the "
                              f"swap bypassing the sync triggers (session_replication_role = replica, disabled "
                              f"triggers); nothing was changed",
                              hint=f"compare {col!r} and {retired!r} in those rows and write the right value into "
                                   f"the wrong one (the sync recomputes the other from the one that changed); then "
                                   f"re-run the contract")

    def rollback(self, ctx: Context) -> None:
        ctx.x.note("-- forget the verification result")


def scan_before_swap(ctx: Context) -> parity.ParityResult:
    """The parity scan before the swap; with change_type it also counts, over every row, old values that do not
    come back through down(up(x)). A scan that fails because down fails on some up(x) is a refusal naming rows."""
    try:
        return parity.check(ctx, swapped=False)
    except psycopg.DataError as err:
        if not ctx.changes_type:
            raise
        rows = parity.lossy_rows(ctx)
        if not rows:  # not down failing on a value of the table: the error as it is
            raise
        result = parity.ParityResult(lossy=len(rows), lossy_sample=rows)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        refuse_lossy(ctx, result, f"the swap stays blocked (down fails on up(x): {first})")
        raise


def refuse_lossy(ctx: Context, result: parity.ParityResult, then: str) -> None:
    """Old values the way back would change: a rollback of the swap would hand the old version another value."""
    if not result.lossy:
        return
    shown = "; ".join(f"{_key(ctx, k)}: {v} gives {'NULL (down fails)' if g is None else g}"
                      for k, v, g in result.lossy_sample)
    count = f"{result.lossy} rows" if result.rows else "rows"
    raise Refused(f"{count} of {ctx.m.label} hold a value that down(up(x)) does not give back ({shown}): after the "
                  f"swap a rollback would return another value; {then}",
                  hint=f"change those rows' {ctx.m.column.name!r} to values that come back, or roll back every "
                       f"phase and correct up/down in the playbook; then run this phase again")


def _key(ctx: Context, key) -> str:
    values = key if isinstance(key, tuple) else (key,)
    return ", ".join(f"{c}={v!r}" for c, v in zip(ctx.row_key, values))
