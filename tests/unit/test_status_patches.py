"""Composing RFC 7386 merge patches (the status writer coalesces queued writes with it)."""

from __future__ import annotations

from typing import Any

from dptr_operator.statuswriter import merge_patches


def apply(target: Any, patch: Any) -> Any:
    """RFC 7386 section 2, verbatim."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = apply(result.get(key), value)
    return result


DOCUMENTS: list[dict[str, Any]] = [
    {},
    {"phase": "Running", "heartbeat": {"owner": "sidecar", "lastAt": "t0", "lastError": "x"}},
    {"heartbeat": "not an object", "jobName": "j"},
]
PATCHES: list[dict[str, Any]] = [
    {"heartbeat": {"lastAt": "t1", "lastError": None, "by": "op"}},
    {"heartbeat": {"lastError": "Throttled"}},
    {"heartbeat": None},
    {"jobName": "job-1", "phase": "Pending"},
    {"heartbeat": {"owner": "operator", "extra": {"deep": 1}}},
]


def test_one_merged_patch_has_the_effect_of_both_in_order() -> None:
    composed = 0
    for doc in DOCUMENTS:
        for first in PATCHES:
            for second in PATCHES:
                try:
                    merged = merge_patches(first, second)
                except ValueError:
                    # Only "replace a member, then patch inside it" cannot be one patch.
                    assert any(
                        not isinstance(first[k], dict) and isinstance(v, dict)
                        for k, v in second.items()
                        if k in first
                    )
                    continue
                composed += 1
                assert apply(doc, merged) == apply(apply(doc, first), second), (
                    doc,
                    first,
                    second,
                )

    # The three pairs that cannot compose: {"heartbeat": None}, then a patch inside it.
    assert composed == len(DOCUMENTS) * (len(PATCHES) ** 2 - 3)


def test_inputs_are_not_modified() -> None:
    first = {"heartbeat": {"lastAt": "t1"}}
    merge_patches(first, {"heartbeat": {"by": "op"}})
    assert first == {"heartbeat": {"lastAt": "t1"}}
