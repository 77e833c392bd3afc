"""Prometheus metrics: scraped over HTTP (in process and from `fleet --metrics-port`) and read from the textfile;
every figure matches `fleet status` for targets in every state (applied, failed with lock retries, half-way,
untouched, unreachable)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.engine.errors import Refused
from orchestrator.fleet import metrics

from .helpers import ROOT
from .test_fleet import SECRET, _fleet, fleet_cli, six  # noqa: F401 (fixture)


def samples(text: str) -> dict:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        return r.read().decode()


def check_matches(m: dict, st: dict) -> None:
    """Every figure of the scrape equals the status of the same targets."""
    def v(name, t, **extra):
        labels = {"target": t["name"], "wave": t["wave"], "env": t["env"] or "", **extra}
        return m.get((f"orchestrator_{name}", tuple(sorted(labels.items()))))

    for t in st["targets"]:
        assert v("target_up", t) == (1 if t["reachable"] else 0)
        for s in metrics.STATES:
            assert v("target_state", t, state=s) == (1 if t["state"] == s else 0), (t["name"], s)
        if t["error_at"] is not None and t["reachable"]:
            assert v("target_last_error_timestamp_seconds", t) == pytest.approx(t["error_at"])
        elif t["reachable"]:
            assert v("target_last_error_timestamp_seconds", t) is None
        if not t["reachable"]:
            assert v("target_phase", t) is None
            continue
        assert v("target_phase", t) == t["phase"]
        assert v("lock_retries_total", t) == t["lock_retries"]
        bf = t["backfill"]
        if bf is None:
            assert v("backfill_batches", t) is None
            continue
        for tb in bf["tables"]:
            assert v("backfill_rows_done", t, table=tb["table"]) == tb["rows_done"]
            assert v("backfill_rows_scanned", t, table=tb["table"]) == tb["rows_scanned"]
            assert v("backfill_rows_total", t, table=tb["table"]) == tb["rows_total"]
        assert v("backfill_rows_per_second", t) == (bf["rows_per_s"] or 0)
        assert v("backfill_batches", t) == bf["batches"]
        assert v("backfill_last_batch_seconds", t) == pytest.approx(bf["last_batch_ms"] / 1000)
        assert v("backfill_max_batch_seconds", t) == pytest.approx(bf["max_batch_ms"] / 1000)
        assert v("backfill_finished", t) == (1 if bf["finished"] else 0)
    for phase, count in st["summary"]["by_phase"].items():
        assert m[("orchestrator_fleet_targets", (("phase", phase),))] == count
    assert sum(val for (name, _), val in m.items() if name == "orchestrator_fleet_targets") == len(st["targets"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_match_status(six, tmp_path, monkeypatch):  # noqa: F811
    dead = f"postgresql://postgres:{SECRET}@127.0.0.1:1/nowhere?connect_timeout=2"
    f = _fleet(tmp_path, [*six[:4], dead], monkeypatch, waves=[{"name": "all", "rest": True}])
    t1, t2, t3, _t4 = (f.orchestrator(t) for t in f.inv.targets[:4])
    for k in range(1, 7):
        t1.run(k)  # t1: every phase applied, backfill finished
    for k in range(1, 4):
        t3.run(k)  # t3: half-way, at the backfill
    blocker = psycopg.connect(six[1])
    blocker.execute("LOCK TABLE workflow_templates IN ACCESS SHARE MODE")
    with pytest.raises(Refused):
        t2.run(1)  # t2: failed, with lock retries in its run log
    blocker.rollback()
    blocker.close()
    for o in (t1, t2, t3, _t4):
        o.close()

    exporter = metrics.Exporter(f.status, max_age_s=60)
    port = exporter.serve(0)
    try:
        text = scrape(port)
    finally:
        exporter.close()
    assert SECRET not in text
    st = f.status()  # a fresh read, independent of the scrape's
    by = {t["name"]: t for t in st["targets"]}
    assert [by[n]["state"] for n in ("t1", "t2", "t3", "t4", "t5")] == ["applied", "failed", "applied", "pending",
                                                                       "unreachable"]
    assert by["t2"]["lock_retries"] >= 1 and by["t3"]["phase"] == 3
    check_matches(samples(text), st)

    # The CLI: --metrics-textfile after `status --json` (written from a fresh read at exit) ...
    prom = tmp_path / "textfile" / "fleet.prom"
    env = {k: v for k, v in os.environ.items() if k.startswith("FLEET_T")}
    proc = fleet_cli(tmp_path / "fleet.yaml", env, "--metrics-textfile", str(prom), "status", "--json",
                     tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = prom.read_text()
    assert SECRET not in text
    check_matches(samples(text), json.loads(proc.stdout))

    # ... and --metrics-port, scraped while `fleet status --watch` keeps the endpoint up.
    port = free_port()
    cmd = [sys.executable, "-m", "orchestrator", "fleet", "--inventory", str(tmp_path / "fleet.yaml"),
           "--metrics-port", str(port), "status", "--json", "--watch", "60"]
    watcher = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "ORCHESTRATOR_CONTROL_DIR": str(tmp_path / "ctl")})
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                text = scrape(port)
                break
            except OSError:
                assert time.monotonic() < deadline and watcher.poll() is None, watcher.stderr.read()
                time.sleep(0.3)
    finally:
        watcher.terminate()
        out, err = watcher.communicate(timeout=30)
    assert SECRET not in text + out + err
    check_matches(samples(text), f.status())
