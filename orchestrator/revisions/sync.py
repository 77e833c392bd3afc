"""Alembic's version table kept on the orchestrator's state: moving a playbook's branch (`sync_chain`), after
each CLI command (`sync_alembic_version`, registered in `runner.COMMAND_LISTENERS` when this module is imported)
and from env.py (`reconcile`), and the version-table half of `status` (`alembic_status`)."""

from __future__ import annotations

import configparser
import logging
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, overload

import psycopg
from psycopg import sql

from orchestrator.engine import db
from orchestrator.engine.db import sqlalchemy_url
from orchestrator.engine.errors import BadInput
from orchestrator.engine.playbook import Playbook, load
from orchestrator.engine.state import PhaseRow, State
from orchestrator.revisions.files import GENERATED_BY, project_root
from orchestrator.revisions.runtime import _IN_ALEMBIC, VERSION_TABLE, version_table_options, x_arguments
from orchestrator.revisions.steps import chain, target_index, target_revision
from orchestrator.run.runner import COMMAND_LISTENERS, Orchestrator

log = logging.getLogger("orchestrator.revisions")

SYNC_LOCK_TIMEOUT = "5s"  # moving the version row must never queue behind a long migration for long


# -- keeping the version table on the orchestrator's state --------------------------------------------------
@dataclass
class SyncResult:
    playbook: str
    before: str | None
    after: str | None

    @property
    def changed(self) -> bool:
        return self.before != self.after

    def __str__(self) -> str:
        if not self.changed:
            return f"{self.playbook}: alembic revision {self.after or 'base'} (already in sync)"
        return f"{self.playbook}: alembic revision {self.before or 'base'} -> {self.after or 'base'}"


def config_path(path: str | Path | None = None) -> Path | None:
    """The Alembic config file: the path given, else $ALEMBIC_CONFIG, else ./alembic.ini (Alembic's lookup)."""
    for candidate in (path, os.environ.get("ALEMBIC_CONFIG"), "alembic.ini"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def find_config(path: str | Path | None = None):
    """That file as an Alembic Config, or None."""
    found = config_path(path)
    if found is None:
        return None
    from alembic.config import Config

    return Config(str(found))


def _ini_version_options(path: Path) -> dict:
    """version_table options read straight from the ini: status and the runner's quick path need no Alembic."""
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read(path, encoding="utf-8")
        section = parser["alembic"] if parser.has_section("alembic") else {}
    except (configparser.Error, UnicodeDecodeError):
        section = {}
    opts = {"version_table": section.get("version_table") or VERSION_TABLE}
    if section.get("version_table_schema"):
        opts["version_table_schema"] = section["version_table_schema"]
    return opts


def _script_has_chain(script, pb: Playbook) -> bool:
    try:
        return all(script.get_revision(s.revision) is not None for s in chain(pb))
    except Exception:  # alembic raises ResolutionError / CommandError for unknown ids
        return False


@overload
def sync_chain(connection, script, pb: Playbook, phases: dict[int, PhaseRow] | None,
               opts: dict | None = None, *, create: Literal[True] = True) -> SyncResult: ...
@overload
def sync_chain(connection, script, pb: Playbook, phases: dict[int, PhaseRow] | None,
               opts: dict | None = None, *, create: bool) -> SyncResult | None: ...
def sync_chain(connection, script, pb: Playbook, phases: dict[int, PhaseRow] | None,
               opts: dict | None = None, *, create: bool = True) -> SyncResult | None:
    """Move the playbook's branch in the version table to where the orchestrator's state says it is.

    `connection` is a SQLAlchemy connection inside a transaction the caller commits. Each step is recorded
    with Alembic's own HeadMaintainer, exactly as `alembic upgrade/downgrade` would, without running it.
    With create=False a database without a version table is left alone (None).
    """
    from alembic.runtime.migration import HeadMaintainer, MigrationContext, RevisionStep
    from alembic.util import CommandError

    steps = chain(pb)
    ids = [s.revision for s in steps]
    with _quiet("alembic.runtime.migration"):  # its "Context impl ..." lines belong to Alembic's own run
        mctx = MigrationContext.configure(connection, opts=dict(opts or {"version_table": VERSION_TABLE}))
    heads = mctx.get_current_heads()
    ours = [h for h in heads if h in ids]
    if len(ours) > 1:
        raise CommandError(f"{pb.name}: the version table lists {len(ours)} revisions of one linear chain "
                           f"({', '.join(ours)}); fix it with `alembic stamp`")
    current = ours[0] if ours else None
    target_i = target_index(phases, len(steps) // 2)
    target = ids[target_i] if target_i >= 0 else None
    if current == target:
        return SyncResult(pb.name, current, target)
    current_i = ids.index(current) if current else -1
    revmap = script.revision_map
    if target_i > current_i:
        if current_i < 0:
            _check_dependencies(script, pb, ids[0], heads)
        todo = [RevisionStep(revmap, script.get_revision(ids[i]), True) for i in range(current_i + 1, target_i + 1)]
    else:
        todo = [RevisionStep(revmap, script.get_revision(ids[i]), False) for i in range(current_i, target_i, -1)]
    if not heads and not mctx._has_version_table():
        if not create:
            return None
        mctx._ensure_version_table()
    maintainer = HeadMaintainer(mctx, heads)
    for step in todo:
        maintainer.update_to_step(step)
    return SyncResult(pb.name, current, target)


@contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _check_dependencies(script, pb: Playbook, root_rev: str, heads: tuple) -> None:
    """Recording the branch's first step implies its depends_on is applied: refuse when Alembic says not."""
    from alembic.util import CommandError

    root = script.get_revision(root_rev)
    needed = set(root._normalized_down_revisions)  # depends_on, resolved to revision ids
    if not needed:
        return
    applied = {r.revision for r in script.revision_map._get_ancestor_nodes(script.get_revisions(heads))} \
        if heads else set()
    missing = sorted(needed - applied)
    if missing:
        raise CommandError(f"{pb.name}: its revisions depend on {', '.join(missing)}, which the version table "
                           f"does not show as applied; run `alembic upgrade {missing[0]}` first")


def read_phases(conn: psycopg.Connection, pb: Playbook) -> dict[int, PhaseRow]:
    return State(conn, pb.settings.state_schema, pb.name).phases()


def sync_alembic_version(dsn: str, pb: Playbook, phases: dict[int, PhaseRow] | None = None, *,
                         conn: psycopg.Connection | None = None, config=None, create: bool = False,
                         raise_errors: bool = False) -> SyncResult | None:
    """After the CLI ran, rolled back or contracted a phase: move Alembic's version table to match.

    A no-op (None) inside an Alembic migration (Alembic records its own step), when no Alembic config is found
    ($ALEMBIC_CONFIG, ./alembic.ini), when the database has no version table and not create (env.py's
    reconcile records the phases at the next Alembic command), or when the script directory has no revisions
    for this playbook. `conn` (optional, e.g. the runner's) answers the version-table question without a new
    connection or importing Alembic. Never raises unless raise_errors: the phase itself succeeded; a failure
    is logged with the repair command.
    """
    if _IN_ALEMBIC.get():
        return None
    try:
        if config is None:
            path = config_path()
            if path is None:
                return None
            opts = _ini_version_options(path)
        else:
            opts = version_table_options(config)
        if not create and not _has_version_table(conn if conn is not None else dsn, opts):
            return None
        from alembic.script import ScriptDirectory
        from sqlalchemy import create_engine, text
        from sqlalchemy.pool import NullPool

        cfg = config if config is not None else find_config(path)
        opts = version_table_options(cfg)
        script = ScriptDirectory.from_config(cfg)
        if not _script_has_chain(script, pb):
            return None
        engine = create_engine(sqlalchemy_url(dsn), poolclass=NullPool)
        try:
            with engine.begin() as sa_conn:
                sa_conn.execute(text("SELECT set_config('lock_timeout', :v, true)"), {"v": SYNC_LOCK_TIMEOUT})
                if phases is None:
                    raw = sa_conn.connection.driver_connection
                    if raw is None:  # never: an open SQLAlchemy connection has its driver's
                        raise RuntimeError("the SQLAlchemy connection has no psycopg connection")
                    phases = read_phases(raw, pb)
                result = sync_chain(sa_conn, script, pb, phases, opts, create=create)
        finally:
            engine.dispose()
        if result is not None and result.changed:
            log.info("%s", result)
        return result
    except Exception as err:
        if raise_errors:
            raise
        log.warning("could not move the Alembic version table to match the orchestrator (%s: %s); "
                    "repair: orchestrator revisions sync", type(err).__name__, " ".join(str(err).split())[:300])
        return None


def _version_table(opts: dict) -> sql.Identifier:
    return sql.Identifier(*(o for o in (opts.get("version_table_schema"), opts["version_table"]) if o))


def _has_version_table(dsn_or_conn, opts: dict) -> bool:
    if isinstance(dsn_or_conn, psycopg.Connection):
        conn = dsn_or_conn
        return db.scalar(conn, "SELECT to_regclass(%s) IS NOT NULL",
                               (_version_table(opts).as_string(conn),))
    with psycopg.connect(dsn_or_conn, autocommit=True, connect_timeout=10) as conn:
        return _has_version_table(conn, opts)


def chains_in_script(script) -> dict[str, str]:
    """playbook name -> playbook path (relative to the project root), for every generated chain."""
    found: dict[str, str] = {}
    for rev in script.walk_revisions():
        module = rev.module
        if getattr(module, "GENERATED_BY", None) == GENERATED_BY:
            found.setdefault(module.PLAYBOOK_NAME, module.PLAYBOOK)
    return found


def reconcile(connection, script, config=None) -> list[SyncResult]:
    """For env.py, before Alembic reads its version table: bring every generated chain in line with the
    orchestrator's state, so `alembic upgrade +1` continues from the phase the CLI ran last.
    `-x reconcile=off` skips it (Alembic then trusts its version table alone)."""
    results: list[SyncResult] = []
    if config is not None and x_arguments(config).get("reconcile", "").lower() in ("off", "false", "0", "no"):
        return results
    root = project_root(Path(script.dir))
    opts = version_table_options(config)
    for name, rel in chains_in_script(script).items():
        try:
            pb = load(root / rel)
        except BadInput as err:
            log.warning("not reconciling %s: %s", name, err.one_line())
            continue
        if pb.name != name or not _script_has_chain(script, pb):
            continue
        # A caller's connection may already be in its transaction: work inside it, else in our own.
        with (nullcontext() if connection.in_transaction() else connection.begin()):
            phases = read_phases(connection.connection.driver_connection, pb)
            result = sync_chain(connection, script, pb, phases, opts, create=True)
        if result is not None and result.changed:
            log.info("reconciled with the orchestrator's state: %s", result)
        results.append(result)
    return results


def alembic_status(conn: psycopg.Connection, pb: Playbook, phases: dict[int, PhaseRow] | None,
                   config=None) -> dict:
    """For `status`: the playbook's revision in Alembic's version table, and the one its state stands for."""
    steps = {s.revision: s for s in chain(pb)}
    expected = target_revision(pb, phases)
    if config is not None:
        opts = version_table_options(config)
    else:
        path = config_path()
        opts = _ini_version_options(path) if path is not None else {"version_table": VERSION_TABLE}
    table = _version_table(opts)
    out = {"revision": None, "message": None, "expected": expected,
           "expected_message": steps[expected].message if expected else None, "in_sync": None, "table": False}
    if not _has_version_table(conn, opts):
        return out  # no Alembic here: nothing to be in or out of sync with
    out["table"] = True
    heads = [r[0] for r in conn.execute(sql.SQL("SELECT version_num FROM {}").format(table)).fetchall()]
    ours = [h for h in heads if h in steps]
    current = ours[0] if len(ours) == 1 else None
    out.update(revision=current, message=steps[current].message if current else None,
               in_sync=len(ours) <= 1 and current == expected)
    return out


def _after_command(orch: Orchestrator) -> None:
    """The runner finished a command: Alembic's version table follows the state it wrote (a no-op inside
    `alembic upgrade`, which records the step itself)."""
    sync_alembic_version(orch.dsn, orch.pb, orch.state.phases(), conn=orch.x.conn)


COMMAND_LISTENERS.append(_after_command)
