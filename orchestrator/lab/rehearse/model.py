"""What a rehearsal's report is made of: its steps, the checks evaluated, the lock samples, the result
(read by scenario.py, which fills them in, and by report.py, which shows them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone

from orchestrator.lab.traffic import StatementSample

AFTER_CONTRACT = "after contract"  # the cycle that takes the contracted migration all the way back and forward


# --------------------------------------------------------------------------------------------------
# What the report is made of


@dataclass
class Step:
    n: int
    cycle: str  # "cycle 3", "cycle 6 (fallback)", "final: forward + contract", "after contract"
    action: str  # run | rollback | rollback (refused) | dba fix | contract | undo contract | undo contract (refused)
    phase: int | None
    name: str
    t0: float
    t1: float = 0.0
    outcome: str = ""
    ok: bool = True
    rows_checked: int | None = None  # over every migrated table
    rows_by_table: dict[str, int] = field(default_factory=dict)  # table.column -> rows checked
    schema: str = ""  # "identical" | "differs" | ""
    note: str = ""
    retries: int = 0  # DDL attempts that failed (lock_timeout, ...) and were retried, from the run log

    @property
    def result(self) -> str:
        return self.outcome + (f" ({self.retries} DDL retries)" if self.retries else "")

    @property
    def seconds(self) -> float:
        return max(0.0, self.t1 - self.t0)

    @property
    def label(self) -> str:
        if self.action == "run":
            return f"+{self.phase}"
        if self.action.startswith("rollback"):
            return f"-{self.phase}"
        if self.action.startswith("undo contract"):
            return f"-C{self.phase}"
        if self.action == "contract":
            return f"C{self.phase}"
        return "fix" if self.action == "dba fix" else self.action[:3]


@dataclass
class Check:
    name: str
    passed: bool
    detail: str = ""
    step: int | None = None


# one poll of traffic.LockSampler that saw app backends waiting on a lock
@dataclass
class LockSample:
    t: float  # seconds on the traffic clock
    waiting: int  # app backends in a Lock wait
    max_wait_ms: float  # longest of those waits so far (now - query_start)
    events: str


@dataclass
class RehearsalResult:
    playbook: str
    playbook_source: str
    policy: str
    database: str
    server: str
    rows: int
    writers: int
    readers: int
    started_at: datetime
    finished_at: datetime | None = None
    steps: list[Step] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    samples: list[StatementSample] = field(default_factory=list)
    lock_samples: list[LockSample] = field(default_factory=list)
    lock_polls: int = 0
    notes: list[str] = field(default_factory=list)
    fixes: list[dict] = field(default_factory=list)
    stopped: str | None = None  # why the rehearsal stopped before the end
    report_path: str | None = None
    tables: list[str] = field(default_factory=list)  # table.column of every migrated column
    rows_by_table: dict[str, int] = field(default_factory=dict)  # original rows per table.column
    builtin_by_table: dict[str, int] = field(default_factory=dict)  # built-in (seed) rows per table.column
    schema_source: str = ""  # what the rows and schema are: Chatter's schema, the fixture, an existing database
    rolling_deploy: dict | None = None  # per app version: instances, operations, errors, latency (app_versions)

    @property
    def app_errors(self) -> list[StatementSample]:
        return [s for s in self.samples if s.error is not None]

    @property
    def failed_checks(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    @property
    def passed(self) -> bool:
        return bool(self.checks) and not self.failed_checks and not self.app_errors and self.stopped is None

    @property
    def duration_s(self) -> float:
        end = self.finished_at or datetime.now(timezone.utc)
        return (end - self.started_at).total_seconds()


class _Stop(Exception):
    """A check failed in a way that makes later steps meaningless."""
