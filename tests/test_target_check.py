"""Issue 18: the new column keeps a guarantee. `target.check` (the reference playbook: pattern
^[a-z][a-z0-9_]*$) becomes a CHECK on the new column, added NOT VALID and VALIDATEd before the swap, kept
through the swap and the contract, dropped by every rollback; playbooks whose own values break it are
refused before anything runs."""

from __future__ import annotations

import psycopg
import pytest
from psycopg import errors as pgerr
from psycopg import sql

from orchestrator.engine import playbook
from orchestrator.engine.errors import BadInput
from orchestrator.engine.target_rules import PatternError, to_python
from orchestrator.lab import chatter
from orchestrator.lab.snapshot import snapshot_diff
from orchestrator.lab.traffic import AppTraffic
from orchestrator.run.runner import Orchestrator

from .helpers import (
    cli,
    make_playbook,
    query,
    real_playbook,
    reference_dict,
    seed,
    seed_chatter,
    snapshot,
    write_playbook,
)

TABLES = (chatter.TEMPLATES, chatter.SPECS)
CHECK = "_ec_workflow_type_check"
MALFORMED = ("", "  ", "Rag Chat;--", "Medical_chat", "9lives", "rag-chat", "rag_chat\n")
VALID_NEW = ("medical_chat", "rag_chat", "x", "legal_2024")


def constraints(dsn: str) -> list[tuple]:
    """(table, constraint, validated, column it is on) of every target CHECK in the database."""
    return query(dsn, """SELECT c.conrelid::regclass::text, c.conname, c.convalidated, a.attname
                         FROM pg_constraint c JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1]
                         WHERE c.conname = %s ORDER BY 1""", (CHECK,))


def rejected(dsn: str, table: str, value: str, how: str = "update") -> bool:
    """Does the database refuse `value` in workflow_type? Either way nothing is kept."""
    with psycopg.connect(dsn) as conn:
        try:
            with conn.transaction(force_rollback=True):
                if how == "insert":
                    insert = chatter.insert_template if table == chatter.TEMPLATES else chatter.insert_spec
                    insert(conn, f"probe-{table}", value, chatter.SYSTEM_USER)
                else:
                    conn.execute(sql.SQL("UPDATE {} SET workflow_type = %s WHERE id = (SELECT min(id) FROM {})").format(
                        sql.Identifier(table), sql.Identifier(table)), (value,))
        except pgerr.CheckViolation as err:
            assert err.diag.constraint_name == CHECK, err
            return True
    return False


def assert_guarded(dsn: str) -> None:
    for table in TABLES:
        for value in MALFORMED:
            assert rejected(dsn, table, value), f"{table}: {value!r} was accepted"
        assert rejected(dsn, table, "", how="insert"), f"{table}: INSERT of '' was accepted"
        for value in VALID_NEW:
            assert not rejected(dsn, table, value), f"{table}: the valid {value!r} was refused"
            assert not rejected(dsn, table, value, how="insert"), f"{table}: INSERT of {value!r} was refused"


def test_malformed_types_are_rejected_after_the_swap_and_the_contract_while_the_app_writes(dsn):
    seed_chatter(dsn, rows=1500)
    orch = Orchestrator(real_playbook(), dsn)
    traffic = AppTraffic(dsn, chatter.chatter_names(), writers=2, readers=1, chatter=True,
                         new_only_values=("medical_chat",))
    try:
        with traffic:
            for k in range(1, 5):
                assert orch.run(k) == "applied"
            assert constraints(dsn) == []  # nothing before the swap's preparation
            assert orch.run(5) == "applied"
            traffic.use_new_app(allow_new_only=True)  # medical_chat from now on
            assert constraints(dsn) == [("template_specs", CHECK, True, "workflow_type"),
                                        ("workflow_templates", CHECK, True, "workflow_type")]
            assert_guarded(dsn)
            assert orch.run(6) == "applied"
            assert orch.contract(old_version_gone=True) == ["contracted"] * 6
            assert constraints(dsn) == [("template_specs", CHECK, True, "workflow_type"),
                                        ("workflow_templates", CHECK, True, "workflow_type")]
            assert_guarded(dsn)
        report = traffic.stop()
    finally:
        orch.close()
    assert report.errors == [], report.errors[:5]
    written = {**report.written, **report.written_specs}
    assert "medical_chat" in written.values(), "the new app never wrote a new type"
    for table in TABLES:  # every row, the app's included, satisfies the guarantee
        assert query(dsn, sql.SQL("SELECT count(*) FROM {} WHERE workflow_type !~ '^[a-z][a-z0-9_]*$'").format(
            sql.Identifier(table))) == [(0,)]
    assert query(dsn, "SELECT count(*) FROM workflow_templates WHERE workflow_type = 'medical_chat'")[0][0] > 0


def test_rollback_of_each_phase_leaves_no_trace_of_the_check(dsn):
    seed_chatter(dsn, rows=300)
    snaps = {0: snapshot(dsn)}
    orch = Orchestrator(real_playbook(), dsn)
    try:
        for k in range(1, 7):
            orch.run(k)
            snaps[k] = snapshot(dsn)
        assert [c[1] for c in constraints(dsn)] == [CHECK, CHECK]
        for k in range(6, 0, -1):
            assert orch.rollback(k) == "rolled back"
            assert snapshot_diff(snaps[k - 1], snapshot(dsn)) == [], f"rollback {k}"
            assert len(constraints(dsn)) == (2 if k > 5 else 0), f"after rollback {k}"
    finally:
        orch.close()


def test_an_interrupted_swap_rolls_back_without_a_trace(dsn, tmp_path):
    """Killed right after VALIDATE (the NOT VALID constraint is committed): `rollback 5` removes it."""
    seed_chatter(dsn, rows=200)
    path = write_playbook(reference_dict(), tmp_path / "pb.yaml")
    for k in range(1, 5):
        assert cli("run", str(k), dsn=dsn, playbook_path=path).returncode == 0
    before = snapshot(dsn)
    r = cli("run", "5", dsn=dsn, playbook_path=path,
            env={"ORCHESTRATOR_CRASH_AT": f'VALIDATE CONSTRAINT "{CHECK}"#2'})
    assert r.returncode != 0
    assert [(t, v) for t, _, v, _ in constraints(dsn)] == [("template_specs", False), ("workflow_templates", True)]
    r = cli("rollback", "5", "--yes", dsn=dsn, playbook_path=path)
    assert r.returncode == 0, r.stderr
    assert constraints(dsn) == []
    assert snapshot_diff(before, snapshot(dsn)) == []
    r = cli("run", "5", dsn=dsn, playbook_path=path)  # and forward again
    assert r.returncode == 0, r.stderr
    assert [c[2] for c in constraints(dsn)] == [True, True]


def test_rows_breaking_the_check_refuse_the_swap_and_are_listed(dsn, tmp_path):
    seed_chatter(dsn, rows=200)
    path = write_playbook(reference_dict(), tmp_path / "pb.yaml")
    for k in range(1, 5):
        assert cli("run", str(k), dsn=dsn, playbook_path=path).returncode == 0
    bad = [r[0] for r in query(dsn, "SELECT id FROM template_specs ORDER BY id LIMIT 2")]
    with psycopg.connect(dsn) as conn:  # written behind the trigger's back, after the parity check
        conn.execute("SET session_replication_role = replica")  # else the sync trigger repairs the copy
        conn.execute("UPDATE template_specs SET workflow_type_new = 'Rag Chat;--' WHERE id = ANY(%s)", (bad,))
    before = snapshot(dsn)
    r = cli("run", "5", dsn=dsn, playbook_path=path)
    assert r.returncode == 3, r.stderr
    assert "template_specs.workflow_type: 2 rows" in r.stderr and all(i in r.stderr for i in bad), r.stderr
    assert "Rag Chat;--" in r.stderr
    assert snapshot(dsn) == before, "a refused swap must change nothing"
    assert constraints(dsn) == []
    with psycopg.connect(dsn) as conn:
        conn.execute("UPDATE template_specs SET workflow_type_new = 'rag_chat', workflow_type = 'rag' "
                     "WHERE id = ANY(%s)", (bad,))
    r = cli("run", "5", dsn=dsn, playbook_path=path)
    assert r.returncode == 0, r.stderr
    assert [c[2] for c in constraints(dsn)] == [True, True]


@pytest.mark.parametrize("edit, names", [
    (lambda d: d["target"]["check"].update(pattern="^[a-z]+$"), ["mapping.plain", "'simple_chat'"]),
    (lambda d: d["columns"][0]["seed_rows"]["rows"][2].update(workflow_type="Function Chat"),
     ["columns[0].seed_rows.rows[2].workflow_type", "function_chat_builtin", "'Function Chat'"]),
    (lambda d: d["rollback"].update(reverse_mapping={"Legacy": "plain"}), ["rollback.reverse_mapping", "'Legacy'"]),
    (lambda d: d["target"]["check"].update(pattern=r"^\w+$"), ["target.check.pattern", "position 1"]),
    (lambda d: d["target"]["check"].update(pattern="^[[:lower:]]+$"), ["target.check.pattern"]),
    (lambda d: d["target"].update(check={"non_empty": True, "pattern": "^[a-z_]+$", "extra": 1}),
     ["target.check.extra"]),
], ids=["mapping", "built-in-row", "reverse-mapping", "class-shorthand", "posix-class", "unknown-key"])
def test_a_playbook_whose_own_values_break_the_check_is_refused(dsn, tmp_path, edit, names):
    seed_chatter(dsn, rows=20)
    data = reference_dict()
    edit(data)
    path = write_playbook(data, tmp_path / "bad.yaml")
    before = snapshot(dsn)
    r = cli("run", "1", dsn=dsn, playbook_path=path)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert all(n in r.stderr for n in names), r.stderr
    assert snapshot(dsn) == before
    assert query(dsn, "SELECT to_regnamespace('_orchestrator') IS NULL") == [(True,)]


def test_plan_names_the_check_statements_with_their_locks(dsn):
    seed_chatter(dsn, rows=20)
    r = cli("plan", dsn=dsn, env={"COLUMNS": "300"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr
    text = r.stdout
    swap = text[text.index("Phase 5: swap"):text.index("Phase 6:")]
    expand = swap[:swap.index("contract:")]
    rollback = swap[swap.index("rollback:"):]
    for table in TABLES:
        add = (f'ALTER TABLE "public"."{table}" ADD CONSTRAINT "{CHECK}" CHECK ("workflow_type_new" ~ '
               f"'^[a-z][a-z0-9_]*$') NOT VALID;   -- lock: ACCESS EXCLUSIVE (catalog only, NOT VALID: no scan)")
        assert add in expand, expand
        assert (f'ALTER TABLE "public"."{table}" VALIDATE CONSTRAINT "{CHECK}";   -- lock: SHARE UPDATE EXCLUSIVE'
                in expand)
        assert f'ALTER TABLE "public"."{table}" DROP CONSTRAINT IF EXISTS "{CHECK}";   -- lock: ACCESS EXCLUSIVE' \
            in rollback
    # Added before the swap transaction, so new values are held to it from the swap on.
    assert expand.index(f'ADD CONSTRAINT "{CHECK}"') < expand.index("LOCK TABLE")
    assert "UNSAFE" not in text


def test_non_empty_on_the_one_column_shape(dsn):
    """non_empty alone (no pattern), on the simplified table: '' and white space refused, anything else kept."""
    seed(dsn, rows=100)
    pb = make_playbook(**{"target.check": {"non_empty": True}})
    orch = Orchestrator(pb, dsn)
    try:
        for k in range(1, 6):
            orch.run(k)
        with psycopg.connect(dsn) as conn:
            for value in ("", " ", "\t\n"):
                with pytest.raises(pgerr.CheckViolation), conn.transaction():
                    conn.execute("UPDATE workflow_templates SET workflow_type = %s WHERE id = "
                                 "(SELECT min(id) FROM workflow_templates)", (value,))
            for value in ("Anything Goes;--", "simple_chat"):  # the last one: a value the rollback can map back
                conn.execute("UPDATE workflow_templates SET workflow_type = %s WHERE id = "
                             "(SELECT min(id) FROM workflow_templates)", (value,))
        orch.rollback(5)
        assert query(dsn, "SELECT count(*) FROM pg_constraint WHERE conname = %s", (CHECK,)) == [(0,)]
    finally:
        orch.close()


def test_the_pattern_subset_reads_the_same_in_python_and_postgresql(dsn):
    patterns = [r"^[a-z][a-z0-9_]*$", r"^(?:simple|rag|function)_chat$", r"^[^ ]+$", r"a.c", r"^x{2,3}$",
                r"^(ab|c)+?$", r"^[-a-c]+$", r"\.", r"^$", r"^.{3}$", r"^[A-Z]?[a-z]*$"]
    values = ["", " ", "abc", "a_c", "a\nc", "abc\n", "Abc", "xx", "xxx", "xxxx", "simple_chat", "ab", "abcab",
              "-", "a-b", ".", "é", "rag chat", "9a", "medical_chat"]
    with psycopg.connect(dsn) as conn:
        for p in patterns:
            for v in values:
                server = conn.execute("SELECT %s::text ~ %s", (v, p)).fetchone()[0]
                assert bool(to_python(p).search(v)) == server, (p, v)
    for p in [r"\d", r"\w+", r"\bword", r"(a)\1", r"(?=a)", r"(?i)a", r"[[:alpha:]]", r"[a\]]", r"***:a", r"a{1,300}",
              r"a{,3}", r"a]", r"(a", r"a)", r"[z-a]", "a\tb", ""]:
        with pytest.raises(PatternError):
            to_python(p)


def test_the_server_rechecks_the_playbook_values_before_phase_1(dsn, monkeypatch):
    """Should Python and the server ever disagree, the server's answer on the very CHECK expression wins."""
    seed_chatter(dsn, rows=20)
    from orchestrator.engine import target_rules
    pb = real_playbook()
    monkeypatch.setattr(target_rules, "expression",
                        lambda rules, column: sql.SQL("{} ~ '^[a-z]+$'").format(column))  # a "different engine"
    orch = Orchestrator(pb, dsn)
    try:
        with pytest.raises(BadInput) as err:
            orch.run(1)
    finally:
        orch.close()
    assert "mapping.plain" in str(err.value) and "checked by the server" in str(err.value)
    assert query(dsn, "SELECT to_regnamespace('_orchestrator') IS NULL") == [(True,)]
    with pytest.raises(BadInput):
        playbook.parse({**reference_dict(), "target": {"type": "varchar", "length": 50, "check": {}}})
