"""Lint every phase's SQL with Squawk, exactly as it runs (with its SET LOCAL timeouts, in its transactions).

Findings the design accepts are suppressed with the reason written here; anything else is shown by
`plan` and fails the test suite, so a new unsafe statement cannot slip into a phase.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from orchestrator.engine.executor import Recorded
from orchestrator.engine.playbook import Settings


def _ours(statement: str, _before: list[str]) -> bool:
    # objects the orchestrator created itself (trigger functions, helper checks)
    return '"_ec_' in statement or '"~ec_' in statement


def _ours_or_moved(statement: str, script: list[str]) -> bool:
    """Ours, or (change_type of a key) a key or foreign key that the same transaction adds again by its name on
    the swapped column: the guarantee never lapses for any statement but ours."""
    if _ours(statement, script):
        return True
    name = statement.rsplit("DROP CONSTRAINT", 1)[-1].replace("IF EXISTS", "").strip().rstrip(";")
    return any(f"ADD CONSTRAINT {name} " in line for line in script)


def _after_validate(_statement: str, before: list[str]) -> bool:
    return any("VALIDATE CONSTRAINT" in line for line in before)


# rule -> (why the design accepts it, and when: None means always, else a check on the statement)
ACCEPTED = {
    "prefer-text-field": ("the target type is varchar(n) by requirement; the column is added new "
                          "(ADD COLUMN), never resized, so no rewrite or long lock follows", None),
    "renaming-column": ("the swap renames by design, in one short transaction under lock_timeout; stale app "
                        "instances that still write the old vocabulary are translated by the trigger", None),
    "renaming-object": ("the column's index names follow the column at the swap, in the same short transaction",
                        None),
    "prefer-robust-stmts": ("every step is guarded by a catalog check (already done -> skipped), so a re-run "
                            "after a crash is safe even where SQL has no IF [NOT] EXISTS form", None),
    "adding-not-nullable-field": ("SET NOT NULL follows a VALIDATEd CHECK (col IS NOT NULL): PostgreSQL 12+ "
                                  "skips the scan", _after_validate),
    "ban-drop-constraint": ("drops only the orchestrator's own CHECKs (_ec_*): the NOT NULL helper once SET NOT NULL "
                            "replaced it, or target.check when the swap is rolled back; or a key or foreign key the "
                            "same swap transaction adds again on the new column", _ours_or_moved),
    "ban-drop-function": ("drops only the orchestrator's own trigger functions", _ours),
    "ban-drop-table": ("drops only its own tables (_ec_*): phase 3's copy when rolled back before its swap, the "
                       "table the copy replaced once nothing reads it, the copy's log", _ours),
    "ban-drop-default": ("the swap moves the default to the new column (mapped value); the retired enum column "
                         "must not invent values", None),
    "ban-drop-not-null": ("the retired enum column must accept rows whose new value has no label during the "
                          "rollback window; the rollback restores NOT NULL online", None),
    "ban-drop-column": ("contract only: drops the retired column after the rollback window, when nothing reads it",
                        None),
    "ban-drop-type": ("contract only: drops the enum type once no column uses it", None),
    # app_versions: the orchestrator creates these (the old version's in phase 1, the new version's in phase 4)
    # and is the only one to drop them.
    "ban-drop-view": ("drops the version schemas' views it created (app_versions: the old version's in phase 1, "
                      "the new version's in phase 4), once the app versions no longer use them", None),
    "ban-drop-schema": ("drops the version schemas it created (app_versions: in phases 1 and 4); without CASCADE, "
                        "so a schema holding anything else is not dropped", None),
    "ban-drop-sequence": ("drops its own note of the old version's last write", None),
    # kind change_type: the way back after the contract re-adds the column with the type it had.
    "prefer-bigint-over-int": ("the column's original type, re-added only by the way back after the contract (or "
                               "the type the playbook asks for)", None),
}


# Where a rollback does what the contract does, for another reason: the reason shown is the rollback's.
ACCEPTED_IN_ROLLBACK = {
    "ban-drop-column": ("rollback only: drops the columns this phase added (refused first if the app wrote values "
                        "in them); the original column is untouched", None),
    "ban-drop-type": ("rollback only: drops a type this migration created", None),
}


def accepted(rule: str, statement: str, before: list[str], action: str = "") -> str | None:
    table = ACCEPTED_IN_ROLLBACK if action == "rollback" and rule in ACCEPTED_IN_ROLLBACK else ACCEPTED
    reason, condition = table.get(rule, (None, None))
    if reason is None or (condition is not None and not condition(statement, before)):
        return None
    return reason


@dataclass
class Finding:
    phase: int
    action: str
    rule: str
    message: str
    statement: str
    accepted: str | None  # the reason, when the design accepts this finding

    @property
    def unsafe(self) -> bool:
        return self.accepted is None


def squawk() -> str | None:
    """squawk on PATH, else beside this Python (a virtualenv's bin/ is often not on PATH)."""
    beside = Path(sys.executable).parent / "squawk"
    return shutil.which("squawk") or (str(beside) if beside.exists() else None)


def available() -> bool:
    return squawk() is not None


def script(recorded: list[Recorded], settings: Settings) -> tuple[list[str], dict[int, str]]:
    """The SQL lines as executed, and which line holds which statement."""
    lock = f"'{settings.lock_timeout_ms}ms'"
    stmt_to = f"'{settings.statement_timeout_ms}ms'"
    lines: list[str] = []
    where: dict[int, str] = {}
    groups: list[list[Recorded]] = []
    for r in recorded:
        if r.kind == "note":
            continue
        if groups and r.transaction is not None and groups[-1][0].transaction == r.transaction:
            groups[-1].append(r)
        else:
            groups.append([r])
    for group in groups:
        if group[0].kind == "concurrent":
            lines += [f"SET lock_timeout = {lock};", f"SET statement_timeout = {stmt_to};"]
        else:
            lines += ["BEGIN;", f"SET LOCAL lock_timeout = {lock};", f"SET LOCAL statement_timeout = {stmt_to};"]
        for r in group:
            where[len(lines)] = r.sql
            lines.append(" ".join(r.sql.split()) + ";")
        if group[0].kind != "concurrent":
            lines.append("COMMIT;")
    return lines, where


def lint(phase: int, action: str, recorded: list[Recorded], settings: Settings) -> list[Finding]:
    lines, where = script(recorded, settings)
    if not where:
        return []
    exe = squawk()
    if exe is None:  # callers ask available() first
        raise RuntimeError("squawk is not installed")
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
        f.write("\n".join(lines) + "\n")
        path = Path(f.name)
    try:
        done = subprocess.run([exe, str(path), "--reporter", "json"], capture_output=True, text=True,
                              timeout=60)
    finally:
        path.unlink(missing_ok=True)
    raw = json.loads(done.stdout or "[]")
    findings = []
    for f in raw:
        statement = where.get(f["line"], lines[f["line"]])
        # The condition sees the whole script: a constraint the swap drops is re-added after it.
        context = lines if f["rule_name"] == "ban-drop-constraint" else lines[:f["line"]]
        findings.append(Finding(phase, action, f["rule_name"], f["message"], statement,
                                accepted(f["rule_name"], statement, context, action)))
    return findings
