"""JDBC connection strings and driver classes, translated to what dptr's Python drivers take.

Pipelines written for the official Task Runner name a JDBC URL and a Java driver class
(``JdbcDatabase.connectionString`` / ``jdbcDriverClass``).  dptr has no JVM: it serves the
URL schemes below with the well-kept Python driver of each database, and refuses anything
else with an errorId that says what (``dptr.Sql.UnsupportedUrl.<scheme>``,
``dptr.Sql.UnsupportedDriver.<class>``), before a Job is created.

===================  =================================  ==========================
scheme               driver classes accepted            Python driver
===================  =================================  ==========================
``jdbc:postgresql``  ``org.postgresql.Driver``          psycopg 3
``jdbc:mysql``       ``com.mysql.jdbc.Driver``,         PyMySQL
``jdbc:mariadb``     ``com.mysql.cj.jdbc.Driver``,
                     ``org.mariadb.jdbc.Driver``
``jdbc:redshift``    ``com.amazon.redshift.jdbc*.Driver``  psycopg 3 (Redshift speaks
                                                        the PostgreSQL protocol)
===================  =================================  ==========================

``jdbcDriverJarUri`` names a Java archive to load: it has no meaning without a JVM and is
ignored (docs/task-runner-parity.md).  Properties come from the URL's query string and from
``jdbcProperties`` (``key=value`` strings; the latter win); :mod:`dptr_activities.connect`
maps the ones it knows to the driver's own options.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import parse_qsl, unquote

from dptr_common.errors import TaskError, error_id

__all__ = [
    "DIALECT_DEFAULT_PORTS",
    "Dialect",
    "JdbcTarget",
    "dialect_for_driver",
    "parse_jdbc_url",
    "parse_properties",
]

Dialect = Literal["postgresql", "mysql", "redshift"]

DIALECT_DEFAULT_PORTS: dict[str, int] = {"postgresql": 5432, "mysql": 3306, "redshift": 5439}

_SCHEMES: dict[str, Dialect] = {
    "postgresql": "postgresql",
    "mysql": "mysql",
    "mariadb": "mysql",
    "redshift": "redshift",
}
_DRIVERS: dict[str, Dialect] = {
    "org.postgresql.Driver": "postgresql",
    "com.mysql.jdbc.Driver": "mysql",
    "com.mysql.cj.jdbc.Driver": "mysql",
    "org.mariadb.jdbc.Driver": "mysql",
    "com.amazon.redshift.jdbc.Driver": "redshift",
    "com.amazon.redshift.jdbc4.Driver": "redshift",
    "com.amazon.redshift.jdbc41.Driver": "redshift",
    "com.amazon.redshift.jdbc42.Driver": "redshift",
}
# host[:port] where host is a name, an IPv4 address or a bracketed IPv6 address.
_AUTHORITY = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(?::(?P<port>[0-9]{1,5}))?$")


@dataclass(frozen=True)
class JdbcTarget:
    """Where a JDBC URL points, and the properties it carries (user and password excluded)."""

    dialect: Dialect
    host: str
    port: int
    database: str | None
    properties: dict[str, str] = field(default_factory=dict)
    user: str | None = None
    password: str | None = field(default=None, repr=False)


def dialect_for_driver(driver_class: str) -> Dialect:
    dialect = _DRIVERS.get(driver_class.strip())
    if dialect is None:
        raise TaskError(
            error_id("Sql", "UnsupportedDriver", driver_class.strip()[:80]),
            f"jdbcDriverClass {driver_class.strip()[:200]!r} is not one dptr serves; it runs "
            + ", ".join(sorted(_DRIVERS)),
        )
    return dialect


def parse_properties(values: list[str], *, where: str) -> dict[str, str]:
    """``jdbcProperties`` values (``key=value`` each) as a dict; raises TaskError for one without ``=``."""
    out: dict[str, str] = {}
    for value in values:
        key, sep, rest = value.partition("=")
        if not sep or not key.strip():
            raise TaskError(
                "dptr.Sql.BadJdbcProperty",
                f"{where}: jdbcProperties value {value[:100]!r} is not key=value",
            )
        out[key.strip()] = rest.strip()
    return out


def parse_jdbc_url(
    url: str, *, driver_class: str | None = None, where: str = "connectionString"
) -> JdbcTarget:
    """``jdbc:<scheme>://host[:port]/[database][?k=v&...]`` -> :class:`JdbcTarget`.

    Raises TaskError: ``dptr.Sql.UnsupportedUrl.<scheme>`` for a scheme dptr cannot
    serve, ``dptr.Sql.UnsupportedDriver.<class>`` for a driver class it does not know
    or that does not match the scheme, ``dptr.Sql.BadConnectionString`` for the rest.
    """
    # No message here quotes the URL or its host part: either may hold a password
    # (user:password@host, password=...), and the message goes to Data Pipeline and Events.
    text = url.strip()
    match = re.match(r"^jdbc:([A-Za-z0-9]+):(.*)$", text, re.DOTALL | re.IGNORECASE)
    if not match:
        raise TaskError("dptr.Sql.BadConnectionString", f"{where} is not a jdbc:<database>://... URL")
    scheme, rest = match.group(1).lower(), match.group(2)
    dialect = _SCHEMES.get(scheme)
    if dialect is None:
        raise TaskError(
            error_id("Sql", "UnsupportedUrl", scheme),
            f"{where} uses jdbc:{scheme}, which dptr cannot serve; it serves "
            + ", ".join(f"jdbc:{s}" for s in sorted(_SCHEMES)),
        )
    if driver_class and driver_class.strip():
        by_driver = dialect_for_driver(driver_class)
        if by_driver != dialect:
            raise TaskError(
                error_id("Sql", "UnsupportedDriver", driver_class.strip()[:80]),
                f"jdbcDriverClass {driver_class.strip()!r} is a {by_driver} driver, but {where} is jdbc:{scheme}",
            )
    if not rest.startswith("//"):
        raise TaskError(
            "dptr.Sql.BadConnectionString", f"{where} must name a host: jdbc:{scheme}://host[:port]/database"
        )
    rest = rest[2:]
    authority, _, tail = rest.partition("/")
    path, _, query = tail.partition("?")
    if "?" in authority:  # jdbc:mysql://host?x=y, no database
        authority, _, query = authority.partition("?")
    found = _AUTHORITY.match(authority)
    if not found:
        raise TaskError(
            "dptr.Sql.BadConnectionString",
            f"{where}: the part after jdbc:{scheme}:// is not one host[:port] (user info in the host "
            "part, several hosts and address=(...) forms are not supported)",
        )
    host = found.group("host").strip("[]")
    port = int(found.group("port")) if found.group("port") else DIALECT_DEFAULT_PORTS[dialect]
    if not 0 < port < 65536:
        raise TaskError("dptr.Sql.BadConnectionString", f"{where} port {port} is out of range")
    database = unquote(path) if path else None
    if database is not None and ("/" in database or not database.strip()):
        raise TaskError("dptr.Sql.BadConnectionString", f"{where}: the database part is not a name")
    properties: dict[str, str] = {}
    # MySQL's Connector/J also takes ;-separated properties on some versions: '&' is the standard.
    for key, value in parse_qsl(query, keep_blank_values=True):
        properties[key] = value
    user = properties.pop("user", None)
    password = properties.pop("password", None)
    return JdbcTarget(
        dialect=dialect,
        host=host,
        port=port,
        database=database,
        properties=properties,
        user=user,
        password=password,
    )
