"""The rehearsal report: per-step app latency figures, a rich table, and a self-contained HTML file
with an inline SVG latency-over-time plot (no JavaScript, no external resources)."""

from __future__ import annotations

import bisect
import html
import json
import math
from dataclasses import dataclass
from pathlib import Path

from rich.table import Table

from orchestrator.lab.rehearse.model import AFTER_CONTRACT, RehearsalResult, Step
from orchestrator.lab.traffic import StatementSample

# --------------------------------------------------------------------------------------------------
# Figures per window


@dataclass
class WindowStats:
    statements: int
    errors: int
    p50: float
    p99: float
    max: float  # longest app statement overlapping the window: the longest lock wait the app saw
    lock_wait_ms: float  # longest Lock wait of an app backend seen in pg_stat_activity (sampled)
    lock_waiting_polls: int  # polls that saw at least one app backend waiting on a lock


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile, like TrafficReport.percentile."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


class Windows:
    """Statement samples indexed by start time, to cut out any window quickly."""

    def __init__(self, result: RehearsalResult):
        self.samples = sorted(result.samples, key=lambda s: s.t)
        self.starts = [s.t for s in self.samples]
        self.longest_s = max((s.latency_ms for s in self.samples), default=0.0) / 1000
        self.locks = sorted(result.lock_samples, key=lambda s: s.t)
        self.lock_ts = [s.t for s in self.locks]

    def overlapping(self, t0: float, t1: float) -> list[StatementSample]:
        """Statements that ran during [t0, t1] (started before its end, finished after its start)."""
        lo = bisect.bisect_left(self.starts, t0 - self.longest_s)
        hi = bisect.bisect_right(self.starts, t1)
        return [s for s in self.samples[lo:hi] if s.t + s.latency_ms / 1000 >= t0]

    def stats(self, t0: float, t1: float) -> WindowStats:
        got = self.overlapping(t0, t1)
        lat = sorted(s.latency_ms for s in got)
        locks = self.locks[bisect.bisect_left(self.lock_ts, t0):bisect.bisect_right(self.lock_ts, t1)]
        return WindowStats(len(got), sum(1 for s in got if s.error), percentile(lat, 50), percentile(lat, 99),
                           lat[-1] if lat else 0.0, max((s.max_wait_ms for s in locks), default=0.0), len(locks))


def step_stats(result: RehearsalResult) -> list[tuple[Step, WindowStats]]:
    w = Windows(result)
    return [(s, w.stats(s.t0, s.t1)) for s in result.steps]


def _ms(v: float) -> str:
    return f"{v:,.1f}"


def _rows(v: int | None) -> str:
    return "" if v is None else f"{v:,}"


def _rows_split(step: Step) -> str:
    """Rows checked per table (table name only), when more than one table was checked."""
    if len(step.rows_by_table) < 2:
        return ""
    return " + ".join(f"{label.rsplit('.', 1)[0]} {n:,}" for label, n in step.rows_by_table.items())


def tables_line(result: RehearsalResult) -> str:
    """Every migrated column with its original and built-in rows, e.g. for the report's header."""
    parts = []
    for label in result.tables:
        extra = []
        if label in result.rows_by_table:
            extra.append(f"{result.rows_by_table[label]:,} rows")
        if result.builtin_by_table.get(label):
            extra.append(f"{result.builtin_by_table[label]} built-in rows")
        parts.append(label + (f" ({', '.join(extra)})" if extra else ""))
    return "; ".join(parts)


# --------------------------------------------------------------------------------------------------
# Terminal


def rich_table(result: RehearsalResult) -> Table:
    """One row per step, a section (with the cycle's name) per cycle."""
    t = Table(title=f"Rollback rehearsal: {result.playbook}"
                    + (f" ({', '.join(result.tables)})" if result.tables else "") + " - "
                    + ("[bold green]PASSED[/]" if result.passed else "[bold red]FAILED[/]"),
              caption="max ms = longest app statement during the step (the longest lock wait the app saw); "
                      "lock ms = longest Lock wait sampled in pg_stat_activity")
    right = {"justify": "right"}
    for col, kw in (("#", right), ("step", {}), ("phase", {"no_wrap": True}), ("s", right), ("stmts", right),
                    ("p50 ms", right), ("p99 ms", right), ("max ms", right), ("lock ms", right), ("err", right),
                    ("rows checked", right), ("schema", {}), ("result", {})):
        t.add_column(col, **kw)
    cycle = None
    for step, st in step_stats(result):
        if step.cycle != cycle:
            if cycle is not None:
                t.add_section()
            cycle = step.cycle
            t.add_row("", f"[bold]{step.cycle}[/]", "", *[""] * 10)
        color = "green" if step.ok else "red"
        t.add_row(str(step.n), step.action.replace(" (refused)", ""), f"{step.phase or ''} {step.name}",
                  f"{step.seconds:.2f}", f"{st.statements:,}", _ms(st.p50), _ms(st.p99), _ms(st.max),
                  _ms(st.lock_wait_ms) if st.lock_waiting_polls else "-",
                  (f"[red]{st.errors}[/]" if st.errors else "0"), _rows(step.rows_checked), step.schema,
                  f"[{color}]{step.result}[/]")
    return t


def summary_lines(result: RehearsalResult) -> list[str]:
    lat = sorted(s.latency_ms for s in result.samples)
    failed = result.failed_checks
    lines = [
        f"{len(result.steps)} steps in {result.duration_s:.1f} s on {result.server}; {result.rows:,} original rows"
        + (f" ({tables_line(result)})" if result.tables else "") + "; "
        f"{result.writers} writers + {result.readers} readers issued {len(lat):,} statements "
        f"(p50 {_ms(percentile(lat, 50))} ms, p99 {_ms(percentile(lat, 99))} ms, max {_ms(lat[-1] if lat else 0)} ms), "
        f"{len(result.app_errors)} errors",
        f"checks: {len(result.checks) - len(failed)} passed, {len(failed)} failed",
    ]
    for version, d in (result.rolling_deploy or {}).items():
        lines.append(f"rolling deploy, {version} app ({', '.join(d['instances'])}): {d['ops']:,} operations, "
                     f"{d['errors']} errors, p50 {d['p50_ms']} ms, p99 {d['p99_ms']} ms, max {d['max_ms']} ms")
    lines += [f"  FAILED {c.name}: {c.detail}" for c in failed]
    if result.stopped:
        lines.append(f"stopped: {result.stopped}")
    return lines


# --------------------------------------------------------------------------------------------------
# HTML + SVG

_FILL = {"run": "#dbeafe", "rollback": "#fde7d3", "rollback (refused)": "#fecaca", "dba fix": "#ede9fe",
         "contract": "#d1fae5", "undo contract": "#fef3c7", "undo contract (refused)": "#fecaca"}


def _nice_step(span: float, target: int = 10) -> float:
    raw = span / max(target, 1)
    mag = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
    for m in (1, 2, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def svg_plot(result: RehearsalResult, width: int = 1200, height: int = 470) -> str:
    left, right, top, bottom = 64, 16, 78, 40
    pw, ph = width - left - right, height - top - bottom
    samples = sorted(result.samples, key=lambda s: s.t)
    t_end = max([s.t1 for s in result.steps] + [s.t + s.latency_ms / 1000 for s in samples[-50:]] + [1.0])
    peak = max([s.latency_ms for s in samples] + [l.max_wait_ms for l in result.lock_samples] + [1.0])
    ymin, ymax = 0.1, 10 ** max(2, math.ceil(math.log10(peak * 1.1)))
    lmin, lmax = math.log10(ymin), math.log10(ymax)

    def x(t: float) -> float:
        return left + pw * min(max(t / t_end, 0.0), 1.0)

    def y(ms: float) -> float:
        v = math.log10(min(max(ms, ymin), ymax))
        return top + ph * (1 - (v - lmin) / (lmax - lmin))

    e = html.escape
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
           f'height="{height}" style="max-width: 100%; height: auto" font-family="system-ui, sans-serif" '
           f'font-size="11" role="img" aria-label="app statement latency over time">',
           f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>']
    # Step bands (hover: what ran), then their boundaries and labels.
    stats = dict((s.n, st) for s, st in step_stats(result))
    label_rows, cycle = [-99.0, -99.0, -99.0], None
    cycle_x = [x(s.t0) for i, s in enumerate(result.steps) if i == 0 or result.steps[i - 1].cycle != s.cycle]
    for s in result.steps:
        x0, x1 = x(s.t0), x(s.t1)
        st = stats[s.n]
        tip = (f"#{s.n} {s.cycle}: {s.action} {s.phase or ''} {s.name} - {s.seconds:.2f} s, app max "
               f"{st.max:.1f} ms, p99 {st.p99:.1f} ms, errors {st.errors}; {s.result}")
        fill = "#fca5a5" if not s.ok else _FILL.get(s.action, "#f3f4f6")
        out.append(f'<rect x="{x0:.1f}" y="{top}" width="{max(x1 - x0, 0.8):.1f}" height="{ph}" fill="{fill}">'
                   f'<title>{e(tip)}</title></rect>')
        if s.cycle != cycle:
            cycle = s.cycle
            out.append(f'<line x1="{x0:.1f}" y1="{top - 62}" x2="{x0:.1f}" y2="{top + ph}" stroke="#374151" '
                       f'stroke-width="1.2"/>')
            nxt = min([c for c in cycle_x if c > x0 + 0.5] + [left + pw])
            digits = "".join(ch for ch in cycle.split("(")[0] if ch.isdigit())
            short = f"c{digits}" if digits else cycle.split(":")[0]
            text = cycle if nxt - x0 >= 6.5 * len(cycle) + 6 else short if nxt - x0 >= 6.5 * len(short) + 4 else ""
            out.append(f'<text x="{x0 + 3:.1f}" y="{top - 52}" fill="#111827" font-weight="600">{e(text)}</text>')
        else:
            out.append(f'<line x1="{x0:.1f}" y1="{top - 44}" x2="{x0:.1f}" y2="{top + ph}" stroke="#9ca3af" '
                       f'stroke-width="0.6" stroke-dasharray="3,3"/>')
        for row in range(len(label_rows)):
            if x0 - label_rows[row] >= 13:
                color = "#b91c1c" if s.action.startswith(("rollback", "undo contract")) else "#1f2937"
                out.append(f'<text x="{x0 + 2:.1f}" y="{top - 36 + 11 * row}" font-size="9" fill="{color}">'
                           f'{e(s.label)}</text>')
                label_rows[row] = x0
                break
    # Axes and grid.
    for d in range(int(lmin), int(lmax) + 1):
        v = 10.0 ** d
        label = f"{v:g} ms" if v < 1000 else f"{v / 1000:g} s"
        out.append(f'<line x1="{left}" y1="{y(v):.1f}" x2="{left + pw}" y2="{y(v):.1f}" stroke="#e5e7eb"/>')
        out.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end" fill="#374151">{label}</text>')
    step = _nice_step(t_end)
    t = 0.0
    while t <= t_end + 1e-9:
        out.append(f'<line x1="{x(t):.1f}" y1="{top + ph}" x2="{x(t):.1f}" y2="{top + ph + 4}" stroke="#374151"/>')
        out.append(f'<text x="{x(t):.1f}" y="{top + ph + 16}" text-anchor="middle" fill="#374151">{t:g} s</text>')
        t += step
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#374151"/>')
    out.append(f'<text x="{left + pw / 2:.0f}" y="{height - 6}" text-anchor="middle" fill="#374151">'
               f'time since the app started (s)</text>')
    out.append(f'<text x="14" y="{top + ph / 2:.0f}" transform="rotate(-90 14 {top + ph / 2:.0f})" '
               f'text-anchor="middle" fill="#374151">app statement latency (log scale)</text>')
    # Latency: per-pixel buckets, max and median.
    buckets: list[list[float]] = [[] for _ in range(pw)]
    for sample in samples:
        if sample.error is None:
            buckets[min(pw - 1, int(pw * sample.t / t_end))].append(sample.latency_ms)
    # One polyline per run of non-empty buckets: the moments the app was held show as gaps.
    runs: list[tuple[list[str], list[str]]] = []
    empty = 0
    gap_px = max(0.15, 5 * t_end / max(len(samples), 1)) * pw / t_end  # a silence longer than this is a hold
    for i, b in enumerate(buckets):
        if not b:
            empty += 1
            continue
        if not runs or empty > gap_px:
            runs.append(([], []))
        empty = 0
        b.sort()
        px = left + i + 0.5
        runs[-1][0].append(f"{px:.1f},{y(b[-1]):.1f}")
        runs[-1][1].append(f"{px:.1f},{y(b[len(b) // 2]):.1f}")
    for p_max, p_med in runs:
        if len(p_max) == 1:  # a lone bucket: draw it as a dot-sized segment
            p_max, p_med = p_max * 2, p_med * 2
        out.append(f'<polyline fill="none" stroke="#dc2626" stroke-width="1" points="{" ".join(p_max)}"/>')
        out.append(f'<polyline fill="none" stroke="#2563eb" stroke-width="1.2" points="{" ".join(p_med)}"/>')
    for ls in result.lock_samples:
        out.append(f'<circle cx="{x(ls.t):.1f}" cy="{y(ls.max_wait_ms):.1f}" r="2.2" fill="#f59e0b" '
                   f'stroke="#92400e" stroke-width="0.4"><title>{ls.waiting} app backends waiting on '
                   f'{e(ls.events)} for {ls.max_wait_ms:.1f} ms</title></circle>')
    for sample in samples:
        if sample.error is not None:
            cx, cy = x(sample.t), top + 8
            out.append(f'<path d="M{cx - 4:.1f},{cy - 4:.1f} L{cx + 4:.1f},{cy + 4:.1f} M{cx - 4:.1f},{cy + 4:.1f} '
                       f'L{cx + 4:.1f},{cy - 4:.1f}" stroke="#b91c1c" stroke-width="2"><title>{e(sample.kind)}: '
                       f'{e(sample.error or "")}</title></path>')
    out.append("</svg>")
    return "\n".join(out)


_CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; margin: 24px; color: #111827; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px; }
.verdict { display: inline-block; padding: 4px 12px; border-radius: 4px; font-weight: 700; color: #fff; }
.pass { background: #15803d; } .fail { background: #b91c1c; }
table { border-collapse: collapse; font-size: 12px; }
th, td { border: 1px solid #d1d5db; padding: 3px 7px; text-align: left; vertical-align: top; }
th { background: #f3f4f6; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
tr.bad td { background: #fee2e2; } .ok { color: #15803d; font-weight: 600; } .no { color: #b91c1c; font-weight: 700; }
.legend span { display: inline-block; margin-right: 16px; } .sw { display: inline-block; width: 14px; height: 10px;
  margin-right: 4px; vertical-align: middle; border: 1px solid #9ca3af; }
dl { display: grid; grid-template-columns: max-content auto; gap: 2px 14px; font-size: 13px; }
dt { font-weight: 600; } code { background: #f3f4f6; padding: 0 3px; }
"""


def render_html(result: RehearsalResult) -> str:
    e = html.escape
    verdict = "PASSED" if result.passed else "FAILED"
    lat = sorted(s.latency_ms for s in result.samples)
    meta = [("playbook", result.playbook_source), ("database", result.database), ("server", result.server),
            ("started", result.started_at.strftime("%Y-%m-%d %H:%M:%S UTC")),
            ("duration", f"{result.duration_s:.1f} s"),
            *([("migrated columns", tables_line(result))] if result.tables else []),
            *([("schema and rows", result.schema_source)] if result.schema_source else []),
            ("original rows", f"{result.rows:,}" + (f" over {len(result.tables)} tables" if len(result.tables) > 1
                                                    else "")),
            ("app traffic", f"{result.writers} writers, {result.readers} readers, {len(lat):,} statements, "
                            f"p50 {percentile(lat, 50):.2f} ms, p99 {percentile(lat, 99):.2f} ms, "
                            f"max {lat[-1] if lat else 0:.1f} ms, {len(result.app_errors)} errors"),
            ("lock sampling", f"pg_stat_activity every 20 ms: {result.lock_polls:,} polls, "
                              f"{len(result.lock_samples):,} saw an app backend waiting on a lock"),
            ("checks", f"{len(result.checks) - len(result.failed_checks)} passed, "
                       f"{len(result.failed_checks)} failed")]
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Rollback rehearsal {e(result.playbook)} - {verdict}</title>", f"<style>{_CSS}</style></head><body>",
        f"<h1>Rollback rehearsal: {e(result.playbook)}</h1>",
        (f"<p>Tables: {', '.join(f'<code>{e(t)}</code>' for t in result.tables)}; after every rollback each one "
         "is checked row by row and the catalog compared.</p>" if result.tables else ""),
        f'<p><span class="verdict {"pass" if result.passed else "fail"}">{verdict}</span> '
        + ("every phase was rolled back under live traffic with the schema restored, no row lost or wrong, "
           "and zero app errors" + ("; after the contract, every contract step was undone and every phase rolled "
                                    "back to the original schema (column order aside), then run forward again"
                                    if any(st.cycle == AFTER_CONTRACT for st in result.steps) else "")
           if result.passed else e(result.stopped or "at least one check failed; see below"))
        + "</p>",
        "<dl>" + "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in meta) + "</dl>",
        "<h2>App latency over time</h2>",
        svg_plot(result),
        '<p class="legend"><span><svg width="22" height="10"><line x1="0" y1="5" x2="22" y2="5" stroke="#dc2626"/>'
        '</svg> slowest statement per pixel</span><span><svg width="22" height="10"><line x1="0" y1="5" x2="22" '
        'y2="5" stroke="#2563eb" stroke-width="1.5"/></svg> median per pixel</span><span><svg width="10" '
        'height="10"><circle cx="5" cy="5" r="3" fill="#f59e0b"/></svg> app backend in a Lock wait '
        '(pg_stat_activity)</span>'
        + "".join(f'<span><i class="sw" style="background:{c}"></i>{e(a)}</span>' for a, c in _FILL.items()
                  if a != "undo contract (refused)")
        + '<span><i class="sw" style="background:#fca5a5"></i>failed step</span></p>'
        '<p>Labels above the plot: <code>+k</code> run phase k, <code>-k</code> roll back phase k, '
        '<code>Ck</code> contract phase k, <code>-Ck</code> undo contract step k (<code>rollback k</code> once it '
        'is contracted); solid lines start a cycle. Hover a band for its figures. Gaps are the '
        'moments the app was held between two statements so that rows could be compared exactly.</p>',
        "<h2>Steps</h2>",
        "<p>max ms: the longest app statement that overlapped the step, i.e. the longest time any app query "
        "waited (for a lock or otherwise); lock wait ms: the longest Lock wait of an app backend seen by the "
        "pg_stat_activity sampler.</p>",
        "<table><tr>" + "".join(f"<th>{h}</th>" for h in (
            "#", "cycle", "step", "phase", "seconds", "app stmts", "p50 ms", "p99 ms", "max ms", "lock wait ms",
            "errors", "rows checked", "schema", "result", "note")) + "</tr>",
    ]
    for step, st in step_stats(result):
        parts.append(
            f'<tr class="{"" if step.ok else "bad"}"><td class="n">{step.n}</td><td>{e(step.cycle)}</td>'
            f"<td>{e(step.action)}</td><td>{step.phase or ''} {e(step.name)}</td>"
            f'<td class="n">{step.seconds:.2f}</td><td class="n">{st.statements:,}</td>'
            f'<td class="n">{st.p50:.2f}</td><td class="n">{st.p99:.2f}</td><td class="n">{st.max:.1f}</td>'
            f'<td class="n">{_ms(st.lock_wait_ms) if st.lock_waiting_polls else "-"}</td>'
            f'<td class="n{" no" if st.errors else ""}">{st.errors}</td><td class="n">{_rows(step.rows_checked)}'
            + (f'<br><small>{e(_rows_split(step))}</small>' if _rows_split(step) else "") + '</td>'
            f'<td class="{"no" if step.schema == "differs" else ""}">{e(step.schema)}</td>'
            f'<td class="{"ok" if step.ok else "no"}">{e(step.result)}</td><td>{e(step.note)}</td></tr>')
    parts.append("</table>")
    parts.append("<h2>Checks</h2><table><tr><th></th><th>check</th><th>detail</th><th>step</th></tr>")
    for c in result.checks:
        parts.append(f'<tr class="{"" if c.passed else "bad"}"><td class="{"ok" if c.passed else "no"}">'
                     f'{"pass" if c.passed else "FAIL"}</td><td>{e(c.name)}</td><td>{e(c.detail)}</td>'
                     f'<td class="n">{c.step or ""}</td></tr>')
    parts.append("</table>")
    if result.notes or result.fixes:
        parts.append("<h2>Rollback policy and rows fixed</h2><ul>")
        parts += [f"<li>{e(n)}</li>" for n in result.notes]
        for f in result.fixes:
            parts.append(f"<li>{e(f['cycle'])}: after the refusal, {f['rows']} rows"
                         + (f" of <code>{e(f['table'])}</code>" if f.get("table") else "") + " "
                         f"({e(', '.join(f'{v}: {n}' for v, n in f['from'].items()))}) were set to "
                         f"<code>{e(f['to'])}</code> (enum label <code>{e(f['label'])}</code>); ids include "
                         f"{e(', '.join(f['ids']))}</li>")
        parts.append("</ul>")
    if result.rolling_deploy:
        parts.append("<h2>Rolling deploy: both app versions (SQLAlchemy, asyncpg and psycopg)</h2><table><tr>"
                     "<th>version</th><th>instances</th><th>operations</th><th>errors</th><th>p50 ms</th>"
                     "<th>p99 ms</th><th>max ms</th></tr>")
        for version, d in result.rolling_deploy.items():
            parts.append(f"<tr><td>{e(version)}</td><td>{e(', '.join(d['instances']))}</td>"
                         f"<td class=\"n\">{d['ops']:,}</td><td class=\"n\">{d['errors']}</td>"
                         f"<td class=\"n\">{d['p50_ms']}</td><td class=\"n\">{d['p99_ms']}</td>"
                         f"<td class=\"n\">{d['max_ms']}</td></tr>")
        parts.append("</table>")
    errors = result.app_errors
    if errors:
        parts.append("<h2>App errors</h2><table><tr><th>t (s)</th><th>statement</th><th>error</th></tr>")
        parts += [f'<tr><td class="n">{s.t:.3f}</td><td>{e(s.kind)}</td><td>{e(s.error or "")}</td></tr>'
                  for s in errors[:200]]
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def to_json(result: RehearsalResult) -> dict:
    return {
        "playbook": result.playbook, "passed": result.passed, "stopped": result.stopped,
        "started_at": result.started_at.isoformat(), "duration_s": round(result.duration_s, 3),
        "rows": result.rows, "writers": result.writers, "readers": result.readers,
        "tables": result.tables, "rows_by_table": result.rows_by_table, "builtin_by_table": result.builtin_by_table,
        "schema_source": result.schema_source,
        "app_statements": len(result.samples), "app_errors": len(result.app_errors),
        "steps": [{"n": s.n, "cycle": s.cycle, "action": s.action, "phase": s.phase, "name": s.name,
                   "seconds": round(s.seconds, 3), "outcome": s.outcome, "ddl_retries": s.retries, "ok": s.ok,
                   "rows_checked": s.rows_checked, "rows_by_table": s.rows_by_table,
                   "schema": s.schema, "note": s.note, "app_statements": st.statements, "app_errors": st.errors,
                   "p50_ms": round(st.p50, 3), "p99_ms": round(st.p99, 3), "max_ms": round(st.max, 3),
                   "lock_wait_ms": round(st.lock_wait_ms, 3)} for s, st in step_stats(result)],
        "checks": [{"name": c.name, "passed": c.passed, "detail": c.detail, "step": c.step} for c in result.checks],
        "fixes": result.fixes, "notes": result.notes, "rolling_deploy": result.rolling_deploy,
    }


def write(result: RehearsalResult, path: str | Path) -> Path:
    """The HTML report at `path`, and the same figures as JSON next to it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(result), encoding="utf-8")
    path.with_suffix(".json").write_text(json.dumps(to_json(result), indent=2, default=str), encoding="utf-8")
    result.report_path = str(path)
    return path
