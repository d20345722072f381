"""Real PostgreSQL and MariaDB servers for the tests, each on loopback in its own directory.

SqlActivity and CopyActivity talk to databases through psycopg and PyMySQL, and what the
tests must pin down is wire behaviour: password authentication over TCP, encodings, the
servers' own error codes, and a query cancelled while it runs.  A mock or SQLite shows none
of that, so the suite runs Debian's own servers (``postgresql``, ``mariadb-server``): a
fresh data directory per server, a free port on 127.0.0.1 only, and socket and pid files
beside the data, so a machine's own instance (``/var/run``, port 5432 or 3306,
``/etc/mysql``) is never read, touched or needed.  Durability is switched off: the data
goes with the test run, and waiting for the disk is what makes small commits slow.

Neither server runs as root: PostgreSQL refuses to, and MariaDB only does when told.  As
root they run as the package's system user (``postgres``, ``mysql``; else ``nobody``).
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
import secrets
import shutil
import signal
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from .controlplane import free_port
from .waiting import wait_for

__all__ = ["DatabaseServer", "mariadb_server", "postgres_server"]

Kind = Literal["postgresql", "mariadb"]

HOST = "127.0.0.1"
DATABASE = "dptr"
USER = "dptr"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
# A free port is only free until someone binds it: another xdist worker's server may take it
# between our probe and the server's bind.  That shows as "Address already in use"; try anew.
PORT_ATTEMPTS = 3
POSTGRES_LIBDIR = Path("/usr/lib/postgresql")
MARIADB_DIRS: tuple[str, ...] = ("/usr/sbin", "/usr/bin")
LOG_TAIL = 60


@dataclass(frozen=True)
class DatabaseServer:
    """A running server, as a client (and a JdbcDatabase) sees it."""

    kind: Kind
    host: str
    port: int
    user: str
    password: str
    database: str

    @property
    def jdbc_url(self) -> str:
        # Data Pipeline's JdbcDatabase names MySQL's driver for MariaDB too.
        scheme = "postgresql" if self.kind == "postgresql" else "mysql"
        return f"jdbc:{scheme}://{self.host}:{self.port}/{self.database}"

    def connect(self) -> Any:
        """A new autocommit connection as ``user`` over TCP with the password: a
        ``psycopg.Connection`` or a ``pymysql`` connection, by ``kind``."""
        # Imported here so that dptr_testbed imports without the activities' drivers.
        if self.kind == "postgresql":
            import psycopg

            return psycopg.connect(
                host=self.host,
                port=self.port,
                user=self.user,
                password=self.password,
                dbname=self.database,
                autocommit=True,
                connect_timeout=10,
            )
        import pymysql

        return pymysql.connect(
            host=self.host,
            port=self.port,
            user=self.user,
            password=self.password,
            database=self.database,
            autocommit=True,
            charset="utf8mb4",
            connect_timeout=10,
        )


# ---- the account and the directory a server runs in -------------------------------------
@dataclass(frozen=True)
class _Account:
    name: str
    uid: int
    gid: int


def _account(preferred: str) -> _Account | None:
    """Who the server runs as when this process is root; None: as this process."""
    if os.geteuid() != 0:
        return None
    for name in (preferred, "nobody"):
        with contextlib.suppress(KeyError):
            entry = pwd.getpwnam(name)
            return _Account(name, entry.pw_uid, entry.pw_gid)
    raise RuntimeError(f"running as root, and neither {preferred!r} nor 'nobody' exists to run the server as")


def _reachable(path: Path, account: _Account) -> bool:
    """Whether ``account`` may search every directory down to ``path`` (mode bits only)."""
    groups = {account.gid, *(g.gr_gid for g in grp.getgrall() if account.name in g.gr_mem)}
    for directory in (path, *path.parents):
        st = directory.stat()
        if st.st_uid == account.uid:
            bit = stat.S_IXUSR
        elif st.st_gid in groups:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return False
    return True


@contextlib.contextmanager
def _run_dir(directory: Path, kind: Kind, account: _Account | None) -> Iterator[Path]:
    """A fresh directory for the server's data, socket and pid file, owned by ``account``.

    It is ``directory/<kind>`` when the account can reach it.  pytest's temporary
    directories are root's and mode 0700, so under a root pytest it cannot: then the
    directory is a private one in the system's temp directory (the way Debian's
    pg_virtualenv does it), ``directory/<kind>`` links to it, and it goes when the server
    has stopped.
    """
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    link = directory / kind
    if account is None or _reachable(directory, account):
        link.mkdir(mode=0o700)  # fresh: an existing one is an error, not reused
        if account is not None:
            os.chown(link, account.uid, account.gid)
        yield link
        return
    private = Path(tempfile.mkdtemp(prefix=f"dptr-{kind}-"))
    try:
        os.chown(private, account.uid, account.gid)
        if not _reachable(private, account):
            raise RuntimeError(f"neither {directory} nor {private} is reachable for user {account.name!r}")
        link.symlink_to(private, target_is_directory=True)
        yield private
    finally:
        shutil.rmtree(private, ignore_errors=True)
        link.unlink(missing_ok=True)


# ---- processes --------------------------------------------------------------------------
def _env() -> dict[str, str]:
    # The clients' and servers' environment knobs (PGDATA, PGPORT, MYSQL_UNIX_PORT,
    # MYSQL_HOME...) could point them at the machine's own instance: the flags say it all.
    # The C locale keeps the servers' messages in English, which tests may match.
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PG", "MYSQL", "MARIADB", "LC_")) and k not in {"LANG", "LANGUAGE"}
    } | {"LC_ALL": "C"}


class _ExitedError(Exception):
    """The server exited while we waited for it to accept connections."""


@dataclass(frozen=True)
class _Runner:
    """How one server's programs run: as whom, in which directory, logging where."""

    account: _Account | None
    cwd: Path
    log: IO[bytes]  # unbuffered, so the file always holds what was said
    log_path: Path

    def popen(self, argv: Sequence[str | Path]) -> subprocess.Popen[bytes]:
        account = self.account
        return subprocess.Popen(
            [str(a) for a in argv],
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=self.cwd,
            env=_env(),
            # Its own session: a Ctrl-C at the terminal reaches pytest, whose teardown then
            # stops the server cleanly, rather than the server dying under a running test.
            start_new_session=True,
            user=None if account is None else account.uid,
            group=None if account is None else account.gid,
            extra_groups=None if account is None else [],
        )

    def tail(self, offset: int) -> str:
        """The end of what the log got from ``offset`` on: this run's, not an earlier one's."""
        with self.log_path.open("rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
        return "\n".join(text.splitlines()[-LOG_TAIL:]) or "(nothing in the log)"

    def run(self, what: str, argv: Sequence[str | Path]) -> None:
        offset = self.log.tell()
        proc = self.popen(argv)
        try:
            code = proc.wait(timeout=START_TIMEOUT)
        except subprocess.TimeoutExpired:
            _stop(proc, signal.SIGTERM)
            raise RuntimeError(
                f"{what} did not finish within {START_TIMEOUT}s:\n{self.tail(offset)}"
            ) from None
        if code != 0:
            raise RuntimeError(f"{what} failed (exit {code}):\n{self.tail(offset)}")

    def start(
        self,
        what: str,
        argv_for: Callable[[int], Sequence[str | Path]],
        probe: Callable[[int], None],
        not_yet: tuple[type[BaseException], ...],
    ) -> tuple[subprocess.Popen[bytes], int]:
        """Start the server on a free port; return it and the port once ``probe(port)``
        succeeds (an exception in ``not_yet`` means it does not accept connections yet)."""
        for attempt in range(1, PORT_ATTEMPTS + 1):
            port = free_port()
            offset = self.log.tell()
            proc = self.popen(argv_for(port))

            def ready(proc: subprocess.Popen[bytes] = proc, port: int = port) -> bool:
                if proc.poll() is not None:
                    raise _ExitedError(proc.returncode)
                probe(port)
                return True

            try:
                wait_for(ready, timeout=START_TIMEOUT, what=f"{what} to accept connections", tolerate=not_yet)
            except _ExitedError as exited:
                output = self.tail(offset)
                if "Address already in use" in output and attempt < PORT_ATTEMPTS:
                    continue
                raise RuntimeError(
                    f"{what} exited (code {exited.args[0]}) before accepting connections:\n{output}"
                ) from None
            except BaseException as exc:
                _stop(proc, signal.SIGTERM)
                if isinstance(exc, AssertionError):  # wait_for's timeout
                    raise RuntimeError(f"{exc}; the server's log:\n{self.tail(offset)}") from exc
                raise
            return proc, port
        raise AssertionError("unreachable: the last attempt returns or raises")


def _stop(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    """Stop the server with ``sig`` (its clean shutdown), SIGKILL its group if it lingers."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        # The group, not just the leader: PostgreSQL's backends are its children, and would
        # outlive a killed postmaster until they next noticed it gone.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=STOP_TIMEOUT)


# ---- PostgreSQL -------------------------------------------------------------------------
def _postgres_bindir() -> Path:
    """The newest installed major version's binaries (Debian keeps them off PATH)."""
    candidates = sorted(
        (d for d in POSTGRES_LIBDIR.glob("*/bin") if (d / "initdb").exists() and (d / "postgres").exists()),
        key=lambda d: [int(part) for part in re.findall(r"\d+", d.parent.name)] or [0],
    )
    if not candidates:
        raise RuntimeError(
            f"PostgreSQL's server is not installed (no {POSTGRES_LIBDIR}/<version>/bin/postgres): "
            "apt-get install postgresql, or `dptr-testbed node-prereqs --install`"
        )
    return candidates[-1]


@contextlib.contextmanager
def postgres_server(directory: Path) -> Iterator[DatabaseServer]:
    """A fresh PostgreSQL server on 127.0.0.1 with database ``dptr`` owned by user ``dptr``
    (password authentication over TCP), stopped on exit.  Its log is
    ``directory/postgresql.log``."""
    import psycopg
    from psycopg import sql

    bindir = _postgres_bindir()
    account = _account("postgres")
    password = secrets.token_urlsafe(18)
    log_path = directory.resolve() / "postgresql.log"
    with _run_dir(directory, "postgresql", account) as run, log_path.open("ab", buffering=0) as log:
        data = run / "data"
        runner = _Runner(account, run, log, log_path)
        runner.run(
            "initdb",
            [
                bindir / "initdb",
                f"--pgdata={data}",
                "--username=postgres",
                "--encoding=UTF8",
                # The C locale: the same collation on every machine, and no locale to install.
                "--locale=C",
                "--auth=trust",  # replaced below by our own pg_hba.conf
                "--no-sync",
                "--no-instructions",
            ],
        )
        # Trust only on the socket, which is in a 0700 directory of the server's account
        # (root and that account can reach it); everyone else logs in with a password.
        hba = data / "pg_hba.conf"
        hba.write_text("local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n")
        if account is not None:
            os.chown(hba, account.uid, account.gid)

        def argv(port: int) -> list[str | Path]:
            settings = {
                "listen_addresses": HOST,
                "port": str(port),
                "unix_socket_directories": str(run),
                "unix_socket_permissions": "0700",
                "fsync": "off",
                "synchronous_commit": "off",
                "full_page_writes": "off",
                "shared_buffers": "16MB",
                "max_wal_size": "64MB",
                "password_encryption": "scram-sha-256",
            }
            return [bindir / "postgres", "-D", data, *(f"-c{k}={v}" for k, v in settings.items())]

        def probe(port: int) -> None:
            psycopg.connect(
                host=str(run), port=port, user="postgres", dbname="postgres", connect_timeout=2
            ).close()

        proc, port = runner.start("PostgreSQL", argv, probe, (psycopg.OperationalError,))
        try:
            with psycopg.connect(
                host=str(run), port=port, user="postgres", dbname="postgres", autocommit=True
            ) as admin:
                # Utility statements take no bind parameters: compose the literal client-side.
                admin.execute(
                    sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                        sql.Identifier(USER), sql.Literal(password)
                    )
                )
                admin.execute(
                    sql.SQL("CREATE DATABASE {} OWNER {}").format(
                        sql.Identifier(DATABASE), sql.Identifier(USER)
                    )
                )
            server = DatabaseServer("postgresql", HOST, port, USER, password, DATABASE)
            server.connect().close()  # the way the tests come in: TCP, SCRAM
            yield server
        finally:
            # SIGINT is PostgreSQL's fast shutdown; its SIGTERM ("smart") would wait for
            # every client to leave, and one a test leaked would hold it to the SIGKILL.
            _stop(proc, signal.SIGINT)


# ---- MariaDB ----------------------------------------------------------------------------
def _mariadb_binaries() -> tuple[Path, Path]:
    found: list[Path] = []
    for name in ("mariadbd", "mariadb-install-db"):
        # mariadbd is in /usr/sbin, which a non-root PATH often lacks.
        where = shutil.which(name) or shutil.which(name, path=os.pathsep.join(MARIADB_DIRS))
        if where is None:
            raise RuntimeError(
                f"MariaDB's server is not installed (no {name}): "
                "apt-get install mariadb-server, or `dptr-testbed node-prereqs --install`"
            )
        found.append(Path(where))
    return found[0], found[1]


@contextlib.contextmanager
def mariadb_server(directory: Path) -> Iterator[DatabaseServer]:
    """A fresh MariaDB server on 127.0.0.1 with database ``dptr`` and user ``dptr``
    (password authentication over TCP), stopped on exit.  Its log is
    ``directory/mariadb.log``."""
    import pymysql

    mariadbd, install_db = _mariadb_binaries()
    account = _account("mysql")
    user = account.name if account is not None else pwd.getpwuid(os.geteuid()).pw_name
    password = secrets.token_urlsafe(18)
    log_path = directory.resolve() / "mariadb.log"
    with _run_dir(directory, "mariadb", account) as run, log_path.open("ab", buffering=0) as log:
        data = run / "data"
        socket_path = run / "mariadb.sock"
        runner = _Runner(account, run, log, log_path)
        # --no-defaults comes first, or the server reads /etc/mysql after all.  Without
        # Debian's config the server's character set is latin1: say utf8mb4 as it does.
        server_options = [
            f"--datadir={data}",
            f"--tmpdir={run}",
            "--character-set-server=utf8mb4",
            "--innodb-buffer-pool-size=32M",
            "--innodb-log-file-size=16M",
            "--innodb-flush-log-at-trx-commit=0",
            "--innodb-doublewrite=0",
            "--skip-log-bin",
            "--skip-name-resolve",
        ]
        runner.run(
            "mariadb-install-db",
            [
                install_db,
                "--no-defaults",
                # root@localhost with no password: reachable only through the socket below,
                # in a 0700 directory of the server's account.
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
                # No --user: it runs as the account already, and with --user the script
                # would chown and chmod the system's PAM helper in /usr/lib/mysql/plugin.
                *server_options,
            ],
        )

        def argv(port: int) -> list[str | Path]:
            return [
                mariadbd,
                "--no-defaults",
                *server_options,
                f"--user={user}",
                f"--socket={socket_path}",
                f"--pid-file={run / 'mariadb.pid'}",
                f"--port={port}",
                f"--bind-address={HOST}",
            ]

        def probe(port: int) -> None:
            pymysql.connect(unix_socket=str(socket_path), user="root", password="", connect_timeout=2).close()

        proc, port = runner.start("MariaDB", argv, probe, (pymysql.err.OperationalError,))
        try:
            admin = pymysql.connect(unix_socket=str(socket_path), user="root", password="", autocommit=True)
            try:
                with admin.cursor() as cur:
                    cur.execute(f"CREATE DATABASE `{DATABASE}` CHARACTER SET utf8mb4")
                    # 127.0.0.1, not localhost: with --skip-name-resolve a TCP client is its address.
                    cur.execute(f"CREATE USER '{USER}'@'{HOST}' IDENTIFIED BY %s", (password,))
                    cur.execute(f"GRANT ALL PRIVILEGES ON `{DATABASE}`.* TO '{USER}'@'{HOST}'")
            finally:
                admin.close()
            server = DatabaseServer("mariadb", HOST, port, USER, password, DATABASE)
            server.connect().close()  # the way the tests come in: TCP, a password
            yield server
        finally:
            _stop(proc, signal.SIGTERM)  # MariaDB's normal shutdown; it ends client connections
