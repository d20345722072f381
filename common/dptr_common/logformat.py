"""``--log-format=json``: one JSON object per line, with the same fields for the operator,
the sidecar and ``dptr-activity``, so a log pipeline can route and join them.

Every line has ``time`` (RFC 3339, UTC, milliseconds), ``level``, ``logger`` and
``message``; ``exception`` when one is logged.  The work a line is about, when known:

* ``taskrunner`` (``namespace/name``), ``pipeline``, ``attempt`` and ``task`` (the
  PipelineTask's name): set for a stretch of code with :func:`log_context` (the operator,
  per poller thread and per dispatched task) or once for the process
  (:func:`configure` ``static``: the sidecar's and the activity's own attempt);
* ``object`` (``namespace/name``) for kopf's per-object lines.

Nothing else of a record is copied: a field is added here, on purpose, or not at all.
Stdlib only: the sidecar loads it.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
import time
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any, TextIO

__all__ = ["FIELDS", "JsonFormatter", "configure", "log_context"]

#: The context fields, in the order they are written.
FIELDS = ("taskrunner", "pipeline", "attempt", "task")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_EMPTY: Mapping[str, str] = MappingProxyType({})
_context: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar(
    "dptr_log_context", default=_EMPTY
)


@contextlib.contextmanager
def log_context(**fields: str | None) -> Iterator[None]:
    """Lines logged in this block (in this thread or task) carry ``fields`` (None: unset)."""
    merged = {**_context.get(), **{k: v for k, v in fields.items() if v}}
    token = _context.set(merged)
    try:
        yield
    finally:
        _context.reset(token)


class JsonFormatter(logging.Formatter):
    def __init__(self, static: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self.static = {k: v for k, v in (static or {}).items() if v}

    def format(self, record: logging.LogRecord) -> str:
        seconds = time.gmtime(record.created)
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", seconds) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        context = {**self.static, **_context.get()}
        for key in FIELDS:
            if context.get(key):
                line[key] = context[key]
        ref = getattr(record, "k8s_ref", None)  # kopf's object loggers
        if isinstance(ref, Mapping) and ref.get("name"):
            namespace = ref.get("namespace")
            line["object"] = f"{namespace}/{ref['name']}" if namespace else str(ref["name"])
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def configure(
    level: str,
    log_format: str = "text",
    *,
    static: Mapping[str, str] | None = None,
    stream: TextIO | None = None,
) -> None:
    """The root logger's one handler: ``text`` (the classic line) or ``json``."""
    handler = logging.StreamHandler(stream or sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter(static))
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
