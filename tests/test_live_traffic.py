"""The app keeps writing through every phase (old vocabulary before the swap, new after): zero failed
statements, and every value it wrote is there, mapped, at the end."""

from __future__ import annotations

import time

from orchestrator.lab.traffic import AppTraffic

from .helpers import column_values, make_playbook, orchestrator, seed

MAPPING = {"plain": "simple_chat", "rag": "rag_chat", "tools": "function_chat", "full": "advanced_chat"}


def test_app_writes_through_every_phase_and_rollback_with_zero_errors(dsn):
    seed(dsn, rows=20_000)
    pb = make_playbook(**{"settings.batch_size": 1000, "settings.min_batch_size": 100})
    orch = orchestrator(pb, dsn)
    traffic = AppTraffic(dsn, writers=3, readers=1).start()
    try:
        time.sleep(0.3)
        for n in range(1, 5):
            orch.run(n)
            time.sleep(0.2)
        # rehearse a rollback of the first phases under load, then go forward again
        for n in range(4, 0, -1):
            orch.rollback(n)
        for n in range(1, 6):
            orch.run(n)
        traffic.use_new_app(allow_new_only=False)
        time.sleep(0.3)
        orch.run(6)
        orch.contract()
        time.sleep(0.3)
    finally:
        report = traffic.stop()
        orch.close()
    assert report.count() > 200
    assert report.errors == [], report.errors[:5]
    final = column_values(dsn)
    for id_, value in report.written.items():
        assert final[id_] == MAPPING.get(value, value), id_
