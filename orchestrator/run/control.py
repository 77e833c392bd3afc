"""Operator switches that work across processes: a pause file honoured between batches and DDL steps."""

from __future__ import annotations

import os
from pathlib import Path

from orchestrator.engine.playbook import Playbook


def control_dir() -> Path:
    return Path(os.environ.get("ORCHESTRATOR_CONTROL_DIR", ".orchestrator"))


def pause_path(pb: Playbook) -> Path:
    return control_dir() / f"{pb.name}.pause"


def pause(pb: Playbook) -> Path:
    path = pause_path(pb)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    return path


def resume(pb: Playbook) -> bool:
    path = pause_path(pb)
    existed = path.exists()
    path.unlink(missing_ok=True)
    return existed
