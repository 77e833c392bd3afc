"""kind change_type, pgroll-style, on each PostgreSQL major: an integer key family (a serial primary key and two
foreign keys pointing at it) becomes bigint, and a timestamp column timestamptz, through the same phases as the
enum; rolled back after any phase the catalog is as it was; bad expressions are refused before anything changes."""

from __future__ import annotations

import psycopg
import pytest
import yaml

from orchestrator.engine import playbook
from orchestrator.engine.errors import BadInput, Refused
from orchestrator.lab import shop
from orchestrator.lab.snapshot import ignoring_column_order, schema_snapshot, snapshot_diff
from orchestrator.run.runner import Orchestrator

from .helpers import ROOT, cli, query, write_playbook

KEYS = ROOT / "playbooks" / "account_id_to_bigint.yaml"
TIMES = ROOT / "playbooks" / "placed_at_to_timestamptz.yaml"
PHASES = 5


def data(path=KEYS, **settings) -> dict:
    d = yaml.safe_load(path.read_text())
    d["settings"].update({"old_version_quiet_s": 0, **settings})
    return d


def make(dsn, path=KEYS, **settings) -> Orchestrator:
    return Orchestrator(playbook.parse(data(path, **settings)), dsn)


def seeded(dsn, accounts=2000) -> dict:
    with psycopg.connect(dsn) as conn:
        shop.create_shop(conn, accounts=accounts)
        return schema_snapshot(conn)


def snap(dsn) -> dict:
    with psycopg.connect(dsn) as conn:
        return schema_snapshot(conn)


def rows(dsn) -> list:
    return query(dsn, "SELECT a.id, a.email, a.created_at, o.id, o.account_id, o.placed_at, i.account_id "
                      "FROM accounts a JOIN orders o ON o.account_id = a.id JOIN invoices i ON i.account_id = a.id "
                      "ORDER BY o.id")


def column_type(dsn, table, column) -> str:
    return query(dsn, "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = %s::regclass "
                      "AND attname = %s", (table, column))[0][0]


@pytest.mark.parametrize("method", ["update", "copy"])
def test_a_key_family_becomes_bigint_under_signups_with_zero_app_errors(dsn, method):
    """The app signs up accounts through the sequence and places orders for them during the whole run, old
    version through its views before the swap and new version after; afterwards ids past 2^31 insert. By copy
    too: each table of the family copied and swapped in, the others' foreign keys re-pointed at the copy."""
    seeded(dsn)
    orch = make(dsn, backfill_method=method)
    old = shop.ShopTraffic(dsn, search_path="shop_v1,public").start()
    new = None
    try:
        for n in range(1, PHASES + 1):
            assert orch.run(n) == "applied"
            if n == PHASES:
                new = shop.ShopTraffic(dsn, search_path="shop_v2,public").start()
        old.stop()
        assert orch.contract(old_version_gone=True) == ["contracted"] * PHASES
    finally:
        old.stop()
        if new is not None:
            new.stop()
        orch.close()
    assert old.errors == [] and new is not None and new.errors == [], (old.errors[:3], new and new.errors[:3])
    assert old.signups > 0 and new.signups > 0
    for table, column in (("accounts", "id"), ("orders", "account_id"), ("invoices", "account_id")):
        assert column_type(dsn, table, column) == "bigint"
    assert query(dsn, "SELECT conname, convalidated, pg_get_constraintdef(oid) FROM pg_constraint "
                      "WHERE conrelid IN ('orders'::regclass, 'invoices'::regclass) AND contype = 'f' ORDER BY 1") == [
        ("invoices_account_fk", True, "FOREIGN KEY (account_id) REFERENCES accounts(id) DEFERRABLE INITIALLY DEFERRED"),
        ("orders_account_id_fkey", True, "FOREIGN KEY (account_id) REFERENCES accounts(id) ON DELETE CASCADE")]
    assert query(dsn, "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = 'accounts_pkey'") == [
        ("PRIMARY KEY (id)",)]
    seq = [s for s in snap(dsn)["sequences"] if s["name"] == "accounts_id_seq"][0]
    assert (seq["type"], seq["owned_by"]) == ("bigint", "accounts.id")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT setval('accounts_id_seq', %s)", (shop.INT_MAX + 5,))
        big = conn.execute("INSERT INTO accounts (email) VALUES ('big') RETURNING id").fetchone()[0]
        conn.execute("INSERT INTO orders (account_id) VALUES (%s)", (big,))
    assert big > shop.INT_MAX
    assert query(dsn, "SELECT count(*) FROM orders WHERE account_id = %s", (big,)) == [(1,)]


@pytest.mark.parametrize("k", range(1, PHASES + 1))
@pytest.mark.parametrize("method", ["update", "copy"])
def test_rolled_back_after_phase_k_the_catalog_and_data_are_as_before(dsn, k, method):
    before = seeded(dsn, accounts=500)
    data_before = rows(dsn)
    orch = make(dsn, backfill_method=method)
    try:
        for n in range(1, k + 1):
            assert orch.run(n) == "applied"
        assert column_type(dsn, "accounts", "id") == ("bigint" if k == PHASES else "integer")
        for n in range(k, 0, -1):
            assert orch.rollback(n) == "rolled back"
    finally:
        orch.close()
    assert snapshot_diff(before, snap(dsn)) == []
    assert rows(dsn) == data_before


def test_rollback_of_the_swap_refuses_ids_the_old_type_cannot_hold_naming_them(dsn):
    before = seeded(dsn, accounts=300)
    orch = make(dsn)
    try:
        for n in range(1, PHASES + 1):
            orch.run(n)
        with psycopg.connect(dsn, autocommit=True, options="-csearch_path=shop_v2,public") as conn:
            conn.execute("SELECT setval('accounts_id_seq', %s)", (shop.INT_MAX + 1,))
            big = conn.execute("INSERT INTO accounts (email) VALUES ('past') RETURNING id").fetchone()[0]
        # The old version's copy is NULL (the write did not fail); its view shows no id for that row.
        assert query(dsn, "SELECT id_old FROM accounts WHERE id = %s", (big,)) == [(None,)]
        with pytest.raises(Refused, match=rf"accounts\.id: 1 rows, e\.g\. ids \[{big}\]"):
            orch.rollback(PHASES)
        assert column_type(dsn, "accounts", "id") == "bigint"  # nothing changed
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("DELETE FROM accounts WHERE id = %s", (big,))
        # The row is gone but the sequence handed out its id: integer cannot take the sequence back either.
        with pytest.raises(Refused, match="accounts_id_seq .* past what integer holds"):
            orch.rollback(PHASES)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("SELECT setval('accounts_id_seq', (SELECT max(id) FROM accounts))")
        for n in range(PHASES, 0, -1):
            assert orch.rollback(n) == "rolled back"
    finally:
        orch.close()
    after = snap(dsn)
    for s in after["sequences"]:  # setval above moved the sequence's position, not its shape
        assert s in before["sequences"]
    assert snapshot_diff(before, after) == []


def test_the_way_back_after_the_contract(dsn):
    before = seeded(dsn, accounts=400)
    data_before = rows(dsn)
    orch = make(dsn)
    try:
        for n in range(1, PHASES + 1):
            orch.run(n)
        orch.contract(old_version_gone=True)
        for n in range(PHASES, 0, -1):
            assert orch.rollback(n) == "contract undone"
        assert query(dsn, "SELECT count(*) FROM accounts WHERE id_old IS DISTINCT FROM id") == [(0,)]
        for n in range(PHASES, 0, -1):
            assert orch.rollback(n) == "rolled back"
    finally:
        orch.close()
    assert snapshot_diff(ignoring_column_order(before), ignoring_column_order(snap(dsn))) == []
    assert rows(dsn) == data_before


def test_timestamp_becomes_timestamptz_with_every_value_the_same_instant(dsn):
    seeded(dsn, accounts=1500)
    wall = dict(query(dsn, "SELECT id, placed_at FROM orders"))
    orch = make(dsn, TIMES)
    old = shop.ShopTraffic(dsn, search_path="shop_v1,public").start()
    try:
        for n in range(1, PHASES + 1):
            orch.run(n)
        old.stop()
        orch.contract(old_version_gone=True)
    finally:
        old.stop()
        orch.close()
    assert old.errors == []
    assert column_type(dsn, "orders", "placed_at") == "timestamp with time zone"
    # Each value is the instant its wall-clock time named in UTC, whatever the session's time zone.
    got = dict(query(dsn, "SELECT id, placed_at AT TIME ZONE 'UTC' FROM orders WHERE id = ANY(%s)", (list(wall),)))
    assert got == wall


BAD = [
    ("syntax", {"up": "id::bigint +"}, r"columns\[0\]\.up: syntax error"),
    ("wrong result type", {"up": "id::text || 'x'"}, r"columns\[0\]\.up: return type mismatch"),
    ("two statements", {"up": "id::bigint); DROP TABLE orders; SELECT (1"}, r"columns\[0\]\.up: "),
    ("another column", {"up": "email::bigint"}, r"columns\[0\]\.up: column \"email\" does not exist"),
    ("no way back", {"down": "(id / 2)::integer"},
     r"columns\[0\]\.down: the value \d+ of accounts\.id in the row id=\d+ does not come back"),
    ("unknown type", {"type": "bigint2"}, r"columns\[0\]\.type: 'bigint2' is not a type"),
    ("same type", {"type": "int4", "up": "id", "down": "id"}, r"columns\[0\]\.type: accounts\.id is of type integer"),
]


@pytest.mark.parametrize("case, change, message", BAD, ids=[b[0] for b in BAD])
def test_bad_expressions_are_refused_before_anything_changes(dsn, case, change, message):
    before = seeded(dsn, accounts=50)
    d = data()
    d["columns"][0].update(change)
    orch = Orchestrator(playbook.parse(d), dsn)
    try:
        with pytest.raises(BadInput, match=message):
            orch.run(1)
    finally:
        orch.close()
    assert snapshot_diff(before, snap(dsn)) == []
    assert query(dsn, "SELECT to_regclass('orders') IS NOT NULL") == [(True,)]


def test_a_column_joined_by_a_foreign_key_cannot_be_left_out(dsn, tmp_path):
    before = seeded(dsn, accounts=50)
    d = data()
    del d["columns"][2]
    r = cli("run", "1", dsn=dsn, playbook_path=write_playbook(d, tmp_path / "pb.yaml"))
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "invoices.account_id is joined to accounts.id by foreign key 'invoices_account_fk'" \
        in lines[0], r.stderr
    assert snapshot_diff(before, snap(dsn)) == []


def test_an_identity_column_is_refused_with_what_to_do(dsn):
    with psycopg.connect(dsn) as conn:
        conn.execute("CREATE TABLE things (id integer GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, n integer)")
    pb = playbook.parse({"name": "ident", "kind": "change_type", "columns": [
        {"table": "things", "column": "id", "type": "bigint", "up": "id::bigint", "down": "id::integer"}]})
    orch = Orchestrator(pb, dsn)
    try:
        with pytest.raises(BadInput, match="identity column.*DROP IDENTITY"):
            orch.run(1)
    finally:
        orch.close()


@pytest.mark.parametrize("field, value, message", [
    ("mapping", {"a": "b"}, "'mapping': not used by kind change_type"),
    ("enum", {"name": "x"}, "'enum': not used by kind change_type"),
    ("rollback", {"unmapped": "fallback", "fallback_label": "x"}, "only refuses"),
])
def test_enum_fields_in_a_change_type_playbook_are_refused(field, value, message):
    d = data()
    d[field] = value
    with pytest.raises(BadInput, match=message):
        playbook.parse(d)


def test_a_change_type_entry_needs_type_up_and_down():
    d = data()
    del d["columns"][1]["down"]
    with pytest.raises(BadInput, match=r"columns\.1\.down': required with kind change_type"):
        playbook.parse(d)


def test_a_fleet_rolls_the_key_family_out_wave_by_wave(pg_server, tmp_path):
    """The same playbook across three databases, canary first: every target ends with bigint keys."""
    import secrets as _secrets

    from orchestrator.lab import server

    names = [f"kf_{_secrets.token_hex(4)}_{i}" for i in range(3)]
    dsns = [server.create_database(pg_server.dsn, n) for n in names]
    try:
        for d in dsns:
            seeded(d, accounts=200)
        write_playbook(data(), tmp_path / "playbook.yaml")
        inv = tmp_path / "fleet.yaml"
        inv.write_text(yaml.safe_dump({
            "playbook": "playbook.yaml", "concurrency": 2,
            "targets": [{"name": f"t{i}", "dsn": d, "labels": {"tier": "canary"} if i == 0 else {}}
                        for i, d in enumerate(dsns)],
            "waves": [{"name": "canary", "select": {"tier": "canary"}}, {"name": "rest", "rest": True}]}))
        r = cli("fleet", "--inventory", str(inv), "run", str(PHASES), "--through",
                env={"ORCHESTRATOR_CONTROL_DIR": str(tmp_path / "ctl")})
        assert r.returncode == 0, r.stdout + r.stderr
        for d in dsns:
            assert column_type(d, "accounts", "id") == "bigint"
            assert column_type(d, "invoices", "account_id") == "bigint"
            assert query(d, "SELECT count(*) FROM pg_constraint WHERE contype = 'f' AND NOT convalidated") == [(0,)]
    finally:
        for n in names:
            server.drop_database(pg_server.dsn, n)


@pytest.mark.parametrize("path", [KEYS, TIMES], ids=["keys", "timestamptz"])
def test_the_rehearsal_of_a_change_type_playbook_passes_under_sign_ups(dsn, path, tmp_path):
    """Every phase's rollback under the app's traffic, the contract, the way back and forward again: every check
    passes, no app error; for the key family, the swap's rollback refuses an id past 2^31, naming it."""
    from orchestrator.lab import rehearse
    from orchestrator.lab.rehearse import report

    result = rehearse.rehearse(playbook.parse(data(path)), dsn, rows=300, writers=2, dwell_s=0.02)
    assert result.passed, ([c for c in result.failed_checks][:3], result.app_errors[:3], result.stopped)
    names = {c.name for c in result.checks}
    assert "schema after the way back = the original (column order aside)" in names
    assert ("rollback of the swap refuses an id past the old type, naming it" in names) == (path == KEYS)
    assert report.write(result, tmp_path / "r.html").read_text().count("<tr") > 10


def test_odd_names_go_through_and_an_up_that_fails_names_its_row(dsn):
    """A schema and table with spaces and quotes, a column with a space, views per app version in schemas with
    spaces: the whole way and back; text -> jsonb with one row that is not JSON is refused naming that row."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute('CREATE SCHEMA "my schema"')
        conn.execute('CREATE TABLE "my schema"."Odd ""Table""" (id int PRIMARY KEY, "Created At" timestamp, v text)')
        conn.execute('INSERT INTO "my schema"."Odd ""Table""" SELECT g, timestamp \'2020-01-01\' + g * interval '
                     '\'1 day\', \'{"a": 1}\' FROM generate_series(1, 300) g')
        conn.execute('UPDATE "my schema"."Odd ""Table""" SET v = \'not json\' WHERE id = 77')
        before = schema_snapshot(conn, "my schema")
    pb = playbook.parse({"name": "odd", "kind": "change_type", "columns": [
        {"schema": "my schema", "table": 'Odd "Table"', "column": "Created At", "type": "timestamptz",
         "up": "\"Created At\" AT TIME ZONE 'UTC'", "down": "\"Created At\" AT TIME ZONE 'UTC'"}],
        "app_versions": {"old": "odd v1", "new": "odd v2"}, "settings": {"old_version_quiet_s": 0}})
    orch = Orchestrator(pb, dsn)
    try:
        for n in range(1, PHASES + 1):
            orch.run(n)
        orch.contract(old_version_gone=True)
        for _ in range(2):  # the undo of each contract step, then each rollback
            for n in range(PHASES, 0, -1):
                orch.rollback(n)
    finally:
        orch.close()
    with psycopg.connect(dsn) as conn:
        after = schema_snapshot(conn, "my schema")
    assert snapshot_diff(ignoring_column_order(before), ignoring_column_order(after)) == []
    jsonb = playbook.parse({"name": "odd_json", "kind": "change_type", "columns": [
        {"schema": "my schema", "table": 'Odd "Table"', "column": "v", "type": "jsonb", "up": "v::jsonb",
         "down": "v::text"}]})
    orch = Orchestrator(jsonb, dsn)
    try:
        with pytest.raises(BadInput, match=r'columns\[0\]\.up: fails on my schema\.Odd "Table"\.v in the row id=77 '
                                            r'\(value not json\): invalid input syntax for type json'):
            orch.run(1)
    finally:
        orch.close()
