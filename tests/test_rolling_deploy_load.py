"""A busy rolling deploy (issue 26): both app versions write back to back through their own views while the DBA
runs every lock-taking step (the old version's views at phase 1, the new version's at phase 4, the swap, its
rollback, the swap again, contract 2 dropping the old views, contract 5 dropping the new ones).

Each step must complete within its retry budget, no app statement may fail, and every row must hold what its
last writer wrote. The figures (statements/s per step, the slowest app statement) are printed for
docs/benchmarks.md; the test asserts behaviour only.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import Counter

import psycopg
from psycopg import sql

from orchestrator.lab import chatter
from orchestrator.run.runner import Orchestrator

from .helpers import query, real_playbook, seed_chatter

OLD, NEW = "chatter_v1", "chatter_v2"
MAPPING = {"plain": "simple_chat", "tools": "function_chat", "rag": "rag_chat", "full": "advanced_chat"}
REVERSE = {v: k for k, v in MAPPING.items()}


class Writers:
    """`per_version` connections per app version, each owning its rows (the ones it inserts, and a share of the
    seeded ones), so the last writer of every row is known. A version writes only while it is switched on."""

    def __init__(self, dsn: str, per_version: int = 2):
        self.dsn, self.stop_at, self.lock = dsn, threading.Event(), threading.Lock()
        self.on = {OLD: threading.Event(), NEW: threading.Event()}
        self.new_types = threading.Event()  # the new version also writes a type with no enum label
        self.errors: list[str] = []
        self.ops: Counter = Counter()
        self.slowest_ms: dict[str, float] = {OLD: 0.0, NEW: 0.0}
        self.last: dict[tuple[str, str], str] = {}  # (table, id) -> the value last written (new vocabulary)
        with psycopg.connect(dsn) as conn:
            seeded = [r[0] for r in conn.execute("SELECT id FROM workflow_templates ORDER BY id LIMIT 64")]
        n = per_version * 2
        self.threads = [threading.Thread(target=self._run, args=((OLD, NEW)[i % 2], seeded[i::n]), daemon=True)
                        for i in range(n)]

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop_at.set()
        for t in self.threads:
            t.join(timeout=30)

    def _run(self, version: str, owned: list[str]) -> None:
        conn = psycopg.connect(self.dsn, autocommit=True, prepare_threshold=0,
                               options=f"-csearch_path={version},public")
        mine = list(owned)
        i = 0
        with conn:
            while not self.stop_at.is_set():
                if not self.on[version].wait(timeout=0.05):
                    continue
                i += 1
                if version == OLD:
                    label = list(MAPPING)[i % 4]
                    written, canonical = label, MAPPING[label]
                else:
                    canonical = written = "medical_chat" if self.new_types.is_set() and i % 3 == 0 else \
                        list(MAPPING.values())[i % 4]
                start = time.monotonic()
                try:
                    if i % 4 == 0:
                        rid = secrets.token_hex(13)[:26].upper()
                        values = chatter.template_values(rid, written)
                        conn.execute(sql.SQL("INSERT INTO workflow_templates ({}) VALUES ({})").format(
                            sql.SQL(", ").join(map(sql.Identifier, values)),
                            sql.SQL(", ").join(sql.Placeholder() * len(values))), chatter.insert_params(values))
                        mine.append(rid)
                    elif i % 4 == 1:
                        conn.execute("SELECT * FROM workflow_templates WHERE id = %s", (mine[i % len(mine)],),
                                     prepare=True).fetchall()
                        continue
                    else:
                        rid = mine[i % len(mine)]
                        conn.execute("UPDATE workflow_templates SET workflow_type = %s, usage_count = usage_count + 1 "
                                     "WHERE id = %s", (written, rid), prepare=True)
                    with self.lock:
                        self.last[("workflow_templates", rid)] = canonical
                        self.ops[version] += 1
                        self.slowest_ms[version] = max(self.slowest_ms[version], (time.monotonic() - start) * 1000)
                except psycopg.Error as err:
                    with self.lock:
                        self.errors.append(f"{version}: {' '.join(str(err).split())}")


def test_a_busy_rolling_deploy_completes_every_step_without_an_app_error(dsn):
    seed_chatter(dsn, rows=300)
    pb = real_playbook(**{"settings.old_version_quiet_s": 1, "rollback.unmapped": "refuse"})
    figures = []

    with Writers(dsn) as app:
        def step(name, fn):
            before, t0 = sum(app.ops.values()), time.monotonic()
            result = fn()
            seconds = time.monotonic() - t0
            figures.append((name, round(seconds, 2), round((sum(app.ops.values()) - before) / max(seconds, 1e-3))))
            return result

        app.on[OLD].set()
        time.sleep(0.3)
        orch = Orchestrator(pb, dsn)
        try:
            step("phase 1 (old version's views, then ADD COLUMN)", lambda: orch.run(1))
            for n in (2, 3):
                step(f"phase {n}", lambda n=n: orch.run(n))
            step("phase 4 (new version's views)", lambda: orch.run(4))
            app.on[NEW].set()
            time.sleep(0.3)
            step("phase 5: the swap", lambda: orch.run(5))
            step("rollback 5", lambda: orch.rollback(5))
            step("phase 5 again", lambda: orch.run(5))
            app.new_types.set()  # the new version writes a type the enum never had
            time.sleep(0.3)
            step("phase 6", lambda: orch.run(6))
            app.on[OLD].clear()  # the rolling deploy is done: the old instances are gone
            time.sleep(1.5)  # settings.old_version_quiet_s
            for n in range(1, 7):
                step(f"contract {n}", lambda n=n: orch.contract(n))
            time.sleep(0.3)
        finally:
            orch.close()
    print("\nstep | seconds | app statements/s")
    for name, seconds, rate in figures:
        print(f"{name} | {seconds} | {rate}")
    print(f"slowest app statement: old {app.slowest_ms[OLD]:.0f} ms, new {app.slowest_ms[NEW]:.0f} ms; "
          f"statements: {dict(app.ops)}")

    assert not app.errors, app.errors[:5]
    assert app.ops[OLD] > 100 and app.ops[NEW] > 100, app.ops
    assert query(dsn, "SELECT DISTINCT status FROM _orchestrator.phases") == [("contracted",)]
    stored = dict(query(dsn, "SELECT id, workflow_type FROM workflow_templates WHERE id = ANY(%s)",
                        ([rid for _, rid in app.last],)))
    wrong = {rid: (stored.get(rid), want) for (_, rid), want in app.last.items() if stored.get(rid) != want}
    assert not wrong, dict(list(wrong.items())[:5])
    assert "medical_chat" in stored.values()
