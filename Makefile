# DBA entry points. PLAYBOOK= and DATABASE_URL= may be overridden:
#   make phase-1 PLAYBOOK=playbooks/other.yaml DATABASE_URL=postgresql://user@host/db
# contract-N / rollback-5 ask for confirmation on a terminal; YES=1 answers it (scripts, CI).
# Without DATABASE_URL every target uses the local embedded PostgreSQL that `make demo` starts.

PYTHON   ?= python3
VENV     ?= .venv
PLAYBOOK ?= playbooks/workflow_type_enum_to_varchar.yaml
ROWS     ?= 100000
ORCH      = $(VENV)/bin/orchestrator --playbook $(PLAYBOOK) $(if $(DATABASE_URL),--dsn "$(DATABASE_URL)")
ALEMBIC   = $(VENV)/bin/alembic -x dsn="$(if $(DATABASE_URL),$(DATABASE_URL),demo)"

.PHONY: help venv demo demo-db plan status verify contract pause resume test test-fast test-slow bench bench-backfill bench-footprint server-stop \
        upgrade downgrade history revisions revisions-check

help:
	@echo "make demo            set up, seed $(ROWS) rows, run every phase and the contract"
	@echo "make demo-db         set up and seed only (then make phase-1 ... phase-6)"
	@echo "make plan            every phase's SQL and locks, touching nothing"
	@echo "make phase-N         run phase N     make rollback-N   undo phase N"
	@echo "make contract-N      contract phase N (make contract: all, in order)"
	@echo "make status | verify | pause | resume"
	@echo "make test            the test suite (real PostgreSQL 18 and 15)"
	@echo "make bench           benchmarks vs the naive migration"
	@echo "make upgrade TO=rev | downgrade TO=-1 | history   the same phases through Alembic"
	@echo "make rehearse        rehearse every rollback under app traffic ($(REHEARSE_ROWS) rows), report in reports/"

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(ORCH) demo --rows $(ROWS)

demo-db: venv
	$(ORCH) demo --rows $(ROWS) --setup-only

plan: venv
	$(ORCH) plan

status: venv
	$(ORCH) status

verify: venv
	$(ORCH) verify

phase-%: venv
	$(ORCH) run $*

rollback-%: venv
	$(ORCH) rollback $* $(if $(YES),--yes)

contract-%: venv
	$(ORCH) contract $* $(if $(YES),--yes)

contract: venv
	$(ORCH) contract $(if $(YES),--yes)

pause: venv
	$(ORCH) pause

resume: venv
	$(ORCH) resume

server-stop: venv
	$(ORCH) server-stop

upgrade: venv
	$(ALEMBIC) upgrade $(or $(TO),head)

downgrade: venv
	$(ALEMBIC) downgrade $(or $(TO),-1)

history: venv
	$(ALEMBIC) history

revisions: venv
	$(ORCH) revisions generate

revisions-check: venv
	$(ORCH) revisions check

test: venv
	$(VENV)/bin/pytest -q -m 'not slow'

test-slow: venv
	$(VENV)/bin/pytest -q -m slow || [ $$? -eq 5 ]  # 5: none selected yet

# Rollback rehearsal under simulated app traffic: scratch embedded PostgreSQL unless DATABASE_URL is set.
REHEARSE_ROWS    ?= 200000
REHEARSE_WRITERS ?= 4
.PHONY: rehearse
rehearse: venv
	$(ORCH) rehearse --rows $(REHEARSE_ROWS) --writers $(REHEARSE_WRITERS)

bench: venv
	$(VENV)/bin/python bench/run.py $(BENCH_ARGS)

# WAL, size and a real standby's replay lag vs the naive rewrite (make bench-footprint BENCH_ARGS="--rows 1000000")
bench-footprint: venv
	$(VENV)/bin/python bench/run.py --sections footprint,replica $(BENCH_ARGS)

bench-backfill: venv
	$(VENV)/bin/python bench/run.py --sections backfill
