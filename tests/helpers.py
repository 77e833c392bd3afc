"""Shared test helpers: a seeded database, playbooks with overrides, and CLI invocation."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import psycopg
import yaml
from psycopg import sql

from orchestrator.engine import playbook
from orchestrator.lab.seed import SeedNames, create_seed_schema, insert_rows
from orchestrator.lab.snapshot import schema_snapshot
from orchestrator.run.runner import Orchestrator

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "playbooks" / "workflow_type_enum_to_varchar.yaml"  # Chatter's real schema, both tables
SIMPLE = ROOT / "tests" / "playbooks" / "simple_table.yaml"  # the one-table fixture, for odd shapes


# The long model sweeps of `make test-slow` run as shards of one sweep, so that pytest-xdist spreads them over
# its workers (one 40-example sweep took 12 min on one worker while the others idled). Each shard draws its own
# random examples: SHARDS shards of ceil(n / SHARDS) examples explore as many as one sweep of n.
SLOW_SHARDS = 4


def shard_of(total: int, shards: int = SLOW_SHARDS) -> int:
    """Examples per shard, for a sweep of `total` examples split in `shards`."""
    return -(-total // shards)


def reference_dict() -> dict:
    """The reference playbook: both columns of Chatter's enum type."""
    return yaml.safe_load(REFERENCE.read_text())


def simple_dict() -> dict:
    """The one-table fixture's playbook (demo.create_seed_schema), the same migration written for one column."""
    return yaml.safe_load(SIMPLE.read_text())


def make_playbook(names: SeedNames | None = None, **overrides) -> playbook.Playbook:
    """The one-table fixture's playbook, retargeted at `names`, with top-level or dotted-key overrides."""
    return playbook.parse(playbook_dict(names, **overrides))


def playbook_dict(names: SeedNames | None = None, **overrides) -> dict:
    """make_playbook's data, before validation (to write as a YAML file)."""
    data = copy.deepcopy(simple_dict())
    if names is not None:
        data["table"] = {"schema": names.schema, "name": names.table}
        data["column"] = {"name": names.column, "enum_type": names.enum}
        for row in data["seed_rows"]["rows"]:
            row[names.column] = row.pop("workflow_type")
    return with_overrides(data, overrides)


def with_overrides(data: dict, overrides: dict) -> dict:
    """Set dotted keys ("settings.batch_size") in a playbook's data."""
    for key, value in overrides.items():
        node = data
        *path, last = key.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    return data


def seed(dsn: str, names: SeedNames = SeedNames(), rows: int = 2000, *, enum_default: str | None = "plain") -> None:
    with psycopg.connect(dsn) as conn:
        create_seed_schema(conn, names, enum_default=enum_default)
        insert_rows(conn, rows, names)


def seed_chatter(dsn: str, rows: int = 2000, specs: int | None = None) -> None:
    """Chatter's real schema (both tables using the enum, users with the 'system' owner) and sample rows."""
    from orchestrator.lab import chatter
    with psycopg.connect(dsn) as conn:
        chatter.create_chatter_schema(conn)
        chatter.insert_chatter_rows(conn, rows, specs)


def real_playbook(**overrides) -> playbook.Playbook:
    """The reference playbook (both columns of Chatter's enum type), with dotted-key overrides."""
    return playbook.parse(with_overrides(copy.deepcopy(reference_dict()), overrides))


def snapshot(dsn: str, schema: str = "public") -> dict:
    with psycopg.connect(dsn) as conn:
        return schema_snapshot(conn, schema)


def column_values(dsn: str, names: SeedNames = SeedNames(), column: str | None = None) -> dict[str, str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(sql.SQL("SELECT id, {}::text FROM {}").format(
            sql.Identifier(column or names.column), names.table_ident)).fetchall()
    return dict(rows)


def orchestrator(pb: playbook.Playbook, dsn: str) -> Orchestrator:
    return Orchestrator(pb, dsn)


def cli(*args: str, dsn: str | None = None, playbook_path: str | Path | None = None,
        env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "orchestrator"]
    if dsn:
        cmd += ["--dsn", dsn]
    if playbook_path:
        cmd += ["--playbook", str(playbook_path)]
    full_env = {**os.environ, **(env or {})}
    full_env.pop("DATABASE_URL", None) if dsn else None
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=timeout, env=full_env,
                          cwd=ROOT)


def write_playbook(pb_dict: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(pb_dict, sort_keys=False, allow_unicode=True))
    return path


def query(dsn: str, stmt, params=None) -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(stmt, params).fetchall()


def run_steps(pb, dsn: str, *steps) -> None:
    """Run the playbook's steps in order on one orchestrator: a phase number, "rollback N" or "contract"."""
    o = Orchestrator(pb, dsn)
    try:
        for s in steps:
            if s == "contract":
                o.contract()
            elif isinstance(s, str) and s.startswith("rollback"):
                o.rollback(int(s.split()[1]))
            else:
                o.run(s)
    finally:
        o.close()
