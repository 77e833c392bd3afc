"""`orchestrator fleet --inventory FILE COMMAND`: one playbook, many databases, wave by wave.

Exit codes as for one database: 0 done; otherwise the exit code of the first target that failed (1 failure,
2 bad input, 3 refused), or 1 when a gate between two waves failed. Re-running the same command resumes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from orchestrator.console import logs, output
from orchestrator.engine.errors import BadInput
from orchestrator.fleet import inventory as inventory_mod
from orchestrator.fleet.metrics import Exporter
from orchestrator.fleet.rollout import Fleet, FleetResult

out = Console()
err = Console(stderr=True)  # progress lines: stdout keeps only the result (a table, or JSON with --json)

fleet_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                        help="Roll one playbook out to many databases, wave by wave (canary first), stopping at "
                             "the first failure; re-running the same command resumes.\n\n"
                             "Example: orchestrator fleet --inventory fleet.yaml run 3")


class FleetOpts:
    """The fleet, built on first use (so that `fleet run --help` needs no inventory)."""

    def __init__(self, ctx: typer.Context, parent, inventory: str | None, metrics_port: int | None,
                 metrics_addr: str, metrics_textfile: Path | None):
        self.ctx, self.parent, self.inventory = ctx, parent, inventory
        self.metrics_port, self.metrics_addr, self.metrics_textfile = metrics_port, metrics_addr, metrics_textfile
        self._fleet: Fleet | None = None
        self.exporter: Exporter | None = None

    @property
    def fleet(self) -> Fleet:
        if self._fleet is None:
            self._fleet = self._build()
        return self._fleet

    def _build(self) -> Fleet:
        if not self.inventory:
            raise BadInput("fleet commands need an inventory", hint="orchestrator fleet --inventory FILE ...")
        parent = self.parent  # the global options (cli.Opts): --playbook, --env, --json-logs
        fleet = Fleet(inventory_mod.load(self.inventory), parent.playbook_path, default_env=parent.env,
                      echo=lambda line: err.print(line, markup=False, highlight=False, soft_wrap=True))
        # Log lines (from every target's thread) are scrubbed of every target's password.
        logs.configure(json=parent.json_logs, dsn=parent.dsn_arg, secrets=fleet.secrets)
        if self.metrics_port is None and self.metrics_textfile is None:
            return fleet
        exporter = self.exporter = Exporter(fleet.status)
        if self.metrics_port is not None:
            port = exporter.serve(self.metrics_port, self.metrics_addr)
            err.print(f"metrics: http://{self.metrics_addr}:{port}/metrics", markup=False, highlight=False)
        if self.metrics_textfile is not None:
            exporter.textfile = self.metrics_textfile
            last = [0.0]

            def changed() -> None:  # after each target; at most every 2 s (a full status read each time)
                if time.monotonic() - last[0] >= 2:
                    exporter.write()
                    last[0] = time.monotonic()
            fleet.on_change = changed

        def flush() -> None:  # the textfile's last state, and the HTTP endpoint stopped
            exporter.write()
            exporter.close()
        self.ctx.call_on_close(flush)
        return fleet


@fleet_app.callback()
def _fleet(ctx: typer.Context,
           inventory: Optional[str] = typer.Option(None, "--inventory", "-i", envvar="ORCHESTRATOR_INVENTORY",
                                                   help="inventory YAML: targets, waves, gates (required)"),
           metrics_port: Optional[int] = typer.Option(None, "--metrics-port", min=0, max=65535,
                                                      help="serve Prometheus metrics on this port while the "
                                                           "command runs"),
           metrics_addr: str = typer.Option("127.0.0.1", "--metrics-addr", help="address of the metrics endpoint"),
           metrics_textfile: Optional[Path] = typer.Option(None, "--metrics-textfile",
                                                           help="write the metrics to this .prom file "
                                                                "(node_exporter textfile collector) after each target "
                                                                "and at the end")):
    ctx.obj = FleetOpts(ctx, ctx.obj, inventory, metrics_port, metrics_addr, metrics_textfile)


def _finish(ctx: typer.Context, result: FleetResult, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result.to_json(), indent=2, default=str))
    else:
        table = Table(title=f"fleet {result.command}")
        for col in ("target", "wave", "exit", "result", "seconds"):
            table.add_column(col)
        for o in result.outcomes:
            table.add_row(o.target, o.wave, "" if o.exit_code is None else str(o.exit_code),
                          o.result if not o.exit_code else (o.error or ""), f"{o.seconds:.1f}")
        out.print(table)
        if result.exit_code:
            out.print(f"stopped in wave {result.stopped_at}: {result.reason}", markup=False, highlight=False)
    raise typer.Exit(result.exit_code)


@fleet_app.command("plan")
def fleet_plan(ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help="machine-readable output")):
    """Show the waves, their targets (no password), concurrency and gates. Touches no database.

    Example: orchestrator fleet --inventory fleet.yaml plan
    """
    p = ctx.obj.fleet.plan()
    if as_json:
        print(json.dumps(p, indent=2))
        return
    g = p["gates"]
    out.print(f"playbook {p['playbook']} ({p['playbook_file']}): phases "
              + ", ".join(f"{x['phase']} {x['name']}" for x in p["phases"]), markup=False, highlight=False)
    out.print("gates between waves: every target in the promised state"
              + (", parity verified after the backfill" if g["verify"] else "")
              + (f", hook {' '.join(g['hook'])}" if g["hook"] else "")
              + (f", soak {g['soak_s']:g}s" if g["soak_s"] else ""), markup=False, highlight=False)
    for w in p["waves"]:
        out.print(f"wave {w['wave']} {w['name']} ({w['rule']}, {w['concurrency']} at once"
                  + (f", soak {w['soak_s']:g}s" if w["soak_s"] else "") + "):", markup=False, highlight=False)
        for t in w["targets"]:
            labels = ",".join(f"{k}={v}" for k, v in t["labels"].items())
            out.print(f"  {t['name']}  env={t['env'] or '-'}  {labels}  {t['database']}", markup=False,
                      highlight=False, soft_wrap=True)


@fleet_app.command("status")
def fleet_status(ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
                 watch: Optional[float] = typer.Option(None, "--watch",
                                                       help="refresh every SECONDS until Ctrl-C (keeps the metrics "
                                                            "endpoint up)")):
    """Every target: phase, state, backfill progress, throttle, last error; and how many are at each phase.

    Unreachable targets are listed as such. Example: orchestrator fleet -i fleet.yaml status --json
    """
    fleet = ctx.obj.fleet
    try:
        while True:
            st = fleet.status()
            if as_json:
                print(json.dumps(st, indent=2, default=str), flush=True)
            else:
                out.print(_status_table(st))
                out.print(_summary_line(st), markup=False, highlight=False)
            if not watch:
                return
            time.sleep(watch)
    except KeyboardInterrupt:
        return


def _status_table(st: dict) -> Table:
    table = Table(title=f"{st['playbook']} on {st['summary']['targets']} target(s)")
    for col in ("target", "wave", "env", "phase", "state", "backfill", "throttle", "last error"):
        table.add_column(col)
    for t in st["targets"]:
        bf = t["backfill"]
        progress = ""
        if bf:
            progress = f"{bf['rows_scanned']:,}/{bf['rows_total']:,}" + (" done" if bf["finished"] else "") + (
                f" {bf['rows_per_s']:,} rows/s" if bf["rows_per_s"] and not bf["finished"] else "")
        phase = "-" if not t["reachable"] else f"{t['phase']} {t['phase_name'] or ''}".strip()
        table.add_row(t["name"], t["wave"], t["env"] or "", phase,
                      t["state"] + (f" ({t['step']})" if t["step"] else ""),
                      progress, "; ".join(h["reason"] for h in t["throttles"]), (t["error"] or "")[:100])
    return table


def _summary_line(st: dict) -> str:
    s = st["summary"]
    parts = [f"{n} at phase {k} ({s['phase_names'].get(k, '')})" if k != "unreachable" else f"{n} unreachable"
             for k, n in s["by_phase"].items()]
    return f"{s['targets']} target(s): " + ", ".join(parts)


@fleet_app.command("run")
def fleet_run(ctx: typer.Context, phase: int = typer.Argument(..., help="phase number"),
              through: bool = typer.Option(False, "--through", help="run every phase up to N on each target "
                                                                      "(applied ones are skipped)"),
              as_json: bool = typer.Option(False, "--json", help="print the outcome as JSON")):
    """Run phase N on every target, wave by wave; stop at the first failure. Re-run to resume.

    Example: orchestrator fleet -i fleet.yaml run 6 --through
    """
    _finish(ctx, ctx.obj.fleet.execute("run", phase, through=through), as_json)


@fleet_app.command("contract")
def fleet_contract(ctx: typer.Context, phase: Optional[int] = typer.Argument(None, help="phase; default all"),
                   yes: bool = typer.Option(False, "--yes", "-y",
                                            help="confirm the contract (going back after it is a reverse migration)"),
                   as_json: bool = typer.Option(False, "--json", help="print the outcome as JSON")):
    """Contract every target, wave by wave (ends the rollback window). Needs --yes off a terminal.

    Example: orchestrator fleet -i fleet.yaml contract --yes
    """
    output.confirm(yes, "the contract drops the trigger, the retired column and the enum type on every target; going "
                   "back afterwards is a reverse migration (fleet rollback N, from the last phase). Continue?")
    _finish(ctx, ctx.obj.fleet.execute("contract", phase), as_json)


@fleet_app.command("rollback")
def fleet_rollback(ctx: typer.Context, phase: int = typer.Argument(..., help="phase number"),
                   yes: bool = typer.Option(False, "--yes", "-y", help="confirm a rollback the app can notice"),
                   as_json: bool = typer.Option(False, "--json", help="print the outcome as JSON")):
    """Roll phase N back on every target, wave by wave. Example: orchestrator fleet -i fleet.yaml rollback 3"""
    fleet = ctx.obj.fleet
    # After the contract, rollback N is the undo of contract N on a target: the app keeps its column, no question.
    seen = fleet.app_sees_rollback(phase) if not yes else []
    if seen:
        where = "every target" if len(seen) == len(fleet.inv.targets) else "targets " + ", ".join(seen)
        output.confirm(yes, f"rollback {phase} ({fleet.phases[phase - 1].name}) gives the app back the old column on "
                       f"{where}; has the app been rolled back first?")
    _finish(ctx, fleet.execute("rollback", phase), as_json)


@fleet_app.command("verify")
def fleet_verify(ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help="print the outcome as JSON")):
    """Check parity on every target, wave by wave (exit 1 at the first mismatch). Read-only."""
    _finish(ctx, ctx.obj.fleet.execute("verify"), as_json)
