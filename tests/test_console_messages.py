"""What plan and status say is what the phases do (issue: every message true), under make as well as the CLI."""

from __future__ import annotations

import sys

from .helpers import cli, orchestrator, real_playbook, seed_chatter

MAKE = {"ORCHESTRATOR_FRONTEND": "make", "COLUMNS": "300"}


def one_line(text: str) -> str:
    return " ".join(text.split())


def test_plan_says_when_each_version_has_its_views_and_what_phase_3_does_by_copy(dsn):
    seed_chatter(dsn, rows=100)
    r = cli("plan", dsn=dsn, env={"COLUMNS": "300"})
    assert r.returncode == 0, r.stderr
    text = one_line(r.stdout)
    assert ("app versions (the old version's views from phase 1 until contract 2, the new version's from phase 4 "
            "until contract 5") in text
    assert "from phase 2" not in text and "created in phase 2" not in text
    # the reference playbook copies (backfill_method: copy): the header and the summary describe the copy
    assert "Phase 3: backfill - copy each table with the shadow column filled, then swap the copy in" in text
    phase3 = text[text.index("Phase 3: backfill"):text.index("Phase 4:")]
    assert "expand: CREATE TABLE copy" in phase3 and "UPDATE ... SET shadow" not in phase3


def test_status_after_the_contract_and_part_way_back_under_make(dsn):
    seed_chatter(dsn, rows=300)
    pb = real_playbook(**{"settings.old_version_quiet_s": 0})
    orch = orchestrator(pb, dsn)
    try:
        for n in range(1, 7):
            orch.run(n)
        st = cli("status", dsn=dsn, env=MAKE)
        assert "rows copied in" in st.stdout and "rows updated" not in st.stdout, st.stdout  # by copy
        orch.contract(old_version_gone=True)
        after = cli("status", dsn=dsn, env=MAKE)
        assert after.returncode == 0, after.stderr
        # the contract removed both versions' views: no connection option to set any more
        assert "search_path=" not in after.stdout, after.stdout
        assert "the contract removed their views" in after.stdout
        orch.rollback(6)  # the first step of the way back after the contract
    finally:
        orch.close()
    way_back = cli("status", dsn=dsn, env=MAKE)
    assert "next: make rollback-5" in way_back.stdout, way_back.stdout
    assert "orchestrator " not in way_back.stdout


def test_the_demo_says_what_it_does_before_each_long_step(dsn):
    r = cli("demo", "--rows", "200", dsn=dsn, env={"COLUMNS": "300"})
    assert r.returncode == 0, r.stderr
    text = r.stdout
    assert text.index("seeding 200 sample rows") < text.index("created Chatter's schema")
    # the reference playbook copies: the demo's phase 3 header says so, as plan does
    assert "phase 3: copy each table with the shadow column filled, then swap the copy in" in text
    assert "expand: CREATE TABLE copy" in text


def test_logging_configured_by_an_in_process_cli_run_outlives_its_stderr(monkeypatch, capsys):
    """A CLI run in-process (CliRunner, an embedding tool) configures logging while sys.stderr is its own stream;
    once that stream is closed, later log lines go to the stderr of the moment, not to the closed one."""
    import io

    import structlog

    from orchestrator.console import logs
    saved = structlog.get_config()
    try:
        temporary = io.StringIO()
        monkeypatch.setattr(sys, "stderr", temporary)
        logs.configure(json=True)
        structlog.get_logger().info("during")
        temporary.close()
        monkeypatch.undo()
        structlog.get_logger().info("after")  # ValueError: I/O operation on closed file, before
        assert '"event": "after"' in capsys.readouterr().err
    finally:
        structlog.configure(**saved)
