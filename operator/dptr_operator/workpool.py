"""The operator's work pool: blocking work (Kubernetes writes, Data Pipeline reports)
off the watch handlers and the pollers.

Work takes keyword arguments only, so a call site says what each value means.  Work that
can be asked for again before it ran (a TaskRunner's finalizer on every event of it, a
runner's status on every sweep) is keyed: while one is queued and not yet started, asking
again queues nothing more, and the queued call runs with the newest arguments.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

__all__ = ["WorkPool"]

log = logging.getLogger(__name__)


class WorkPool:
    def __init__(self, workers: int, *, name: str = "work") -> None:
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix=name)
        self._lock = threading.Lock()
        self._queued: dict[Hashable, tuple[Callable[..., Any], dict[str, Any]]] = {}

    def submit(self, fn: Callable[..., Any], /, *, key: Hashable | None = None, **kwargs: Any) -> bool:
        """Run ``fn(**kwargs)`` on a pool thread; False when ``key`` was already queued
        (that call now runs with these arguments)."""
        if key is None:
            self._pool.submit(self._run, fn, kwargs)
            return True
        with self._lock:
            queued = key in self._queued
            self._queued[key] = (fn, kwargs)
        if not queued:
            self._pool.submit(self._run_keyed, key)
        return not queued

    def _run_keyed(self, key: Hashable) -> None:
        with self._lock:
            fn, kwargs = self._queued.pop(key)
        self._run(fn, kwargs)

    @staticmethod
    def _run(fn: Callable[..., Any], kwargs: dict[str, Any]) -> None:
        try:
            fn(**kwargs)
        except Exception:
            log.exception("%s failed", getattr(fn, "__qualname__", fn))

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
