"""SqlActivity: the script's statements, in order, against the activity's database.

* ``script`` or ``scriptUri`` (fetched from S3 with the runner's identity);
* ``scriptArgument`` values bound to the ``?`` placeholders in order, across statements
  (:mod:`dptr_activities.sqlscript`); a count that does not match fails before any
  statement runs (``dptr.Sql.ArgumentCount``);
* one transaction for the whole script, committed after its last statement, unless the
  script manages its own (``BEGIN``/``COMMIT``/``ROLLBACK``...): then each statement runs
  as written, in autocommit.  (MySQL commits DDL implicitly whatever dptr does.)
* a failed statement rolls the transaction back and ends FAILED ``dptr.Sql.<class>``
  with its position: ``statement 2 of 3 (line 4, column 1): ERROR 42P01: ...``;
* ``queue`` sets Redshift's ``query_group`` first.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Mapping

from dptr_common.activity_plan import ActivityPlan
from dptr_common.errors import TaskError

from .connect import DatabaseError, Session, connect
from .sqlscript import manages_own_transaction, split_script

__all__ = ["run_sql", "script_text"]

log = logging.getLogger("dptr.activity")

#: The most of a script dptr reads from S3 (a script, not data).
MAX_SCRIPT_BYTES = 16 * 1024 * 1024


def script_text(plan: ActivityPlan, env: Mapping[str, str]) -> str:
    if plan.script is not None:
        return plan.script
    from dptr_sidecar.s3 import S3Client, S3Error, parse_s3_uri

    uri = parse_s3_uri(str(plan.script_uri))
    try:
        with S3Client(env=env) as s3:
            data = b"".join(s3.iter_object(uri, limit=MAX_SCRIPT_BYTES))
    except S3Error as exc:
        raise TaskError(f"dptr.ScriptFetchFailed.{exc.code}", f"scriptUri {plan.script_uri}: {exc}") from exc
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TaskError("dptr.Sql.ScriptNotUtf8", f"scriptUri {plan.script_uri} is not UTF-8: {exc}") from exc


class Stopped(Exception):  # noqa: N818 - a state, not a failure
    """SIGTERM came: nothing more is run or committed."""


_LITERAL = re.compile(r"'(?:[^']|'')*'")


def _masked(source: str) -> str:
    # A statement's literals may hold secrets (CREATE USER ... PASSWORD '...'): the echo
    # in errorMessage shows their place, not their text.
    masked: str = _LITERAL.sub("'…'", source)
    return masked[:300]


def run_sql(
    plan: ActivityPlan,
    session_hook: list[Session],
    env: Mapping[str, str] | None = None,
    stopping: threading.Event | None = None,
) -> None:
    """Run the plan's script; raises TaskError, or Stopped once ``stopping`` is set.  The
    open session is put in ``session_hook`` so the SIGTERM handler can cancel its statement;
    ``stopping`` is checked before each statement and before the commit, so a SIGTERM that
    falls between two calls (or during the connect) runs and commits nothing more."""
    env = os.environ if env is None else env
    stopping = stopping or threading.Event()

    def check() -> None:
        if stopping.is_set():
            raise Stopped

    if plan.database is None:
        raise TaskError("dptr.InvalidTask.Sql.NoDatabase", "the SqlActivity has no database")
    text = script_text(plan, env)
    # The dialect decides the scanner; an RDS instance's is known after the lookup, but
    # both dialects split plain scripts alike, so PostgreSQL's rules are a safe start.
    session = connect(plan.database, env=env, autocommit=True)
    session_hook.append(session)
    try:
        check()
        statements = split_script(text, dialect=session.dialect)
        if not statements:
            raise TaskError("dptr.Sql.EmptyScript", "the script has no statement")
        wanted = sum(s.parameters for s in statements)
        if wanted != len(plan.script_arguments):
            raise TaskError(
                "dptr.Sql.ArgumentCount",
                f"the script has {wanted} ? placeholder(s) and the activity {len(plan.script_arguments)} "
                "scriptArgument value(s)",
            )
        if plan.queue and session.dialect == "redshift":
            session.set_query_group(plan.queue)
        own = manages_own_transaction(statements)
        session.set_autocommit(own)
        arguments = list(plan.script_arguments)
        total = len(statements)
        for number, statement in enumerate(statements, start=1):
            params, arguments = arguments[: statement.parameters], arguments[statement.parameters :]
            check()
            try:
                count = session.execute(statement.text, params)
            except DatabaseError as exc:
                session.rollback()
                check()  # cancelled by SIGTERM: not the statement's fault
                where = f"statement {number} of {total} (line {statement.line}, column {statement.column})"
                raise TaskError(
                    exc.error_id, f"{where}: {exc.message}; the statement: {_masked(statement.source)}"
                ) from exc
            log.info("dptr: statement %d of %d done (%s rows)", number, total, count)
        if not own:
            check()
            session.commit()
    finally:
        session.close()
