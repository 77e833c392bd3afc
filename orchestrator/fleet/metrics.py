"""Prometheus metrics of a fleet (or of one database: a fleet of one), with the `prometheus_client` library.

The figures are read from the same snapshot as `fleet status` (each database's state tables are the truth),
so a scrape and `status` always agree. Snapshots are cached for `max_age_s` so that frequent scrapes do not
hammer the databases. Exposed over HTTP (`--metrics-port`) or written to a file for node_exporter's textfile
collector (`--metrics-textfile`, rewritten atomically by prometheus_client).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server, write_to_textfile
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

PREFIX = "orchestrator"
STATES = ("pending", "applied", "running", "interrupted", "failed", "contracting", "contracted", "uncontracting",
          "unreachable")
THROTTLES = ("replica_lag", "long_transactions", "wal_rate", "autovacuum", "lock_waiters", "other")


class FleetCollector(Collector):
    def __init__(self, snapshot: Callable[[], dict], max_age_s: float = 2.0):
        self._snapshot, self.max_age_s = snapshot, max_age_s
        self._cached: tuple[float, dict] | None = None
        self._lock = threading.Lock()

    def snapshot(self) -> dict:
        with self._lock:
            if self._cached is None or time.monotonic() - self._cached[0] > self.max_age_s:
                started = time.monotonic()
                st = self._snapshot()
                st["_seconds"] = time.monotonic() - started
                self._cached = (time.monotonic(), st)
            return self._cached[1]

    def invalidate(self) -> None:
        with self._lock:
            self._cached = None

    def collect(self):
        st = self.snapshot()
        t_labels = ["target", "wave", "env"]

        def g(name, doc, labels=t_labels):
            return GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=labels)

        up = g("target_up", "1 when the target database answered the last status read")
        phase = g("target_phase", "highest phase applied (or contracted) in order; 0 for none")
        state = g("target_state", "1 for the target's current state", t_labels + ["state"])
        running = g("target_running", "1 while a process holds the target's operator lock")
        err_at = g("target_last_error_timestamp_seconds", "when the target's last error happened (unix time)")
        retries = CounterMetricFamily(f"{PREFIX}_lock_retries", "DDL or batch attempts that gave up on lock_timeout "
                                      "and were retried", labels=t_labels)
        done = g("backfill_rows_done", "rows the backfill updated", t_labels + ["table"])
        scanned = g("backfill_rows_scanned", "rows the backfill walked past (progress)", t_labels + ["table"])
        total = g("backfill_rows_total", "rows in the table when the backfill started (estimate)",
                  t_labels + ["table"])
        rate = g("backfill_rows_per_second", "average backfill rate (rows scanned per second)")
        batches = g("backfill_batches", "backfill batches committed")
        last_batch = g("backfill_last_batch_seconds", "duration of the last backfill batch")
        max_batch = g("backfill_max_batch_seconds", "duration of the longest backfill batch")
        finished = g("backfill_finished", "1 when every table's backfill has finished")
        throttled = g("backfill_throttled", "1 while a throttle of this kind holds the backfill",
                      t_labels + ["table", "kind"])
        for t in st["targets"]:
            lv = [t["name"], t["wave"], t["env"] or ""]
            up.add_metric(lv, 1 if t["reachable"] else 0)
            for s in STATES:
                state.add_metric(lv + [s], 1 if t["state"] == s else 0)
            if t["error_at"]:
                err_at.add_metric(lv, float(t["error_at"]))
            if not t["reachable"]:
                continue
            phase.add_metric(lv, t["phase"])
            running.add_metric(lv, 1 if t["running_now"] else 0)
            retries.add_metric(lv, t["lock_retries"])
            bf = t["backfill"]
            if bf:
                for tb in bf["tables"]:
                    done.add_metric(lv + [tb["table"]], tb["rows_done"])
                    scanned.add_metric(lv + [tb["table"]], tb["rows_scanned"])
                    total.add_metric(lv + [tb["table"]], tb["rows_total"] or 0)
                rate.add_metric(lv, bf["rows_per_s"] or 0)
                batches.add_metric(lv, bf["batches"])
                last_batch.add_metric(lv, (bf["last_batch_ms"] or 0) / 1000)
                max_batch.add_metric(lv, (bf["max_batch_ms"] or 0) / 1000)
                finished.add_metric(lv, 1 if bf["finished"] else 0)
            for h in t["throttles"]:
                throttled.add_metric(lv + [h["table"], h["kind"]], 1)
        fleet = GaugeMetricFamily(f"{PREFIX}_fleet_targets", "targets at each phase ('unreachable' apart)",
                                  labels=["phase"])
        for key, count in st["summary"]["by_phase"].items():
            fleet.add_metric([key], count)
        scrape = GaugeMetricFamily(f"{PREFIX}_fleet_status_seconds", "time the last status read took")
        scrape.add_metric([], st.get("_seconds", 0.0))
        yield from (up, phase, state, running, err_at, retries, done, scanned, total, rate, batches, last_batch,
                    max_batch, finished, throttled, fleet, scrape)


class Exporter:
    """A registry holding the fleet's collector; serve it over HTTP and/or write it to a textfile."""

    def __init__(self, snapshot: Callable[[], dict], max_age_s: float = 2.0):
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = FleetCollector(snapshot, max_age_s)
        self.registry.register(self.collector)
        self.server: WSGIServer | None = None
        self.textfile: Path | None = None

    def serve(self, port: int, addr: str = "127.0.0.1") -> int:
        """Start the HTTP endpoint (port 0: any free port); returns the port."""
        self.server, _ = start_http_server(port, addr=addr, registry=self.registry)
        return self.server.server_port

    def write(self) -> None:
        """Rewrite the textfile (if one was asked for) from a fresh snapshot."""
        if self.textfile is not None:
            self.collector.invalidate()
            self.textfile.parent.mkdir(parents=True, exist_ok=True)
            write_to_textfile(str(self.textfile), self.registry)

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
