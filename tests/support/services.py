"""Private PostgreSQL and Redis servers that a test (or bench) starts, stops and
restarts itself, to play a dependency outage for real.

    with PrivatePostgres() as pg:              # initdb + pg_ctl start, ~2 s
        url = pg.url                           # postgresql+psycopg://postgres@127.0.0.1:P/bearpaw
        pg.stop()                              # pg_ctl stop -m fast: the database is gone
        pg.start()                             # back on the same port with the same data

    with PrivateRedis() as redis:
        redis.url(db=1)
        redis.stop()                           # SIGKILL: nothing answers on the port
        redis.start()                          # a fresh, empty server on the same port

The shared services on 5432/6379 are never touched. initdb and postgres refuse to
run as root, so as root the PostgreSQL binaries run as the ``postgres`` OS user.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.support.vllm_server import free_port

PG_USER = "postgres"  # the database superuser initdb creates (trust auth, loopback only)


def _binary(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    # Debian keeps the server binaries out of PATH; take the newest major version.
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: p.parent.name)
    for bin_dir in reversed(versions):
        if (bin_dir / name).exists():
            return str(bin_dir / name)
    raise FileNotFoundError(f"{name} not found (install PostgreSQL server binaries)")


def _listening(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


class PrivatePostgres:
    """A throwaway PostgreSQL cluster on a free port, with one database."""

    def __init__(self, database: str = "bearpaw", port: int | None = None) -> None:
        self.database = database
        self.port = port or free_port()
        self.root: Path | None = None
        self._initialized = False
        self._as_postgres = os.getuid() == 0

    # ------------------------------------------------------------- addresses
    @property
    def url(self) -> str:
        """SQLAlchemy URL of the database (psycopg 3 driver)."""
        return self.url_for(self.database)

    def url_for(self, database: str) -> str:
        return f"postgresql+psycopg://{PG_USER}@127.0.0.1:{self.port}/{database}"

    @property
    def dsn(self) -> str:
        """libpq URL for psycopg.connect()."""
        return f"postgresql://{PG_USER}@127.0.0.1:{self.port}/{self.database}"

    @property
    def data_dir(self) -> Path:
        assert self.root is not None, "not started"
        return self.root / "data"

    @property
    def log_path(self) -> Path:
        assert self.root is not None, "not started"
        return self.root / "postgres.log"

    # ------------------------------------------------------------- lifecycle
    def _run(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        cmd = list(args)
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        # cwd: the postgres user may not be allowed into the caller's directory.
        result = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, cwd=self.root or "/"
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args[:2])} failed ({result.returncode}):\n"
                f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}\n{self.log_tail()}"
            )
        return result

    def _init(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="bearpaw-pg-"))
        if self._as_postgres:
            user = pwd.getpwnam("postgres")
            os.chown(self.root, user.pw_uid, user.pw_gid)
        # --no-sync: the cluster is thrown away; durability under test is the
        # gateway's, not PostgreSQL's (a fast stop still checkpoints cleanly).
        self._run(
            _binary("initdb"),
            "-D",
            str(self.data_dir),
            "-U",
            PG_USER,
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
            "--no-instructions",
        )
        self._initialized = True

    def start(self, timeout: float = 30.0) -> PrivatePostgres:
        """Start the cluster (initdb on first use) and create the database once."""
        first = not self._initialized
        if first:
            self._init()
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
            "-c max_connections=200"
        )
        self._run(
            _binary("pg_ctl"),
            "-D",
            str(self.data_dir),
            "-l",
            str(self.log_path),
            "-o",
            options,
            "-w",
            "-t",
            str(int(timeout)),
            "start",
            timeout=timeout + 10,
        )
        if first:
            self.create_database(self.database)
        return self

    def create_database(self, name: str) -> str:
        """Create another database in this cluster; returns its SQLAlchemy URL."""
        import psycopg

        admin = f"postgresql://{PG_USER}@127.0.0.1:{self.port}/postgres"
        with psycopg.connect(admin, autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url_for(name)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: disconnect everyone, clean shutdown;
        ``immediate``: like a crash). Data stays for ``start()``."""
        if not self.running():
            return
        self._run(_binary("pg_ctl"), "-D", str(self.data_dir), "-m", mode, "-w", "stop")

    def running(self) -> bool:
        return self.root is not None and (self.data_dir / "postmaster.pid").exists()

    def close(self) -> None:
        """Stop and delete the cluster."""
        if self.root is None:
            return
        try:
            self.stop("immediate")
        except RuntimeError:
            pass
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None
        self._initialized = False

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except (OSError, AssertionError):
            return ""

    def __enter__(self) -> PrivatePostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class PrivateRedis:
    """A redis-server child on a free port, without persistence."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.root = Path(tempfile.mkdtemp(prefix="bearpaw-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self, timeout: float = 10.0) -> PrivateRedis:
        if self.running():
            return self
        log = (self.root / "redis.log").open("ab")
        self.proc = subprocess.Popen(
            [
                _redis_server(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.root),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited:\n{self.log_tail()}")
            if _listening(self.port):
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server not listening on {self.port}:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGKILL: an outage, not a shutdown (what was in memory is gone)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.proc = None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return (self.root / "redis.log").read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def __enter__(self) -> PrivateRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _redis_server() -> str:
    found = shutil.which("redis-server")
    if not found:
        raise FileNotFoundError("redis-server not found (apt-get install redis-server)")
    return found
