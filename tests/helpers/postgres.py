"""A throwaway PostgreSQL server on loopback for the cluster-path tests (Debian's postgresql package).

`make setup` installs the package when initdb is missing (see the Makefile's postgres step). The server
runs as the `postgres` system user when the tests run as root (initdb refuses root), listens on
127.0.0.1 only, trusts local connections (a test cluster in a temporary folder), and is stopped and
removed at the end.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from helpers.sweep import free_port


def postgres_bin() -> Path | None:
    """The folder holding initdb and pg_ctl: on PATH, else Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(versions[-1]).parent if versions else None


def _as_user(cmd: list[str], user: str | None) -> list[str]:
    return ["runuser", "-u", user, "--", *cmd] if user else cmd


@contextmanager
def postgres_server(database: str = "leuko"):
    """Start a server with one database; yield its SQLAlchemy URL (postgresql://postgres@127.0.0.1:PORT/DB).

    The cluster lives in its own temporary folder (pytest's are private to root, which the postgres user
    cannot enter) and is removed at the end."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        raise RuntimeError("PostgreSQL is not installed: run `make setup` (it installs Debian's postgresql package)")
    user = None
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root
        user = "postgres"
        pwd.getpwnam(user)  # the Debian package creates this system user
    folder = Path(tempfile.mkdtemp(prefix="leuko-pg-"))
    data, sockets = folder / "pgdata", folder / "pgsock"
    sockets.mkdir()
    if user:
        for path in (folder, sockets):
            shutil.chown(path, user)
    port = free_port()
    env = {**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}
    initdb = [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"]
    options = f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c max_connections=100 -c fsync=off"
    start = [str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(folder / "postgres.log"), "-w", "start"]
    try:
        for cmd in (initdb, start):
            done = subprocess.run(_as_user(cmd, user), capture_output=True, text=True, env=env, cwd=folder)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
        url = f"postgresql://postgres@127.0.0.1:{port}"
        _create_database(url, database)
        yield f"{url}/{database}"
    finally:
        subprocess.run(
            _as_user([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"], user),
            capture_output=True,
            env=env,
            cwd=folder,
        )
        shutil.rmtree(folder, ignore_errors=True)


def _create_database(url: str, database: str, timeout: float = 20) -> None:
    import sqlalchemy

    engine = sqlalchemy.create_engine(f"{url}/postgres", isolation_level="AUTOCOMMIT")
    deadline = time.time() + timeout
    while True:
        try:
            with engine.connect() as conn:
                conn.execute(sqlalchemy.text(f'CREATE DATABASE "{database}"'))
            break
        except sqlalchemy.exc.OperationalError:
            if time.time() > deadline:
                raise
            time.sleep(0.3)
    engine.dispose()
