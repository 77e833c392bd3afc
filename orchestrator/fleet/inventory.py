"""Fleet inventories: the databases one playbook must reach, and the waves of the rollout.

Validated as strictly as a playbook (orchestrator/playbook.py): an unknown key, a duplicate name, a wave that
selects nothing or targets left out of every wave are one-line errors (exit 2), before any database is touched.

    playbook: ../playbooks/workflow_type_enum_to_varchar.yaml   # relative to this file
    concurrency: 4                # targets migrated at once inside a wave
    targets:
      - {name: eu-canary, dsn_env: EU_CANARY_URL, env: production, labels: {region: eu, tier: canary}}
      - {name: eu-1, dsn: "postgresql://dba@eu1.db/chatter", env: production, labels: {region: eu}}
    waves:
      - {name: canary, select: {tier: canary}}
      - {name: ten-percent, percent: 10}
      - {name: rest, rest: true}
    gates: {hook: [./check_error_rate.sh], soak_s: 600, verify: true}
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from orchestrator.engine.errors import BadInput
from orchestrator.engine.playbook import _first_error, _nul_path, read_yaml

NAME = r"^[A-Za-z0-9_.-]+$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class TargetSpec(_Strict):
    name: str = Field(min_length=1, max_length=100, pattern=NAME)
    dsn: str | None = Field(None, min_length=1)  # inline (better without a password)
    dsn_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")  # the variable holding the DSN
    env: str | None = None  # the playbook environment (settings, hooks) for this database
    labels: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_dsn(self) -> TargetSpec:
        if (self.dsn is None) == (self.dsn_env is None):
            raise ValueError(f"target {self.name!r}: give exactly one of dsn and dsn_env")
        return self


class WaveSpec(_Strict):
    name: str = Field(min_length=1, max_length=100, pattern=NAME)
    select: dict[str, str] | None = None  # label selector: every label must match
    count: int | None = Field(None, ge=1, le=100_000)  # the next N remaining targets, in inventory order
    percent: float | None = Field(None, gt=0, le=100)  # this share of the remaining targets (rounded up)
    rest: bool = False  # every remaining target
    concurrency: int | None = Field(None, ge=1, le=1_000)
    soak_s: float | None = Field(None, ge=0, le=7 * 86_400)

    @model_validator(mode="after")
    def _one_rule(self) -> WaveSpec:
        rules = [r for r, v in (("select", self.select), ("count", self.count), ("percent", self.percent))
                 if v is not None] + (["rest"] if self.rest else [])
        if len(rules) != 1:
            raise ValueError(f"wave {self.name!r}: give exactly one of select, count, percent and rest: true"
                             + (f" (it has {', '.join(rules)})" if rules else ""))
        if self.select is not None and not self.select:
            raise ValueError(f"wave {self.name!r}: select needs at least one label")
        return self


class Gates(_Strict):
    """Checked after each wave before the next one starts (never after the last)."""

    hook: list[str] = Field(default_factory=list)  # argv of a command that must exit 0
    hook_timeout_s: float = Field(300, gt=0, le=86_400)
    soak_s: float = Field(0, ge=0, le=7 * 86_400)  # wait this long after the wave finished
    verify: bool = True  # parity check on every target of the wave once its backfill has run


class Inventory(_Strict):
    playbook: str | None = None  # relative to the inventory file; default: the global --playbook
    concurrency: int = Field(1, ge=1, le=1_000)
    targets: list[TargetSpec] = Field(min_length=1)
    waves: list[WaveSpec] = Field(min_length=1)
    gates: Gates = Field(default_factory=Gates)
    source: str = "inventory"  # set by load(): where it came from, for messages

    @model_validator(mode="after")
    def _check(self) -> Inventory:
        for what, names in (("target", [t.name for t in self.targets]), ("wave", [w.name for w in self.waves])):
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"{what} name {dupes[0]!r} is used twice")
        assign(self.targets, self.waves)  # raises ValueError when a wave is empty or targets are left over
        return self


@dataclass(frozen=True)
class Wave:
    index: int  # 1-based
    spec: WaveSpec
    targets: tuple[TargetSpec, ...]

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def rule(self) -> str:
        s = self.spec
        if s.select is not None:
            return "select " + ",".join(f"{k}={v}" for k, v in s.select.items())
        if s.count is not None:
            return f"next {s.count}"
        if s.percent is not None:
            return f"{s.percent:g}% of the remaining"
        return "the rest"


def assign(targets: list[TargetSpec], waves: list[WaveSpec]) -> list[Wave]:
    """Targets of each wave, in inventory order. Deterministic: the same file always gives the same waves."""
    remaining = list(targets)
    out = []
    for i, w in enumerate(waves, 1):
        if w.select is not None:
            chosen = [t for t in remaining if all(t.labels.get(k) == v for k, v in w.select.items())]
        elif w.count is not None:
            chosen = remaining[:w.count]
        elif w.percent is not None:
            chosen = remaining[:math.ceil(len(remaining) * w.percent / 100)]
        else:
            chosen = list(remaining)
        if not chosen:
            raise ValueError(f"wave {w.name!r} ({Wave(i, w, ()).rule}) selects no target")
        out.append(Wave(i, w, tuple(chosen)))
        remaining = [t for t in remaining if t not in chosen]
    if remaining:
        names = ", ".join(t.name for t in remaining[:5]) + (", ..." if len(remaining) > 5 else "")
        raise ValueError(f"{len(remaining)} target(s) in no wave ({names}); end the waves with "
                         "{name: rest, rest: true}")
    return out


def resolve_dsn(t: TargetSpec, environ: Mapping[str, str] | None = None) -> str:
    """The target's DSN: inline, or read from its environment variable (so secrets stay out of the file)."""
    if t.dsn is not None:
        return t.dsn
    value = (os.environ if environ is None else environ).get(t.dsn_env or "")
    if not value:
        raise BadInput(f"target {t.name!r}: environment variable {t.dsn_env} is not set",
                       hint=f"export {t.dsn_env}=postgresql://...")
    return value


def _error(err: ValidationError) -> str:
    return _first_error(err).replace("playbook field", "inventory field")


def parse(data: Any, source: str = "inventory") -> Inventory:
    if not isinstance(data, dict):
        raise BadInput(f"{source}: expected a mapping with targets and waves at the top level")
    nul = _nul_path(data)
    if nul is not None:
        raise BadInput(f"{source}: inventory field '{'.'.join(map(str, nul))}': must not contain a NUL byte")
    if "source" in data:
        raise BadInput(f"{source}: inventory field 'source': unknown key")
    try:
        return Inventory.model_validate({**data, "source": source})
    except ValidationError as err:
        raise BadInput(f"{source}: {_error(err)}") from None


def load(path: str | Path) -> Inventory:
    path = Path(path)
    inv = parse(read_yaml(path, "inventory"), str(path))
    if inv.playbook is not None and not Path(inv.playbook).is_absolute():
        inv = inv.model_copy(update={"playbook": str(path.parent / inv.playbook)})
    return inv
