"""A key family for kind change_type: accounts with a serial integer key near overflow, and two tables whose
foreign keys point at it (playbooks/account_id_to_bigint.yaml), plus a `timestamp` column to move to
`timestamptz` (playbooks/placed_at_to_timestamptz.yaml). The app signs up accounts through the sequence and
places orders for them."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import psycopg

from orchestrator.lab.traffic import StatementSample

SCHEMA_SQL = """
CREATE TABLE accounts (
    id serial PRIMARY KEY,
    email text NOT NULL,
    created_at timestamp NOT NULL DEFAULT now()
);
CREATE TABLE orders (
    id bigserial PRIMARY KEY,
    account_id integer NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    amount_cents integer NOT NULL DEFAULT 0,
    placed_at timestamp NOT NULL DEFAULT (now() AT TIME ZONE 'UTC')
);
CREATE INDEX ix_orders_account_id ON orders (account_id);
CREATE INDEX ix_orders_placed_at ON orders (placed_at);
CREATE TABLE invoices (
    id bigserial PRIMARY KEY,
    account_id integer CONSTRAINT invoices_account_fk REFERENCES accounts (id) DEFERRABLE INITIALLY DEFERRED,
    total_cents integer
);
"""

INT_MAX = 2_147_483_647


def create_shop(conn: psycopg.Connection, accounts: int = 10_000, orders_per_account: int = 2,
                ids_left: int = 2_000_000) -> None:
    """The schema and its rows; the accounts sequence then stands `ids_left` ids before integer overflow."""
    conn.execute(SCHEMA_SQL)
    conn.execute("""INSERT INTO accounts (email, created_at)
                    SELECT 'user' || g || '@example.com', timestamp '2024-01-01' + g * interval '1 minute'
                    FROM generate_series(1, %s) g""", (accounts,))
    conn.execute("""INSERT INTO orders (account_id, amount_cents, placed_at)
                    SELECT a.id, (a.id * 7 + k) %% 10000, a.created_at + k * interval '1 hour'
                    FROM accounts a, generate_series(1, %s) k""", (orders_per_account,))
    conn.execute("INSERT INTO invoices (account_id, total_cents) SELECT id, id % 5000 FROM accounts")
    conn.execute("SELECT setval('accounts_id_seq', %s)", (INT_MAX - ids_left,))
    conn.execute("ANALYZE accounts, orders, invoices")
    conn.commit()


@dataclass
class ShopTraffic:
    """Sign-ups through the sequence and orders for them, on `writers` connections, each statement timed.

    `search_path` may be changed while it runs (an app version replaced by another: each connection is made
    again with the new one). `prepare`: server-side prepared statements for every statement, as a pooled app's
    would be (off: plain statements, for a database without views per app version, where a column's type
    change invalidates a prepared statement's result type)."""

    dsn: str
    writers: int = 2
    search_path: str | None = None  # e.g. "app_v1,public": the old app version through its views
    pause_s: float = 0.002
    prepare: bool = True
    errors: list[str] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    samples: list[StatementSample] = field(default_factory=list)  # on the clock of `t0`
    orders: dict[int, int] = field(default_factory=dict)  # order id -> account id, as committed by the app
    signups: int = 0
    t0: float = field(default_factory=time.monotonic)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> ShopTraffic:
        for _ in range(self.writers):
            t = threading.Thread(target=self._run, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> ShopTraffic:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)
        return self

    @property
    def max_ms(self) -> float:
        return max(self.latencies_ms, default=0.0)

    def _timed(self, conn: psycopg.Connection, kind: str, stmt: str, params: tuple = ()) -> list[tuple]:
        start = time.monotonic()
        error = None
        try:
            cur = conn.execute(stmt, params)
            return cur.fetchall() if cur.description else []
        except psycopg.Error as err:
            error = " ".join(str(err).split())[:200]
            raise
        finally:
            ms = (time.monotonic() - start) * 1000
            with self._lock:
                self.latencies_ms.append(ms)
                self.samples.append(StatementSample(start - self.t0, kind, ms, error))

    def _connect(self, search_path: str | None) -> psycopg.Connection:
        options = f"-csearch_path={search_path}" if search_path else ""
        # prepare_threshold=0: every statement is a server-side prepared one, as a pooled app's would be.
        return psycopg.connect(self.dsn, autocommit=True, options=options,
                               prepare_threshold=0 if self.prepare else None)

    def _run(self) -> None:
        path = self.search_path
        conn = self._connect(path)
        try:
            while not self._stop.is_set():
                if self.search_path != path:  # the app version was replaced: a new instance connects
                    conn.close()
                    path = self.search_path
                    conn = self._connect(path)
                try:
                    with conn.transaction():
                        account = self._timed(conn, "sign up", "INSERT INTO accounts (email) VALUES (%s) RETURNING id",
                                              (f"u{time.monotonic_ns()}@example.com",))[0][0]
                        order = self._timed(conn, "order", "INSERT INTO orders (account_id, amount_cents) "
                                                           "VALUES (%s, %s) RETURNING id", (account, 100))[0][0]
                        self._timed(conn, "invoice", "INSERT INTO invoices (account_id, total_cents) VALUES (%s, %s)",
                                    (account, 100))
                    self._timed(conn, "update", "UPDATE orders SET amount_cents = amount_cents + 1 "
                                                "WHERE account_id = %s", (account,))
                    self._timed(conn, "join", "SELECT a.id, o.id FROM accounts a JOIN orders o ON o.account_id = a.id "
                                              "WHERE a.id = %s", (account,))
                    with self._lock:
                        self.signups += 1
                        self.orders[order] = account
                except psycopg.Error as err:
                    with self._lock:
                        self.errors.append(" ".join(str(err).split())[:200])
                    if conn.closed:
                        conn = self._connect(path)
                time.sleep(self.pause_s)
        finally:
            conn.close()
