"""The target column's CHECK (playbook `target.check`): what the enum enforced, kept after the swap.

Added online in the swap's preparation, before the columns change names:
  ALTER TABLE t ADD CONSTRAINT _ec_<column>_check CHECK (shadow ~ '<pattern>') NOT VALID   -- catalog only
  ALTER TABLE t VALIDATE CONSTRAINT _ec_<column>_check      -- SHARE UPDATE EXCLUSIVE: the app goes on
so from the moment the new vocabulary can be written (the swap) every write is held to it. The constraint is
on the shadow column and follows it through the renames; its name uses the column's final name. If VALIDATE
finds rows that break it, the swap is refused (exit 3) listing them, and the constraints are removed again
from every table: nothing changed. The swap's rollback drops it; the contract keeps it (it is the point).

Not done yet: the reverse migration after a contract (varchar back to an enum) does not exist; when it does,
it must drop this constraint (`drop(ctx)`) before converting the column.
"""

from __future__ import annotations

from psycopg import errors as pgerr
from psycopg import sql

from orchestrator.engine.context import Context
from orchestrator.engine.errors import Refused
from orchestrator.engine.playbook import _suffixed
from orchestrator.engine.sqlkit import I, Q
from orchestrator.engine.target_rules import expression

ADD_LOCK = "ACCESS EXCLUSIVE (catalog only, NOT VALID: no scan)"
VALIDATE_LOCK = "SHARE UPDATE EXCLUSIVE (reads and writes go on)"
DROP_LOCK = "ACCESS EXCLUSIVE (catalog only, milliseconds)"


def name(ctx: Context) -> str:
    """_ec_<column>_check: the orchestrator's (the _ec_ prefix), named after the column it ends up on."""
    return _suffixed(f"_ec_{ctx.m.column.name}", "_check")


def add_statement(ctx: Context) -> sql.Composed:
    return Q("ALTER TABLE {} ADD CONSTRAINT {} CHECK ({}) NOT VALID").format(
        ctx.table, I(name(ctx)), expression(ctx.m.target.check, ctx.shadow))


def validate_statement(ctx: Context) -> sql.Composed:
    return Q("ALTER TABLE {} VALIDATE CONSTRAINT {}").format(ctx.table, I(name(ctx)))


def drop_statement(ctx: Context) -> sql.Composed:
    return Q("ALTER TABLE {} DROP CONSTRAINT IF EXISTS {}").format(ctx.table, I(name(ctx)))


def _swapped(ctx: Context) -> sql.Composed:
    return ctx.exists_query("column", ctx.m.retired)


def prepare(ctx: Context) -> None:
    """Before the swap: the CHECK on the shadow column, NOT VALID then VALIDATEd; refuse listing bad rows."""
    if ctx.m.target.check is None:
        return
    x = ctx.x
    x.atomic(add_statement(ctx),
             skip_if=Q("SELECT ({}) OR ({})").format(ctx.exists_query("constraint", name(ctx)), _swapped(ctx)),
             lock=ADD_LOCK, what="add the target CHECK")
    try:
        x.atomic(validate_statement(ctx), skip_if=_swapped(ctx), lock=VALIDATE_LOCK, what="validate the target CHECK",
                 online=True)
    except pgerr.CheckViolation:
        bad = Q("NOT ({})").format(expression(ctx.m.target.check, ctx.shadow))
        n, ids = ctx.sample_ids(bad, limit=10)
        values = x.query(Q("SELECT DISTINCT {}::text FROM {} WHERE {} LIMIT 5").format(ctx.shadow, ctx.table, bad))
        # A value the new version wrote (no enum label, the enum copy holding the fallback label or NULL) is one
        # the copies agree on: the backfill keeps it, so only correcting the row mends it.
        written, written_ids = ctx.sample_ids(Q("({}) AND {}").format(bad, ctx.copies_agree(ctx.col, ctx.shadow)))
        hint = ("orchestrator rollback 5, 4 and 3, then run 3, 4 and 5 again: the backfill rewrites those rows from "
                "the mapping (or roll back every phase and change target.check)")
        if written:
            hint = (f"{written} of them hold a value the app wrote to {ctx.m.shadow} (e.g. ids {written_ids}), which "
                    f"the backfill keeps: correct those rows, then run 5 again (or roll back every phase and change "
                    f"target.check)")
        raise Refused(f"{ctx.m.label}: {n} rows hold a value that breaks target.check (e.g. ids {ids}, values "
                      f"{[v for (v,) in values]}); the swap was not started and nothing was changed",
                      hint=hint) from None


def drop(ctx: Context) -> None:
    """The rollback's side: no trace of the constraint (a no-op when it was never added)."""
    if ctx.m.target.check is None:
        return
    ctx.x.atomic(drop_statement(ctx), skip_if=Q("SELECT NOT ({})").format(ctx.exists_query("constraint", name(ctx))),
                 lock=DROP_LOCK, what="drop the target CHECK")



def prepare_all(ctxs: list[Context]) -> None:
    try:
        for ctx in ctxs:
            prepare(ctx)
    except Refused:
        drop_all(ctxs)  # every table's, the ones already validated too: a refused swap changes nothing
        raise


def drop_all(ctxs: list[Context]) -> None:
    for ctx in ctxs:
        drop(ctx)
