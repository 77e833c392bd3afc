"""`orchestrator`: the DBA's command line. Thin: parsing and printing; the runner does the work.

Exit codes: 0 done, 1 failure (re-run resumes), 2 bad input (nothing changed), 3 refused (nothing changed),
130 interrupted; listed by `orchestrator --help` (output.EXIT_CODES).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

import psycopg
import typer
from rich.console import Console

from orchestrator import (
    revisions as revisions_mod,  # registers the Alembic listener: alembic_version follows each command
)
from orchestrator.console import local, logs, output
from orchestrator.console.local import DEMO_DB
from orchestrator.engine import db
from orchestrator.engine import playbook as playbook_mod
from orchestrator.engine.db import redact, safe_dsn, secrets_of
from orchestrator.engine.errors import BadInput, OrchestratorError
from orchestrator.run import control
from orchestrator.run.runner import Orchestrator

DEFAULT_PLAYBOOK = "playbooks/workflow_type_enum_to_varchar.yaml"

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Zero-downtime expand/contract migrations for PostgreSQL, one phase at a time.\n\n"
                       "Example: orchestrator --playbook playbooks/workflow_type_enum_to_varchar.yaml run 1\n\n"
                       "Without --dsn / DATABASE_URL it uses the local embedded PostgreSQL that `orchestrator demo` "
                       "starts (data in .orchestrator/pgdata; `orchestrator server-stop` stops it).",
                  epilog=output.EXIT_CODES)
out = output.make_console()


class Opts:
    def __init__(self, playbook: str, dsn: str | None, json_logs: bool | None, env: str | None = None):
        self.playbook_path, self.dsn_arg, self.json_logs, self.env = playbook, dsn, json_logs, env

    def playbook(self) -> playbook_mod.Playbook:
        return playbook_mod.load(self.playbook_path, self.env)

    def dsn(self) -> str:
        if self.dsn_arg:
            return self.dsn_arg
        return local.demo_dsn()  # no DSN: the local embedded server that `orchestrator demo` set up

    def orchestrator(self, *, dry_run: bool = False) -> Orchestrator:
        pb = self.playbook()
        return Orchestrator(pb, self.dsn(), dry_run=dry_run)


@app.callback()
def _main(ctx: typer.Context,
          playbook: str = typer.Option(os.environ.get("PLAYBOOK", DEFAULT_PLAYBOOK), "--playbook", "-p",
                                       help="playbook YAML file"),
          dsn: Optional[str] = typer.Option(None, "--dsn", envvar="DATABASE_URL",
                                            help="PostgreSQL URL; default: $DATABASE_URL, else the local demo server"),
          json_logs: Optional[bool] = typer.Option(None, "--json-logs/--human-logs",
                                                   help="log format (default: human on a terminal, JSON otherwise)"),
          env: Optional[str] = typer.Option(None, "--env", envvar="ORCHESTRATOR_ENV",
                                            help="apply the playbook's settings/hooks for this environment "
                                                 "(e.g. dev, staging, production)")):
    logs.configure(json=json_logs, dsn=dsn)
    ctx.obj = Opts(playbook, dsn, json_logs, env)


@app.command(epilog=output.EXIT_CODES)
def plan(ctx: typer.Context,
         lint_sql: bool = typer.Option(True, "--lint/--no-lint", help="lint the SQL with Squawk")):
    """Print every phase's expand, contract and rollback SQL, the locks it takes and Squawk's findings.

    Changes nothing. Exit 1 when Squawk finds a statement the design does not accept.
    Example: orchestrator plan    /    orchestrator --env production plan --no-lint
    """
    from orchestrator.console import lint
    unsafe_count = 0
    orch = ctx.obj.orchestrator(dry_run=True)
    s = orch.pb.settings
    out.print(f"[bold]{orch.pb.name}[/]: {orch.pb.description}")
    from orchestrator.engine.executor import max_lock_wait_s
    out.print(f"every DDL: lock_timeout={s.lock_timeout_ms}ms, up to {s.retries + 1} attempts with backoff "
              f"(longest possible wait of one app query behind us: {s.lock_timeout_ms}ms); a step whose lock is "
              f"never granted is refused (exit 3) after at most {max_lock_wait_s(s)}s\n")
    _print_app_versions(orch.pb)
    for pp in orch.plan():
        p = pp.phase
        title, expand_doc = p.described(s)
        out.print(f"[bold cyan]Phase {p.number}: {p.name}[/] - {title}")
        out.print(f"  locks: {p.locks_doc}")
        for action, recs, doc in (("expand", pp.expand, expand_doc), ("contract", pp.contract, p.contract_doc),
                                  ("rollback", pp.rollback, p.rollback_doc),
                                  ("rollback after contract", pp.uncontract, p.uncontract_doc)):
            out.print(f"  [bold]{action}[/]: {doc}")
            for r in recs:
                tx = f" [tx {r.transaction}]" if r.transaction else ""
                lock = f"   -- lock: {r.lock}{tx}" if r.lock else ""
                out.print(f"    {output.readable_sql(r.sql)};{lock}", markup=False, highlight=False, soft_wrap=True)
            if lint_sql and lint.available():
                for f in lint.lint(p.number, action, recs, s):
                    unsafe = f.unsafe
                    unsafe_count += unsafe
                    verdict = "[bold red]UNSAFE[/]" if unsafe else f"accepted: {f.accepted}"
                    out.print(f"    [yellow]squawk {f.rule}[/]: {f.message} - {verdict}")
        out.print()
    orch.close()
    if lint_sql and not lint.available():
        out.print("squawk not found: SQL not linted (pip install squawk-cli)")
    if unsafe_count:
        out.print(f"[bold red]{unsafe_count} unsafe statement(s) found by squawk[/]")
        raise typer.Exit(1)


def _print_app_versions(pb) -> None:
    from orchestrator.kinds.phases import versions
    hints = versions.connection_hints(pb)
    if hints is None:
        values = "enum labels and new values" if pb.kind == "enum_to_varchar" else "both types"
        out.print(f"app versions: none (no app_versions in the playbook). The app must be released in two steps: "
                  f"before phase 5 a release that reads both vocabularies ({values}) and writes "
                  f"old values; after phase 5 one that writes the new values. Old instances must be gone before "
                  f"the swap.\n", markup=False, highlight=False, soft_wrap=True)
        return
    out.print("app versions (the old version's views from phase 1 until contract 2, the new version's from phase 4 "
              "until contract 5; after that each version falls through to the tables):", markup=False)
    for v, h in hints.items():
        out.print(f"  {v}: schema {h['schema']}; connect with {h['dsn_option']} (or ALTER ROLE <app role> SET "
                  f"search_path = {h['search_path']})", markup=False, highlight=False, soft_wrap=True)
    out.print()


@app.command(epilog=output.EXIT_CODES)
def run(ctx: typer.Context, phase: int = typer.Argument(..., help="phase number"),
        dry_run: bool = typer.Option(False, "--dry-run", help="check the order and print the SQL; change nothing")):
    """Run phase N's expand step (N-1 must be applied). Re-running after a crash resumes it.

    Example: orchestrator run 3
    """
    orch = ctx.obj.orchestrator(dry_run=dry_run)
    try:
        result = orch.run(phase)
        _print_recorded(orch)
        out.print(f"phase {phase}: {result}")
    finally:
        orch.close()


@app.command(epilog=output.EXIT_CODES)
def rollback(ctx: typer.Context, phase: int = typer.Argument(..., help="phase number"),
             dry_run: bool = typer.Option(False, "--dry-run", help="print the SQL; change nothing"),
             yes: bool = typer.Option(False, "--yes", "-y", help="confirm a rollback the app can notice (the swap)")):
    """Undo phase N (every later phase must be rolled back first). Refuses rather than lose data.

    After the contract, rollback N undoes phase N's contract step, from the last phase down (for the swap: a
    reverse migration, online, that brings the enum column back); then the phases themselves, 6 down to 1.

    Rolling back the swap changes what the app sees: roll the app back first, then confirm (prompt on a
    terminal, --yes otherwise). Example: orchestrator rollback 5 --yes
    """
    orch = ctx.obj.orchestrator(dry_run=dry_run)
    if not dry_run and orch.phase(phase).visible_to_app and not orch.undoes_contract(phase) \
            and not _nothing_to_do(ctx, "rollback", phase):
        output.confirm(yes, f"rollback {phase} ({orch.phase(phase).name}) gives the app back the old column; "
                       "has the app been rolled back first?")
    try:
        result = orch.rollback(phase)
        _print_recorded(orch)
        out.print(f"phase {phase}: {result}")
    finally:
        orch.close()


@app.command(epilog=output.EXIT_CODES)
def contract(ctx: typer.Context, phase: Optional[int] = typer.Argument(None, help="phase number; default all"),
             dry_run: bool = typer.Option(False, "--dry-run", help="print the SQL; change nothing"),
             yes: bool = typer.Option(False, "--yes", "-y",
                                      help="confirm the contract (going back after it is a reverse migration)"),
             old_version_gone: bool = typer.Option(False, "--old-version-gone",
                                                   help="contract although the old app version wrote recently")):
    """Remove what the phases left behind, in order, once every phase is applied. Ends the rollback window.

    Asks for confirmation on a terminal (--yes otherwise). Example: orchestrator contract --yes
    """
    orch = ctx.obj.orchestrator(dry_run=dry_run)
    if not dry_run and not _nothing_to_do(ctx, "contract", phase):
        old = "the enum type" if orch.pb.kind == "enum_to_varchar" else "the conversion functions"
        output.confirm(yes, f"the contract drops the trigger, the retired column and {old}; going back "
                       "afterwards is a reverse migration (orchestrator rollback N, from the last phase). Continue?")
    try:
        results = orch.contract(phase, old_version_gone=old_version_gone)
        _print_recorded(orch)
        for n, r in zip([phase] if phase else range(1, len(results) + 1), results):
            out.print(f"contract {n}: {r}")
    finally:
        orch.close()


@app.command(epilog=output.EXIT_CODES)
def verify(ctx: typer.Context):
    """Check parity of the two columns now (exit 1 on any mismatch). Read-only.

    Example: orchestrator verify
    """
    orch = ctx.obj.orchestrator()
    try:
        result = orch.verify()
    finally:
        orch.close()
    out.print(json.dumps({table: r.to_json() for table, r in result.items()}))
    raise typer.Exit(1 if any(r.mismatches for r in result.values()) else 0)


@app.command(epilog=output.EXIT_CODES)
def status(ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
           watch: Optional[float] = typer.Option(None, "--watch", help="refresh every SECONDS until Ctrl-C")):
    """Show each phase's state, who ran it where, the backfill progress with rate and ETA, the last error.

    A phase in progress shows running, paused (held by `orchestrator pause`) or interrupted (its process is
    gone: run the same command again). Works while another process runs a phase.
    Example: orchestrator status --watch 2   /   status --json
    """
    orch = ctx.obj.orchestrator()
    try:
        if watch:
            from rich.live import Live
            with Live(_status_view(_with_pause(_status_with_alembic(orch), orch.pb)), console=out,
                      refresh_per_second=4) as live:
                while True:
                    time.sleep(watch)
                    live.update(_status_view(_with_pause(_status_with_alembic(orch), orch.pb)))
        st = _with_pause(_status_with_alembic(orch), orch.pb)
    except KeyboardInterrupt:
        return
    finally:
        orch.close()
    if as_json:
        print(json.dumps(st, default=str, indent=2))
        return
    out.print(_status_view(st))


def _status_with_alembic(orch: Orchestrator) -> dict:
    from orchestrator.engine import health
    st = orch.status()
    st["alembic"] = revisions_mod.alembic_status(orch.x.conn, orch.pb, orch.state.phases())
    st["throttles"] = health.for_status(orch, st["running_now"])  # health throttles holding the backfill now
    return st


def _with_pause(st: dict, pb) -> dict:
    """A phase held by `orchestrator pause` shows `paused`, not `running` (the pause file is per playbook)."""
    st["paused"] = control.pause_path(pb).exists()
    if st["paused"]:
        for p in st["phases"]:
            if p["status"] == "running" or (p["status"] == "applied" and p["step"] == "contract" and st["running_now"]):
                p["status"] = "paused"
    return st


def _status_view(st: dict):
    from rich.console import Group
    title = output.for_frontend(f"{st['playbook']}" + (" (running now)" if st["running_now"] else "") +
                                (" (paused: orchestrator resume continues)" if st.get("paused") else ""))
    rows = []
    for p in st["phases"]:
        error = p["error"] or ""
        # A phase rolled back is pending again: the step and times of the run it undid no longer describe it.
        done = p["status"] != "pending"
        rows.append([str(p["phase"]), p["name"], p["status"], (p["step"] or "") if done else "",
                     _t(p["started_at"]) if done else "", _t(p["finished_at"]) if done else "",
                     f"{p['run_by'] or ''}@{p['host'] or ''}" if p["run_by"] else "",
                     p.get("env") or "", error[:80] + "..." if output.is_terminal() and len(error) > 80 else error])
    parts = [output.table(title, ["phase", "name", "status", "step", "started", "finished", "by", "env", "error"],
                          rows)]
    v = st.get("app_versions")
    if v:
        parts.append(_app_versions_line(v, contracted=any(p["status"] == "contracted" for p in st["phases"])))
    a = st.get("alembic") or {}
    if a.get("table") is False:
        if a.get("expected"):
            parts.append("alembic: no Alembic version table in this database")
    elif a.get("revision") or a.get("expected"):
        line = f"alembic: {a['revision'] or 'base'}" + (f" - {a['message']}" if a["message"] else "")
        if a["in_sync"] is False:
            line += f" (state says {a['expected'] or 'base'}; orchestrator revisions sync)"
        parts.append(line)
    w = st.get("way_back")
    if w:
        parts.append(f"way back after the contract: contract steps {', '.join(map(str, w['undone']))} undone, "
                     f"{', '.join(map(str, w['contracted']))} still contracted; next: {w['next']}")
        parts += [f"  {note}" for note in w["notes"]]
    for b in st["backfill"]:
        if "rows_done" not in b:
            continue
        total = b["rows_estimate"] or 0
        what = "reverse backfill" if b.get("direction") == "reverse" else "backfill"
        done = "copied" if b.get("method") == "copy" else "updated"
        parts.append(f"{what} {b['table']}: {b['rows_done']:,} rows {done} in {b['batches']} batches"
                  + (f" (table ~{total:,} rows)" if total else "")
                  + f", batch size {b['batch_size']}, longest batch {b['max_batch_ms'] or 0:.0f} ms"
                  + (", finished" if b["finished_at"] else "")
                  + (f", {b['rows_per_s']:,} rows/s" if b["rows_per_s"] else "")
                  + (f", ETA {b['eta_s']:.0f}s" if b["eta_s"] is not None else ""))
    for h in st.get("throttles") or []:
        parts.append(f"backfill {h['table']} held since {_t(h['since'])}: {h['reason']}")
    # Hints name the commands of the entry point in use (make phase-N under make).
    return Group(*(output.for_frontend(p) if isinstance(p, str) else p for p in parts))


def _app_versions_line(v: dict, contracted: bool) -> str:
    """Each version's connection option while its views exist (or before they are made); once the contract
    removed them, that version uses the tables and has nothing to set."""
    present = {"old": v.get("old_present", True), "new": v.get("views_present", True)}
    shown = [f"{k} {v[k]['dsn_option']}" + ("" if present[k] else " (its views are not made yet)")
             for k in ("old", "new") if present[k] or not contracted]
    if not shown:
        return "app versions: the contract removed their views; every app instance uses the tables (no search_path)"
    line = f"app versions: {', '.join(shown)}"
    if present["old"] or not contracted:
        line += f"; last write of the old version: {v['old_last_write'] or 'none seen'}"
    return line


@app.command("log", epilog=output.EXIT_CODES)
def run_log(ctx: typer.Context, phase: Optional[int] = typer.Option(None, "--phase", help="only this phase"),
            limit: int = typer.Option(200, help="the last N statements (0: all); says so when it leaves some out"),
            as_json: bool = typer.Option(False, "--json", help="machine-readable output")):
    """Print the run log: every statement the orchestrator ran, when, how long, lock wait and outcome.

    On a terminal long statements are shortened; piped to a file every statement is printed whole.
    Example: orchestrator log --phase 5  /  orchestrator log --limit 0 > migration-log.txt
    """
    if limit < 0:
        raise BadInput("--limit must be >= 0 (0: every statement)")
    orch = ctx.obj.orchestrator()
    try:
        if phase is not None:
            orch.phase(phase)  # a phase that does not exist is bad input (exit 2), not an empty log
        # One more than asked: tells whether older statements were left out.
        rows = orch.state.run_log(phase, limit + 1 if limit else 2 ** 62)
    finally:
        orch.close()
    truncated = bool(limit) and len(rows) > limit
    if truncated:
        rows = rows[1:]
        print(f"note: showing the last {limit} statements; older ones exist (--limit N for more, --limit 0 for "
              "all)", file=sys.stderr)
    if as_json:
        print(json.dumps(rows, default=str, indent=2))
        return
    terminal = output.is_terminal()
    table_rows = []
    for r in rows:
        text = " ".join(r["statement"].split())
        table_rows.append([r["at"].strftime("%H:%M:%S.%f")[:-3], str(r["phase"] or ""), r["action"] or "",
                           f"{(r['seconds'] or 0) * 1000:.1f}",
                           f"{r['lock_wait_ms']:.0f}" if r["lock_wait_ms"] else "", r["outcome"] or "",
                           text[:120] + "..." if terminal and len(text) > 120 else text])
    title = f"run log of {orch.pb.name}" + (f", phase {phase}" if phase else "") + \
        (f" (last {limit} statements)" if truncated else "")
    output.print_table(out, title, ["at", "phase", "action", "ms", "lock wait ms", "outcome", "statement"],
                       table_rows)


@app.command(epilog=output.EXIT_CODES)
def pause(ctx: typer.Context):
    """Hold the backfill between batches until `resume` (works from another terminal)."""
    path = control.pause(ctx.obj.playbook())
    out.print(f"paused: {path} exists; `orchestrator resume` continues")


@app.command(epilog=output.EXIT_CODES)
def resume(ctx: typer.Context):
    """Let a paused backfill continue."""
    existed = control.resume(ctx.obj.playbook())
    out.print("resumed" if existed else "was not paused")


@app.command(epilog=output.EXIT_CODES)
def demo(ctx: typer.Context, rows: int = typer.Option(100_000, help="sample rows to generate"),
         setup_only: bool = typer.Option(False, "--setup-only", help="create the seed schema and stop")):
    """Create the seed's schema with sample rows, run every phase and the contract, show the final schema.

    With no --dsn it starts (or reuses) a local embedded PostgreSQL in .orchestrator/.
    Example: orchestrator demo --rows 200000
    """
    local.require_lab("orchestrator demo")
    from orchestrator.lab import demo as demo_mod
    from orchestrator.lab import server
    pb = ctx.obj.playbook()
    started = None
    if ctx.obj.dsn_arg:
        dsn = ctx.obj.dsn_arg
        demo_mod.refuse_existing(dsn, pb)  # the demo creates its table: never on top of an existing one
    else:
        out.print("starting the local PostgreSQL in .orchestrator/ (the first time: initdb, a few seconds)",
                  highlight=False)
        started = server.local_server()
        server.drop_database(started.dsn, DEMO_DB)
        dsn = server.create_database(started.dsn, DEMO_DB)
        out.print(f"local PostgreSQL {started.major} ({started.kind}): {safe_dsn(dsn)}, data in "
                  ".orchestrator/pgdata", highlight=False)
    demo_mod.run_demo(dsn, pb, rows=rows, setup_only=setup_only, console=out)
    if started is not None:
        out.print(output.for_frontend(
            "the local PostgreSQL keeps running for the next commands (orchestrator status, orchestrator log, "
            "orchestrator run 1 after --setup-only); orchestrator server-stop stops it"
            if setup_only else "the local PostgreSQL keeps running (orchestrator status and orchestrator log "
            "read it); orchestrator server-stop stops it"), markup=False, highlight=False)


@app.command(epilog=output.EXIT_CODES)
def rehearse(ctx: typer.Context,
             rows: int = typer.Option(200_000, help="rows to generate (only when the table does not exist yet)"),
             writers: int = typer.Option(4, help="simulated app writer threads"),
             readers: int = typer.Option(1, help="simulated app reader threads"),
             phases: Optional[list[int]] = typer.Option(None, "--phase",
                                                        help="rehearse only these phases' rollbacks (repeatable); "
                                                             "default: every phase"),
             report: Optional[Path] = typer.Option(None, "--report",
                                                   help="HTML report path (a .json copy goes next to it); "
                                                        "default: reports/rehearsal-<timestamp>.html"),
             dwell: float = typer.Option(0.2, help="seconds of app traffic between two steps"),
             after_contract: bool = typer.Option(True, "--after-contract/--no-after-contract",
                                                 help="after the contract, undo it and roll all the way back, "
                                                      "then forward again"),
             verbose: bool = typer.Option(False, "--verbose", help="also print the orchestrator's log lines"),
             playbook: Optional[str] = typer.Option(None, "--playbook", "-p",
                                                    help="playbook YAML (default: the global --playbook)"),
             dsn: Optional[str] = typer.Option(None, "--dsn", help="staging database URL (default: the global "
                                                                     "--dsn / $DATABASE_URL, else a scratch server)")):
    """Rehearse every rollback under simulated app traffic; print the report table and write it as HTML.

    For each phase k: run 1..k, roll back k..1 checking the schema and every row after each rollback;
    then run every phase and the contract. Then, under the same traffic, undo every contract step (rollback
    6..1: the swap's undo is the online reverse migration) and roll back 6..1 to the original schema (column
    order aside) and values, then run forward through the contract again (--no-after-contract skips this).
    Exit 0 only when every check passed (1 otherwise).
    With no --dsn / DATABASE_URL: a scratch PostgreSQL (embedded) seeded with --rows rows, removed afterwards.
    With --dsn: that staging database as it is (the migration ends contracted there).
    Example: orchestrator rehearse --playbook playbooks/workflow_type_enum_to_varchar.yaml --rows 200000 --writers 4
    """
    from datetime import datetime, timezone

    local.require_lab("orchestrator rehearse")
    from orchestrator.lab import rehearse as rehearse_mod
    from orchestrator.lab.rehearse import report as report_mod
    if rows < 0 or writers < 1 or readers < 0 or dwell < 0:
        raise BadInput("--rows, --readers and --dwell must be >= 0 and --writers >= 1")
    dsn = dsn or ctx.obj.dsn_arg
    logs.configure(json=ctx.obj.json_logs, dsn=dsn, level="info" if verbose else "warning")
    source = playbook or ctx.obj.playbook_path
    pb = playbook_mod.load(source, ctx.obj.env)
    path = report or Path("reports") / f"rehearsal-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}.html"
    result = rehearse_mod.rehearse(pb, dsn, rows=rows, writers=writers, readers=readers,
                                   cycles=phases or None, after_contract=after_contract, dwell_s=dwell, console=out,
                                   playbook_source=source)
    report_mod.write(result, path)
    wide = out if out.is_terminal else Console(width=max(out.width, 170))
    wide.print(report_mod.rich_table(result))
    for line in report_mod.summary_lines(result):
        wide.print(line, markup=False, highlight=False)
    out.print(f"report: {path}", highlight=False)
    out.print("[bold green]rehearsal PASSED[/]" if result.passed else "[bold red]rehearsal FAILED[/]")
    raise typer.Exit(0 if result.passed else 1)


@app.command("server-stop", epilog=output.EXIT_CODES)
def server_stop():
    """Stop the local embedded demo server (its data stays in .orchestrator/; the next command restarts it)."""
    local.require_lab("orchestrator server-stop")
    from orchestrator.lab import server
    if server.stop_local_server():
        out.print("stopped the local PostgreSQL (data kept in .orchestrator/pgdata)", highlight=False)
    else:
        out.print("the local PostgreSQL was not running", highlight=False)


def _nothing_to_do(ctx: typer.Context, action: str, phase: Optional[int]) -> bool:
    """The order checks of a step, run as a dry run before asking for confirmation: a step that would be
    refused for its order is refused first, with the hint that helps (not "confirm" and then "refused").
    True when there is nothing to do (no confirmation needed)."""
    from orchestrator.engine.state import CONTRACTED, OperatorLock
    dry = ctx.obj.orchestrator(dry_run=True)
    try:
        if OperatorLock(dry.dsn, dry.pb.tables).is_held_elsewhere(dry.x.conn):
            return False  # another operator is at work: its state is in flux; the real command refuses
        if action == "rollback":
            return dry.rollback(phase) in ("nothing to do", "contract already undone")
        rows = dry.state.phases()
        todo = [k for k in ([phase] if phase else range(1, len(dry.phases) + 1))
                if not rows or k not in rows or rows[k].status != CONTRACTED or rows[k].step == "uncontract"]
        if not todo:
            return True
        dry.contract(todo[0])  # the first one still to do: the later ones depend on it
        return False
    finally:
        dry.close()


def _t(v) -> str:
    return v.strftime("%H:%M:%S") if v else ""


def _print_recorded(orch: Orchestrator) -> None:
    for r in orch.x.recorded:
        out.print(f"{r.sql};" + (f"   -- lock: {r.lock}" if r.lock else ""), markup=False, highlight=False,
                  soft_wrap=True)  # SQL is for copying: never wrapped


def main() -> None:
    output.line_buffered_stdout()
    command = typer.main.get_command(app)
    try:
        rv = command.main(standalone_mode=False)
        sys.exit(rv if isinstance(rv, int) else 0)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.TyperException as e:  # usage errors: unknown option, missing argument, bad number
        print(f"error: {' '.join(e.format_message().split())} (see orchestrator --help)", file=sys.stderr)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        print(output.for_frontend("interrupted; re-run the same command to resume"), file=sys.stderr)
        sys.exit(130)
    except OrchestratorError as e:
        secrets = secrets_of(os.environ.get("DATABASE_URL")) + secrets_of(_dsn_from_argv())
        print(f"error: {output.for_frontend(redact(e.one_line(), secrets))}", file=sys.stderr)
        sys.exit(e.exit_code)
    except psycopg.Error as e:  # e.g. the connection lost outside a retried step: a failure, not a traceback
        secrets = secrets_of(os.environ.get("DATABASE_URL")) + secrets_of(_dsn_from_argv())
        reason = redact(" ".join(str(e).split()) or type(e).__name__, secrets)
        if db.is_transient(e):
            hint = "re-run the same command; completed work is kept"
        else:  # e.g. a missing privilege or object: running it again unchanged would fail the same way
            hint = "fix what the database reports, then re-run the same command; completed work is kept"
        print(f"error: database error ({type(e).__name__}): {reason} -> {output.for_frontend(hint)}",
              file=sys.stderr)
        sys.exit(1)


def _dsn_from_argv() -> str | None:
    argv = sys.argv
    for i, a in enumerate(argv):
        if a == "--dsn" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--dsn="):
            return a.split("=", 1)[1]
    return None


# -- `orchestrator revisions`: every phase as an Alembic revision (revisions/, alembic.ini) ---------------------
revisions_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                            help="Every phase of a playbook as an Alembic revision: generate the files, check "
                                 "them against the playbook, sync Alembic's version table with the state.")


def _revisions_dir(directory: Optional[str]) -> Path:
    """--dir, else script_location of $ALEMBIC_CONFIG / ./alembic.ini, else revisions/."""
    if directory:
        return Path(directory)
    cfg = revisions_mod.find_config()
    location = cfg.get_main_option("script_location") if cfg is not None else None
    return Path(location) if location else Path("revisions")


@revisions_app.command("generate")
def revisions_generate(
        ctx: typer.Context,
        playbook: Optional[str] = typer.Option(None, "--playbook", "-p",
                                               help="playbook YAML (default: the global one)"),
        directory: Optional[str] = typer.Option(None, "--dir",
                                                help="Alembic script directory (default: alembic.ini's)"),
        depends_on: Optional[list[str]] = typer.Option(None, "--depends-on",
                                                       help="application revision the branch needs (repeatable)"),
        branch_label: Optional[str] = typer.Option(None, "--branch-label", help="default: the playbook name")):
    """Write one revision per phase, then one per contract step, into DIR/versions. Re-running is a no-op.

    Example: orchestrator revisions generate --playbook playbooks/workflow_type_enum_to_varchar.yaml
    """
    res = revisions_mod.generate(playbook or ctx.obj.playbook_path, _revisions_dir(directory),
                                 branch_label=branch_label, depends_on=depends_on)
    for p in res.written:
        out.print(f"wrote {os.path.relpath(p)}", markup=False, highlight=False, soft_wrap=True)
    for p in res.removed:
        out.print(f"removed {os.path.relpath(p)}", markup=False, highlight=False, soft_wrap=True)
    out.print(f"{len(res.written)} written, {len(res.unchanged)} unchanged, {len(res.removed)} removed")


@revisions_app.command("check")
def revisions_check(
        playbook: Optional[list[str]] = typer.Option(None, "--playbook", "-p",
                                                     help="check only this playbook (default: every one with files)"),
        directory: Optional[str] = typer.Option(None, "--dir",
                                                help="Alembic script directory (default: alembic.ini's)")):
    """Exit 1 when the revision files and the playbooks disagree (edited playbook, missing or stale file).

    Example: orchestrator revisions check
    """
    problems = revisions_mod.check(_revisions_dir(directory), playbook or None)
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    if problems:
        raise typer.Exit(1)
    out.print("revision files match their playbooks")


@revisions_app.command("sync")
def revisions_sync(ctx: typer.Context,
                   config: Optional[str] = typer.Option(None, "--config", "-c",
                                                        help="alembic.ini (default: $ALEMBIC_CONFIG, ./alembic.ini)")):
    """Move Alembic's version table to the phase the orchestrator's state says is applied (a repair; the
    runner and env.py do it on their own).

    Example: orchestrator revisions sync
    """
    cfg = revisions_mod.find_config(config)
    if cfg is None:
        raise BadInput("no Alembic config found", hint="--config alembic.ini, or set ALEMBIC_CONFIG")
    result = revisions_mod.sync_alembic_version(ctx.obj.dsn(), ctx.obj.playbook(), config=cfg, create=True,
                                                  raise_errors=True)
    out.print(str(result) if result else "this playbook has no revisions in the Alembic script directory "
                                         "(orchestrator revisions generate)", markup=False, highlight=False)


app.add_typer(revisions_app, name="revisions")

# -- `orchestrator fleet`: one playbook rolled out to many databases, wave by wave (orchestrator/fleet.py) -------
from orchestrator.console.fleet_cli import fleet_app  # noqa: E402

app.add_typer(fleet_app, name="fleet")
