"""The orchestrator alone in its own process, so its peak memory is measured apart from the benchmark's.

Usage (by bench/run.py): python bench/child.py '<json: {"dsn": ..., "playbook": {...}}>'
Runs every phase and the contract, and prints one JSON line: per-phase seconds, the backfill state row,
and the process's peak RSS: /proc/self/status VmHWM (KiB), the figure to use, and getrusage ru_maxrss, which
Linux carries across exec (it starts at the size of the forked parent, so it overstates a small child).
Only the orchestrator is imported here: no traffic threads, no rich tables, no benchmark data.
"""

from __future__ import annotations

import json
import resource
import sys
import time


def _vm_hwm_kib() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def main() -> None:
    cfg = json.loads(sys.argv[1])
    from orchestrator import logs, playbook
    from orchestrator.runner import Orchestrator
    from procstat import postmaster_pid, server_cpu_s  # bench/ is this script's directory: on sys.path

    logs.configure(level="warning", json=True)
    pb = playbook.parse(cfg["playbook"])
    orch = Orchestrator(pb, cfg["dsn"])
    pm = postmaster_pid(orch.x.conn)
    seconds: dict[str, float] = {}
    cpu: dict[str, float | None] = {}
    backfill = None

    def timed(name, fn):
        c, t = server_cpu_s(pm), time.monotonic()
        fn()
        seconds[name] = time.monotonic() - t
        c1 = server_cpu_s(pm)
        cpu[name] = None if c is None or c1 is None else round(c1 - c, 2)

    try:
        for phase in orch.phases:
            timed(phase.name, lambda: orch.run(phase.number))
            if phase.name == "backfill":
                backfill = orch.state.backfill()
        timed("contract", orch.contract)
    finally:
        orch.close()
    print(json.dumps({"seconds": seconds, "server_cpu_s": cpu, "backfill": backfill,
                      "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      "vm_hwm_kib": _vm_hwm_kib()}, default=str))


if __name__ == "__main__":
    main()
