"""Replica lag for the backfill's throttle: bytes and time behind, per standby, read on the primary.

`pg_stat_replication.replay_lag` alone cannot hold a backfill reliably: PostgreSQL only updates it when the
standby's replay position moves past a point it sampled, so a standby whose replay is stuck (paused, a long
conflict, a slow disk) keeps showing the last value measured before it stopped, a small one, and once a
standby has caught up the column turns NULL. So the throttle also reads the bytes the standby has still to
replay (`pg_current_wal_lsn() - replay_lsn`, `max_replica_lag_bytes`) and, for `max_replica_lag_ms`, takes
the larger of replay_lag and its own estimate: the time since the primary's WAL first passed the standby's
replay position, from the (time, LSN) pairs it records at each check (a lower bound: never more than the
real lag plus one check interval).

Reading replay_lsn of other sessions needs superuser or pg_read_all_stats (docs/privileges.md); without it
the columns are NULL and no standby is counted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from orchestrator.engine.executor import Executor
from orchestrator.engine.playbook import Settings
from orchestrator.engine.sqlkit import Q

HISTORY = 20_000  # (time, LSN) samples kept per backfill: far more than one check per batch needs


@dataclass
class Standby:
    name: str  # application_name, else client address, else pid
    lag_bytes: float  # WAL generated on the primary that the standby has not replayed
    lag_ms: float  # max(replay_lag, our estimate)
    replay_lag_ms: float | None  # as pg_stat_replication shows it


class LagWatch:
    """The standbys' lag as one backfill sees it, with the (time, LSN) samples its estimate needs."""

    def __init__(self, s: Settings, x: Executor):
        self.s, self.x = s, x
        self.history: list[tuple[float, float]] = []

    def standbys(self) -> list[Standby]:
        """Every standby streaming from this server, with its lag; records a (time, LSN) sample."""
        return standbys(self.x, self.history)

    def reason(self) -> str | None:
        """Why the next batch must wait for a standby (max_replica_lag_bytes / max_replica_lag_ms), or None."""
        s = self.s
        if s.max_replica_lag_ms is None and s.max_replica_lag_bytes is None:
            return None
        for sb in self.standbys():
            if s.max_replica_lag_bytes is not None and sb.lag_bytes > s.max_replica_lag_bytes:
                return (f"replica replay lag {sb.lag_bytes / 1024:.0f} kB > max_replica_lag_bytes "
                        f"{s.max_replica_lag_bytes} ({sb.name}, {sb.lag_ms:.0f} ms behind)")
            if s.max_replica_lag_ms is not None and sb.lag_ms > s.max_replica_lag_ms:
                return (f"replica replay lag {sb.lag_ms:.0f} ms > max_replica_lag_ms {s.max_replica_lag_ms} "
                        f"({sb.name}, {sb.lag_bytes / 1024:.0f} kB behind)")
        return None


def standbys(x: Executor, history: list[tuple[float, float]]) -> list[Standby]:
    """Every standby streaming from this server, with its lag; appends a (time, LSN) sample to `history`."""
    rows = x.query(Q("""SELECT coalesce(nullif(application_name, ''), client_addr::text, pid::text),
                                  pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::float8,
                                  pg_wal_lsn_diff(replay_lsn, '0/0')::float8,
                                  extract(epoch FROM replay_lag)::float8 * 1000
                           FROM pg_stat_replication WHERE replay_lsn IS NOT NULL
                           UNION ALL SELECT NULL, pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::float8, NULL, NULL
                           ORDER BY 1 NULLS FIRST"""))
    now = time.monotonic()
    current = rows[0][1]
    if not history or history[-1][1] != current:
        history.append((now, current))
        del history[:-HISTORY]
    out = []
    for name, _, replay, lag in rows[1:]:
        behind = max(current - replay, 0.0)
        # The first sample past the replay position: WAL the standby lacks existed by then.
        first = next((t for t, lsn in history if lsn > replay), None) if behind > 0 else None
        estimate = (now - first) * 1000 if first is not None else 0.0
        # A standby with nothing left to replay is not behind, whatever replay_lag last measured.
        out.append(Standby(name, behind, max(lag or 0.0, estimate) if behind > 0 else 0.0, lag))
    return out
