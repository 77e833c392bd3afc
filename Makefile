# DBA entry points. PLAYBOOK= and DATABASE_URL= may be overridden:
#   make phase-1 PLAYBOOK=playbooks/other.yaml DATABASE_URL=postgresql://user@host/db
# contract-N / rollback-5 ask for confirmation on a terminal; YES=1 answers it (scripts, CI).
# Without DATABASE_URL every target uses the local embedded PostgreSQL that `make demo` starts
# (data in .orchestrator/pgdata; it keeps running until `make server-stop`).
#
# Passwords: DATABASE_URL reaches the orchestrator through the environment, never a command line, and
# recipes are not echoed (@), so make prints no DSN. Exit codes: every target runs bin/orch, which exits
# with the orchestrator's code (0 done, 1 failure, 2 bad input, 3 refused); GNU make turns any failed
# recipe into its own exit status 2, after printing the orchestrator's code. Scripts call
# `bin/orch phase-3` (same targets, same variables) to get the code itself.

PYTHON   ?= python3
VENV     ?= .venv
PLAYBOOK ?= playbooks/workflow_type_enum_to_varchar.yaml
ROWS     ?= 100000
export PLAYBOOK ROWS VENV
$(foreach v,DATABASE_URL YES PHASE,$(if $(value $(v)),$(eval export $(v))))
ORCH      = ORCHESTRATOR_FRONTEND=make bin/orch
ALEMBIC   = $(VENV)/bin/alembic $(if $(DATABASE_URL),,-x dsn=demo)

.PHONY: help venv demo demo-db plan status log verify contract pause resume test test-slow bench \
        bench-backfill bench-footprint server-stop upgrade downgrade history revisions revisions-check lint

help:
	@echo "make demo            set up, seed $(ROWS) rows, run every phase and the contract (leaves the local"
	@echo "                     PostgreSQL running: make server-stop stops it)"
	@echo "make demo-db         set up and seed only (then make phase-1 ... phase-6)"
	@echo "make plan            every phase's SQL and locks, touching nothing"
	@echo "make phase-N         run phase N     make rollback-N   undo phase N (once contracted: its contract step)"
	@echo "make contract-N      contract phase N (make contract: all, in order)"
	@echo "make status | verify | pause | resume"
	@echo "make log [PHASE=N]   the run log: every statement the orchestrator ran"
	@echo "make server-stop     stop the local embedded PostgreSQL (data stays in .orchestrator/)"
	@echo "make venv            create .venv with the package and its lab and test extras (.venv/bin/orchestrator)"
	@echo "make test            the test suite (real PostgreSQL 18 and 15); make test-slow: the wider sweeps"
	@echo "make lint            ruff (the linter) and mypy (the type checker), as CI runs them"
	@echo "make bench           benchmarks vs the naive migration; make bench-backfill: the backfill alone"
	@echo "make bench-footprint WAL, size and a real standby's replay lag vs the naive rewrite (BENCH_ARGS=...)"
	@echo "make upgrade TO=rev | downgrade TO=-1 | history   the same phases through Alembic"
	@echo "make revisions       regenerate the Alembic revisions; make revisions-check: compare them"
	@echo "make rehearse        rehearse every rollback under app traffic ($(REHEARSE_ROWS) rows), report in reports/"
	@echo "Variables: DATABASE_URL= PLAYBOOK= YES=1 ROWS= PHASE=. make exits 2 on any failure; bin/orch TARGET"
	@echo "exits with the orchestrator's code: 0 done, 1 failure (re-run resumes), 2 bad input, 3 refused."

$(VENV)/.installed: pyproject.toml
	@echo "make venv: creating $(VENV) and installing the package with its lab and test extras (about a minute, once)"
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[test]'
	@echo "make venv: done ($(VENV)/bin/orchestrator)"
	touch $@

venv: $(VENV)/.installed

demo demo-db plan status log verify pause resume server-stop contract: venv
	@$(ORCH) $@

phase-% rollback-% contract-%: venv
	@$(ORCH) $@

upgrade: venv
	@$(ALEMBIC) upgrade $(or $(TO),head)

downgrade: venv
	@$(ALEMBIC) downgrade $(or $(TO),-1)

history: venv
	@$(ALEMBIC) history

revisions: venv
	@$(ORCH) revisions generate

revisions-check: venv
	@$(ORCH) revisions check

# Tests run on PYTEST_WORKERS processes (pytest-xdist), each with its own server per major; PYTEST_WORKERS=0
# runs them in this process. worksteal: an idle worker takes queued tests from a busy one (the long ones vary).
PYTEST_WORKERS ?= 4
PYTEST = $(VENV)/bin/pytest -q $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --dist worksteal)

test: venv
	$(PYTEST) -m 'not slow'

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# No exit-code exception: a marker that selects nothing (pytest's 5) fails the target.
test-slow: venv
	$(PYTEST) -m slow

# Rollback rehearsal under simulated app traffic: scratch embedded PostgreSQL unless DATABASE_URL is set.
REHEARSE_ROWS    ?= 200000
REHEARSE_WRITERS ?= 4
.PHONY: rehearse
rehearse: venv
	@$(ORCH) rehearse --rows $(REHEARSE_ROWS) --writers $(REHEARSE_WRITERS)

bench: venv
	$(VENV)/bin/python bench/run.py $(BENCH_ARGS)

# WAL, size and a real standby's replay lag vs the naive rewrite (make bench-footprint BENCH_ARGS="--rows 1000000")
bench-footprint: venv
	$(VENV)/bin/python bench/run.py --sections footprint,replica $(BENCH_ARGS)

bench-backfill: venv
	$(VENV)/bin/python bench/run.py --sections backfill
