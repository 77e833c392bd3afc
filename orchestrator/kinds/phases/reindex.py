"""The backfill's contract step with settings.reindex_on_contract: rebuild the indexes the backfill bloated.

The backfill updates every row, so every index of the table gets a second entry per row. The leaf pages that
split to take them stay half empty once VACUUM removes the old entries: B-tree pages are never merged. The
naive rewrite instead builds every index from scratch. `REINDEX INDEX CONCURRENTLY` packs each index again,
online: SHARE UPDATE EXCLUSIVE on the table, waits under the online timeouts, and the old index is dropped
concurrently. Measured in docs/benchmarks.md.

A rebuild that stops leaves an INVALID copy behind: `<name>_ccnew` before the swap of the two, or the old
index as `<name>_ccold` after it. It is dropped concurrently before every attempt, and again by the re-run.
The indexes already rebuilt are recorded in the phase's details, so a re-run after a crash goes on with the
next one.
"""

from __future__ import annotations

from typing import Callable

from psycopg import sql

from orchestrator.engine import catalog
from orchestrator.engine.context import Context
from orchestrator.engine.sqlkit import Q

LOCK = "SHARE UPDATE EXCLUSIVE (reads and writes go on); the old index dropped concurrently"


def candidates(ctx: Context, oid: int) -> list[str]:
    """The table's valid indexes, by name. Left out: the retired column's indexes (the swap's contract drops
    them) and exclusion constraints' (PostgreSQL cannot rebuild those concurrently)."""
    retired = {ix.retired_name for ix in ctx.facts.indexes}
    rows = ctx.x.query(Q("""SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
                            WHERE i.indrelid = %s AND i.indisvalid AND NOT EXISTS (
                              SELECT FROM pg_constraint k WHERE k.conindid = i.indexrelid AND k.contype = 'x')
                            ORDER BY c.relname"""), (oid,))
    return [name for (name,) in rows if name not in retired]


def leftovers(ctx: Context, oid: int, name: str) -> list[str]:
    """INVALID copies a stopped `REINDEX INDEX CONCURRENTLY name` left: `<name>_ccnew[N]` or `<name>_ccold[N]`,
    the name cut short to fit 63 bytes as PostgreSQL cuts it (so: any prefix of the name)."""
    rows = ctx.x.query(Q("""SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
                            WHERE i.indrelid = %s AND NOT i.indisvalid
                              AND c.relname ~ '_cc(new|old)[0-9]*$'
                              AND starts_with(%s, substring(c.relname FROM '^(.*)_cc(?:new|old)[0-9]*$'))"""),
                       (oid, name))
    return [r[0] for r in rows]


def rebuild_indexes(ctx: Context, done: list[str], record: Callable[[list[str]], None]) -> None:
    """REINDEX INDEX CONCURRENTLY each candidate not in `done`, one at a time, calling `record` with the names
    rebuilt so far after each one."""
    x = ctx.x
    if x.dry_run:
        x.note(f"REINDEX INDEX CONCURRENTLY each index of {x.render(ctx.table)} but the retired column's  "
               f"-- settings.reindex_on_contract; an INVALID copy a stopped rebuild left is dropped first",
               lock=LOCK)
        return
    oid = catalog.table_oid(x.conn, *ctx.table_name)
    if oid is None:  # no such table: no index to rebuild (what the queries below would find for a NULL oid)
        return
    for name in candidates(ctx, oid):
        if name in done:
            continue

        def cleanup(name: str = name) -> list[sql.Composed]:
            return [Q("DROP INDEX CONCURRENTLY IF EXISTS {}").format(ctx.index(n)) for n in leftovers(ctx, oid, name)]

        x.concurrently(Q("REINDEX INDEX CONCURRENTLY {}").format(ctx.index(name)), lock=LOCK, cleanup=cleanup,
                       what=f"rebuild index {name}")
        done = [*done, name]
        record(done)
