"""A throwaway PostgreSQL server for tests: its own cluster (``initdb``) in a temporary folder,
on a free high port of 127.0.0.1 (and, when a test asks, the host side of its own network
namespaces), a password for ``postgres``; always stopped and removed.

Debian's ``postgresql`` package puts the server programs in ``/usr/lib/postgresql/VERSION/bin``.
``initdb`` refuses to run as root: as root the cluster belongs to the ``postgres`` user (the
package creates it), which gets the folder.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.sshd import free_port

SERVER_USER = "postgres"  # as root, the cluster runs as this user


def bin_dir() -> Path | None:
    """The newest ``/usr/lib/postgresql/*/bin`` with initdb and pg_ctl (or the PATH's)."""
    found = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")]
    found.sort(key=lambda path: int(path.parent.name) if path.parent.name.isdigit() else 0)
    if found and (found[-1] / "pg_ctl").is_file():
        return found[-1]
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb and shutil.which("pg_ctl") else None


def missing_reason() -> str:
    """Why no test PostgreSQL can run here ('' when it can)."""
    if bin_dir() is None:
        return ("PostgreSQL server programs (initdb, pg_ctl) are missing; apt-get install "
                "postgresql")
    try:  # the driver SQLAlchemy uses for postgresql:// (psycopg 3 from SQLAlchemy 2.1 on)
        from sqlalchemy.engine import make_url

        make_url("postgresql://").get_dialect().import_dbapi()
    except ImportError as exc:
        return f"no PostgreSQL driver for SQLAlchemy ({exc}); pip install -e '.[postgres]'"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SERVER_USER)
        except KeyError:
            return f"running as root, initdb needs the {SERVER_USER!r} user (apt-get install postgresql)"
    return ""


class PostgresServer:
    """One cluster: ``start()``, ``url()``, ``create_database()``, ``listen()``, ``stop()``."""

    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="edgec-pg-"))
        self.data, self.log = self.root / "data", self.root / "server.log"
        self.port, self.password = free_port(), secrets.token_hex(12)
        self.addresses = ["127.0.0.1"]
        self.bin = bin_dir()
        self.as_user = os.geteuid() == 0  # initdb refuses root

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        prefix = ["runuser", "-u", SERVER_USER, "--"] if self.as_user else []
        done = subprocess.run([*prefix, *argv], capture_output=True, text=True, cwd=self.root)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): "
                               f"{done.stderr.strip()[-2000:]}\n{self._log_tail()}")
        return done

    def _log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""

    def start(self) -> PostgresServer:
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self.as_user:
            entry = pwd.getpwnam(SERVER_USER)
            for path in (self.root, pwfile):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        self.root.chmod(0o700)
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres",
                  "--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}",
                  "--encoding=UTF8", "--locale=C", "--no-sync")
        pwfile.unlink()
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(f"\nport = {self.port}\nunix_socket_directories = '{self.root}'\n"
                       "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                       "max_connections = 100\n")
        with open(self.data / "pg_hba.conf", "a") as hba:  # the tests' own namespaces only
            hba.write("host all all 10.77.0.0/16 scram-sha-256\n")
        self._write_listen()
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w",
                  "-t", "60", "start")
        return self

    def _write_listen(self) -> None:
        (self.data / "postgresql.auto.conf").write_text(
            f"listen_addresses = '{','.join(self.addresses)}'\n")

    def listen(self, *addresses: str) -> None:
        """Listen on ``addresses`` too (the host side of a test's namespaces): a restart."""
        new = [a for a in addresses if a not in self.addresses]
        if not new:
            return
        self.addresses += new
        self._write_listen()
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w",
                  "-t", "60", "-m", "fast", "restart")

    def url(self, database: str = "postgres", host: str = "127.0.0.1") -> str:
        return f"postgresql://postgres:{self.password}@{host}:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A fresh database ``name``; its URL on 127.0.0.1."""
        import sqlalchemy

        engine = sqlalchemy.create_engine(self.url(), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as connection:
                connection.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}"'))
                connection.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
        finally:
            engine.dispose()
        return self.url(name)

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-w", "-t", "30", "-m",
                      "immediate", "stop", check=False)
        deadline = time.monotonic() + 10
        while (self.data / "postmaster.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        with contextlib.suppress(OSError):
            shutil.rmtree(self.root)


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server for the session (skips when it cannot run here); removed at the end."""
    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    server = PostgresServer()
    try:
        yield server.start()
    finally:
        server.stop()
