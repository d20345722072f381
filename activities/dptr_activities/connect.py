"""Connections to the activity's database with the Python driver of its dialect.

One small interface over psycopg 3 (PostgreSQL, Redshift) and PyMySQL (MySQL, MariaDB):
run a statement with bound parameters, stream a query's rows with a server-side cursor,
insert in batches, and **cancel** what runs now from another thread (the SIGTERM of a
cancelled or timed-out attempt): psycopg sends PostgreSQL's cancel request; for MySQL a
second connection issues ``KILL QUERY <thread id>``.  Either way the statement stops on
the server, not only in this process.

Endpoints of an ``RdsDatabase`` (``rdsInstanceId``) and a ``RedshiftDatabase``
(``clusterId``) are looked up with the runner's AWS identity (DescribeDBInstances,
DescribeClusters); the engine of an RDS instance picks the dialect.

``jdbcProperties`` (and a URL's query string) are mapped where a driver has the same
option; the others are listed once in the log and ignored (docs/task-runner-parity.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dptr_common.activity_plan import DatabasePlan
from dptr_common.errors import TaskError, error_id
from dptr_common.jdbc import DIALECT_DEFAULT_PORTS

__all__ = ["DatabaseError", "Session", "connect", "resolve_endpoint"]

log = logging.getLogger("dptr.activity")

#: Rows fetched per round trip from a server-side cursor, and inserted per batch.
BATCH_ROWS = 2000
CONNECT_TIMEOUT_SECONDS = 30
_RDS_ENGINES = {
    "postgres": "postgresql",
    "aurora-postgresql": "postgresql",
    "mysql": "mysql",
    "mariadb": "mysql",
    "aurora-mysql": "mysql",
    "aurora": "mysql",
}


class DatabaseError(Exception):
    """A statement or connection failed; ``error_id`` names the database's error class."""

    def __init__(self, error_id: str, message: str) -> None:
        super().__init__(message)
        self.error_id = error_id
        self.message = message


@dataclass(frozen=True)
class Endpoint:
    dialect: str
    host: str
    port: int
    database: str | None


def _aws_client(service: str, region: str | None, env: Mapping[str, str]) -> Any:
    from botocore.config import Config

    from dptr_common.awsauth import AssumedRole, StaticCredentials, make_session

    keys = None
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        keys = StaticCredentials(
            env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"], env.get("AWS_SESSION_TOKEN") or None
        )
    region = region or env.get("AWS_REGION") or env.get("DPTR_REGION") or "us-east-1"
    session = make_session(keys, AssumedRole.from_env(env), region=region)
    endpoint = env.get(f"AWS_ENDPOINT_URL_{service.upper()}") or env.get("AWS_ENDPOINT_URL") or None
    return session.create_client(
        service,
        region_name=region,
        endpoint_url=endpoint,
        config=Config(connect_timeout=10, read_timeout=30, retries={"mode": "standard", "max_attempts": 5}),
    )


def resolve_endpoint(db: DatabasePlan, env: Mapping[str, str] | None = None) -> Endpoint:
    """Where to connect: the plan's host, or the endpoint RDS or Redshift reports."""
    env = os.environ if env is None else env
    if db.host:
        known = db.dialect or "postgresql"
        return Endpoint(known, db.host, db.port or DIALECT_DEFAULT_PORTS[known], db.database)
    try:
        if db.rds_instance_id:
            client = _aws_client("rds", db.region, env)
            found = client.describe_db_instances(DBInstanceIdentifier=db.rds_instance_id)["DBInstances"][0]
            engine = str(found.get("Engine") or "")
            dialect: str | None = db.dialect or _RDS_ENGINES.get(engine)
            if dialect is None:
                raise TaskError(
                    error_id("Sql", "UnsupportedEngine", engine or "unknown"),
                    f"RDS instance {db.rds_instance_id!r} runs {engine!r}; dptr serves "
                    + ", ".join(sorted(_RDS_ENGINES)),
                )
            address = found.get("Endpoint") or {}
            if not address.get("Address"):
                raise TaskError(
                    "dptr.Sql.NoEndpoint", f"RDS instance {db.rds_instance_id!r} has no endpoint yet"
                )
            return Endpoint(
                dialect,
                str(address["Address"]),
                int(address.get("Port") or DIALECT_DEFAULT_PORTS[dialect]),
                db.database or found.get("DBName"),
            )
        if db.cluster_id:
            client = _aws_client("redshift", db.region, env)
            cluster = client.describe_clusters(ClusterIdentifier=db.cluster_id)["Clusters"][0]
            address = cluster.get("Endpoint") or {}
            if not address.get("Address"):
                raise TaskError(
                    "dptr.Sql.NoEndpoint", f"Redshift cluster {db.cluster_id!r} has no endpoint yet"
                )
            return Endpoint(
                "redshift",
                str(address["Address"]),
                int(address.get("Port") or 5439),
                db.database or cluster.get("DBName"),
            )
    except TaskError:
        raise
    except Exception as exc:  # botocore's ClientError and friends: one clear line
        code = getattr(exc, "response", {}).get("Error", {}).get("Code") or type(exc).__name__
        raise TaskError(
            error_id("Sql", "EndpointLookup", code), f"could not look up {db.type} {db.id!r}: {exc}"
        ) from exc
    raise TaskError("dptr.Sql.BadDatabase", f"{db.type} {db.id!r} names no host, instance or cluster")


def _truthy(value: str) -> bool:
    return value.strip().lower() in ("true", "1", "yes", "on")


def _pg_options(props: Mapping[str, str]) -> tuple[dict[str, Any], list[str]]:
    out: dict[str, Any] = {}
    ignored: list[str] = []
    for key, value in props.items():
        lowered = key.lower()
        if lowered == "sslmode":
            out["sslmode"] = value
        elif lowered == "ssl":
            # PgJDBC's ssl=true verifies the server's certificate and host name.
            out.setdefault("sslmode", "verify-full" if _truthy(value) else "disable")
            if _truthy(value):
                out.setdefault("sslrootcert", "system")
        elif lowered in ("connecttimeout", "logintimeout"):
            out["connect_timeout"] = int(float(value))
        elif lowered == "applicationname":
            out["application_name"] = value
        elif lowered == "currentschema":
            # libpq's options: a backslash escapes a space or a backslash in a value.
            escaped = value.replace("\\", "\\\\").replace(" ", "\\ ")
            out["options"] = f"-c search_path={escaped}"
        elif lowered in ("sslrootcert", "sslcert", "sslkey"):
            out[lowered] = value
        else:
            ignored.append(key)
    return out, ignored


def _mysql_tls(mode: str) -> Any:
    """Connector/J's sslMode as an SSLContext: VERIFY_IDENTITY checks the certificate (the
    system's CAs) and the host name, VERIFY_CA the certificate only, REQUIRED encrypts
    without checking (as Connector/J does)."""
    import ssl

    context = ssl.create_default_context()
    if mode == "VERIFY_CA":
        context.check_hostname = False
    elif mode == "REQUIRED":
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _mysql_options(props: Mapping[str, str]) -> tuple[dict[str, Any], list[str]]:
    out: dict[str, Any] = {}
    ignored: list[str] = []
    for key, value in props.items():
        lowered = key.lower()
        if lowered == "connecttimeout":  # Connector/J: milliseconds
            out["connect_timeout"] = max(1, int(float(value) / 1000))
        elif lowered == "sslmode" and value.upper() in ("REQUIRED", "VERIFY_CA", "VERIFY_IDENTITY"):
            out["ssl"] = _mysql_tls(value.upper())
        elif lowered in ("usessl", "requiressl") and _truthy(value):
            out.setdefault("ssl", _mysql_tls("REQUIRED"))
        elif lowered == "allowmultiqueries":
            pass  # dptr splits the script itself (dptr_activities.sqlscript): always "allowed"
        elif lowered in ("characterencoding", "charset"):
            out["charset"] = "utf8mb4" if value.replace("-", "").lower() == "utf8" else value
        else:
            ignored.append(key)
    return out, ignored


class Session:
    """One connection, used by one worker thread; :meth:`cancel` may come from another."""

    def __init__(self, dialect: str, conn: Any, cancel_args: dict[str, Any]) -> None:
        self.dialect = dialect
        self.conn = conn
        self._cancel_args = cancel_args
        self._lock = threading.Lock()
        self.cancelled = False

    @property
    def postgres(self) -> bool:
        return self.dialect in ("postgresql", "redshift")

    # ---- statements -------------------------------------------------------------

    def set_autocommit(self, on: bool) -> None:
        with self._errors():
            if self.postgres:
                self.conn.autocommit = on
            else:
                self.conn.autocommit(on)  # PyMySQL: a method that tells the server

    def execute(self, sql: str, params: Sequence[Any] | None = None) -> int:
        with self._errors():
            cur = self.conn.cursor()
            try:
                cur.execute(sql, params if params else None)
                return int(cur.rowcount if cur.rowcount is not None else -1)
            finally:
                cur.close()

    def insert_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        with self._errors():
            cur = self.conn.cursor()
            try:
                cur.executemany(sql, rows)
            finally:
                cur.close()

    def stream(self, sql: str, *, as_text: bool = False) -> tuple[list[str], Iterator[Sequence[Any]]]:
        """A query's column names and its rows, fetched :data:`BATCH_ROWS` at a time.

        ``as_text``: every value as the server's own text form (None for NULL), not a
        Python object, so a copy to S3 writes what the database would print and a copy
        back parses it the same way (a timestamp, a boolean ``t``, a bytea ``\\x..``)."""
        with self._errors():
            if self.postgres:
                cur = self.conn.cursor(name="dptr_copy")  # server-side: rows stay on the server
                cur.itersize = BATCH_ROWS
                if as_text:
                    from psycopg.types.string import TextLoader

                    for info in cur.adapters.types:
                        for oid in (info.oid, getattr(info, "array_oid", 0)):
                            if oid:
                                cur.adapters.register_loader(oid, TextLoader)
            else:
                import pymysql.cursors

                if as_text:
                    self.conn.decoders = {}  # PyMySQL then hands every text column over decoded
                cur = self.conn.cursor(pymysql.cursors.SSCursor)  # unbuffered
            cur.execute(sql)
            names = [d[0] for d in (cur.description or [])]

        def rows() -> Iterator[Sequence[Any]]:
            try:
                while True:
                    with self._errors():
                        batch = cur.fetchmany(BATCH_ROWS)
                    if not batch:
                        return
                    yield from batch
            finally:
                with contextlib.suppress(Exception):
                    cur.close()

        return names, rows()

    def commit(self) -> None:
        with self._errors():
            self.conn.commit()

    def rollback(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.rollback()

    def set_query_group(self, queue: str) -> None:
        """Redshift's WLM queue for the session (SqlActivity's ``queue``), quoted as a literal."""
        from psycopg import sql

        with self._errors():
            self.conn.execute(sql.SQL("SET query_group TO {}").format(sql.Literal(queue)))

    # ---- cancel -----------------------------------------------------------------

    def cancel(self) -> None:
        """Stop the running statement on the server (safe from another thread)."""
        self.cancelled = True
        try:
            if self.postgres:
                cancel = getattr(self.conn, "cancel_safe", None) or self.conn.cancel
                cancel()
                return
            import pymysql

            thread_id = self.conn.thread_id()
            killer = pymysql.connect(**self._cancel_args)
            try:
                with killer.cursor() as cur:
                    cur.execute(f"KILL QUERY {int(thread_id)}")
            finally:
                killer.close()
        except Exception as exc:  # the attempt ends anyway; say why the server may still run it
            log.warning("dptr: could not cancel the statement on the server: %s", exc)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.close()

    # ---- errors -----------------------------------------------------------------

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except DatabaseError:
            raise
        except Exception as exc:
            raise self.translate(exc) from exc

    def translate(self, exc: BaseException) -> DatabaseError:
        if self.postgres:
            return _pg_error(exc)
        return _mysql_error(exc)


def _pg_error(exc: BaseException) -> DatabaseError:
    import psycopg

    if isinstance(exc, psycopg.Error):
        state = getattr(exc, "sqlstate", None)
        diag = getattr(exc, "diag", None)
        text = (getattr(diag, "message_primary", None) or str(exc)).strip()
        detail = f"ERROR {state}: {text}" if state else text
        return DatabaseError(error_id("Sql", type(exc).__name__), detail)
    return DatabaseError(error_id("Sql", type(exc).__name__), str(exc))


_ER_NAMES: dict[int, str] = {}


def _mysql_error(exc: BaseException) -> DatabaseError:
    import pymysql
    from pymysql.constants import CR, ER

    if not _ER_NAMES:
        for module in (ER, CR):
            for name in dir(module):
                value = getattr(module, name)
                if name.isupper() and isinstance(value, int):
                    _ER_NAMES.setdefault(value, name.removeprefix("CR_"))
    if isinstance(exc, pymysql.Error):
        args = exc.args
        code = args[0] if args and isinstance(args[0], int) else None
        text = str(args[1]) if len(args) > 1 else str(exc)
        parts: list[str | int] = ["Sql", type(exc).__name__]
        if code is not None:
            parts.append(_ER_NAMES.get(code, str(code)))
        return DatabaseError(error_id(*parts), f"ERROR {code}: {text}" if code is not None else text)
    return DatabaseError(error_id("Sql", type(exc).__name__), str(exc))


def connect(db: DatabasePlan, *, env: Mapping[str, str] | None = None, autocommit: bool = False) -> Session:
    """Connect to ``db``; raises TaskError (what is wrong with the plan) or DatabaseError."""
    endpoint = resolve_endpoint(db, env)
    if endpoint.dialect in ("postgresql", "redshift"):
        import psycopg

        options, ignored = _pg_options(db.properties)
        kwargs: dict[str, Any] = {
            "host": endpoint.host,
            "port": endpoint.port,
            "dbname": endpoint.database or ("dev" if endpoint.dialect == "redshift" else "postgres"),
            "user": db.username,
            "password": db.password,
            "connect_timeout": CONNECT_TIMEOUT_SECONDS,
            "application_name": "dptr-activity",
            **options,
        }
        if ignored:
            log.warning(
                "dptr: jdbcProperties ignored (no psycopg equivalent): %s", ", ".join(sorted(ignored))
            )
        try:
            conn = psycopg.connect(
                autocommit=autocommit, **{k: v for k, v in kwargs.items() if v is not None}
            )
        except Exception as exc:
            raise _pg_error(exc) from exc
        return Session(endpoint.dialect, conn, {})
    import pymysql

    options, ignored = _mysql_options(db.properties)
    if ignored:
        log.warning("dptr: jdbcProperties ignored (no PyMySQL equivalent): %s", ", ".join(sorted(ignored)))
    args: dict[str, Any] = {
        "host": endpoint.host,
        "port": endpoint.port,
        "user": db.username,
        # UTF-8 bytes: PyMySQL encodes a str password as Latin-1, and fails on anything else.
        "password": (db.password or "").encode("utf-8"),
        "database": endpoint.database,
        "connect_timeout": CONNECT_TIMEOUT_SECONDS,
        "charset": "utf8mb4",
        "local_infile": False,  # a hostile server must not read the pod's files
        **options,
    }
    try:
        conn = pymysql.connect(autocommit=autocommit, **args)
    except Exception as exc:
        raise _mysql_error(exc) from exc
    return Session("mysql", conn, {k: v for k, v in args.items() if k != "database"})
