"""Connections, secret redaction and the classification of errors worth retrying."""

from __future__ import annotations

import os
import re
import socket

import psycopg
from psycopg import errors as pgerr
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from .errors import BadInput

APP_NAME = "orchestrator"

# Errors that say "try again later" rather than "this is wrong": the statement did nothing.
TRANSIENT = (
    pgerr.LockNotAvailable,  # lock_timeout
    pgerr.DeadlockDetected,
    pgerr.SerializationFailure,
    pgerr.QueryCanceled,  # statement_timeout
    pgerr.AdminShutdown,  # pg_terminate_backend
    pgerr.ObjectInUse,  # CREATE INDEX CONCURRENTLY racing another
)


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, TRANSIENT):
        return True
    # A lost connection surfaces as a bare OperationalError with no SQLSTATE.
    return isinstance(exc, psycopg.OperationalError) and getattr(exc, "sqlstate", None) in (None, "08006", "08003")


def secrets_of(dsn: str | None) -> list[str]:
    """Every password that may leak into a message: the DSN's and PGPASSWORD."""
    found = [os.environ.get("PGPASSWORD", "")]
    if dsn:
        try:
            found.append(conninfo_to_dict(dsn).get("password") or "")
        except psycopg.ProgrammingError:  # unparseable: still find what looks like a password
            found += re.findall(r"^\w+://[^:@/]*:([^@]*)@", dsn) + re.findall(r"password\s*=\s*'?([^'\s]*)", dsn)
    return [s for s in found if s]


def redact(text: str, secrets: list[str]) -> str:
    for s in secrets:
        text = text.replace(s, "***")
    return text


def safe_dsn(dsn: str) -> str:
    """The DSN as it can be shown to people: without the password."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "<unparseable DSN>"
    if params.pop("password", None) is not None:
        params["password"] = "***"
    return make_conninfo(**params)


def connect(dsn: str, *, role: str = "main") -> psycopg.Connection:
    """An autocommit connection; transactions are always explicit (`with conn.transaction()`)."""
    name = f"{APP_NAME}:{role}:{socket.gethostname()}:{os.getpid()}"[:63]
    try:
        return psycopg.connect(dsn, autocommit=True, application_name=name, connect_timeout=10)
    except psycopg.ProgrammingError as err:
        text = str(err).replace(dsn, "<the DSN>")
        raise BadInput(f"invalid DSN: {redact(text, secrets_of(dsn)).splitlines()[0]}",
                       hint="check --dsn / DATABASE_URL") from None
    except psycopg.OperationalError as err:
        first = redact(str(err), secrets_of(dsn)).strip().splitlines()[0] if str(err).strip() else "connection failed"
        raise BadInput(f"cannot connect to {safe_dsn(dsn)}: {first}",
                       hint="check --dsn / DATABASE_URL") from None
