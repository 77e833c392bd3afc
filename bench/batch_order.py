#!/usr/bin/env python
"""Experiment for issue 25, item 2: does the backfill's batch order decide its WAL?

    python bench/batch_order.py [--rows 200000] [--batch-rows 5000]

On Chatter's workflow_templates (ids are random strings, so key order is not the heap's order), fills a new
varchar column with the mapping three ways on identical clones, with full_page_writes and checksums on, each
from a CHECKPOINT to after a VACUUM of the table (counted): the naive `ALTER COLUMN ... TYPE` rewrite; batches
in primary-key order (what the backfill does today); batches over ranges of heap blocks (ctid order), each
batch writing its rows' new versions while the pages it reads are fresh in this checkpoint cycle. Prints WAL,
full-page images and size for each. Not a test: figures only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import psycopg
from psycopg.conninfo import make_conninfo

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from orchestrator.lab import chatter, server  # noqa: E402

MAP = "CASE workflow_type WHEN 'plain' THEN 'simple_chat' WHEN 'rag' THEN 'rag_chat' WHEN 'tools' " \
      "THEN 'function_chat' WHEN 'full' THEN 'advanced_chat' END"


def wal(conn: psycopg.Connection) -> tuple[int, int]:
    lsn = conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::bigint").fetchone()[0]
    fpi = conn.execute("SELECT wal_fpi FROM pg_stat_wal").fetchone()[0]
    return int(lsn), int(fpi)


def size(conn: psycopg.Connection) -> int:
    return int(conn.execute("SELECT pg_total_relation_size('workflow_templates')").fetchone()[0])


def naive(conn: psycopg.Connection, batch: int) -> int:
    conn.execute(f"ALTER TABLE workflow_templates ALTER COLUMN workflow_type TYPE varchar(50) USING ({MAP})")
    return 1


def by_key(conn: psycopg.Connection, batch: int) -> int:
    conn.execute("ALTER TABLE workflow_templates ADD COLUMN wt_new varchar(50)")
    last, n = "", 0
    while True:
        row = conn.execute(f"""WITH b AS (SELECT id FROM workflow_templates WHERE id > %s ORDER BY id LIMIT %s)
                               , u AS (UPDATE workflow_templates t SET wt_new = {MAP} FROM b WHERE t.id = b.id
                                       RETURNING t.id)
                               SELECT max(id) FROM u""", (last, batch)).fetchone()
        n += 1
        if row[0] is None:
            return n
        last = row[0]


def by_block(conn: psycopg.Connection, batch: int) -> int:
    conn.execute("ALTER TABLE workflow_templates ADD COLUMN wt_new varchar(50)")
    pages = conn.execute("SELECT relpages FROM pg_class WHERE oid = 'workflow_templates'::regclass").fetchone()[0]
    rows = conn.execute("SELECT reltuples FROM pg_class WHERE oid = 'workflow_templates'::regclass").fetchone()[0]
    step = max(1, int(pages * batch / max(rows, 1)))
    b, n = 0, 0
    while b <= pages:  # the table grows as new versions are written: stop at the original end
        conn.execute(f"UPDATE workflow_templates SET wt_new = {MAP} WHERE ctid >= %s::tid AND ctid < %s::tid "
                     f"AND wt_new IS NULL", (f"({b},0)", f"({b + step},0)"))
        b += step
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--batch-rows", type=int, default=5_000)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    srv = server.start_embedded()
    out: dict = {"rows": a.rows, "batch_rows": a.batch_rows}
    try:
        with psycopg.connect(srv.dsn, autocommit=True) as c:
            c.execute("ALTER SYSTEM SET full_page_writes = on")
            c.execute("SELECT pg_reload_conf()")
            out["data_checksums"] = c.execute("SHOW data_checksums").fetchone()[0]
        template = server.create_database(srv.dsn, "bo_template")
        with psycopg.connect(template) as conn:
            chatter.create_chatter_schema(conn)
            chatter.insert_chatter_rows(conn, a.rows, a.rows // 4)
        with psycopg.connect(template, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE workflow_templates")
            out["size_before"] = size(conn)
        for name, fn in (("naive rewrite", naive), ("batches by key", by_key), ("batches by block", by_block)):
            with psycopg.connect(srv.dsn, autocommit=True) as c:
                c.execute(f'CREATE DATABASE "bo_{fn.__name__}" TEMPLATE bo_template')  # noqa: S608 - fixed names
            dsn = make_conninfo(srv.dsn, dbname=f"bo_{fn.__name__}")
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("ALTER TABLE workflow_templates SET (autovacuum_enabled = false)")
                conn.execute("CHECKPOINT")
                w0, f0 = wal(conn)
                t0 = time.perf_counter()
                batches = fn(conn, a.batch_rows)
                seconds = time.perf_counter() - t0
                w1, f1 = wal(conn)
                conn.execute("VACUUM workflow_templates")
                w2, f2 = wal(conn)
                out[name] = {"batches": batches, "seconds": round(seconds, 1), "wal_mb": round((w1 - w0) / 2**20, 1),
                             "fpi": f1 - f0, "vacuum_wal_mb": round((w2 - w1) / 2**20, 1),
                             "settled_wal_mb": round((w2 - w0) / 2**20, 1), "size_mb": round(size(conn) / 2**20, 1)}
            print(name, json.dumps(out[name]), flush=True)
        base = out["naive rewrite"]["settled_wal_mb"]
        for name in ("batches by key", "batches by block"):
            out[name]["settled_ratio"] = round(out[name]["settled_wal_mb"] / base, 2)
        print(json.dumps(out, indent=2))
        if a.json:
            a.json.write_text(json.dumps(out, indent=2))
    finally:
        srv.stop()


if __name__ == "__main__":
    main()
