"""structlog set-up: readable lines on a terminal, JSON lines otherwise, never a password."""

from __future__ import annotations

import logging
import sys
from typing import TextIO, cast

import structlog
from structlog.typing import EventDict, WrappedLogger

from orchestrator.engine.db import redact, secrets_of


class _CurrentStderr:
    """sys.stderr as it is when a line is written, not when logging was configured: a CLI run in-process (a test,
    an embedding tool) would otherwise leave every later log line writing to its since-closed stream."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure(*, json: bool | None = None, dsn: str | None = None, level: str = "info",
              secrets: list[str] | None = None) -> None:
    secrets = secrets_of(dsn) + list(secrets or [])  # `secrets`: e.g. every target's password (fleet)

    def scrub(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
        if secrets:
            for k, v in event.items():
                if isinstance(v, str):
                    event[k] = redact(v, secrets)
        return event

    as_json = (not sys.stderr.isatty()) if json is None else json
    renderer = structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer(
        colors=sys.stderr.isatty())
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso", utc=True), scrub, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=cast(TextIO, _CurrentStderr())),
        cache_logger_on_first_use=False,
    )
