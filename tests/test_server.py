"""Real servers, no mocks: each kind we can start on this machine is started and used."""

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
import pytest

from orchestrator.lab import server


def test_dsn_fixture_matches_major(pg_server, dsn):
    with psycopg.connect(dsn) as conn:
        num = int(conn.execute("SHOW server_version_num").fetchone()[0])
        assert num // 10000 == pg_server.major
        # fresh and empty: no user tables
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone()[0] == 0


def test_create_drop_database_round_trip(pg_server):
    name = "Round Trip-db"  # needs quoting both as an identifier and in the URL
    url = server.create_database(pg_server.dsn, name)
    assert url == pg_server.dsn_for(name)
    holder = psycopg.connect(url)  # left open: drop_database must kick it out
    holder.execute("CREATE TABLE t (id int)")
    holder.commit()
    server.drop_database(pg_server.dsn, name)
    server.drop_database(pg_server.dsn, name)  # IF EXISTS: idempotent
    with psycopg.connect(pg_server.dsn) as conn:
        assert conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None
    holder.close()


@pytest.fixture
def state_dir():
    # Not tmp_path: concurrent pytest sessions prune each other's numbered basetemp
    # dirs, which would pull a live cluster's data dir out from under it.
    with tempfile.TemporaryDirectory(prefix="orch") as d:
        yield Path(d) / "state"


def test_local_server_reattaches_and_stops(state_dir):
    state = state_dir
    first = server.local_server(state)
    try:
        assert first.kind == "embedded"
        with psycopg.connect(first.dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE kept (v text)")
            conn.execute("INSERT INTO kept VALUES ('hello')")
        first.stop()  # persistent: a no-op, the server must stay up

        # same process again, then a fresh process, as successive `make phase-N` runs would
        again = server.local_server(state)
        code = f"from orchestrator.lab.server import local_server; print(local_server({str(state)!r}).dsn)"
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parents[1])
        assert proc.stderr == ""  # no RuntimeDirWarning noise on the CLI
        for url in (again.dsn, proc.stdout.strip()):
            with psycopg.connect(url) as conn:
                assert conn.execute("SELECT v FROM kept").fetchone() == ("hello",)
    finally:
        server.stop_local_server(state)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(first.dsn, connect_timeout=3)
    server.stop_local_server(state)  # already stopped: no-op

    # and it comes back, with the data, after being stopped
    back = server.local_server(state)
    try:
        with psycopg.connect(back.dsn) as conn:
            assert conn.execute("SELECT v FROM kept").fetchone() == ("hello",)
    finally:
        server.stop_local_server(state)


def test_start_binaries():
    dirs = server.find_pg_bin_dirs()
    if not dirs:
        pytest.skip("no PostgreSQL binaries installed")
    major, bin_dir = max(dirs.items())
    srv = server.start_binaries(bin_dir=bin_dir)
    try:
        assert (srv.kind, srv.major) == ("binaries", major)
        with psycopg.connect(srv.dsn) as conn:
            assert conn.execute("SELECT current_setting('fsync')").fetchone() == ("off",)
    finally:
        srv.stop()
    srv.stop()  # idempotent
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(srv.dsn, connect_timeout=3)


def test_provide_external_is_not_stopped(pg_server):
    ext = server.provide(pg_server.dsn)
    assert (ext.kind, ext.major) == ("external", pg_server.major)
    ext.stop()
    with psycopg.connect(pg_server.dsn) as conn:  # still up
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_docker_available_answers_quickly():
    assert isinstance(server.docker_available(), bool)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("useradd"), reason="creates an OS user: root only")
def test_os_user_waits_for_another_useradd():
    """pytest-xdist workers start their servers together: while one worker's useradd holds the lock on
    /etc/passwd, another's fails with "cannot lock /etc/passwd; try again later". It must try again, not fail."""
    name = f"orch_t{os.getpid() % 100000}"
    holder = subprocess.Popen(["sleep", "30"])  # a live process "holding" the lock, as shadow-utils records it
    lock = Path("/etc/passwd.lock")
    assert not lock.exists(), "another useradd is running"
    lock.write_text(str(holder.pid))
    try:
        worker = subprocess.Popen(
            [sys.executable, "-c", f"from orchestrator.lab import server; print(server._pg_os_user({name!r}))"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1.5)  # the worker's first attempts meet the lock
        lock.unlink()
        out, err = worker.communicate(timeout=60)
        assert (worker.returncode, out.strip()) == (0, name), err
        pwd.getpwnam(name)
    finally:
        lock.unlink(missing_ok=True)
        holder.kill()
        subprocess.run(["userdel", name], capture_output=True)
