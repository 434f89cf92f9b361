"""A throw-away PostgreSQL server for the tests: Debian's ``postgresql`` package, a cluster in a temp
folder, run as a non-root user, listening on a Unix socket only (no TCP port at all).

Not a test module; ``conftest.py`` starts one per test session when a test asks for the PostgreSQL
backend, and each test gets a database of its own. Where the package is missing (and ``scripts/test``
could not install it) the PostgreSQL cases skip with a message; CI installs it.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

# The user the server runs as when the tests run as root (initdb and postgres refuse root): the
# package creates it.
SERVER_USER = "postgres"


def find_bin() -> Path | None:
    """The newest installed PostgreSQL's bin folder (``/usr/lib/postgresql/<major>/bin``)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


class PostgresServer:
    """Start with :meth:`start`, make databases with :meth:`new_database`, stop with :meth:`stop`."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="lora-studio-pg-"))
        self.data = self.root / "data"
        self.socket_dir = self.root / "socket"
        self.user = SERVER_USER if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name

    def _run(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        command = [*args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", SERVER_USER, "--", *command]
        return subprocess.run(command, check=True, capture_output=True, text=True, timeout=120, **kwargs)

    def start(self) -> None:
        self.socket_dir.mkdir(parents=True)
        if os.geteuid() == 0:
            entry = pwd.getpwnam(SERVER_USER)
            for path in (self.root, self.socket_dir):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", self.user, "--auth=trust",
                  "--no-sync", "-E", "UTF8")
        # No TCP at all (listen_addresses ''); fsync off: a test cluster is thrown away, durability buys nothing.
        options = f"-c listen_addresses='' -k {self.socket_dir} -c fsync=off -c full_page_writes=off " \
                  f"-c max_connections=100"
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.root / "log"),
                  "-w", "-t", "60", "start")

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://{self.user}@/{database}?host={self.socket_dir}"

    def new_database(self) -> str:
        """A fresh, empty database; its SQLAlchemy URL."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(host=str(self.socket_dir), user=self.user, dbname="postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, url: str) -> None:
        import psycopg

        name = url.split("?", 1)[0].rsplit("/", 1)[1]  # the query (host=/path/to/socket) has slashes too
        with psycopg.connect(host=str(self.socket_dir), user=self.user, dbname="postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        try:
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
