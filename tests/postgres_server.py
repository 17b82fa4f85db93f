"""A real PostgreSQL server on 127.0.0.1 for tests: what Optuna's docs recommend as the storage many workers share.

    with postgres_server() as url:            # PostgresUnavailable: not installed here (make test installs it)
        optuna.create_study(storage=url)      # postgresql+psycopg2://postgres@127.0.0.1:PORT/postgres

Debian's `postgresql` package, not its system service: a fresh cluster (initdb) in a temp dir, listening on a
free port on 127.0.0.1 only, with its socket in that dir, trust authentication, stopped and deleted afterwards. The
server refuses to run as root, so under root it runs as the package's `postgres` user.
"""
from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path


class PostgresUnavailable(RuntimeError):
    """PostgreSQL's server programs are not installed here."""


class PostgresStartError(RuntimeError):
    """Installed, but the server would not initialise or start: a real failure."""


def server_program(name: str) -> Path:
    """initdb or pg_ctl: Debian keeps them under /usr/lib/postgresql/<version>/bin (the newest wins)."""
    for folder in sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name), reverse=True):
        if (folder / name).is_file():
            return folder / name
    found = shutil.which(name)
    if found is None:
        raise PostgresUnavailable(f"no {name}: install PostgreSQL (make test does: apt-get install -y postgresql)")
    return Path(found)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def postgres_server():
    """A running server; yields its SQLAlchemy URL for the database `postgres` (user `postgres`, no password)."""
    initdb, pg_ctl = server_program("initdb"), server_program("pg_ctl")
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    folder = Path(tempfile.mkdtemp(prefix="fmnist-postgres-"))
    data, port = folder / "data", free_port()
    if as_user:
        user = pwd.getpwnam("postgres")
        os.chown(folder, user.pw_uid, user.pw_gid)

    def run(*args) -> None:
        try:
            subprocess.run([*as_user, *map(str, args)], check=True, capture_output=True, text=True, timeout=120)
        except subprocess.CalledProcessError as e:
            log = folder / "server.log"
            tail = log.read_text()[-1500:] if log.is_file() else ""
            raise PostgresStartError(f"{' '.join(map(str, args))}: {(e.stderr or e.stdout)[-1500:]}\n{tail}") from None

    try:
        run(initdb, "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8")
        run(pg_ctl, "-D", data, "-l", folder / "server.log", "-w", "-t", "60", "-o",
            f"-h 127.0.0.1 -p {port} -k {folder}", "start")
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, str(pg_ctl), "-D", str(data), "-m", "immediate", "stop"], capture_output=True,
                       timeout=60)
        shutil.rmtree(folder, ignore_errors=True)
