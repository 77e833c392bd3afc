"""CPU time of a local PostgreSQL server, from /proc: robust to other load on a shared machine.

Wall-clock rates on a busy 2-core box swing by ±50% with whatever else runs; the server's CPU seconds
per unit of work barely move, so the benchmark reports both.
"""

from __future__ import annotations

import os
from pathlib import Path


def _stat(pid: int | str) -> list[str]:
    """/proc/<pid>/stat fields after the command name: [0] state, [1] ppid, [11] utime, [12] stime, ..."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def postmaster_pid(conn) -> int | None:
    """The local server's postmaster (the parent of this connection's backend), or None for a remote one."""
    try:
        return int(_stat(conn.info.backend_pid)[1])
    except (OSError, IndexError, ValueError):
        return None


def server_cpu_s(postmaster: int | None) -> float | None:
    """CPU seconds used so far by the whole server: postmaster, live children, and reaped (exited) children."""
    if postmaster is None:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    try:
        total = sum(int(x) for x in _stat(postmaster)[11:15])  # utime, stime, cutime, cstime
    except OSError:
        return None
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            c = _stat(d.name)
        except OSError:
            continue
        if c[1] == str(postmaster):
            total += int(c[11]) + int(c[12])
    return total / tick
