"""Shared fixtures: a real PostgreSQL per available major, and a fresh database per test.

PG_MAJORS=18 (comma-separated) restricts the majors; DATABASE_URL replaces them all.
"""

import os
import secrets

import pytest

from orchestrator.lab import server  # noqa: E402


def _server_params() -> list:
    if os.environ.get("DATABASE_URL"):
        return [pytest.param(("external", None), id="external")]
    wanted = {int(m) for m in os.environ.get("PG_MAJORS", "").replace(",", " ").split()}
    emb = server.embedded_major()
    candidates = [(emb, ("embedded", None))]
    candidates += [(m, ("binaries", d)) for m, d in sorted(server.find_pg_bin_dirs().items(), reverse=True) if m != emb]
    return [pytest.param(spec, id=f"pg{m}") for m, spec in candidates if not wanted or m in wanted]


@pytest.fixture(scope="session", params=_server_params())
def pg_server(request):
    kind, bin_dir = request.param
    if kind == "external":
        srv = server.provide()
    elif kind == "embedded":
        srv = server.start_embedded()
    else:
        srv = server.start_binaries(bin_dir=bin_dir)
    yield srv
    srv.stop()


@pytest.fixture
def dsn(pg_server):
    """A fresh, empty database on pg_server, dropped after the test."""
    name = f"t_{secrets.token_hex(6)}"
    url = server.create_database(pg_server.dsn, name)
    yield url
    server.drop_database(pg_server.dsn, name)
