"""Keys in the swap (kind change_type): a primary or unique key, the foreign keys pointing at it, its sequence.

A key constraint owns its index, so it cannot be renamed across like a plain index. The swap's one
transaction drops the family's foreign keys, then the old key (its index goes with it), renames the columns,
adds the key again on the new column with the unique index phase 1 built there (`ADD CONSTRAINT ... USING
INDEX`: no scan, the NOT NULL is proven already), moves the sequence with the column (OWNED BY, AS the new type)
and re-creates every foreign key with its own definition, NOT VALID: the definition names columns, which now
are the new ones. VALIDATE follows, outside the transaction, taking locks the app never waits for.

The rollback of the swap is the same the other way; the old column gets its unique index first (built
CONCURRENTLY, named as the retired copy of the key's index), and the new column's copy is built again after.
"""

from __future__ import annotations

from psycopg import sql

from orchestrator.engine.catalog import ForeignKeyFact, IndexFact
from orchestrator.engine.context import Context
from orchestrator.engine.errors import Refused
from orchestrator.engine.sqlkit import I, L, Q

INTEGER_TYPES = ("smallint", "integer", "bigint")


def key_indexes(ctx: Context) -> list[IndexFact]:
    return [ix for ix in ctx.facts.indexes if ix.constraint is not None]


def family(ctxs: list[Context]) -> list[tuple[Context, ForeignKeyFact]]:
    return [(ctx, fk) for ctx in ctxs for fk in ctx.facts.foreign_keys]


def excused(ctxs: list[Context]) -> tuple[str, ...]:
    """Constraints on the columns that the swap moves itself: not objects in its way."""
    return tuple(fk.name for _, fk in family(ctxs)) + tuple(
        ix.constraint for ctx in ctxs for ix in key_indexes(ctx) if ix.constraint is not None)


def drop_foreign_keys(ctxs: list[Context]) -> list[sql.Composed]:
    return [Q("ALTER TABLE {} DROP CONSTRAINT IF EXISTS {}").format(ctx.table, I(fk.name)) for ctx, fk in family(ctxs)]


def add_foreign_keys(ctxs: list[Context]) -> list[sql.Composed]:
    # The definition is pg_get_constraintdef's text, read from the catalog at phase 1: the same constraint again.
    return [Q("ALTER TABLE {} ADD CONSTRAINT {} {} NOT VALID").format(ctx.table, I(fk.name), Q(fk.definition))
            for ctx, fk in family(ctxs)]


def validate_foreign_keys(ctxs: list[Context]) -> None:
    """VALIDATE each re-created foreign key: SHARE UPDATE EXCLUSIVE on its table, ROW SHARE on the referenced
    one; the app reads and writes on. Skipped when valid already (a re-run)."""
    for ctx, fk in family(ctxs):
        ctx.x.atomic(Q("ALTER TABLE {} VALIDATE CONSTRAINT {}").format(ctx.table, I(fk.name)),
                     skip_if=Q("SELECT NOT EXISTS (SELECT FROM pg_constraint WHERE conrelid = to_regclass({}) "
                               "AND conname = {} AND NOT convalidated)").format(L(ctx.x.render(ctx.table)),
                                                                                 L(fk.name)),
                     lock="SHARE UPDATE EXCLUSIVE (reads and writes go on)", what=f"validate foreign key {fk.name}",
                     online=True)


def drop_key(ctx: Context) -> list[sql.Composed]:
    return [Q("ALTER TABLE {} DROP CONSTRAINT {}").format(ctx.table, I(ix.constraint)) for ix in key_indexes(ctx)
            if ix.constraint is not None]


def add_key(ctx: Context, index_of: str) -> list[sql.Composed]:
    """The key again, on the column now named as the original, with its copy index (`index_of`: "shadow_name"
    after the swap, "retired_name" after its rollback), which takes the constraint's name."""
    out = []
    for ix in key_indexes(ctx):
        kind = Q("PRIMARY KEY") if ix.constraint_type == "p" else Q("UNIQUE")
        out.append(Q("ALTER TABLE {} ADD CONSTRAINT {} {} USING INDEX {}").format(
            ctx.table, I(ix.constraint or ix.name), kind, I(getattr(ix, index_of))))
    return out


def move_sequence(ctx: Context, type_: str) -> list[sql.Composed]:
    """The column's sequence follows it: owned by the column now bearing the name, of its integer type."""
    seq = ctx.facts.sequence
    if seq is None:
        return []
    stmt = Q("ALTER SEQUENCE {}").format(I(seq.schema, seq.name))
    if type_ in INTEGER_TYPES and seq.type in INTEGER_TYPES:
        stmt = Q("{} AS {}").format(stmt, Q(type_))
    return [Q("{} OWNED BY {}").format(stmt, I(*ctx.table_name, ctx.m.column.name))]


def refuse_sequence_past_old_type(ctxs: list[Context]) -> None:
    """Before the swap is rolled back: a sequence that handed out a value the old type cannot hold (an insert
    that failed or was deleted still used it) cannot go back to that type."""
    for ctx in ctxs:
        seq = ctx.facts.sequence
        if seq is None or ctx.x.dry_run or seq.type not in INTEGER_TYPES:
            continue
        last, fits = ctx.x.query(Q("SELECT last_value, last_value <= (SELECT max(v) FROM (VALUES "
                                   "(32767::bigint, 'smallint'), (2147483647, 'integer'), "
                                   "(9223372036854775807, 'bigint')) AS m(v, t) WHERE t = {}) FROM {}").format(
            L(seq.type), I(seq.schema, seq.name)))[0]
        if not fits:
            raise Refused(f"rollback of the swap: sequence {seq.schema}.{seq.name} of {ctx.m.label} is at {last}, "
                          f"past what {seq.type} holds; nothing was changed",
                          hint="stay on the new type (contract), or ALTER SEQUENCE ... RESTART below the old "
                               "type's limit once no row needs those ids")
