"""Rollback rehearsal under live application traffic (`orchestrator rehearse`); scenario.py says what it does.

model.py      what the report is made of: Step, Check, LockSample, RehearsalResult
traffic.py    the app held between statements for the row checks; the lock-wait sampler
base.py       the migrated columns (Unit), the playbook helpers, the rehearsal's state and database helpers
checks.py     the checks evaluated after each step
steps.py      the steps: run, roll back, the DBA's fixes, the undo of a contract step
scenario.py   the rehearsal run: set-up, the cycles under traffic, the final contract, the after-contract cycle
report.py     the rich table and the self-contained HTML report of a rehearsal
"""

from orchestrator.lab.rehearse.base import Unit, chatter_problem, fallback_label, other_policy, seed_names
from orchestrator.lab.rehearse.model import AFTER_CONTRACT, Check, LockSample, RehearsalResult, Step
from orchestrator.lab.rehearse.scenario import Rehearsal, rehearse
from orchestrator.lab.rehearse.traffic import LockSampler, RehearsalTraffic

__all__ = ["AFTER_CONTRACT", "Check", "LockSample", "LockSampler", "Rehearsal", "RehearsalResult",
           "RehearsalTraffic", "Step", "Unit", "chatter_problem", "fallback_label", "other_policy", "rehearse",
           "seed_names"]
