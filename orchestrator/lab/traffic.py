"""Application traffic simulator: writer/reader threads hammering the seed table.

Tests run it through every migration phase and demand zero failed statements;
benchmarks and rehearsals read its latency samples.  ``TrafficReport.written``
records, per id, the last column value this traffic committed, so callers can
check every app-written row after each phase or rollback.

``AppTraffic(..., chatter=True)`` models Chatter's app on its real schema
(``orchestrator/chatter.py``): full-row inserts into both ``workflow_templates``
and ``template_specs``, column updates in both, and a cross-table JOIN probe on
the enum column; ``TrafficReport.written_specs`` records template_specs.
"""
from __future__ import annotations

import gc
import math
import random
import secrets
import threading
import time
import zlib
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from orchestrator.engine import db
from orchestrator.lab import chatter as _chatter
from orchestrator.lab.seed import REFERENCE_MAPPING, SeedNames

WRITE_KINDS = ("insert", "insert_default", "update_col", "update_other")
READ_KINDS = ("select_id", "count")
_WRITE_WEIGHTS = {"insert": 3, "insert_default": 1, "update_col": 3, "update_other": 2}
# Chatter mode: both tables written, both read, plus the cross-table JOIN on the enum column
CHATTER_WRITE_KINDS = ("insert", "insert_default", "insert_spec", "update_col", "update_spec_col",
                       "update_other", "update_spec_other")
CHATTER_READ_KINDS = ("select_id", "select_spec_id", "count", "join")
_CHATTER_WRITE_WEIGHTS = {"insert": 3, "insert_default": 1, "insert_spec": 2, "update_col": 3,
                          "update_spec_col": 2, "update_other": 2, "update_spec_other": 1}
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_OWNERS = tuple(f"01APPOWNER{i:016d}" for i in range(5))
_SWITCH_TIMEOUT_S = 10.0


def new_ulid() -> str:
    """A real ULID (48-bit ms clock + 80 random bits): unique across threads and runs."""
    value = (int(time.time() * 1000) << 80) | int.from_bytes(secrets.token_bytes(10), "big")
    return "".join(_CROCKFORD[(value >> (5 * i)) & 31] for i in reversed(range(26)))


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:500]


@dataclass
class StatementSample:
    t: float  # seconds since AppTraffic.start() (monotonic)
    kind: str
    latency_ms: float
    error: str | None = None


@dataclass
class TrafficReport:
    samples: list[StatementSample]
    written: dict[str, str]  # id -> last committed column value written by this traffic
    # Chatter mode: the same for template_specs.workflow_type (empty otherwise)
    written_specs: dict[str, str] = field(default_factory=dict)

    @property
    def errors(self) -> list[StatementSample]:
        return [s for s in self.samples if s.error is not None]

    def count(self) -> int:
        return len(self.samples)

    def by_kind(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.samples:
            out[s.kind] = out.get(s.kind, 0) + 1
        return out

    def percentile(self, p: float) -> float:
        """Nearest-rank percentile (p in 0..100) of all statement latencies, in ms."""
        lat = sorted(s.latency_ms for s in self.samples)
        if not lat:
            return 0.0
        rank = max(1, math.ceil(p / 100 * len(lat)))
        return lat[min(rank, len(lat)) - 1]

    def max_latency_ms(self) -> float:
        return max((s.latency_ms for s in self.samples), default=0.0)

    def summary(self) -> dict:
        return {
            "count": self.count(),
            "errors": len(self.errors),
            "p50": round(self.percentile(50), 3),
            "p99": round(self.percentile(99), 3),
            "max": round(self.max_latency_ms(), 3),
            "by_kind": self.by_kind(),
        }


@dataclass(frozen=True)
class _Vocab:
    """What the app currently writes; swapped atomically by use_new_app/use_old_app."""

    generation: int
    mode: str  # "old" | "new"
    values: tuple[str, ...]
    execution_pattern: bool = False


@dataclass
class _Worker:
    index: int
    role: str  # "writer" | "reader"
    rng: random.Random
    own_ids: list[str] = field(default_factory=list)  # ids only this writer writes the column of
    samples: list[StatementSample] = field(default_factory=list)
    written: dict[str, str] = field(default_factory=dict)
    own_spec_ids: list[str] = field(default_factory=list)  # Chatter mode: template_specs ids
    written_specs: dict[str, str] = field(default_factory=dict)
    seen_generation: int = 0
    conn: psycopg.Connection | None = None
    thread: threading.Thread | None = None


class AppTraffic:
    def __init__(
        self,
        dsn: str,
        names: SeedNames = SeedNames(),
        *,
        writers: int = 2,
        readers: int = 1,
        mapping: dict[str, str] | None = None,
        new_only_values: tuple[str, ...] = ("medical_chat",),
        pause_s: float = 0.002,
        seed: int = 0,
        chatter: bool = False,
    ):
        if chatter and (names.table, names.column) != (_chatter.TEMPLATES, _chatter.COLUMN):
            raise ValueError(f"chatter mode runs on {_chatter.TEMPLATES}.{_chatter.COLUMN}, "
                             f"not {names.table}.{names.column}")
        self.dsn = dsn
        self.names = names
        self.chatter = chatter
        self.mapping = dict(REFERENCE_MAPPING if mapping is None else mapping)
        self.new_only_values = tuple(new_only_values)
        self.pause_s = pause_s
        self.report: TrafficReport | None = None
        self._t0 = 0.0
        self._stop = threading.Event()
        self._vocab = _Vocab(0, "old", tuple(names.labels))
        self._has_default = False
        self._shared_ids: list[str] = []  # any row id: targets for reads / updated_at touches
        self._shared_spec_ids: list[str] = []  # the same for template_specs (Chatter mode)
        self._workers = [
            _Worker(i, "writer", random.Random(seed * 1009 + i)) for i in range(writers)
        ] + [_Worker(writers + i, "reader", random.Random(seed * 1009 + writers + i)) for i in range(readers)]
        self._n_writers = writers
        t, c = names.table_ident, sql.Identifier(names.column)
        self._sql = {
            "insert_default": sql.SQL(
                "INSERT INTO {} (id, owner_id, name) VALUES (%s, %s, %s) RETURNING {}"
            ).format(t, c),
            "insert_default_ep": sql.SQL(
                "INSERT INTO {} (id, owner_id, name, execution_pattern) VALUES (%s, %s, %s, %s) RETURNING {}"
            ).format(t, c),
            "insert": sql.SQL("INSERT INTO {} (id, owner_id, name, {}) VALUES (%s, %s, %s, %s)").format(t, c),
            "insert_ep": sql.SQL(
                "INSERT INTO {} (id, owner_id, name, {}, execution_pattern) VALUES (%s, %s, %s, %s, %s)"
            ).format(t, c),
            "update_col": sql.SQL("UPDATE {} SET {} = %s WHERE id = %s").format(t, c),
            "update_other": sql.SQL("UPDATE {} SET updated_at = now() WHERE id = %s").format(t),
            "select_id": sql.SQL("SELECT id, {}, updated_at FROM {} WHERE id = %s").format(c, t),
            # LIMIT keeps it "small" even on a 5M-row table (index scan, stops early)
            "count": sql.SQL("SELECT count(*) FROM (SELECT 1 FROM {} WHERE {} = %s LIMIT 100) AS s").format(t, c),
        }
        if chatter:
            s = sql.Identifier(names.schema, _chatter.SPECS)
            self._sql.update({
                "update_col": sql.SQL("UPDATE {} SET {} = %s, updated_at = now() WHERE id = %s").format(t, c),
                "update_spec_col": sql.SQL("UPDATE {} SET {} = %s, updated_at = now() WHERE id = %s").format(s, c),
                "update_spec_other": sql.SQL("UPDATE {} SET updated_at = now() WHERE id = %s").format(s),
                "select_spec_id": sql.SQL("SELECT id, {}, updated_at FROM {} WHERE id = %s").format(c, s),
                # must work whatever phase each table is in: both columns enum, or both varchar
                "join": sql.SQL("SELECT count(*) FROM (SELECT 1 FROM {} s JOIN {} t ON s.{} = t.{} "
                                "WHERE s.id = %s LIMIT 10) AS x").format(s, t, c, c),
            })

    # --- lifecycle -----------------------------------------------------------

    def start(self) -> "AppTraffic":
        with self._connect() as conn:
            self._has_default = bool(self._column_has_default(conn, self.names.column))
            sample = self._sample_ids(conn)
            spec_sample = self._sample_ids(conn, table=_chatter.SPECS) if self.chatter else []
        self._shared_ids.extend(sample)
        self._shared_spec_ids.extend(spec_sample)
        # Seed rows are split between writers by hash so no two threads ever write the
        # same id's column: then "last committed write" per id is well defined.
        for rid in sample:
            if self._n_writers:
                self._workers[zlib.crc32(rid.encode()) % self._n_writers].own_ids.append(rid)
        for rid in spec_sample:
            if self._n_writers:
                self._workers[zlib.crc32(rid.encode()) % self._n_writers].own_spec_ids.append(rid)
        self._t0 = time.monotonic()
        for w in self._workers:
            w.thread = threading.Thread(target=self._run, args=(w,), name=f"app-traffic-{w.role}-{w.index}",
                                        daemon=True)
            w.thread.start()
        threading.Thread(target=self._freeze_samples, name="app-traffic-gc", daemon=True).start()
        return self

    def _freeze_samples(self) -> None:
        """The samples pile up (about a million in a 10M-row run), and each full collection of Python's cyclic
        GC walks them all with every thread stopped: 171 ms for 700k of them on an idle core, more on a busy one,
        counted as latency by whichever statement was in flight. Frozen each second, a collection walks only what
        came since."""
        while not self._stop.wait(1.0):
            gc.freeze()
        gc.unfreeze()

    def stop(self) -> TrafficReport:
        if self.report is not None:
            return self.report
        self._stop.set()
        for w in self._workers:
            if w.thread is None:
                continue
            w.thread.join(timeout=15)
            if w.thread.is_alive() and w.conn is not None:
                # Stuck behind a lock: cancel the statement so the thread can exit.
                try:
                    getattr(w.conn, "cancel_safe", w.conn.cancel)()  # cancel_safe: psycopg >= 3.2
                except Exception:
                    pass
                w.thread.join(timeout=15)
        samples = sorted((s for w in self._workers for s in w.samples), key=lambda s: s.t)
        written: dict[str, str] = {}
        written_specs: dict[str, str] = {}
        for w in self._workers:
            written.update(w.written)  # disjoint by construction (id ownership)
            written_specs.update(w.written_specs)
        self.report = TrafficReport(samples=samples, written=written, written_specs=written_specs)
        return self.report

    def __enter__(self) -> "AppTraffic":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- vocabulary switches -------------------------------------------------

    def use_new_app(self, allow_new_only: bool = True) -> None:
        """Write the varchar vocabulary from now on (call after the swap)."""
        values = [self.mapping[l] for l in self.names.labels if l in self.mapping]
        if allow_new_only:
            values += [v for v in self.new_only_values if v not in values]
        with self._connect() as conn:
            has_ep = self._column_has_default(conn, "execution_pattern") is not None
        self._switch(_Vocab(self._vocab.generation + 1, "new", tuple(values), has_ep))

    def use_old_app(self) -> None:
        self._switch(_Vocab(self._vocab.generation + 1, "old", tuple(self.names.labels)))

    def _switch(self, vocab: _Vocab) -> None:
        # Return only once every thread has finished statements built with the old
        # vocabulary, so callers can sequence DDL after the switch deterministically.
        self._vocab = vocab
        deadline = time.monotonic() + _SWITCH_TIMEOUT_S
        for w in self._workers:
            while (
                w.thread is not None and w.thread.is_alive() and w.seen_generation < vocab.generation
                and time.monotonic() < deadline
            ):
                time.sleep(0.001)

    # --- worker loop ---------------------------------------------------------

    def _connect(self) -> psycopg.Connection:
        # prepare_threshold=None: server-side prepared statements would pin the old
        # column type across the swap; the app is modelled as not preparing.
        return psycopg.connect(self.dsn, autocommit=True, application_name="app-traffic", prepare_threshold=None)

    def _column_has_default(self, conn: psycopg.Connection, column: str) -> bool | None:
        """atthasdef of a live column of the seed table, or None if there is no such column."""
        row = conn.execute(
            sql.SQL("""SELECT a.atthasdef FROM pg_attribute a
  JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = %s AND c.relname = %s AND a.attname = %s AND a.attnum > 0 AND NOT a.attisdropped"""),
            [self.names.schema, self.names.table, column],
        ).fetchone()
        return None if row is None else row[0]

    def _sample_ids(self, conn: psycopg.Connection, want: int = 2000, table: str | None = None) -> list[str]:
        """A cheap spread of existing ids: block sampling sized from reltuples."""
        table = table or self.names.table
        reltuples = db.scalar(
            conn,
            sql.SQL("SELECT c.reltuples FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                    "WHERE n.nspname = %s AND c.relname = %s"),
            [self.names.schema, table],
        )
        t = sql.Identifier(self.names.schema, table)
        ids: list[str] = []
        if reltuples and reltuples > want:
            pct = min(100.0, 100.0 * 2 * want / reltuples)
            ids = [r[0] for r in conn.execute(
                sql.SQL("SELECT id FROM {} TABLESAMPLE SYSTEM (%s) LIMIT %s").format(t), [pct, want]
            )]
        if not ids:  # small or never-analysed table
            ids = [r[0] for r in conn.execute(sql.SQL("SELECT id FROM {} LIMIT %s").format(t), [want])]
        return ids

    def _execute(self, w: _Worker, kind: str, query, params) -> tuple | None:
        """One app statement, timed and recorded: (cursor, first row), or None when it failed."""
        assert w.conn is not None
        t = time.monotonic()
        error = row = cur = None
        try:
            cur = w.conn.execute(query, params)
            row = cur.fetchone() if cur.description else None
        except Exception as exc:
            error = _one_line(exc)
        w.samples.append(StatementSample(t - self._t0, kind, (time.monotonic() - t) * 1000, error))
        return None if error is not None else (cur, row)

    def _run(self, w: _Worker) -> None:
        while not self._stop.is_set():
            vocab = self._vocab
            w.seen_generation = vocab.generation
            kind = "connect"
            try:
                if w.conn is None or w.conn.closed:
                    w.conn = self._connect()
                kind = "internal"
                self._step(w, vocab)
            except Exception as exc:  # never let the thread die: record and go on
                w.samples.append(StatementSample(time.monotonic() - self._t0, kind, 0.0, _one_line(exc)))
                self._stop.wait(0.05)
            if w.conn is not None and w.conn.broken:
                w.conn.close()
                w.conn = None
            self._stop.wait(self.pause_s)
        w.seen_generation = 1 << 62
        if w.conn is not None:
            w.conn.close()

    def _step(self, w: _Worker, vocab: _Vocab) -> None:
        if self.chatter:
            return self._step_chatter(w, vocab)
        if w.role == "reader":
            kind = w.rng.choice(READ_KINDS)
        else:
            kinds = [k for k in WRITE_KINDS if k != "insert_default" or self._has_default]
            kind = w.rng.choices(kinds, weights=[_WRITE_WEIGHTS[k] for k in kinds])[0]
            if kind == "update_col" and not w.own_ids:
                kind = "insert"
        if kind in ("select_id", "update_other") and not self._shared_ids:
            kind = "count" if w.role == "reader" else "insert"

        value = w.rng.choice(vocab.values)
        ep = vocab.execution_pattern
        rid = ""
        if kind in ("insert", "insert_default"):
            rid = new_ulid()
            owner = w.rng.choice(_OWNERS)
            name = f"app template {w.index}-{len(w.own_ids)}"
            if kind == "insert":
                params = [rid, owner, name, value] + (["chat"] if ep else [])
                query = self._sql["insert_ep" if ep else "insert"]
            else:
                params = [rid, owner, name] + (["chat"] if ep else [])
                query = self._sql["insert_default_ep" if ep else "insert_default"]
        elif kind == "update_col":
            rid = w.rng.choice(w.own_ids)
            query, params = self._sql[kind], [value, rid]
        elif kind in ("update_other", "select_id"):
            rid = w.rng.choice(self._shared_ids)
            query, params = self._sql[kind], [rid]
        else:  # count
            query, params = self._sql["count"], [value]

        done = self._execute(w, kind, query, params)
        if done is not None:
            self._record(w, kind, rid, value, *done)

    def _step_chatter(self, w: _Worker, vocab: _Vocab) -> None:
        """One statement of Chatter's app: full rows, both tables (see chatter.template_values)."""
        if w.role == "reader":
            kind = w.rng.choice(CHATTER_READ_KINDS)
        else:
            kinds = [k for k in CHATTER_WRITE_KINDS if k != "insert_default" or self._has_default]
            kind = w.rng.choices(kinds, weights=[_CHATTER_WRITE_WEIGHTS[k] for k in kinds])[0]
            if kind == "update_col" and not w.own_ids:
                kind = "insert"
            if kind == "update_spec_col" and not w.own_spec_ids:
                kind = "insert_spec"
        if kind in ("select_id", "update_other") and not self._shared_ids:
            kind = "count" if w.role == "reader" else "insert"
        if kind in ("select_spec_id", "join", "update_spec_other") and not self._shared_spec_ids:
            kind = "count" if w.role == "reader" else "insert_spec"

        value = w.rng.choice(vocab.values)
        schema, col = self.names.schema, self.names.column
        rid = ""
        if kind in ("insert", "insert_default", "insert_spec"):
            rid = new_ulid()
            owner = w.rng.choice(_chatter.OWNERS)
            if kind == "insert_spec":
                values = _chatter.spec_values(rid, value, owner)
                query = _chatter.insert_sql(schema, _chatter.SPECS, tuple(values))
            else:
                extra = {"execution_pattern": "chat"} if vocab.execution_pattern else {}
                if self._shared_ids and w.rng.random() < 0.1:  # derived from an existing template
                    extra["base_template_id"] = w.rng.choice(self._shared_ids)
                values = _chatter.template_values(rid, value, owner, **extra)
                returning = None
                if kind == "insert_default":
                    del values[col]
                    returning = col
                query = _chatter.insert_sql(schema, self.names.table, tuple(values), returning)
            params = _chatter.insert_params(values)
        elif kind in ("update_col", "update_spec_col"):
            rid = w.rng.choice(w.own_ids if kind == "update_col" else w.own_spec_ids)
            query, params = self._sql[kind], [value, rid]
        elif kind in ("update_other", "select_id"):
            rid = w.rng.choice(self._shared_ids)
            query, params = self._sql[kind], [rid]
        elif kind in ("update_spec_other", "select_spec_id", "join"):
            rid = w.rng.choice(self._shared_spec_ids)
            query, params = self._sql[kind], [rid]
        else:  # count
            query, params = self._sql["count"], [value]

        done = self._execute(w, kind, query, params)
        if done is not None:
            self._record(w, kind, rid, value, *done)

    def _record(self, w: _Worker, kind: str, rid: str, value: str, cur, row) -> None:
        """What a statement that returned wrote (autocommit: it is committed), for the end-of-run row checks."""
        if kind == "insert":
            w.written[rid] = value
        elif kind == "insert_default":
            w.written[rid] = row[0]  # whatever the column default produced
        elif kind == "insert_spec":
            w.written_specs[rid] = value
        elif kind == "update_col" and cur.rowcount == 1:
            w.written[rid] = value
        elif kind == "update_spec_col" and cur.rowcount == 1:
            w.written_specs[rid] = value
        if kind in ("insert", "insert_default"):
            w.own_ids.append(rid)
            self._shared_ids.append(rid)
        elif kind == "insert_spec":
            w.own_spec_ids.append(rid)
            self._shared_spec_ids.append(rid)
