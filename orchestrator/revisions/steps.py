"""The chain of revisions a playbook becomes: stable ids, the playbook's fingerprint, the steps in order, the
revision the orchestrator's state stands for, and where the branch hangs in Alembic's history (`Anchor`)."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Iterable

from orchestrator.engine.errors import BadInput
from orchestrator.engine.playbook import Playbook
from orchestrator.engine.state import APPLIED, CONTRACTED, PhaseRow
from orchestrator.kinds import phases_for

PREFIX = "ec_"
EXPAND, CONTRACT = "expand", "contract"


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


