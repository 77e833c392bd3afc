"""The benchmark's report: each section's figures checked against its goals, and the tables printed on stdout."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

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
            b["ratio_vs_one_update"] >= 0.8
            and all(v["ratio_vs_one_update"] >= 0.8 for v in b.get("tables", {}).values()),
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
                            "figure": f"{v['wal_ratio_settled']}×", "target": "≤ 2×",
                            "met": v["wal_ratio_settled"] <= 2,
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
                              f"orchestrator): +{v['reindex_wal_mb']} MB WAL "
                              f"(→ {round(wal / max(nv['wal_mb'], 1e-3), 2)}× "
                              f"naive, with the VACUUM), table + indexes {after['total_mb']} MB ({after['table_mb']} + "
                              f"{after['indexes_mb']}) "
                              f"→ {round(after['total_mb'] / max(nv['size']['total_mb'], 1e-3), 2)}× naive")
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
        t = Table(title="Replay lag per phase of the orchestrator's runs: max MB / max s "
                        "(the throttle holds phase 3 only)")
        t.add_column("phase")
        ours = {k: v for k, v in rp["runs"].items() if "lag_by_phase" in v}
        for name in ours:
            t.add_column(name, justify="right")
        for ph in (next(iter(ours.values()))["lag_by_phase"] if ours else {}):
            t.add_row(ph, *[f"{v['lag_by_phase'].get(ph, {}).get('max_lag_mb', '-')} / "
                            f"{v['lag_by_phase'].get(ph, {}).get('max_lag_s', '-')}  "
                            f"({v['phases'][ph]['wal_mb']} MB WAL)"
                            for v in ours.values()])
        console.print(t)
    elif res.get("replica", {}).get("skipped"):
        console.print(f"replica: skipped, {res['replica']['skipped']}")
