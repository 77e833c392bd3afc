"""A model-based test of phase 3 by copy: hypothesis draws what the app writes between the copy's batches, while
the log is replayed and right before the swap, and where the copy is stopped and run again.

The app's writes (updates of the enum column and of another column, inserts ahead of and behind the cursor,
deletes, a key moved) go to the table and to a model (a dict). After the copy is swapped in, the table must be
the model, row for row, with the shadow column mapped from the enum column. Bounded in `make test`
(COPY_MODEL_EXAMPLES); `make test-slow` runs it longer.
"""

from __future__ import annotations

import os

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.engine import playbook
from orchestrator.engine.errors import OrchestratorError
from orchestrator.kinds.phases import copy as copy_mod

from .helpers import SLOW_SHARDS, query, shard_of
from .helpers import run_steps as run

ROWS, BATCH = 300, 40
LABELS = ("a", "b", "c")
PB = playbook.parse({"name": "copy_model", "enum": {"name": "cm_kind"},
                     "columns": [{"table": "cm_items", "column": "kind"}],
                     "target": {"type": "varchar", "length": 5}, "mapping": {"a": "A", "b": "B", "c": "C"},
                     "settings": {"backfill_method": "copy", "batch_size": BATCH, "min_batch_size": BATCH,
                                  "max_batch_size": BATCH, "retries": 2}})

op = st.tuples(st.sampled_from(["update", "label", "insert", "delete", "move"]), st.integers(-50, ROWS + 50),
               st.sampled_from(LABELS))


class App:
    """Writes to the table and the model alike; a write to a key that is not there changes neither."""

    def __init__(self, dsn: str):
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.model: dict[int, tuple[str, str]] = {i: (f"n{i}", LABELS[i % 3]) for i in range(ROWS)}
        self.fresh = 10_000

    def apply(self, ops: list[tuple[str, int, str]]) -> None:
        for kind, key, label in ops:
            if kind == "update" and key in self.model:
                self.conn.execute("UPDATE cm_items SET note = note || '+' WHERE id = %s", (key,), prepare=True)
                note, lab = self.model[key]
                self.model[key] = (note + "+", lab)
            elif kind == "label" and key in self.model:
                self.conn.execute("UPDATE cm_items SET kind = %s WHERE id = %s", (label, key), prepare=True)
                self.model[key] = (self.model[key][0], label)
            elif kind == "insert" and key not in self.model:
                self.conn.execute("INSERT INTO cm_items (id, note, kind) VALUES (%s, 'new', %s)", (key, label))
                self.model[key] = ("new", label)
            elif kind == "delete" and key in self.model:
                self.conn.execute("DELETE FROM cm_items WHERE id = %s", (key,))
                del self.model[key]
            elif kind == "move" and key in self.model:
                self.fresh += 1
                self.conn.execute("UPDATE cm_items SET id = %s WHERE id = %s", (self.fresh, key))
                self.model[self.fresh] = self.model.pop(key)


def reset(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("DROP SCHEMA IF EXISTS _orchestrator, cm_v1, cm_v2 CASCADE")
        c.execute("DROP TABLE IF EXISTS cm_items")
        c.execute("DROP TYPE IF EXISTS cm_kind")
        c.execute("CREATE TYPE cm_kind AS ENUM ('a', 'b', 'c')")
        c.execute("CREATE TABLE cm_items (id int PRIMARY KEY, note text NOT NULL, kind cm_kind NOT NULL)")
        c.execute("CREATE INDEX cm_items_note ON cm_items (note)")
        c.execute(f"INSERT INTO cm_items SELECT g, 'n' || g, (ARRAY['a','b','c'])[g % 3 + 1]::cm_kind "
                  f"FROM generate_series(0, {ROWS - 1}) g")


def check(dsn: str, model: dict[int, tuple[str, str]]) -> None:
    table = {i: (note, kind) for i, note, kind in query(dsn, "SELECT id, note, kind::text FROM cm_items")}
    assert table == model
    assert query(dsn, "SELECT count(*) FROM cm_items WHERE kind_new IS DISTINCT FROM upper(kind::text)") == [(0,)]


def examples() -> int:
    return int(os.environ.get("COPY_MODEL_EXAMPLES", 25))


def test_copy_model(dsn, monkeypatch):
    batches, replay = copy_mod.CopyBatches.after_batch, copy_mod.TableCopy.replay

    @settings(max_examples=examples(), deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(between=st.lists(st.lists(op, max_size=4), min_size=ROWS // BATCH + 2, max_size=ROWS // BATCH + 2),
           in_replays=st.lists(st.lists(op, max_size=3), min_size=6, max_size=6),
           stop_at=st.one_of(st.none(), st.integers(1, ROWS // BATCH)))
    def one(between, in_replays, stop_at):
        reset(dsn)
        run(PB, dsn, 1, 2)
        app = App(dsn)
        calls = {"batch": 0, "replay": 0}

        def after_batch(self, scanned):
            calls["batch"] += 1
            if calls["batch"] == stop_at:
                raise RuntimeError("stopped")
            app.apply(between[min(calls["batch"], len(between) - 1)])
            return batches(self, scanned)

        def replaying(self, **kw):
            if kw.get("cur") is None:  # outside the swap's lock: the app still writes
                app.apply(in_replays[calls["replay"] % len(in_replays)])
                calls["replay"] += 1
            return replay(self, **kw)

        monkeypatch.setattr(copy_mod.CopyBatches, "after_batch", after_batch)
        monkeypatch.setattr(copy_mod.TableCopy, "replay", replaying)
        try:
            if stop_at is not None:
                with pytest.raises(OrchestratorError, match="stopped"):
                    run(PB, dsn, 3)
                app.apply(between[0])
            run(PB, dsn, 3)
        finally:
            monkeypatch.setattr(copy_mod.CopyBatches, "after_batch", batches)
            monkeypatch.setattr(copy_mod.TableCopy, "replay", replay)
        app.conn.close()
        check(dsn, app.model)
        assert query(dsn, "SELECT count(*) FROM pg_class WHERE relname LIKE '\\_ec\\_%'") == [(0,)]

    one()


@pytest.mark.slow
@pytest.mark.parametrize("shard", range(SLOW_SHARDS))
def test_copy_model_long(dsn, monkeypatch, shard):
    monkeypatch.setenv("COPY_MODEL_EXAMPLES", str(shard_of(int(os.environ.get("COPY_MODEL_EXAMPLES_LONG", "300")))))
    test_copy_model(dsn, monkeypatch)
