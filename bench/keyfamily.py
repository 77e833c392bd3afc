#!/usr/bin/env python
"""Benchmark: an integer key family becomes bigint (playbooks/account_id_to_bigint.yaml), against the naive
`ALTER TABLE ... TYPE bigint` of all three tables, measured in one run on identical clones.

    python bench/keyfamily.py [--accounts 1000000] [--orders-per-account 1] [--writers 2] [--major 18|15]

Schema and app: orchestrator/lab/shop.py (accounts.id serial near overflow; orders.account_id and
invoices.account_id with foreign keys to it). Two runs per side on fresh clones of one template:
  * under the app's sign-up traffic (old version through its views until the swap, new version after):
    longest app statement, errors, wall time;
  * quiet: WAL written (from before the migration to after a VACUUM of the three tables, each side's VACUUM
    counted) and table + index size after it.
And the backfill's rate against one UPDATE of the whole table (the same expression into a new column).
Not a test: it prints figures, always exits 0 once it has run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import psycopg
import yaml
from psycopg.conninfo import make_conninfo

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from orchestrator.console import logs  # noqa: E402
from orchestrator.engine import playbook  # noqa: E402
from orchestrator.lab import server, shop  # noqa: E402
from orchestrator.run.runner import Orchestrator  # noqa: E402

PLAYBOOK = REPO / "playbooks" / "account_id_to_bigint.yaml"
TABLES = ("accounts", "orders", "invoices")
NAIVE = ["ALTER TABLE accounts ALTER COLUMN id TYPE bigint",
         "ALTER TABLE orders ALTER COLUMN account_id TYPE bigint",
         "ALTER TABLE invoices ALTER COLUMN account_id TYPE bigint",
         "ALTER SEQUENCE accounts_id_seq AS bigint"]


def wal_lsn(conn: psycopg.Connection) -> str:
    return str(conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0])


def wal_since(conn: psycopg.Connection, lsn: str) -> int:
    return int(conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)", (lsn,)).fetchone()[0])


def size(conn: psycopg.Connection) -> int:
    return int(conn.execute("SELECT sum(pg_total_relation_size(t::regclass)) FROM unnest(%s::text[]) t",
                            (list(TABLES),)).fetchone()[0])


def vacuum(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for t in TABLES:
            conn.execute(f"VACUUM {t}")  # noqa: S608 - fixed table names of the lab schema


def naive(dsn: str) -> float:
    t0 = time.perf_counter()
    with psycopg.connect(dsn) as conn:
        with conn.transaction():
            for st in NAIVE:
                conn.execute(st)
    return time.perf_counter() - t0


def ours(dsn: str, pb: playbook.Playbook, traffic: bool) -> dict:
    orch = Orchestrator(pb, dsn)
    old = shop.ShopTraffic(dsn, search_path="shop_v1,public").start() if traffic else None
    new = None
    phases: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        for n in range(1, 6):
            ts = time.perf_counter()
            orch.run(n)
            phases[f"run {n}"] = round(time.perf_counter() - ts, 2)
            if n == 5 and traffic:
                new = shop.ShopTraffic(dsn, search_path="shop_v2,public").start()
        if old is not None:
            old.stop()
        ts = time.perf_counter()
        orch.contract(old_version_gone=True)
        phases["contract"] = round(time.perf_counter() - ts, 2)
    finally:
        if old is not None:
            old.stop()
        if new is not None:
            new.stop()
        orch.close()
    out: dict = {"seconds": round(time.perf_counter() - t0, 2), "phases": phases}
    if old is not None and new is not None:
        out.update(app_max_ms=round(max(old.max_ms, new.max_ms), 1), app_errors=len(old.errors) + len(new.errors),
                   first_error=(old.errors + new.errors or [None])[0],
                   signups=old.signups + new.signups, statements=len(old.latencies_ms) + len(new.latencies_ms))
    return out


def under_traffic(dsn: str, fn) -> dict:
    app = shop.ShopTraffic(dsn).start()
    time.sleep(2)
    seconds = fn()
    time.sleep(1)
    app.stop()
    return {"seconds": round(seconds, 2), "app_max_ms": round(app.max_ms, 1), "app_errors": len(app.errors),
            "first_error": app.errors[0] if app.errors else None, "signups": app.signups,
            "statements": len(app.latencies_ms)}


def one_update(dsn: str) -> dict:
    """The backfill's work as one statement: a new bigint column filled by one UPDATE (accounts only)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE accounts ADD COLUMN id_copy bigint")
        rows = conn.execute("SELECT count(*) FROM accounts").fetchone()[0]
        t0 = time.perf_counter()
        conn.execute("UPDATE accounts SET id_copy = id::bigint")
        seconds = time.perf_counter() - t0
    return {"rows": rows, "seconds": round(seconds, 2), "rows_per_s": round(rows / seconds)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--accounts", type=int, default=1_000_000)
    ap.add_argument("--orders-per-account", type=int, default=1)
    ap.add_argument("--major", type=int, default=18)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    logs.configure(json=False, level="warning")
    srv = server.start_embedded() if a.major == 18 else server.start_binaries(
        bin_dir=server.find_pg_bin_dirs()[a.major])
    data = yaml.safe_load(PLAYBOOK.read_text())
    data["settings"]["old_version_quiet_s"] = 0
    pb = playbook.parse(data)
    result: dict = {"accounts": a.accounts, "orders": a.accounts * a.orders_per_account, "invoices": a.accounts,
                    "major": a.major}
    try:
        template = server.create_database(srv.dsn, "kf_template")
        t0 = time.perf_counter()
        with psycopg.connect(template) as conn:
            shop.create_shop(conn, accounts=a.accounts, orders_per_account=a.orders_per_account)
        vacuum(template)
        print(f"template: {a.accounts} accounts in {time.perf_counter() - t0:.0f}s", flush=True)

        def clone(name: str) -> str:
            with psycopg.connect(srv.dsn, autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{name}" TEMPLATE kf_template')  # noqa: S608 - fixed names
            return make_conninfo(srv.dsn, dbname=name)

        with psycopg.connect(clone("kf_size")) as conn:
            result["size_before"] = size(conn)
        for side in ("naive", "ours"):
            dsn = clone(f"kf_{side}_load")
            result[f"{side}_load"] = under_traffic(dsn, lambda d=dsn: naive(d)) if side == "naive" else \
                ours(dsn, pb, traffic=True)
            print(side, "under load:", json.dumps(result[f"{side}_load"]), flush=True)
            dsn = clone(f"kf_{side}_quiet")
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("CHECKPOINT")
                lsn = wal_lsn(conn)
            quiet = {"seconds": round(naive(dsn), 2)} if side == "naive" else ours(dsn, pb, traffic=False)
            vacuum(dsn)
            with psycopg.connect(dsn, autocommit=True) as conn:
                quiet.update(wal_bytes=wal_since(conn, lsn), size_after=size(conn))
            result[f"{side}_quiet"] = quiet
            print(side, "quiet:", json.dumps(quiet), flush=True)
        result["one_update"] = one_update(clone("kf_update"))
        print("one UPDATE:", json.dumps(result["one_update"]), flush=True)
        n, o = result["naive_quiet"], result["ours_quiet"]
        result["wal_ratio"] = round(o["wal_bytes"] / n["wal_bytes"], 2)
        result["size_ratio"] = round(o["size_after"] / n["size_after"], 2)
        print(json.dumps(result, indent=2))
        if a.json:
            a.json.write_text(json.dumps(result, indent=2))
    finally:
        srv.stop()


if __name__ == "__main__":
    main()
