"""What a task stages, decided from its fields alone (pure; shared by render and sidecar).

With ``stage: true``, the official Task Runner downloads each ``input`` S3DataNode into a
directory exposed to the command as ``INPUT1_STAGING_DIR``, ``INPUT2_STAGING_DIR``...
(numbered by the position of the ``input`` reference on the activity) and uploads what
the command wrote to ``OUTPUT1_STAGING_DIR``... to the ``output`` data nodes after a
successful exit.  The variables are set in the command's environment; the shell expands
``${INPUT1_STAGING_DIR}`` in ``command``.

A :class:`StagingPlan` is that decision, serialised into the pod (env
``DPTR_STAGING_PLAN``) so the stage-in init container and the sidecar need nothing but
their environment.  Data nodes that PollForTask did not include are left unresolved
(``uri`` None) and resolved at run time with one DescribeObjects call
(``dptr_sidecar.staging.resolve_plan``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from dptr_common.errors import TaskError
from dptr_common.task import PipelineObject, Task

__all__ = [
    "STAGING_ROOT",
    "DataNodeLocation",
    "StagedNode",
    "StagingPlan",
    "as_pipeline_object",
    "data_node_location",
    "plan_staging",
    "substitute_staging_references",
]

#: Where the staging emptyDir is mounted in every container that uses it.
STAGING_ROOT = "/dptr/staging"

Direction = Literal["input", "output"]
Kind = Literal["directory", "file"]


@dataclass(frozen=True)
class DataNodeLocation:
    """Where an S3DataNode's data is: a directory (prefix) or a single file (key)."""

    uri: str
    kind: Kind
    #: ``s3EncryptionType``: SERVER_SIDE_ENCRYPTION (the default), SERVER_SIDE_ENCRYPTION_KMS or NONE.
    encryption: str = "SERVER_SIDE_ENCRYPTION"
    kms_key_id: str | None = None


@dataclass(frozen=True)
class StagedNode:
    """One staged input or output: its data node, its local directory and its S3 location."""

    direction: Direction
    #: 1-based position among the activity's ``input`` (or ``output``) references.
    index: int
    ref: str
    staging_dir: str
    uri: str | None = None
    kind: Kind | None = None
    encryption: str = "SERVER_SIDE_ENCRYPTION"
    kms_key_id: str | None = None

    @property
    def env_name(self) -> str:
        return f"{self.direction.upper()}{self.index}_STAGING_DIR"

    @property
    def resolved(self) -> bool:
        return self.uri is not None

    def with_location(self, location: DataNodeLocation) -> StagedNode:
        return replace(
            self,
            uri=location.uri,
            kind=location.kind,
            encryption=location.encryption,
            kms_key_id=location.kms_key_id,
        )


@dataclass(frozen=True)
class StagingPlan:
    pipeline_id: str
    nodes: tuple[StagedNode, ...] = ()

    @property
    def inputs(self) -> tuple[StagedNode, ...]:
        return tuple(n for n in self.nodes if n.direction == "input")

    @property
    def outputs(self) -> tuple[StagedNode, ...]:
        return tuple(n for n in self.nodes if n.direction == "output")

    @property
    def unresolved(self) -> list[str]:
        """Data node ids still to look up with DescribeObjects (no duplicates, in order)."""
        return list(dict.fromkeys(n.ref for n in self.nodes if not n.resolved))

    def env(self) -> dict[str, str]:
        """``INPUT1_STAGING_DIR`` ... ``OUTPUTn_STAGING_DIR`` -> directory."""
        return {n.env_name: n.staging_dir for n in self.nodes}

    def to_json(self) -> str:
        return json.dumps(
            {"pipelineId": self.pipeline_id, "nodes": [asdict(n) for n in self.nodes]},
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> StagingPlan:
        try:
            data = json.loads(text)
            nodes = tuple(StagedNode(**n) for n in data["nodes"])
            return cls(pipeline_id=str(data["pipelineId"]), nodes=nodes)
        except (ValueError, KeyError, TypeError) as exc:
            raise TaskError("dptr.StagingFailed.BadPlan", f"DPTR_STAGING_PLAN is malformed: {exc}") from exc


def as_pipeline_object(obj: PipelineObject | Mapping[str, Any]) -> PipelineObject:
    """A parsed object, or a raw API object (``{"id", "name", "fields"}``) parsed."""
    if isinstance(obj, PipelineObject):
        return obj
    from dptr_common.task import TaskField

    fields = tuple(
        TaskField(key=f["key"], string_value=f.get("stringValue"), ref_value=f.get("refValue"))
        for f in obj.get("fields", [])
    )
    return PipelineObject(id=str(obj.get("id")), name=str(obj.get("name") or obj.get("id")), fields=fields)


def data_node_location(obj: PipelineObject | Mapping[str, Any]) -> DataNodeLocation | None:
    """An S3DataNode's location, None for another data node type.

    ``obj`` is a parsed object or a raw API object (``{"id", "name", "fields"}``).
    Raises TaskError ``dptr.StagingFailed.*`` for an S3DataNode that cannot be staged.
    """
    node = as_pipeline_object(obj)
    node_type = node.first("type")
    if node_type != "S3DataNode":
        return None
    directory, file = node.first("directoryPath"), node.first("filePath")
    if node.first("manifestFilePath") and not (directory or file):
        raise TaskError(
            "dptr.StagingFailed.ManifestNotSupported",
            f"S3DataNode {node.id!r} uses manifestFilePath; dptr stages directoryPath or filePath only",
        )
    if bool(directory) == bool(file):
        raise TaskError(
            "dptr.StagingFailed.BadDataNode",
            f"S3DataNode {node.id!r} must have exactly one of directoryPath and filePath",
        )
    path = str(directory or file)
    if "#{" in path:
        raise TaskError(
            "dptr.StagingFailed.UnevaluatedExpression",
            f"S3DataNode {node.id!r} path {path!r} still holds an expression the service did not evaluate",
        )
    if not re.match(r"^s3[an]?://[^/\s]+", path):
        raise TaskError(
            "dptr.StagingFailed.BadDataNode", f"S3DataNode {node.id!r} path {path!r} is not an s3:// URI"
        )
    encryption = (node.first("s3EncryptionType") or "SERVER_SIDE_ENCRYPTION").strip().upper()
    return DataNodeLocation(
        uri=path,
        kind="directory" if directory else "file",
        encryption=encryption,
        kms_key_id=node.first("kmsKeyId"),
    )


def plan_staging(task: Task, root: str = STAGING_ROOT) -> StagingPlan | None:
    """The staging a task asks for, or None when it asks for none.

    None unless ``stage`` is true and the activity has ``input`` or ``output``
    references.  A data node PollForTask included is resolved now; one that is not a
    S3DataNode is not staged (its number is still taken, so ``INPUT2`` stays the
    second ``input``); a missing one is left for DescribeObjects.
    """
    if task.object_type != "ShellCommandActivity" or not task.stage or not (task.inputs or task.outputs):
        return None  # preconditions have no staging fields
    nodes: list[StagedNode] = []
    for direction, refs in (("input", task.inputs), ("output", task.outputs)):
        for index, ref in enumerate(refs, start=1):
            node = StagedNode(
                direction=direction,  # type: ignore[arg-type]
                index=index,
                ref=ref,
                staging_dir=f"{root}/{direction}{index}",
            )
            obj = task.objects.get(ref)
            if obj is not None:
                location = data_node_location(obj)
                if location is None:
                    continue
                node = node.with_location(location)
            nodes.append(node)
    return StagingPlan(pipeline_id=task.pipeline_id, nodes=tuple(nodes))


_REFERENCE = re.compile(
    r"\$\{((?:INPUT|OUTPUT)[0-9]+_STAGING_DIR)\}|\$((?:INPUT|OUTPUT)[0-9]+_STAGING_DIR)\b"
)


def substitute_staging_references(text: str, env: Mapping[str, str]) -> str:
    """Replace ``${INPUT1_STAGING_DIR}`` / ``$INPUT1_STAGING_DIR`` (staging names in ``env`` only).

    Used for ``scriptArgument`` values, which no shell expands.  Every other character
    is left exactly as given; an unknown staging name is left as written.
    """

    def repl(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return env.get(name, match.group(0))

    return _REFERENCE.sub(repl, text)


def substitute_all(values: Iterable[str], env: Mapping[str, str]) -> list[str]:
    return [substitute_staging_references(v, env) for v in values]
