"""kind change_type, issue 33: a value down(up(x)) does not give back (a time in the DST gap through
AT TIME ZONE 'America/New_York') is found over every row before the swap, and one the old version writes after it
survives later edits of the row, so the rollback gives it back."""

from __future__ import annotations

import psycopg
import pytest
import yaml

from orchestrator.engine import playbook
from orchestrator.engine.errors import Refused
from orchestrator.lab import shop
from orchestrator.lab.snapshot import schema_snapshot, snapshot_diff
from orchestrator.run.runner import Orchestrator

from .helpers import ROOT, query

PHASES = 5
GAP = "2024-03-10 02:30:00"  # no such wall-clock time in New York: up/down give 03:30 back
NY = "at AT TIME ZONE 'America/New_York'"


def pb() -> playbook.Playbook:
    return playbook.parse({"name": "ny", "kind": "change_type", "settings": {"old_version_quiet_s": 0},
                           "columns": [{"table": "ev", "column": "at", "type": "timestamptz", "up": NY, "down": NY}]})


def seed(dsn, rows=300) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE ev (id int PRIMARY KEY, at timestamp, pad text)")
        conn.execute("INSERT INTO ev SELECT g, timestamp '2024-01-01' + g * interval '7 hours', 'p' "
                     "FROM generate_series(1, %s) g", (rows,))


def timed() -> dict:
    d = yaml.safe_load(TIMES.read_text())
    d["settings"]["old_version_quiet_s"] = 0
    return d


def snap(dsn) -> dict:
    with psycopg.connect(dsn) as conn:
        return schema_snapshot(conn)


def execute(dsn, stmt, params=None) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(stmt, params)


@pytest.mark.parametrize("written_before", [4, 5], ids=["phase 4", "the swap"])
def test_a_value_that_does_not_come_back_is_refused_over_every_row_naming_it(dsn, written_before):
    """The proof of phase 1 saw no such value; the old version writes one later: phase 4 (or the swap's scan
    again, for a value written after phase 4) refuses, naming the row and what would come back."""
    seed(dsn)
    orch = Orchestrator(pb(), dsn)
    try:
        for n in range(1, written_before):
            assert orch.run(n) == "applied"
        execute(dsn, "UPDATE ev SET at = %s WHERE id = 77", (GAP,))
        with pytest.raises(Refused, match=r"1 rows of ev\.at hold a value that down\(up\(x\)\) does not give back "
                                          r"\(id=77: 2024-03-10 02:30:00 gives 2024-03-10 03:30:00\)"):
            orch.run(written_before)
        assert query(dsn, "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 'ev'::regclass "
                          "AND attname = 'at'") == [("timestamp without time zone",)]
        execute(dsn, "UPDATE ev SET at = '2024-03-10 03:30' WHERE id = 77")  # what the refusal says to do
        for n in range(written_before, PHASES + 1):
            assert orch.run(n) == "applied"
    finally:
        orch.close()


def test_an_old_write_the_conversion_does_not_give_back_survives_edits_and_the_rollback(dsn):
    """After the swap the old version writes the DST-gap time into its copy; edits of the row that leave the
    column alone (another column, a no-op SET at = at) keep it, and rollback 5 gives it back."""
    seed(dsn)
    orch = Orchestrator(pb(), dsn)
    try:
        for n in range(1, PHASES + 1):
            assert orch.run(n) == "applied"
        execute(dsn, "UPDATE ev SET at_old = %s WHERE id = 77", (GAP,))  # the old version, through its copy
        execute(dsn, "INSERT INTO ev (id, at_old, pad) VALUES (1000, %s, 'p')", (GAP,))
        assert query(dsn, "SELECT count(*) FROM ev WHERE id IN (77, 1000) AND at = %s::timestamp AT TIME ZONE "
                          "'America/New_York'", (GAP,)) == [(2,)]
        execute(dsn, "UPDATE ev SET pad = 'edited' WHERE id IN (77, 1000)")
        execute(dsn, "UPDATE ev SET at = at WHERE id IN (77, 1000)")
        assert query(dsn, "SELECT id, at_old::text FROM ev WHERE id IN (77, 1000) ORDER BY id") == [
            (77, GAP), (1000, GAP)]
        assert orch.rollback(PHASES) == "rolled back"
        assert query(dsn, "SELECT id, at::text FROM ev WHERE id IN (77, 1000) ORDER BY id") == [(77, GAP), (1000, GAP)]
    finally:
        orch.close()


def test_the_contract_takes_an_old_write_up_gives_as_in_sync(dsn):
    """Such a row's two copies agree (the new value is up(old copy)): the contract's scan does not take it for a
    write that bypassed the sync; one that did bypass it is refused in the kind's words."""
    seed(dsn)
    orch = Orchestrator(pb(), dsn)
    try:
        for n in range(1, PHASES + 1):
            assert orch.run(n) == "applied"
        execute(dsn, "UPDATE ev SET at_old = %s WHERE id = 77", (GAP,))
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("SET session_replication_role = replica")
            conn.execute("UPDATE ev SET at_old = '2000-01-01' WHERE id = 78")
        with pytest.raises(Refused, match=r"cannot contract: 1 rows of ev\.at hold in the old copy \(timestamp "
                                          r"without time zone\) 'at_old' a value that is not down\(at\).*\[78\]"):
            orch.contract(old_version_gone=True)
        execute(dsn, "UPDATE ev SET at_old = '2000-01-01 00:00:01' WHERE id = 78")  # the sync sets at from it
        assert orch.contract(old_version_gone=True) == ["contracted"] * PHASES
    finally:
        orch.close()



def test_a_value_down_fails_on_is_refused_naming_it(dsn):
    """down failing on up(x) of a row written after the proof: phase 4 refuses naming the row, not the error."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE n (id int PRIMARY KEY, v int)")
        conn.execute("INSERT INTO n SELECT g, g FROM generate_series(1, 200) g")
    orch = Orchestrator(playbook.parse({"name": "fails", "kind": "change_type", "columns": [
        {"table": "n", "column": "v", "type": "bigint", "up": "v::bigint",
         "down": "CASE WHEN v < 1000000 THEN v ELSE v * 3000 END::int"}]}), dsn)
    try:
        assert orch.run(1) == "applied"
        execute(dsn, "INSERT INTO n VALUES (500, 2000000)")
        for n in (2, 3):
            assert orch.run(n) == "applied"
        with pytest.raises(Refused, match=r"rows of n\.v hold a value that down\(up\(x\)\) does not give back "
                                          r"\(id=500: 2000000 gives NULL \(down fails\)\)"):
            orch.run(4)
    finally:
        orch.close()


TIMES = ROOT / "playbooks" / "placed_at_to_timestamptz.yaml"
ZONES = ["America/New_York", "Asia/Kolkata", "UTC"]


def insert_order(dsn, zone: str, search_path: str = "public") -> tuple:
    """An order placed from a session in `zone`, relying on the default: (seconds between the instant stored and
    now, the stored value as the old version's column would hold it)."""
    with psycopg.connect(dsn, autocommit=True, options=f"-c TimeZone={zone} -c search_path={search_path}") as conn:
        return conn.execute("INSERT INTO orders (account_id) VALUES ((SELECT min(id) FROM accounts)) RETURNING "
                            "abs(extract(epoch FROM placed_at::timestamptz - now()))").fetchone()


def test_the_moved_default_stores_the_instant_it_did_and_comes_back_as_it_was(dsn):
    """timestamp DEFAULT (now() AT TIME ZONE 'UTC') becomes timestamptz: an insert relying on the default stores
    now, from a session in any TimeZone, before and after the swap and after the contract; rolled back from the
    swap the catalog is as it was (the old default's text too)."""
    with psycopg.connect(dsn) as conn:
        shop.create_shop(conn, accounts=50)
        before = schema_snapshot(conn)
    orch = Orchestrator(playbook.parse(timed()), dsn)
    try:
        for n in range(1, PHASES + 1):
            assert orch.run(n) == "applied"
        for zone in ZONES:
            (off,) = insert_order(dsn, zone)
            assert off < 60, f"after the swap, an order placed from {zone} is {off:.0f} s off now"
        for n in range(PHASES, 0, -1):
            assert orch.rollback(n) == "rolled back"
        assert snapshot_diff(before, snap(dsn)) == []
        for n in range(1, PHASES + 1):
            assert orch.run(n) == "applied"
        assert orch.contract(old_version_gone=True) == ["contracted"] * PHASES
        for zone in ZONES:
            (off,) = insert_order(dsn, zone)
            assert off < 60, f"after the contract, an order placed from {zone} is {off:.0f} s off now"
    finally:
        orch.close()


def test_a_default_up_would_compute_twice_is_refused_before_the_swap(dsn):
    """up naming the column twice would call a volatile default (nextval) twice per row: the swap refuses."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE n (id int PRIMARY KEY, v int DEFAULT (random() * 100)::int)")
        conn.execute("INSERT INTO n SELECT g, g FROM generate_series(1, 50) g")
    orch = Orchestrator(playbook.parse({"name": "twice", "kind": "change_type", "columns": [
        {"table": "n", "column": "v", "type": "bigint", "up": "CASE WHEN v < 0 THEN 0 ELSE v END::bigint",
         "down": "v::int"}]}), dsn)
    try:
        for n in range(1, PHASES):
            assert orch.run(n) == "applied"
        with pytest.raises(Refused, match=r"cannot swap n\.v: its default .* up names 'v' more than once"):
            orch.run(PHASES)
        assert query(dsn, "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 'n'::regclass "
                          "AND attname = 'v'") == [("integer",)]
    finally:
        orch.close()
