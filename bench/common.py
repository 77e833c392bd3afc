"""What every benchmark section shares: the paths, the time-window helpers over the app traffic's samples, the
machine description, and Bench: the server, the template databases and their clones, the app traffic, the
orchestrator's runs and the naive migration's statements.

Imported by bench/run.py (the entry point, which puts the repository on sys.path) and by every section in
bench/sections/; it imports none of them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import secrets
import subprocess
import time
import types
from pathlib import Path
from typing import Callable

import psycopg
import yaml
from psycopg import sql
from psycopg.types.json import Jsonb
from rich.console import Console

from bench.procstat import postmaster_pid, server_cpu_s
from orchestrator.engine import playbook
from orchestrator.engine import progress as _progress
from orchestrator.engine.backfill import update_statement
from orchestrator.engine.sqlkit import case_map, extra_type, typed_literal
from orchestrator.lab import chatter, server
from orchestrator.lab.traffic import AppTraffic, TrafficReport
from orchestrator.run.runner import Orchestrator

REPO = Path(__file__).resolve().parent.parent
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


def picked(name: str, wanted: str | None) -> bool:
    """Whether a run's name contains one of the comma-separated parts of a --*-variants option (all if none)."""
    parts = [w.strip() for w in (wanted or "").split(",") if w.strip()]
    return not parts or any(w in name for w in parts)


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
                (["shared_buffers", "fsync", "synchronous_commit", "full_page_writes",
                  "max_parallel_workers_per_gather", "work_mem", "maintenance_work_mem", "autovacuum"],)).fetchall())

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

    # -- the backfill as one UPDATE (the backfill and verify sections) -----------------------------
    def one_update(self, dsn: str, autovacuum: bool = True) -> dict:
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

