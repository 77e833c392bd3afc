"""What runs inside Alembic: env.py's `-x` arguments, database URL and version table options, and the bodies
of the generated revisions (`upgrade` / `downgrade`), which run their phase through the orchestrator."""

from __future__ import annotations

import logging
import os
from contextvars import ContextVar
from pathlib import Path

from orchestrator.console import local
from orchestrator.engine.db import libpq_dsn, sqlalchemy_url
from orchestrator.engine.errors import BadInput, OrchestratorError
from orchestrator.engine.playbook import Playbook, load
from orchestrator.revisions.files import project_root
from orchestrator.revisions.steps import CONTRACT, EXPAND, revision_fingerprint
from orchestrator.run.runner import Orchestrator

log = logging.getLogger("orchestrator.revisions")

VERSION_TABLE = "alembic_version"

# Set while a revision's upgrade()/downgrade() drives the orchestrator: Alembic records that step itself,
# so the runner's sync must stay out of its way (it would make Alembic's own version UPDATE match no row).
_IN_ALEMBIC: ContextVar[bool] = ContextVar("orchestrator_in_alembic", default=False)


# -- URLs ---------------------------------------------------------------------------------------------------
def x_arguments(config) -> dict[str, str]:
    """Alembic's `-x key=value` options."""
    out = {}
    for item in (getattr(getattr(config, "cmd_opts", None), "x", None) or []):
        key, _, value = item.partition("=")
        out[key.strip()] = value.strip()
    return out


def database_url(config) -> str:
    """For env.py: `-x dsn=...`, else config.attributes['dsn'], else $DATABASE_URL, else sqlalchemy.url.

    `-x dsn=demo` is the local embedded demo server that `orchestrator demo` / `make demo-db` set up.
    """
    x = x_arguments(config)
    dsn = x.get("dsn") or config.attributes.get("dsn") or os.environ.get("DATABASE_URL") \
        or config.get_main_option("sqlalchemy.url")
    if not dsn:
        from alembic.util import CommandError
        raise CommandError("no database: pass `-x dsn=postgresql://...`, set DATABASE_URL, or set sqlalchemy.url "
                           "in alembic.ini (`-x dsn=demo`: the local demo server)")
    if dsn == "demo":
        dsn = local.demo_dsn()
    return sqlalchemy_url(dsn).render_as_string(hide_password=False)


def version_table_options(config) -> dict:
    """version_table / version_table_schema from alembic.ini, shared by env.py and the sync."""
    opts = {"version_table": VERSION_TABLE}
    if config is not None:
        opts["version_table"] = config.get_main_option("version_table") or VERSION_TABLE
        schema = config.get_main_option("version_table_schema")
        if schema:
            opts["version_table_schema"] = schema
    return opts


# -- the revision bodies ------------------------------------------------------------------------------------
def upgrade(playbook: str, playbook_name: str, fingerprint: str, action: str, phase: int) -> None:
    _apply(playbook, playbook_name, fingerprint, action, phase, up=True)


def downgrade(playbook: str, playbook_name: str, fingerprint: str, action: str, phase: int) -> None:
    _apply(playbook, playbook_name, fingerprint, action, phase, up=False)


def _apply(playbook: str, playbook_name: str, fingerprint: str, action: str, phase: int, *, up: bool) -> None:
    from alembic import context, op
    from alembic.util import CommandError

    what = f"{playbook_name} {'phase' if action == EXPAND else 'contract'} {phase}"
    mctx = op.get_context()
    if mctx.as_sql:
        raise CommandError(f"{what}: offline (--sql) mode is not supported; the orchestrator runs each phase "
                           f"against the live database in short, retried transactions (see `orchestrator plan`)")
    try:
        root = project_root(Path(context.script.dir))
    except Exception:  # called outside an Alembic environment
        root = Path.cwd()
    pb = _load_checked(root / playbook, playbook_name, fingerprint, what)
    dsn = libpq_dsn(op.get_bind().engine.url)

    token = _IN_ALEMBIC.set(True)
    try:
        # Commit Alembic's transaction and leave its connection idle in autocommit: it must hold no lock while
        # the orchestrator's own connections take theirs (short lock_timeout, retries, CONCURRENTLY builds).
        with mctx.autocommit_block():
            orch = Orchestrator(pb, dsn)
            try:
                if action == CONTRACT and up:
                    result = orch.contract(phase)[0]
                elif up:
                    result = orch.run(phase)
                else:
                    result = orch.rollback(phase)
            finally:
                orch.close()
        log.info("%s: %s", what, result)
    except OrchestratorError as err:
        raise CommandError(f"{what}: {err.one_line()}") from err
    finally:
        _IN_ALEMBIC.reset(token)


def _load_checked(path: Path, name: str, fingerprint: str, what: str) -> Playbook:
    from alembic.util import CommandError

    try:
        pb = load(path)
    except BadInput as err:
        raise CommandError(f"{what}: {err.one_line()}") from err
    if pb.name != name:
        raise CommandError(f"{what}: {path} is playbook {pb.name!r}, not {name!r}")
    if revision_fingerprint(pb) != fingerprint:
        raise CommandError(f"{what}: {path} was edited after its revisions were generated (revision fingerprint "
                           f"{fingerprint}, playbook {revision_fingerprint(pb)}) -> orchestrator revisions check; "
                           f"orchestrator revisions generate --playbook {path}")
    return pb


