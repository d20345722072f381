"""The suite's database servers (dptr_testbed.databases) are real, and behave as the SQL tests need.

Each kind is checked the way SqlActivity uses it: the ``dptr`` user over TCP with its
password (a wrong one is refused), text outside ASCII stored and read back as characters,
a running query cancelled from outside (psycopg's cancel request; MariaDB's ``KILL QUERY``
from a second connection), and the port open on 127.0.0.1 only.  A server started here
for the purpose shows it lives in its own directory and leaves no process behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import psycopg
import pymysql
import pytest

from dptr_testbed import databases
from dptr_testbed.controlplane import free_port
from dptr_testbed.databases import DatabaseServer, mariadb_server, postgres_server
from dptr_testbed.waiting import wait_for

KINDS = ["postgresql", "mariadb"]
STARTERS: dict[str, Callable[[Path], AbstractContextManager[DatabaseServer]]] = {
    "postgresql": postgres_server,
    "mariadb": mariadb_server,
}
TEXT = "Grüße aus Köln, Καλημέρα, 東京, Ελλάδα 🚀"


@pytest.fixture(params=KINDS)
def server(request: pytest.FixtureRequest) -> DatabaseServer:
    db: DatabaseServer = request.getfixturevalue("postgres" if request.param == "postgresql" else "mariadb")
    return db


def _rows(conn: Any, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with conn.cursor() as cur:
        cur.execute(query, params)
        return [tuple(row) for row in cur.fetchall()]


def _execute(conn: Any, statement: str, params: tuple[Any, ...] = ()) -> None:
    with conn.cursor() as cur:
        cur.execute(statement, params)


def test_the_user_logs_in_over_tcp_with_its_password(server: DatabaseServer) -> None:
    conn = server.connect()
    try:
        if server.kind == "postgresql":
            # inet_server_addr() is NULL on the Unix socket: this is TCP.
            query = "SELECT current_user, current_database(), host(inet_server_addr())"
            assert _rows(conn, query) == [("dptr", "dptr", "127.0.0.1")]
        else:
            # MariaDB names the account it matched, and a TCP client's is its address.
            assert _rows(conn, "SELECT CURRENT_USER(), DATABASE()") == [("dptr@127.0.0.1", "dptr")]
    finally:
        conn.close()
    error = psycopg.OperationalError if server.kind == "postgresql" else pymysql.err.OperationalError
    with pytest.raises(error, match=r"password|Access denied"):
        dataclasses.replace(server, password="not-" + server.password).connect()


def test_text_outside_ascii_round_trips(server: DatabaseServer) -> None:
    table = "t_" + uuid.uuid4().hex[:12]
    conn = server.connect()
    try:
        _execute(conn, f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, note VARCHAR(200))")
        _execute(conn, f"INSERT INTO {table} (id, note) VALUES (%s, %s)", (1, TEXT))
        # CHAR_LENGTH counts characters: mojibake (bytes stored as latin1) would count more.
        assert _rows(conn, f"SELECT note, CHAR_LENGTH(note) FROM {table} WHERE id = %s", (1,)) == [
            (TEXT, len(TEXT))
        ]
    finally:
        conn.close()
    other = server.connect()  # a second session sees it committed: autocommit
    try:
        assert _rows(other, f"SELECT note FROM {table}") == [(TEXT,)]
    finally:
        other.close()


def _running(observer: Any, kind: str, marker: str) -> list[tuple[Any, ...]]:
    """The sessions (other than the observer's) running a statement that carries ``marker``."""
    pattern = f"%{marker}%"
    if kind == "postgresql":
        # An idle session keeps its last query in pg_stat_activity: running means active.
        return _rows(
            observer,
            "SELECT pid FROM pg_stat_activity WHERE state = 'active' AND query LIKE %s AND pid <> pg_backend_pid()",
            (pattern,),
        )
    return _rows(
        observer,
        "SELECT ID FROM information_schema.PROCESSLIST WHERE INFO LIKE %s AND ID <> CONNECTION_ID()",
        (pattern,),
    )


def test_a_long_query_is_cancelled_from_outside(server: DatabaseServer) -> None:
    marker = "dptr-cancel-" + uuid.uuid4().hex[:8]
    sleep = "pg_sleep(120)" if server.kind == "postgresql" else "SLEEP(120)"
    conn = server.connect()
    observer = server.connect()
    outcome: dict[str, Any] = {}

    def run() -> None:
        began = time.monotonic()
        try:
            outcome["rows"] = _rows(conn, f"SELECT /* {marker} */ {sleep}")
        except Exception as exc:
            outcome["error"] = exc
        outcome["seconds"] = time.monotonic() - began

    thread = threading.Thread(target=run, name="long-query", daemon=True)
    try:
        thread.start()
        wait_for(
            lambda: _running(observer, server.kind, marker), timeout=30, what="the sleep to show as running"
        )
        if server.kind == "postgresql":
            conn.cancel()  # libpq's cancel request, on a connection of its own
        else:
            _execute(observer, "KILL QUERY %s", (conn.thread_id(),))
        thread.join(timeout=30)
        assert not thread.is_alive(), "the cancelled query is still running"
        assert outcome["seconds"] < 30
        if server.kind == "postgresql":
            assert isinstance(outcome.get("error"), psycopg.errors.QueryCanceled), outcome
        else:
            # MariaDB ends an interrupted SLEEP() as an interrupted query (1317), not as a
            # SLEEP() that returned 1 the way MySQL's does.
            error = outcome.get("error")
            assert isinstance(error, pymysql.err.OperationalError), outcome
            assert error.args[0] == 1317, outcome
        wait_for(
            lambda: not _running(observer, server.kind, marker),
            timeout=10,
            what="the cancelled query to leave the server's list of running ones",
        )
        # Only the query went: the session goes on.
        assert _rows(conn, "SELECT 1") == [(1,)]
    finally:
        thread.join(timeout=5)
        conn.close()
        observer.close()


def test_it_listens_on_loopback_only(server: DatabaseServer) -> None:
    conn = server.connect()
    try:
        if server.kind == "postgresql":
            assert _rows(conn, "SHOW listen_addresses") == [("127.0.0.1",)]
            assert _rows(conn, "SHOW port") == [(str(server.port),)]
        else:
            assert _rows(conn, "SELECT @@bind_address, @@port, @@skip_networking") == [
                ("127.0.0.1", server.port, 0)
            ]
    finally:
        conn.close()
    assert server.port not in (5432, 3306)
    # All of 127/8 is loopback: a server bound to the wildcard would answer on 127.0.0.2 too.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.2", server.port), timeout=5).close()
    if socket.has_ipv6:
        with pytest.raises(OSError):  # refused, or no IPv6 loopback at all
            socket.create_connection(("::1", server.port), timeout=5).close()


def _processes_in(directory: Path) -> dict[int, int]:
    """Processes whose working directory is under ``directory``, with the account each runs
    as: both servers chdir into their data directory, and so do PostgreSQL's backends,
    forked from the postmaster. The account is read in the same pass because a backend
    (autovacuum's, a startup check's) may be gone a moment later."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = Path(os.readlink(entry / "cwd"))
            uid = entry.stat().st_uid
        except OSError:  # gone, or not ours to look at
            continue
        if cwd == directory or directory in cwd.parents:
            found[int(entry.name)] = uid
    return found


@pytest.fixture
def open_directory() -> Iterator[Path]:
    """A directory the servers' account can reach, so their data is in it (pytest's own are
    root's and 0700, so under a root pytest the servers' data goes elsewhere)."""
    directory = Path(tempfile.mkdtemp(prefix="dptr-dbtest-"))
    directory.chmod(0o755)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.parametrize("kind", KINDS)
def test_a_server_keeps_to_its_directory_and_leaves_nothing_running(kind: str, open_directory: Path) -> None:
    began = time.monotonic()
    with STARTERS[kind](open_directory / "db") as server:
        started = time.monotonic() - began
        running = _processes_in(open_directory)
        assert running, "no process runs in the server's directory"
        if os.geteuid() == 0:  # neither server runs as root
            assert 0 not in running.values(), running
        assert server.port not in (5432, 3306)
        # A client still connected when the tests end must not hold the stop up.
        leftover = server.connect()
        stopping = time.monotonic()
    stopped = time.monotonic() - stopping
    print(f"{kind}: started in {started:.2f}s, stopped in {stopped:.2f}s")
    try:
        assert stopped < databases.STOP_TIMEOUT
        assert not _processes_in(open_directory)
        assert all(not Path("/proc", str(pid)).exists() for pid in running)
        with socket.socket() as probe:  # its port is free again
            # The server closed its sessions, so their ends wait out TIME_WAIT on its port.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(("127.0.0.1", server.port))
            probe.listen()
        assert (open_directory / "db" / f"{kind}.log").stat().st_size > 0
        # The server ended the session it was left with.
        with pytest.raises((psycopg.Error, pymysql.err.Error)):
            _rows(leftover, "SELECT 1")
    finally:
        with contextlib.suppress(Exception):
            leftover.close()


@pytest.mark.parametrize("kind", KINDS)
def test_a_port_taken_before_the_server_binds_it_is_given_up_for_another(
    kind: str, open_directory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another xdist worker's server may bind the free port first: the start tries anew."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    ports = iter([taken.getsockname()[1]])
    monkeypatch.setattr(databases, "free_port", lambda: next(ports, None) or free_port())
    try:
        with STARTERS[kind](open_directory / "db") as server:
            assert server.port != taken.getsockname()[1]
            server.connect().close()
    finally:
        taken.close()
    assert "Address already in use" in (open_directory / "db" / f"{kind}.log").read_text()


def test_missing_servers_name_the_debian_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(databases, "POSTGRES_LIBDIR", tmp_path / "no-postgresql")
    with pytest.raises(RuntimeError, match="apt-get install postgresql"), postgres_server(tmp_path / "pg"):
        pass
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(databases, "MARIADB_DIRS", ())
    with pytest.raises(RuntimeError, match="apt-get install mariadb-server"), mariadb_server(tmp_path / "my"):
        pass
    assert not (tmp_path / "pg").exists() and not (tmp_path / "my").exists()
