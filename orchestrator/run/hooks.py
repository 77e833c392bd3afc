"""Hooks: the playbook's executables, run on phase start, success, failure and backfill progress.

Details travel in ORCH_* environment variables, as gh-ost does, so a hook can be any script that posts to
chat or pages someone. A failing hook is logged and ignored unless the playbook sets hooks.fail_on_error.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time

import structlog

from orchestrator.engine.errors import Failure
from orchestrator.engine.playbook import Playbook

log = structlog.get_logger()
EVENTS = ("on_start", "on_success", "on_failure", "on_progress")


class Hooks:
    def __init__(self, pb: Playbook, database: str):
        self.pb, self.spec, self.database = pb, pb.hooks, database
        self._last_progress = 0.0

    def fire(self, event: str, **details) -> None:
        commands = getattr(self.spec, event)
        if not commands:
            return
        env = {**os.environ, **self._variables(event, details)}
        for command in commands:
            argv = shlex.split(command)
            try:
                done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=self.spec.timeout_s)
                problem = None if done.returncode == 0 else f"exit {done.returncode}: {done.stderr.strip()[:200]}"
            except (OSError, subprocess.TimeoutExpired) as err:
                problem = f"{type(err).__name__}: {err}"
            if problem is None:
                continue
            log.warning("hook failed", hook=command, hook_event=event, problem=problem)
            if self.spec.fail_on_error and event != "on_failure":
                raise Failure(f"hook {command!r} ({event}) failed: {problem}",
                              hint="fix the hook or set hooks.fail_on_error: false, then re-run")

    def progress(self, **details) -> None:
        """Rate-limited on_progress, called from long loops."""
        if not self.spec.on_progress or time.monotonic() - self._last_progress < self.spec.progress_every_s:
            return
        self._last_progress = time.monotonic()
        self.fire("on_progress", **details)

    def _variables(self, event: str, details: dict) -> dict[str, str]:
        out = {"ORCH_EVENT": event.removeprefix("on_"), "ORCH_PLAYBOOK": self.pb.name,
               # Every table and column of the playbook (comma-separated); backfill progress names its own.
               "ORCH_TABLE": ",".join(f"{m.table.schema_}.{m.table.name}" for m in self.pb.migrations),
               "ORCH_COLUMN": ",".join(m.column.name for m in self.pb.migrations),
               "ORCH_ENV": self.pb.env or "", "ORCH_DATABASE": self.database}
        for key, value in details.items():
            out[f"ORCH_{key.upper()}"] = "" if value is None else str(value)
        return out
