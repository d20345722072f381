"""What a SqlActivity or CopyActivity attempt does, resolved from the polled task's objects.

The official Task Runner runs these two activity types on the worker group's own host,
against databases only that host can reach.  dptr runs them in the task container with
its own code (``dptr-activity``, :mod:`dptr_activities`), from an :class:`ActivityPlan`:
the activity's fields, its database (``JdbcDatabase``, ``RdsDatabase``,
``RedshiftDatabase``) and its data nodes (``S3DataNode``, ``SqlDataNode``) with their
data formats, all resolved here, at render time, so a task dptr cannot run ends FAILED
with a clear errorId before anything is created.

The plan holds the database's ``*password``: it is written to a per-attempt Secret owned
by the PipelineTask and mounted only into the task container (docs/security.md), never
into the Job, the PipelineTask, an annotation, an env value or a log line.  Its
``__repr__`` leaves the password out.

Objects the task did not carry (a task rebuilt from its PipelineTask after a restart,
which keeps no objects) are listed by :func:`missing_objects`, for the operator to look
up with DescribeObjects before it builds the plan.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from dptr_common.errors import TaskError, error_id
from dptr_common.jdbc import Dialect, dialect_for_driver, parse_jdbc_url, parse_properties
from dptr_common.staging_plan import data_node_location
from dptr_common.task import PipelineObject, Task, parse_object

__all__ = [
    "ACTIVITY_TYPES",
    "COPY_ACTIVITY",
    "MANAGED_RESOURCE_TYPES",
    "SQL_ACTIVITY",
    "ActivityPlan",
    "DataFormatPlan",
    "DatabasePlan",
    "NodePlan",
    "build_plan",
    "missing_objects",
]

SQL_ACTIVITY = "SqlActivity"
COPY_ACTIVITY = "CopyActivity"
ACTIVITY_TYPES = frozenset({SQL_ACTIVITY, COPY_ACTIVITY})
#: Activity types that need a resource Data Pipeline manages (an EMR cluster, Redshift's
#: COPY from S3 with the service's own role): never run on a worker group by dptr.
MANAGED_RESOURCE_TYPES = frozenset(
    {
        "RedshiftCopyActivity",
        "HiveActivity",
        "PigActivity",
        "EmrActivity",
        "HadoopActivity",
        "HiveCopyActivity",
    }
)
DATABASE_TYPES = frozenset({"JdbcDatabase", "RdsDatabase", "RedshiftDatabase"})
FORMAT_TYPES = frozenset({"CSV", "TSV", "Custom"})


class _Plan(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DatabasePlan(_Plan):
    """A database object, as far as it can be resolved without the AWS APIs.

    ``host`` is None for an ``RdsDatabase`` (and a ``RedshiftDatabase`` by ``clusterId``):
    the activity looks its endpoint up (DescribeDBInstances, DescribeClusters) with the
    runner's identity.  ``dialect`` is None for an RdsDatabase until its engine is known.
    """

    id: str
    type: str
    dialect: Dialect | None = None
    host: str | None = None
    port: int | None = None
    database: str | None = None
    username: str | None = None
    password: str | None = Field(default=None, repr=False)
    properties: dict[str, str] = {}
    rds_instance_id: str | None = None
    cluster_id: str | None = None
    region: str | None = None


class DataFormatPlan(_Plan):
    """``CSV``, ``TSV`` or ``Custom``: how records and columns are written in an S3 object."""

    id: str
    type: Literal["CSV", "TSV", "Custom"]
    column_separator: str
    record_separator: str = "\n"
    escape_char: str | None = None
    #: Column names (``column`` values, their ``name TYPE`` form's first word).
    columns: tuple[str, ...] = ()

    def same_bytes_as(self, other: DataFormatPlan | None) -> bool:
        """Whether a byte copy from this format to ``other`` keeps every record as it is."""
        return other is not None and (
            self.type,
            self.column_separator,
            self.record_separator,
            self.escape_char,
        ) == (
            other.type,
            other.column_separator,
            other.record_separator,
            other.escape_char,
        )


class NodePlan(_Plan):
    """A data node: an S3 location or a table."""

    id: str
    type: Literal["S3DataNode", "SqlDataNode"]
    uri: str | None = None
    kind: Literal["file", "directory"] | None = None
    compression: Literal["none", "gzip"] = "none"
    data_format: DataFormatPlan | None = None
    encryption: str | None = None
    kms_key_id: str | None = None
    table: str | None = None
    select_query: str | None = None
    insert_query: str | None = None
    create_table_sql: str | None = None
    database: DatabasePlan | None = None


class ActivityPlan(_Plan):
    """What ``dptr-activity`` runs for one attempt."""

    type: Literal["SqlActivity", "CopyActivity"]
    pipeline_id: str
    attempt_id: str
    script: str | None = None
    script_uri: str | None = None
    script_arguments: tuple[str, ...] = ()
    queue: str | None = None
    database: DatabasePlan | None = None
    input: NodePlan | None = None
    output: NodePlan | None = None

    def to_json(self) -> str:
        return self.model_dump_json(exclude_none=True)


# ----------------------------------------------------------------------- resolution


def _single(obj: PipelineObject, key: str) -> str | None:
    values = obj.values(key)
    if len(values) > 1:
        raise TaskError(
            error_id("InvalidTask", "RepeatedField", key),
            f"{obj.id!r}: field {key!r} is given {len(values)} times",
        )
    return values[0].strip() if values and values[0].strip() else None


def _ref(obj: PipelineObject, key: str) -> str | None:
    refs = obj.refs(key)
    if len(refs) > 1:
        raise TaskError(
            error_id("InvalidTask", "RepeatedField", key),
            f"{obj.id!r}: {key!r} references {len(refs)} objects",
        )
    return refs[0] if refs else None


def _type(obj: PipelineObject) -> str:
    return obj.first("type") or "untyped"


def _refs_of(obj: PipelineObject) -> list[str]:
    return [r for key in ("database", "dataFormat", "input", "output") for r in obj.refs(key)]


def missing_objects(task: Task, extra: Mapping[str, PipelineObject] | None = None) -> list[str]:
    """Ids the plan needs that neither the task nor ``extra`` holds (look them up, then build)."""
    if task.object_type not in ACTIVITY_TYPES:
        return []
    known = {**(extra or {}), **task.objects}
    missing: list[str] = []
    seen: set[str] = set()
    queue = _refs_of(task.attempt)
    while queue:
        ref = queue.pop(0)
        if ref in seen:
            continue
        seen.add(ref)
        obj = known.get(ref)
        if obj is None:
            missing.append(ref)
        else:
            queue += _refs_of(obj)
    return missing


def _lookup(objects: Mapping[str, PipelineObject], ref: str, what: str) -> PipelineObject:
    obj = objects.get(ref)
    if obj is None:
        raise TaskError(
            error_id("InvalidTask", "MissingObject", what),
            f"the {what} {ref!r} is not in the task, and DescribeObjects did not return it",
        )
    return obj


def _database(obj: PipelineObject, kind: str | None = None) -> DatabasePlan:
    kind = kind or _type(obj)
    where = f"{_type(obj)} {obj.id!r}"
    username, password = _single(obj, "username"), obj.first("*password")
    properties = parse_properties(obj.values("jdbcProperties"), where=where)
    if kind == "JdbcDatabase":
        url = _single(obj, "connectionString")
        if url is None:
            raise TaskError("dptr.Sql.BadConnectionString", f"{where} has no connectionString")
        target = parse_jdbc_url(
            url, driver_class=_single(obj, "jdbcDriverClass"), where=f"{where} connectionString"
        )
        return DatabasePlan(
            id=obj.id,
            type=kind,
            dialect=target.dialect,
            host=target.host,
            port=target.port,
            database=_single(obj, "databaseName") or target.database,
            username=username or target.user,
            password=password if password is not None else target.password,
            properties={**target.properties, **properties},
        )
    if kind == "RdsDatabase":
        instance = _single(obj, "rdsInstanceId")
        if instance is None:
            raise TaskError("dptr.Sql.BadDatabase", f"{where} has no rdsInstanceId")
        driver = _single(obj, "jdbcDriverClass")
        return DatabasePlan(
            id=obj.id,
            type=kind,
            dialect=dialect_for_driver(driver) if driver else None,
            database=_single(obj, "databaseName"),
            username=username,
            password=password,
            properties=properties,
            rds_instance_id=instance,
            region=_single(obj, "region"),
        )
    if kind == "RedshiftDatabase":
        url, cluster = _single(obj, "connectionString"), _single(obj, "clusterId")
        if bool(url) == bool(cluster):
            raise TaskError(
                "dptr.Sql.BadDatabase", f"{where} needs exactly one of clusterId and connectionString"
            )
        if url:
            target = parse_jdbc_url(url, where=f"{where} connectionString")
            if target.dialect != "redshift":
                raise TaskError(
                    error_id("Sql", "UnsupportedUrl", target.dialect),
                    f"{where} connectionString must be a jdbc:redshift:// URL",
                )
            return DatabasePlan(
                id=obj.id,
                type=kind,
                dialect="redshift",
                host=target.host,
                port=target.port,
                database=_single(obj, "databaseName") or target.database,
                username=username or target.user,
                password=password if password is not None else target.password,
                properties={**target.properties, **properties},
            )
        return DatabasePlan(
            id=obj.id,
            type=kind,
            dialect="redshift",
            database=_single(obj, "databaseName"),
            username=username,
            password=password,
            properties=properties,
            cluster_id=cluster,
            region=_single(obj, "region"),
        )
    raise TaskError(
        error_id("Sql", "UnsupportedDatabase", kind),
        f"{obj.id!r} is a {kind}; dptr connects to " + ", ".join(sorted(DATABASE_TYPES)),
    )


def _single_char(value: str | None, *, field: str, where: str) -> str | None:
    if value is None:
        return None
    if len(value) != 1:
        raise TaskError(
            "dptr.Copy.BadDataFormat", f"{where}: {field} must be one character, not {value[:20]!r}"
        )
    return value


def _unescape(value: str) -> str:
    # Custom formats write separators as the guide's examples do ("\n", "\t", "\u0001").
    return value.encode("latin-1", "backslashreplace").decode("unicode_escape") if "\\" in value else value


def _data_format(obj: PipelineObject) -> DataFormatPlan:
    kind = _type(obj)
    where = f"{kind} {obj.id!r}"
    if kind not in FORMAT_TYPES:
        raise TaskError(
            error_id("Copy", "UnsupportedDataFormat", kind),
            f"{obj.id!r} is a {kind} data format; dptr copies " + ", ".join(sorted(FORMAT_TYPES)),
        )
    columns = tuple(c.split()[0] for c in obj.values("column") if c.split())
    escape = _single_char(_single(obj, "escapeChar"), field="escapeChar", where=where)
    if kind == "CSV":
        return DataFormatPlan(
            id=obj.id, type="CSV", column_separator=",", escape_char=escape, columns=columns
        )
    column = _single(obj, "columnSeparator")
    record = _single(obj, "recordSeparator")
    if kind == "TSV":
        return DataFormatPlan(
            id=obj.id,
            type="TSV",
            column_separator=_unescape(column) if column else "\t",
            record_separator=_unescape(record) if record else "\n",
            escape_char=escape,
            columns=columns,
        )
    if column is None:
        raise TaskError("dptr.Copy.BadDataFormat", f"{where} has no columnSeparator (it is required)")
    separator, records = _unescape(column), _unescape(record) if record else "\n"
    if not separator or not records or separator == records:
        raise TaskError(
            "dptr.Copy.BadDataFormat", f"{where}: columnSeparator and recordSeparator must differ"
        )
    return DataFormatPlan(
        id=obj.id,
        type="Custom",
        column_separator=separator,
        record_separator=records,
        escape_char=escape,
        columns=columns,
    )


def _node(objects: Mapping[str, PipelineObject], ref: str, what: str) -> NodePlan:
    obj = _lookup(objects, ref, what)
    kind = _type(obj)
    if kind == "S3DataNode":
        try:
            location = data_node_location(obj)
        except TaskError as exc:
            raise TaskError(exc.error_id.replace("dptr.StagingFailed.", "dptr.Copy."), exc.message) from None
        if location is None:  # pragma: no cover - None only for other node types
            raise TaskError("dptr.Copy.BadDataNode", f"{obj.id!r} is not an S3DataNode")
        compression = (_single(obj, "compression") or "none").lower()
        if compression not in ("none", "gzip"):
            raise TaskError(
                error_id("Copy", "UnsupportedCompression", compression),
                f"S3DataNode {obj.id!r} compression {compression!r}: dptr copies none or gzip",
            )
        fmt = _ref(obj, "dataFormat")
        return NodePlan(
            id=obj.id,
            type="S3DataNode",
            uri=location.uri,
            kind=location.kind,
            compression=compression,
            data_format=_data_format(_lookup(objects, fmt, "dataFormat")) if fmt else None,
            encryption=location.encryption,
            kms_key_id=location.kms_key_id,
        )
    if kind in ("SqlDataNode", "MySqlDataNode"):
        database = _ref(obj, "database")
        if database is not None:
            db = _database(_lookup(objects, database, "database"))
        elif _single(obj, "connectionString"):
            # The node's own connectionString, username and *password: MySqlDataNode (the
            # guide's deprecated type, still in its MySQL examples) or a SqlDataNode so written.
            db = _database(obj, kind="JdbcDatabase")
        else:
            raise TaskError("dptr.Copy.BadDataNode", f"{kind} {obj.id!r} has no database")
        return NodePlan(
            id=obj.id,
            type="SqlDataNode",
            table=_single(obj, "table"),
            select_query=_single(obj, "selectQuery"),
            insert_query=_single(obj, "insertQuery"),
            create_table_sql=_single(obj, "createTableSql"),
            database=db,
        )
    raise TaskError(
        error_id("Copy", "UnsupportedDataNode", kind),
        f"{what} {obj.id!r} is a {kind}; dptr copies between S3DataNode and SqlDataNode",
    )


def _sql_activity(task: Task, objects: Mapping[str, PipelineObject]) -> ActivityPlan:
    attempt = task.attempt
    script, script_uri = _single(attempt, "script"), _single(attempt, "scriptUri")
    if bool(script) == bool(script_uri):
        raise TaskError(
            "dptr.InvalidTask.Sql.ScriptAndScriptUri" if script else "dptr.InvalidTask.Sql.NoScript",
            "a SqlActivity needs exactly one of script and scriptUri",
        )
    if script_uri and not script_uri.startswith("s3://"):
        raise TaskError(
            "dptr.InvalidTask.BadScriptUri", f"scriptUri {script_uri!r} is not an s3://bucket/key URI"
        )
    database = _ref(attempt, "database")
    if database is None:
        raise TaskError("dptr.InvalidTask.Sql.NoDatabase", "the SqlActivity has no database")
    return ActivityPlan(
        type="SqlActivity",
        pipeline_id=task.pipeline_id,
        attempt_id=task.attempt_id,
        script=script,
        script_uri=script_uri,
        script_arguments=tuple(attempt.values("scriptArgument")),
        queue=_single(attempt, "queue"),
        database=_database(_lookup(objects, database, "database")),
    )


_S3_PATH = re.compile(r"^s3[an]?://([^/]+)/?(.*)$")


def _refuse_overlap(source: NodePlan, target: NodePlan) -> None:
    """A directory's copy may not write under that directory: the listing, a page at a
    time, would find what the copy wrote and copy it again, without end."""
    src, dst = _S3_PATH.match(source.uri or ""), _S3_PATH.match(target.uri or "")
    if source.kind != "directory" or src is None or dst is None or src.group(1) != dst.group(1):
        return
    prefix = src.group(2) if not src.group(2) or src.group(2).endswith("/") else src.group(2) + "/"
    written = dst.group(2) if target.kind == "file" else dst.group(2).rstrip("/")
    if target.kind == "directory" and written:
        written += "/"
    if written.startswith(prefix) or (target.kind == "directory" and prefix.startswith(written)):
        raise TaskError(
            "dptr.Copy.OverlappingPaths",
            f"the output {target.uri} is inside (or holds) the input directory {source.uri}",
        )


def _copy_activity(task: Task, objects: Mapping[str, PipelineObject]) -> ActivityPlan:
    inputs, outputs = task.attempt.refs("input"), task.attempt.refs("output")
    if len(inputs) != 1 or len(outputs) != 1:
        raise TaskError(
            "dptr.InvalidTask.Copy.InputOutput",
            f"a CopyActivity needs one input and one output (it has {len(inputs)} and {len(outputs)})",
        )
    source, target = _node(objects, inputs[0], "input"), _node(objects, outputs[0], "output")
    if source.type == "SqlDataNode" and target.type == "SqlDataNode":
        raise TaskError(
            "dptr.Copy.UnsupportedPair.SqlDataNode-SqlDataNode",
            "dptr copies S3 to S3, S3 to SQL and SQL to S3, not between two tables",
        )
    if source.type == "SqlDataNode" and not (source.select_query or source.table):
        raise TaskError("dptr.Copy.BadDataNode", f"SqlDataNode {source.id!r} needs selectQuery or table")
    if target.type == "SqlDataNode" and not (target.insert_query or target.table):
        raise TaskError("dptr.Copy.BadDataNode", f"SqlDataNode {target.id!r} needs insertQuery or table")
    if source.type == "S3DataNode" and target.type == "S3DataNode":
        _refuse_overlap(source, target)
        fmt_in, fmt_out = source.data_format, target.data_format
        if (fmt_in is None) != (fmt_out is None):
            raise TaskError(
                "dptr.Copy.FormatMismatch",
                "both S3 nodes need a dataFormat, or neither (a byte copy)",
            )
    elif source.type == "S3DataNode" and source.kind == "directory" and source.data_format is None:
        pass  # read as CSV, the default of a record copy
    return ActivityPlan(
        type="CopyActivity",
        pipeline_id=task.pipeline_id,
        attempt_id=task.attempt_id,
        input=source,
        output=target,
    )


def build_plan(task: Task, extra: Mapping[str, PipelineObject] | None = None) -> ActivityPlan:
    """The plan of a SqlActivity or CopyActivity; ``extra`` holds objects looked up with
    DescribeObjects.  Raises TaskError for one dptr cannot run."""
    objects: dict[str, PipelineObject] = {**(extra or {}), **task.objects}
    if task.object_type == SQL_ACTIVITY:
        return _sql_activity(task, objects)
    if task.object_type == COPY_ACTIVITY:
        return _copy_activity(task, objects)
    raise ValueError(f"not an activity dptr plans: {task.object_type}")


def as_objects(raw: list[Mapping[str, Any]]) -> dict[str, PipelineObject]:
    """DescribeObjects' ``pipelineObjects`` as parsed objects (``*`` fields included)."""
    return {str(o.get("id")): parse_object(str(o.get("id")), o) for o in raw if o.get("id")}
