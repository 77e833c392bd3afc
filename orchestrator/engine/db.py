"""Connections, secret redaction and the classification of errors worth retrying."""

from __future__ import annotations

import os
import re
import socket
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import errors as pgerr
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from orchestrator.engine.errors import BadInput

if TYPE_CHECKING:
    from psycopg.abc import Params, QueryNoTemplate  # QueryNoTemplate: psycopg >= 3.3's name for a plain query

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
            found.append(str(conninfo_to_dict(dsn).get("password") or ""))
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
    return make_conninfo("", **params)


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


def one(conn: psycopg.Connection | psycopg.Cursor, query: QueryNoTemplate,
        params: Params | None = None) -> tuple[Any, ...]:
    """The first row of a query that always returns one (SELECT EXISTS, SHOW, an aggregate, ...)."""
    row = conn.execute(query, params).fetchone()
    if row is None:
        text = query if isinstance(query, str) else query.decode() if isinstance(query, bytes) else \
            query.as_string(conn)
        raise RuntimeError(f"expected a row, got none: {' '.join(text.split())[:200]}")
    return row


def scalar(conn: psycopg.Connection | psycopg.Cursor, query: QueryNoTemplate, params: Params | None = None) -> Any:
    """The first column of one(...): the value of a query that always returns a row."""
    return one(conn, query, params)[0]


def sqlalchemy_url(dsn: str):
    """A libpq URL or key=value DSN as a SQLAlchemy URL on the psycopg (3) driver."""
    from sqlalchemy.engine import URL, make_url

    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", dsn):
        url = make_url(dsn)
        if url.get_backend_name() != "postgresql":
            raise BadInput(f"not a PostgreSQL URL: {url.render_as_string(hide_password=True)}")
        return url.set(drivername="postgresql+psycopg")
    try:
        params = {k: str(v) for k, v in conninfo_to_dict(dsn).items()}
    except psycopg.ProgrammingError as err:
        raise BadInput(f"invalid DSN: {str(err).splitlines()[0]}") from None
    host, port = params.pop("host", None), params.pop("port", None)
    query = {}
    if host and (host.startswith("/") or "," in host):
        query["host"] = host
        host = None
    if port and not host:
        query["port"] = port
        port = None
    query.update({k: v for k, v in params.items() if k not in ("user", "password", "dbname")})
    return URL.create("postgresql+psycopg", username=params.get("user"), password=params.get("password"),
                      host=host, port=int(port) if port else None, database=params.get("dbname"), query=query)


def libpq_dsn(url) -> str:
    """A SQLAlchemy URL (any PostgreSQL driver) as the libpq URL psycopg and the orchestrator take."""
    from sqlalchemy.engine import make_url

    url = make_url(url) if isinstance(url, str) else url
    return url.set(drivername="postgresql").render_as_string(hide_password=False)
