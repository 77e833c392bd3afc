"""Every message true (issue 37): `status` after rollbacks shows pending phases as pending, `plan` prints PL/pgSQL
bodies one statement a line. Real migrations on a real server, the CLI's real output."""

from __future__ import annotations

import re

from orchestrator.run.runner import Orchestrator

from .helpers import cli, real_playbook, seed_chatter

PB = real_playbook()


def status_text(dsn: str) -> str:
    r = cli("status", dsn=dsn, env={"COLUMNS": "250"})
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_phases_rolled_back_after_the_way_back_show_pending_without_the_times_of_the_run_undone(dsn):
    seed_chatter(dsn, rows=200)
    o = Orchestrator(PB, dsn)
    try:
        for n in range(1, 7):
            o.run(n)
        o.contract()
        o.rollback(6)  # the way back after the contract: undo contract 6
    finally:
        o.close()
    # The whole way back and every phase rolled back: each phase is pending, with nothing of the run it undid.
    o = Orchestrator(PB, dsn)
    try:
        for n in range(5, 0, -1):
            o.rollback(n)
        for n in range(6, 0, -1):
            o.rollback(n)
            rows = [ln for ln in status_text(dsn).splitlines() if re.match(r"\d+\s", ln)]
            assert len(rows) == 6
            for ln in rows:  # a pending phase shows nothing of the run its rollback undid
                assert ln.split()[2] != "pending" or not re.search(r"\d\d:\d\d", ln), ln
        assert all(p["status"] == "pending" for p in o.status()["phases"])
    finally:
        o.close()


def test_plan_prints_each_trigger_body_one_statement_a_line_and_the_same_function(dsn):
    seed_chatter(dsn, rows=50)
    r = cli("plan", "--no-lint", dsn=dsn, env={"COLUMNS": "250"})
    assert r.returncode == 0, r.stderr
    dry = Orchestrator(PB, dsn, dry_run=True)
    try:
        bodies = [rec.sql for pp in dry.plan() for recs in (pp.expand, pp.rollback, pp.uncontract) for rec in recs
                  if "RETURNS trigger LANGUAGE plpgsql" in rec.sql]
    finally:
        dry.close()
    assert bodies
    text = r.stdout
    for sql_text in bodies:
        head = sql_text[:sql_text.index(" AS '")]
        starts = [m.start() for m in re.finditer(re.escape(head), text)]
        shown_all = [text[s:text.index("END';", s) + 4] for s in starts]
        # white space only: the same function (two bodies may share a name: the swap's rollback closes the sync)
        same = [s for s in shown_all if " ".join(s.split()) == " ".join(sql_text.split())]
        assert same, head
        shown = same[0]
        lines = shown.splitlines()
        assert len(lines) >= 4 and max(map(len, lines)) < len(sql_text) / 2, shown[:300]
        assert any(ln.strip().startswith("RETURN ") for ln in lines), shown[-200:]
