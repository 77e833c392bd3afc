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

# The package, by what it does (each module imports only those before it):
#   steps.py    revision ids, the fingerprint, the chain of steps, the target revision, the branch's Anchor
#   files.py    rendering a step, the files on disk, generate and check
#   runtime.py  inside Alembic: -x arguments, database_url, version table options, the revision bodies
#   sync.py     the version table kept on the orchestrator's state, reconcile, alembic_status, and the
#               runner listener (importing this package registers it)
# Generated revision files do `from orchestrator import revisions as ec` and call ec.upgrade / ec.downgrade,
# env.py calls ec.database_url / ec.version_table_options / ec.reconcile: every name stays importable here.

from orchestrator.revisions.files import (
    GENERATED_BY,
    GeneratedFile,
    GenerateResult,
    check,
    expected_files,
    generate,
    project_root,
    read_generated,
    relative_playbook_path,
    render,
)
from orchestrator.revisions.runtime import (
    VERSION_TABLE,
    database_url,
    downgrade,
    upgrade,
    version_table_options,
    x_arguments,
)
from orchestrator.revisions.steps import (
    CONTRACT,
    EXPAND,
    PREFIX,
    Anchor,
    Step,
    chain,
    playbook_anchor,
    resolve_anchor,
    revision_fingerprint,
    revision_id,
    target_index,
    target_revision,
)
from orchestrator.revisions.sync import (
    SYNC_LOCK_TIMEOUT,
    SyncResult,
    alembic_status,
    chains_in_script,
    config_path,
    find_config,
    read_phases,
    reconcile,
    sync_alembic_version,
    sync_chain,
)
from orchestrator.revisions.sync import (
    _after_command as _after_command,  # the runner listener (tests check it is registered once)
)

__all__ = [
    "CONTRACT", "EXPAND", "GENERATED_BY", "PREFIX", "SYNC_LOCK_TIMEOUT", "VERSION_TABLE",
    "Anchor", "GenerateResult", "GeneratedFile", "Step", "SyncResult",
    "alembic_status", "chain", "chains_in_script", "check", "config_path", "database_url", "downgrade",
    "expected_files", "find_config", "generate", "playbook_anchor", "project_root", "read_generated",
    "read_phases", "reconcile", "relative_playbook_path", "render", "resolve_anchor", "revision_fingerprint",
    "revision_id", "sync_alembic_version", "sync_chain", "target_index", "target_revision", "upgrade",
    "version_table_options", "x_arguments",
]
