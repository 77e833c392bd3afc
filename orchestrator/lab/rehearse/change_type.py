"""The rollback rehearsal of a `kind: change_type` playbook, on the lab shop schema (orchestrator/lab/shop.py).

The same discipline as the enum's (scenario.py), for the app that signs accounts up through the sequence and
places orders for them: for every phase k, run 1..k and roll back k..1 under that traffic, each rollback
compared with the catalog before its phase and every row checked (the original rows unchanged, every order the
app committed present with its account); then forward through the contract; then (after_contract) the way
back: undo every contract step and roll back to the original catalog (column order aside), and forward through
the contract again, which must give the first contract's catalog. The app is the old version before the swap
and the new one after it (app_versions); in the last cycle the new version writes an id past what the old type
holds, the swap's rollback must refuse naming it and change nothing, and the DBA deletes it.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from functools import partial
from typing import Any, Callable, Sequence

import psycopg
from psycopg import sql

from orchestrator.engine import db
from orchestrator.engine.errors import BadInput, OrchestratorError, Refused
from orchestrator.engine.playbook import Playbook
from orchestrator.lab import shop
from orchestrator.lab.rehearse.model import AFTER_CONTRACT, Check, RehearsalResult, Step
from orchestrator.lab.snapshot import ignoring_column_order, schema_snapshot, snapshot_diff
from orchestrator.run.runner import Orchestrator

SHOP_TABLES = ("accounts", "orders", "invoices")


class ChangeTypeRehearsal:
    def __init__(self, pb: Playbook, dsn: str, *, rows: int, writers: int, cycles: Sequence[int] | None,
                 after_contract: bool, dwell_s: float, console=None, playbook_source: str = "",
                 server_label: str = ""):
        unknown = [m.label for m in pb.migrations if m.table.name not in SHOP_TABLES or m.table.schema_ != "public"]
        if unknown:
            raise BadInput(f"cannot rehearse {pb.name}: the simulated app of a change_type playbook writes the lab "
                           f"shop schema (accounts, orders, invoices), not {', '.join(unknown)}")
        self.pb, self.dsn, self.console = pb, dsn, console
        self.rows, self.writers, self.dwell_s = rows, writers, dwell_s
        self.n = 5
        self.cycles = list(cycles) if cycles else list(range(1, self.n + 1))
        self.after_contract = after_contract
        self.big_id = any((m.table.name, m.column.name) == ("accounts", "id") for m in pb.migrations)
        self.result = RehearsalResult(
            playbook=pb.name, playbook_source=playbook_source or pb.name, policy=pb.rollback.unmapped,
            database=dsn.split("@")[-1], server=server_label, rows=rows, writers=writers, readers=0,
            started_at=datetime.now(timezone.utc), tables=[m.label for m in pb.migrations],
            schema_source="the lab shop schema (orchestrator/lab/shop.py)")
        self.traffic: shop.ShopTraffic | None = None
        self.original_rows: dict[str, list] = {}
        self.original_columns: dict[str, list[str]] = {}
        self.original_max: dict[str, int] = {}

    # -- helpers ------------------------------------------------------------------------------------
    def say(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text, highlight=False)

    def snapshot(self) -> dict:
        with psycopg.connect(self.dsn) as conn:
            return schema_snapshot(conn)

    def version(self, which: str) -> None:
        if self.traffic is not None and self.pb.app_versions is not None:
            self.traffic.search_path = f"{getattr(self.pb.app_versions, which)},public"

    def now(self) -> float:
        return time.monotonic() - (self.traffic.t0 if self.traffic else 0.0)

    def step(self, cycle: str, action: str, phase: int | None, name: str, fn: Callable[[], Any]) -> Step:
        st = Step(n=len(self.result.steps) + 1, cycle=cycle, action=action, phase=phase, name=name, t0=self.now())
        try:
            out = fn()
            st.outcome = out if isinstance(out, str) else "ok"
        except Refused as err:
            st.outcome, st.ok = f"refused: {err}", action.endswith("(refused)")
        except OrchestratorError as err:
            st.outcome, st.ok = f"failed: {err}", False
        st.t1 = self.now()
        self.result.steps.append(st)
        self.say(f"  {st.label:>5} {name}: {st.outcome[:140]}")
        time.sleep(self.dwell_s)
        return st

    def check(self, name: str, passed: bool, detail: str, st: Step) -> None:
        self.result.checks.append(Check(name, passed, detail, st.n))

    def check_schema(self, want: dict, st: Step, what: str, ignore_order: bool = False) -> None:
        got = self.snapshot()
        a, b = (ignoring_column_order(want), ignoring_column_order(got)) if ignore_order else (want, got)
        diff = snapshot_diff(a, b)
        st.schema = "identical" if not diff else "differs"
        self.check(f"schema {what}", not diff, "; ".join(diff[:5]), st)

    def check_rows(self, st: Step) -> None:
        """Original rows as they were; every order the app committed present with its account, as the new
        type reads it (the tables' own columns: whichever holds the name now)."""
        app = dict(self.traffic.orders) if self.traffic else {}  # first: an order committed later is not in it
        with psycopg.connect(self.dsn) as conn:
            now = {t: conn.execute(sql.SQL("SELECT {} FROM {} WHERE id <= %s ORDER BY id").format(
                sql.SQL(", ").join(map(sql.Identifier, self.original_columns[t])), sql.Identifier(t)),
                (self.original_max[t],)).fetchall() for t in SHOP_TABLES}
            orders: dict[int, int] = dict(conn.execute("SELECT id, account_id FROM orders WHERE id > %s",
                                       (self.original_max["orders"],)).fetchall())
        changed = [t for t in SHOP_TABLES if _canonical(now[t]) != _canonical(self.original_rows[t])]
        missing = {o: a for o, a in app.items() if orders.get(o) != a}
        st.rows_checked = sum(len(v) for v in now.values()) + len(app)
        self.check("rows", not changed and not missing,
                   f"changed original rows in {changed}; app orders missing or moved: {list(missing.items())[:5]}"
                   if changed or missing else f"{st.rows_checked} rows", st)

    # -- the run ------------------------------------------------------------------------------------
    def run(self) -> RehearsalResult:
        with psycopg.connect(self.dsn) as conn:
            exists = db.scalar(conn, "SELECT to_regclass('accounts') IS NOT NULL")
        if not exists:
            with psycopg.connect(self.dsn) as conn:
                shop.create_shop(conn, accounts=max(self.rows, 10), orders_per_account=1)
        with psycopg.connect(self.dsn) as conn:
            self.original_max = {t: db.scalar(conn, sql.SQL("SELECT coalesce(max(id), 0) FROM {}").format(
                sql.Identifier(t))) for t in SHOP_TABLES}
            self.original_columns = {t: [r[0] for r in conn.execute(
                "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped "
                "ORDER BY attnum", (t,))] for t in SHOP_TABLES}
            self.original_rows = {t: conn.execute(sql.SQL("SELECT {} FROM {} ORDER BY id").format(
                sql.SQL(", ").join(map(sql.Identifier, self.original_columns[t])), sql.Identifier(t))).fetchall()
                for t in SHOP_TABLES}
        self.result.rows_by_table = {m.label: len(self.original_rows[m.table.name]) for m in self.pb.migrations}
        original = self.snapshot()
        versions = self.pb.app_versions
        views = versions is not None
        if versions is None:
            self.result.notes.append("no app_versions: the app runs without server-side prepared statements (a "
                                     "column's type change invalidates a prepared statement's result type)")
        self.traffic = shop.ShopTraffic(self.dsn, writers=self.writers, prepare=views,
                                        search_path=f"{versions.old},public" if versions else None)
        self.traffic.start()
        orch = Orchestrator(self.pb, self.dsn)
        try:
            time.sleep(self.dwell_s)
            for k in self.cycles:
                self.cycle(orch, k, original)
            contracted = self.forward_and_contract(orch, "final: forward + contract")
            if self.after_contract:
                self.way_back(orch, original, contracted)
        except OrchestratorError as err:
            self.result.stopped = str(err)
        finally:
            orch.close()
            self.traffic.stop()
            self.result.samples = list(self.traffic.samples)
            self.result.finished_at = datetime.now(timezone.utc)
        return self.result

    def cycle(self, orch: Orchestrator, k: int, original: dict) -> None:
        cycle = f"cycle {k}"
        self.say(f"{cycle}: run 1..{k}, roll back {k}..1")
        before: dict[int, dict] = {}
        for n in range(1, k + 1):
            before[n] = self.snapshot() if n > 1 else original
            self.step(cycle, "run", n, orch.phase(n).name, partial(orch.run, n))
            if n == self.n:
                self.version("new")
        if k == self.n and self.big_id and k == self.cycles[-1]:
            self.refused_swap_rollback(orch, cycle)
        for n in range(k, 0, -1):
            if n == self.n:
                self.version("old")  # back to the old release before the swap is rolled back
            st = self.step(cycle, "rollback", n, orch.phase(n).name, partial(orch.rollback, n))
            self.check_schema(before[n], st, f"after rollback {n} = before phase {n}")
            self.check_rows(st)

    def refused_swap_rollback(self, orch: Orchestrator, cycle: str) -> None:
        """The new version writes an id the old type cannot hold: rolling back the swap must refuse, name it,
        and change nothing; the DBA deletes it, as they would after reading the refusal."""
        big = shop.INT_MAX + 1
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("INSERT INTO accounts (id, email) VALUES (%s, 'past-int@example.com')", (big,))
        before = self.snapshot()
        st = self.step(cycle, "rollback (refused)", self.n, orch.phase(self.n).name, lambda: orch.rollback(self.n))
        self.check("rollback of the swap refuses an id past the old type, naming it",
                   st.outcome.startswith("refused") and str(big) in st.outcome, st.outcome[:200], st)
        self.check_schema(before, st, "unchanged by the refused rollback")
        fix = self.step(cycle, "dba fix", None, "delete the account the old type cannot hold", lambda: _exec(
            self.dsn, "DELETE FROM accounts WHERE id = %s", (big,)))
        fix.note = f"DELETE FROM accounts WHERE id = {big}, as the refusal names it"
        self.result.notes.append(f"{cycle}: the swap's rollback refused the account {big} (past what the old type "
                                 f"holds), changing nothing; the DBA deleted it and the rollback ran")

    def forward_and_contract(self, orch: Orchestrator, cycle: str) -> dict:
        self.say(f"{cycle}")
        for n in range(1, self.n + 1):
            self.step(cycle, "run", n, orch.phase(n).name, partial(orch.run, n))
            if n == self.n:
                self.version("new")
        st = self.step(cycle, "contract", self.n, "contract 1..5",
                       lambda: " ".join(orch.contract(old_version_gone=True)))
        self.check_rows(st)
        return self.snapshot()

    def way_back(self, orch: Orchestrator, original: dict, contracted: dict) -> None:
        self.say(AFTER_CONTRACT)
        for n in range(self.n, 0, -1):
            self.step(AFTER_CONTRACT, "undo contract", n, orch.phase(n).name, partial(orch.rollback, n))
        for n in range(self.n, 0, -1):
            if n == self.n:
                self.version("old")
            st = self.step(AFTER_CONTRACT, "rollback", n, orch.phase(n).name, partial(orch.rollback, n))
            self.check_rows(st)
        self.check_schema(original, self.result.steps[-1], "after the way back = the original (column order aside)",
                          ignore_order=True)
        again = self.forward_and_contract(orch, AFTER_CONTRACT + ": forward + contract again")
        diff = snapshot_diff(ignoring_column_order(contracted), ignoring_column_order(again))
        self.check("schema contracted again = the first contract's", not diff, "; ".join(diff[:5]),
                   self.result.steps[-1])


def _canonical(rows: list) -> list:
    """Rows comparable across the type change: an instant as UTC wall-clock time, a number as itself."""
    return sorted(tuple(str(_utc(v)) for v in r) for r in rows)


def _utc(v):
    if isinstance(v, datetime) and v.tzinfo is not None:
        return v.astimezone(timezone.utc).replace(tzinfo=None)
    return v


def _exec(dsn: str, stmt: str, params: tuple) -> str:
    with psycopg.connect(dsn, autocommit=True) as conn:
        n = conn.execute(stmt, params).rowcount
    return f"{n} row(s)"
