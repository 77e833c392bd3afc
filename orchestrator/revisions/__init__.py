"""Alembic-native playbooks: every phase is a real Alembic revision, generated from the playbook.

The chain of a playbook with N phases is 2N revisions, in this order:

    phase 1 .. phase N        upgrade = `orchestrator run n`,      downgrade = `orchestrator rollback n`
    contract 1 .. contract N  upgrade = `orchestrator contract n`, downgrade = `orchestrator rollback n` (the undo
                              of that contract step: for the swap, an online reverse migration)

Revision ids are stable hashes of (playbook name, step), so regenerating the files is a no-op and the
orchestrator can name a phase's revision from the playbook alone.

Two ledgers, kept equal:
  * the orchestrator's state table (`_orchestrator.phases`) is the source of truth;
  * Alembic's version table follows it. A revision run by Alembic runs its phase through the orchestrator
    (idempotent: a phase the CLI already ran is only recorded). A phase run by the CLI moves the version
    table right away (`sync_alembic_version`, which this module registers in `runner.COMMAND_LISTENERS` at
    import: the runner itself knows nothing of Alembic), and env.py reconciles every generated
    chain with the state before Alembic reads its version table (`reconcile`), so `alembic upgrade +1` after
    `orchestrator run 1` runs phase 2 even where the runner could not sync.

The version table is only ever moved with Alembic's own bookkeeping (`HeadMaintainer` over `RevisionStep`s),
the way `alembic upgrade`/`downgrade` would move it, so a playbook's branch may sit beside an application's
history: its own branch label, and a `depends_on` on the application revision that creates the table.
"""

from __future__ import annotations

import ast
import configparser
import hashlib
import json
import logging
import os
import re
import textwrap
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, overload

import psycopg
from psycopg import sql

from orchestrator.console import local
from orchestrator.engine import db
from orchestrator.engine.db import libpq_dsn, sqlalchemy_url
from orchestrator.engine.errors import BadInput, OrchestratorError
from orchestrator.engine.playbook import Playbook, load
from orchestrator.engine.state import APPLIED, CONTRACTED, PhaseRow, State
from orchestrator.kinds import phases_for
from orchestrator.run.runner import COMMAND_LISTENERS, Orchestrator

log = logging.getLogger("orchestrator.revisions")

PREFIX = "ec_"
GENERATED_BY = "orchestrator revisions generate"
VERSION_TABLE = "alembic_version"
EXPAND, CONTRACT = "expand", "contract"
SYNC_LOCK_TIMEOUT = "5s"  # moving the version row must never queue behind a long migration for long

# Set while a revision's upgrade()/downgrade() drives the orchestrator: Alembic records that step itself,
# so the runner's sync must stay out of its way (it would make Alembic's own version UPDATE match no row).
_IN_ALEMBIC: ContextVar[bool] = ContextVar("orchestrator_in_alembic", default=False)


# -- the chain --------------------------------------------------------------------------------------------
def revision_id(playbook_name: str, action: str, phase: int) -> str:
    """Stable id of one step: the same playbook name and step always give the same revision."""
    digest = hashlib.sha256(f"pg-expand-contract\x00{playbook_name}\x00{action}\x00{phase}".encode()).hexdigest()
    return PREFIX + digest[:10]


def revision_fingerprint(pb: Playbook) -> str:
    """Hash of what the playbook file says (the fields it sets, as validated; not the description).

    Unlike `Playbook.fingerprint()` it does not move when a later version of the tool adds a setting with a
    default, so generated files only go stale when someone edits the playbook.
    """
    body = pb.model_dump(mode="json", by_alias=True, exclude_unset=True, exclude={"description"})
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Step:
    seq: int  # 1-based position in the chain
    action: str  # expand | contract
    phase: int
    phase_name: str
    revision: str
    down_revision: str | None
    message: str
    upgrade_doc: str
    downgrade_doc: str
    locks_doc: str
    filename: str


def chain(pb: Playbook) -> list[Step]:
    """The playbook's revisions in order: every phase's expand step, then every contract step."""
    phases = phases_for(pb.kind)
    steps: list[Step] = []
    down = None
    for action in (EXPAND, CONTRACT):
        for p in phases:
            rev = revision_id(pb.name, action, p.number)
            seq = len(steps) + 1
            if action == EXPAND:
                message = f"{pb.name} phase {p.number}: {p.title}"
                up = f"orchestrator run {p.number}: {p.expand_doc}"
                back = f"orchestrator rollback {p.number}: {p.rollback_doc}"
                filename = f"{pb.name}_{seq:02d}_phase{p.number}_{p.name}.py"
            else:
                message = f"{pb.name} contract {p.number} ({p.name}): {p.contract_doc}"
                up = f"orchestrator contract {p.number}: {p.contract_doc}"
                back = f"orchestrator rollback {p.number} (after the contract): {p.uncontract_doc}"
                filename = f"{pb.name}_{seq:02d}_contract{p.number}_{p.name}.py"
            steps.append(Step(seq, action, p.number, p.name, rev, down, message, up, back, p.locks_doc, filename))
            down = rev
    return steps


def target_index(phases: dict[int, PhaseRow] | None, n_phases: int) -> int:
    """Position in the chain that the orchestrator's state stands for: -1 (nothing applied) .. 2N-1."""
    rows = phases or {}
    statuses = [rows[k].status if k in rows else None for k in range(1, n_phases + 1)]
    contracted = _leading(statuses, {CONTRACTED})
    if contracted:
        return n_phases - 1 + contracted
    return _leading(statuses, {APPLIED}) - 1


def _leading(statuses: list, wanted: set) -> int:
    n = 0
    for s in statuses:
        if s not in wanted:
            break
        n += 1
    return n


def target_revision(pb: Playbook, phases: dict[int, PhaseRow] | None) -> str | None:
    steps = chain(pb)
    i = target_index(phases, len(steps) // 2)
    return steps[i].revision if i >= 0 else None


# -- where the branch hangs: its own label, and what it depends on -----------------------------------------
@dataclass(frozen=True)
class Anchor:
    branch_label: str
    depends_on: tuple[str, ...] = ()


def playbook_anchor(pb: Playbook) -> dict:
    """`alembic: {branch_label, depends_on}` from the playbook, when the playbook model has that section."""
    spec = getattr(pb, "alembic", None)
    if spec is None:
        return {}
    out: dict[str, Any] = {}
    label = getattr(spec, "branch_label", None)
    if label:
        out["branch_label"] = label
    deps = getattr(spec, "depends_on", None)
    if deps:
        out["depends_on"] = tuple([deps] if isinstance(deps, str) else deps)
    return out


def resolve_anchor(pb: Playbook, existing: dict | None = None, *, branch_label: str | None = None,
                   depends_on: Iterable[str] | None = None) -> Anchor:
    """Command line, else the playbook's `alembic:` section, else what the files already say, else defaults."""
    from_pb = playbook_anchor(pb)
    existing = existing or {}
    label = branch_label or from_pb.get("branch_label") or existing.get("branch_label") or pb.name
    deps = tuple(depends_on or ()) or from_pb.get("depends_on") or existing.get("depends_on") or ()
    for d in deps:
        if not re.fullmatch(r"[A-Za-z0-9_.@+-]+", d):
            raise BadInput(f"depends_on {d!r} is not an Alembic revision id or branch label")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", label):
        raise BadInput(f"branch label {label!r}: use letters, digits, '_', '.', '-'")
    return Anchor(label, tuple(deps))


# -- rendering ----------------------------------------------------------------------------------------------
_TEMPLATE = '''\
"""{message}

{what}
  upgrade:   {upgrade_doc}
  downgrade: {downgrade_doc}
  locks:     {locks_doc}

Generated by `orchestrator revisions generate` from {playbook}; do not edit:
`orchestrator revisions check` fails when this file and the playbook disagree.

Revision ID: {revision}
Revises:{revises}
"""

from orchestrator import revisions as ec

# revision identifiers, used by Alembic.
revision = {revision!r}
down_revision = {down_revision!r}
branch_labels = {branch_labels!r}
depends_on = {depends_on!r}

GENERATED_BY = {generated_by!r}
PLAYBOOK = {playbook!r}
PLAYBOOK_NAME = {playbook_name!r}
FINGERPRINT = {fingerprint!r}
ACTION = {action!r}
PHASE = {phase!r}


def upgrade() -> None:
    ec.upgrade(PLAYBOOK, PLAYBOOK_NAME, FINGERPRINT, ACTION, PHASE)


def downgrade() -> None:
    ec.downgrade(PLAYBOOK, PLAYBOOK_NAME, FINGERPRINT, ACTION, PHASE)
'''


def _doc_text(text: str, indent: int = 13) -> str:
    """Text that is safe inside a docstring: no backslashes or triple quotes, wrapped."""
    text = " ".join(text.replace("\\", "/").replace('"""', "'''").split())
    pad = " " * indent
    return textwrap.fill(text, width=110, initial_indent=pad, subsequent_indent=pad).lstrip() if text else ""


def render(pb: Playbook, playbook_path: str, step: Step, anchor: Anchor) -> str:
    root = step.down_revision is None
    what = (f"Phase {step.phase} ({step.phase_name}) of the playbook, run through the orchestrator."
            if step.action == EXPAND else
            f"Contract step of phase {step.phase} ({step.phase_name}): ends the rollback window of that phase.")
    return _TEMPLATE.format(
        message=_doc_text(step.message, 0).replace("\n", " "), what=what,
        upgrade_doc=_doc_text(step.upgrade_doc), downgrade_doc=_doc_text(step.downgrade_doc),
        locks_doc=_doc_text(step.locks_doc), playbook=_doc_text(playbook_path),
        revision=step.revision, revises=f" {step.down_revision}" if step.down_revision else "", down_revision=step.down_revision,
        branch_labels=(anchor.branch_label,) if root else None,
        depends_on=(anchor.depends_on if len(anchor.depends_on) != 1 else anchor.depends_on[0])
        if root and anchor.depends_on else None,
        generated_by=GENERATED_BY, playbook_name=pb.name, fingerprint=revision_fingerprint(pb),
        action=step.action, phase=step.phase)


# -- the files on disk --------------------------------------------------------------------------------------
@dataclass
class GeneratedFile:
    path: Path
    text: str
    values: dict  # module-level constants (revision, PLAYBOOK, ...)


def read_generated(versions_dir: Path) -> list[GeneratedFile]:
    """Files in versions_dir written by `revisions generate` (any playbook)."""
    out: list[GeneratedFile] = []
    if not versions_dir.is_dir():
        return out
    for path in sorted(versions_dir.glob("*.py")):
        text = path.read_text(encoding="utf-8")
        if GENERATED_BY not in text:
            continue
        values = _module_constants(text)
        if values.get("GENERATED_BY") == GENERATED_BY:
            out.append(GeneratedFile(path, text, values))
    return out


def _module_constants(text: str) -> dict:
    values: dict = {}
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return values
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                values[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return values


def _existing_anchor(files: list[GeneratedFile]) -> dict:
    for f in files:
        if f.values.get("down_revision") is None:
            out: dict[str, Any] = {}
            labels = f.values.get("branch_labels")
            if labels:
                out["branch_label"] = labels if isinstance(labels, str) else labels[0]
            deps = f.values.get("depends_on")
            if deps:
                out["depends_on"] = (deps,) if isinstance(deps, str) else tuple(deps)
            return out
    return {}


def project_root(script_dir: Path) -> Path:
    """The directory playbook paths in revision files are relative to: the one holding the script directory."""
    return Path(script_dir).resolve().parent


def relative_playbook_path(playbook_path: str | Path, script_dir: Path) -> str:
    return Path(os.path.relpath(Path(playbook_path).resolve(), project_root(script_dir))).as_posix()


def expected_files(pb: Playbook, playbook_path: str | Path, script_dir: Path, *,
                   branch_label: str | None = None, depends_on: Iterable[str] | None = None) -> dict[Path, str]:
    versions = Path(script_dir) / "versions"
    mine = [f for f in read_generated(versions) if f.values.get("PLAYBOOK_NAME") == pb.name]
    anchor = resolve_anchor(pb, _existing_anchor(mine), branch_label=branch_label, depends_on=depends_on)
    rel = relative_playbook_path(playbook_path, script_dir)
    return {versions / s.filename: render(pb, rel, s, anchor) for s in chain(pb)}


@dataclass
class GenerateResult:
    written: list[Path] = field(default_factory=list)
    unchanged: list[Path] = field(default_factory=list)
    removed: list[Path] = field(default_factory=list)


def generate(playbook_path: str | Path, script_dir: str | Path = "revisions", *, branch_label: str | None = None,
             depends_on: Iterable[str] | None = None) -> GenerateResult:
    """Write (or rewrite) the playbook's revision files; files already right are left untouched."""
    pb = load(playbook_path)
    script_dir = Path(script_dir)
    if not (script_dir / "env.py").is_file():
        raise BadInput(f"{script_dir} is not an Alembic script directory (no env.py)",
                       hint="create it with `alembic init`, or pass --dir")
    versions = script_dir / "versions"
    versions.mkdir(exist_ok=True)
    want = expected_files(pb, playbook_path, script_dir, branch_label=branch_label, depends_on=depends_on)
    _refuse_clashes(pb, want, versions)
    res = GenerateResult()
    for path, text in want.items():
        if path.is_file() and path.read_text(encoding="utf-8") == text:
            res.unchanged.append(path)
            continue
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
        res.written.append(path)
    for f in read_generated(versions):
        if f.values.get("PLAYBOOK_NAME") == pb.name and f.path not in want:
            f.path.unlink()
            res.removed.append(f.path)
    return res


def _refuse_clashes(pb: Playbook, want: dict[Path, str], versions: Path) -> None:
    for f in read_generated(versions):
        other = f.values.get("PLAYBOOK_NAME")
        if other != pb.name and f.path in want:
            raise BadInput(f"{f.path} belongs to playbook {other!r}; two playbooks cannot share a name prefix")


def check(script_dir: str | Path = "revisions", playbook_paths: Iterable[str | Path] | None = None) -> list[str]:
    """Every way the revision files and the playbooks disagree (empty when they agree)."""
    script_dir = Path(script_dir)
    versions = script_dir / "versions"
    files = read_generated(versions)
    root = project_root(script_dir)
    problems: list[str] = []
    if playbook_paths:
        targets = [Path(p) for p in playbook_paths]
    else:
        targets = sorted({root / f.values["PLAYBOOK"] for f in files if isinstance(f.values.get("PLAYBOOK"), str)})
        if not targets:
            return [f"{versions}: no revision files generated from a playbook (orchestrator revisions generate)"]
    for path in targets:
        try:
            pb = load(path)
        except BadInput as err:
            problems.append(err.one_line())
            continue
        mine = {f.path: f for f in files if f.values.get("PLAYBOOK_NAME") == pb.name}
        try:
            want = expected_files(pb, path, script_dir)
        except BadInput as err:
            problems.append(err.one_line())
            continue
        fp = revision_fingerprint(pb)
        hint = f"orchestrator revisions generate --playbook {relative_playbook_path(path, script_dir)}"
        for p, text in want.items():
            have = mine.get(p)
            if have is None:
                problems.append(f"{p}: missing ({pb.name} {_step_of(text)}) -> {hint}")
            elif have.text != text:
                old = have.values.get("FINGERPRINT")
                why = (f"the playbook was edited after the file was generated (file fingerprint {old}, "
                       f"playbook {fp})" if old != fp else "differs from what the playbook generates")
                problems.append(f"{p}: {why} -> {hint}")
        for p in sorted(set(mine) - set(want)):
            problems.append(f"{p}: stale, {pb.name} has no such step any more -> {hint}")
    return problems


def _step_of(text: str) -> str:
    v = _module_constants(text)
    return f"{'phase' if v.get('ACTION') == EXPAND else 'contract'} {v.get('PHASE')}"


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
