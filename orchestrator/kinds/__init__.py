"""Migration kinds: each is an ordered list of phases. A new kind is a new list, not a new runner."""

from __future__ import annotations

from orchestrator.kinds.phases.backfill import BackfillPhase
from orchestrator.kinds.phases.base import Phase
from orchestrator.kinds.phases.dual_write import DualWrite
from orchestrator.kinds.phases.seed import SeedRowsPhase
from orchestrator.kinds.phases.shadow import AddShadowColumn
from orchestrator.kinds.phases.swap import SwapColumns
from orchestrator.kinds.phases.verify import VerifyPhase


def enum_to_varchar() -> list[Phase]:
    return [AddShadowColumn(), DualWrite(), BackfillPhase(), VerifyPhase(), SwapColumns(), SeedRowsPhase()]


def change_type() -> list[Phase]:
    """Any column type to another through the playbook's up/down expressions: the enum's phases less the
    seed rows (no built-in values to add)."""
    return [AddShadowColumn(), DualWrite(), BackfillPhase(), VerifyPhase(), SwapColumns()]


KINDS = {"enum_to_varchar": enum_to_varchar, "change_type": change_type}


def phases_for(kind: str) -> list[Phase]:
    phases = KINDS[kind]()
    for number, phase in enumerate(phases, 1):
        phase.number = number
    return phases
