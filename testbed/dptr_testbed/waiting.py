"""One way to wait in the tests: poll a predicate until it holds or a deadline passes.

Each test package used to carry its own ``wait_for``, with its own defaults, its own
deadline rule (some gave up without a last look, some slept past the deadline) and its
own message.  This is the only one.  Every call states its ``timeout`` and ``what`` it
waits for, the predicate gets one last try at the deadline, and a timeout always reads
the same: what was awaited, for how long, the last value seen, and the last tolerated
exception as the ``AssertionError``'s cause.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["wait_for"]

T = TypeVar("T")

#: How much of the last value's repr a timeout message keeps.
REPR_LIMIT = 500


def _short_repr(value: object) -> str:
    text = repr(value)
    return text if len(text) <= REPR_LIMIT else text[:REPR_LIMIT] + "...[truncated]"


def wait_for(
    predicate: Callable[[], T | None],
    *,
    timeout: float,
    what: str,
    interval: float = 0.1,
    tolerate: tuple[type[BaseException], ...] = (AssertionError,),
) -> T:
    """Call ``predicate`` until it returns something truthy, and return that.

    An exception of a ``tolerate`` type counts as "not yet" (the last one is kept);
    any other propagates at once.  The predicate is tried once more when the deadline
    has passed, so one that turns true just then still counts.  After ``timeout``
    seconds this raises ``AssertionError`` naming ``what``, the timeout and the last
    value, ``from`` the last tolerated exception if there was one.
    """
    deadline = time.monotonic() + timeout
    tries = 0
    seen_value = False
    last: object = None
    last_exc: BaseException | None = None
    while True:
        final = time.monotonic() >= deadline
        tries += 1
        try:
            value = predicate()
        except tolerate as exc:
            last_exc = exc
        else:
            if value:
                return value
            seen_value, last = True, value
        if final:
            break
        # Sleep no further than the deadline: the last try comes at the deadline, not after.
        time.sleep(max(0.0, min(interval, deadline - time.monotonic())))
    message = f"timed out after {timeout}s waiting for {what} ({tries} tries"
    message += f"; last value: {_short_repr(last)}" if seen_value else "; no value returned"
    if last_exc is not None:
        message += f"; last error: {_short_repr(last_exc)}"
    raise AssertionError(message + ")") from last_exc
