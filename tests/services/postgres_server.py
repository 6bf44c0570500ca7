"""A real PostgreSQL server for the service tests: ``initdb`` in a temporary directory, ``pg_ctl start`` on a
free port of 127.0.0.1, stopped by its postmaster pid. Skipped, with the reason, where the binaries (Debian's
``postgresql`` package, as infra/setup.sh installs) or the ``postgres`` extra (psycopg) are absent.

initdb refuses to run as root: as root, the server runs as the ``postgres`` user the Debian package makes.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stillroom.services.launcher import free_port


def postgres_bin() -> Path | None:
    """The directory of initdb and pg_ctl: on PATH, or Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(versions[-1]).parent if versions else None


class PostgresServer:
    def __init__(self, bin_dir: Path):
        self.bin_dir = bin_dir
        self.password = secrets.token_hex(12)
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="stillroom-pg-"))
        self.pid: int | None = None
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                shutil.rmtree(self.dir)
                pytest.skip("running as root and there is no `postgres` user to run initdb as")
            os.chown(self.dir, user.pw_uid, user.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]
            self._owner = (user.pw_uid, user.pw_gid)

    def _run(self, *args: str) -> None:
        result = subprocess.run([*self.as_user, *args], capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({result.returncode}): {result.stderr[-2000:]}")

    def start(self) -> PostgresServer:
        pwfile = self.dir / "pw"
        pwfile.write_text(self.password)
        if self.as_user:
            os.chown(pwfile, *self._owner)
        data = self.dir / "data"
        self._run(str(self.bin_dir / "initdb"), "-D", str(data), "-U", "stillroom", f"--pwfile={pwfile}",
                  "-A", "scram-sha-256", "-E", "UTF8", "--locale=C")
        self._run(str(self.bin_dir / "pg_ctl"), "-D", str(data), "-l", str(self.dir / "server.log"), "-w",
                  "-t", "60", "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1", "start")
        self.pid = int((data / "postmaster.pid").read_text().split()[0])
        return self

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://stillroom:{self.password}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database on this server; its SQLAlchemy URL."""
        import psycopg

        name = f"t_{secrets.token_hex(6)}"
        with psycopg.connect(f"postgresql://stillroom:{self.password}@127.0.0.1:{self.port}/postgres",
                             autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        """A fast shutdown (SIGINT) of the postmaster by its pid; SIGKILL if it has not ended in 30 s."""
        if self.pid is not None:
            os.kill(self.pid, signal.SIGINT)
            deadline = time.monotonic() + 30
            while _alive(self.pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _alive(self.pid):
                os.kill(self.pid, signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.skip("no PostgreSQL binaries (initdb, pg_ctl): apt-get install postgresql, or run infra/setup.sh")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("psycopg is not installed: pip install -e '.[postgres]'")
    server = PostgresServer(bin_dir)
    try:
        yield server.start()
    finally:
        server.stop()
