"""Progress of long loops: a rich bar with rate and ETA on a terminal, periodic log events otherwise."""

from __future__ import annotations

import sys
import time

import structlog
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichProgress

log = structlog.get_logger()
LOG_EVERY_S = 5.0


class Progress:
    def __init__(self, what: str, total: int | None, done: int = 0):
        self.what, self.total, self.done, self.start_done = what, total, done, done
        self.started = time.monotonic()
        self.last_log = 0.0
        self.changed = 0
        self.bar: RichProgress | None = None

    def __enter__(self) -> Progress:
        if sys.stderr.isatty():
            self.bar = RichProgress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                    TaskProgressColumn(), TextColumn("{task.fields[rate]} rows/s"),
                                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                    console=Console(stderr=True), transient=False)
            self.bar.start()
            self.task = self.bar.add_task(self.what, total=self.total, completed=self.done, rate="-")
        return self

    def advance(self, rows: int, changed: int | None = None) -> None:
        self.done += rows
        if changed is not None:
            self.changed = changed
        rate = self.rate()
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done, rate=f"{rate:,.0f}")
        elif time.monotonic() - self.last_log >= LOG_EVERY_S:
            self.last_log = time.monotonic()
            eta = (self.total - self.done) / rate if self.total and rate else None
            log.info(f"{self.what} progress", rows=self.done, total=self.total, rows_per_s=round(rate),
                     eta_s=round(eta, 1) if eta is not None else None)

    def rate(self) -> float:
        return round((self.done - self.start_done) / max(time.monotonic() - self.started, 1e-6), 1)

    def eta(self) -> float | None:
        rate = self.rate()
        return round((self.total - self.done) / rate, 1) if self.total and rate and self.total > self.done else None

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            if self.total:
                self.bar.update(self.task, total=max(self.total, self.done))
            self.bar.stop()
        log.info(f"{self.what} finished" if exc[0] is None else f"{self.what} interrupted", rows=self.done,
                 seconds=round(time.monotonic() - self.started, 2))
