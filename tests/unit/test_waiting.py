"""The tests' one wait helper, dptr_testbed.waiting.wait_for (pure: no cluster)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from dptr_testbed.waiting import wait_for


def countdown(falsy: int, value: object = "done") -> Callable[[], object]:
    """A predicate that is falsy ``falsy`` times, then returns ``value``."""
    calls = {"n": 0}

    def predicate() -> object:
        calls["n"] += 1
        return value if calls["n"] > falsy else None

    return predicate


def test_returns_the_truthy_value() -> None:
    assert wait_for(lambda: [1, 2], timeout=1, what="a list") == [1, 2]
    assert wait_for(countdown(3, {"a": 1}), timeout=5, what="a dict", interval=0.001) == {"a": 1}


def test_tolerates_assertion_errors_until_it_succeeds() -> None:
    calls = {"n": 0}

    def predicate() -> str:
        calls["n"] += 1
        assert calls["n"] >= 3, "not yet"
        return "ok"

    assert wait_for(predicate, timeout=5, what="the third call", interval=0.001) == "ok"
    assert calls["n"] == 3


def test_tolerates_the_given_exception_types() -> None:
    calls = {"n": 0}

    def predicate() -> str:
        calls["n"] += 1
        if calls["n"] < 3:
            raise ConnectionError("refused")
        return "up"

    assert wait_for(predicate, timeout=5, what="up", interval=0.001, tolerate=(ConnectionError,)) == "up"


def test_a_last_try_at_the_deadline() -> None:
    """A slow predicate that turns true only once the deadline has passed still counts."""
    started = time.monotonic()
    calls = {"n": 0}

    def slow() -> bool:
        calls["n"] += 1
        time.sleep(0.15)
        return time.monotonic() - started > 0.2

    assert wait_for(slow, timeout=0.1, what="the slow one", interval=0.01) is True
    assert calls["n"] == 2  # the first (ending past the deadline) and the last try


def test_the_timeout_message_names_what_the_timeout_and_the_last_value() -> None:
    with pytest.raises(AssertionError) as caught:
        wait_for(lambda: [], timeout=0.05, what="the Job's pod", interval=0.01)
    message = str(caught.value)
    assert "the Job's pod" in message
    assert "0.05s" in message
    assert "last value: []" in message
    assert caught.value.__cause__ is None


def test_the_last_value_is_truncated() -> None:
    long_falsy = LongFalsy()
    with pytest.raises(AssertionError) as caught:
        wait_for(lambda: long_falsy, timeout=0.01, what="the long one")
    message = str(caught.value)
    assert "z" * 400 in message
    assert "z" * 600 not in message
    assert "truncated" in message


class LongFalsy:
    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "z" * 5000


def test_the_timeout_is_chained_to_the_last_tolerated_exception() -> None:
    calls = {"n": 0}

    def predicate() -> bool:
        calls["n"] += 1
        raise AssertionError(f"phase was Pending (call {calls['n']})")

    with pytest.raises(AssertionError) as caught:
        wait_for(predicate, timeout=0.05, what="phase Running", interval=0.01)
    cause = caught.value.__cause__
    assert isinstance(cause, AssertionError)
    assert str(cause) == f"phase was Pending (call {calls['n']})"  # the last, not the first
    assert "phase Running" in str(caught.value)
    assert "no value returned" in str(caught.value)


def test_an_exception_it_does_not_tolerate_propagates_at_once() -> None:
    calls = {"n": 0}

    def predicate() -> bool:
        calls["n"] += 1
        raise KeyError("boom")

    with pytest.raises(KeyError):
        wait_for(predicate, timeout=5, what="never")
    assert calls["n"] == 1
    calls["n"] = 0

    def failing() -> bool:
        calls["n"] += 1
        raise AssertionError("first call")

    with pytest.raises(AssertionError, match="first call"):  # tolerate=() lets it through
        wait_for(failing, timeout=5, what="never", tolerate=())
    assert calls["n"] == 1
