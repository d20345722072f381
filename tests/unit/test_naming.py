from __future__ import annotations

import itertools

import pytest
from dptr_samples import ATTEMPT_ID, PIPELINE_ID

from dptr_common import naming


def test_name_is_deterministic_and_valid() -> None:
    name = naming.pipeline_task_name(PIPELINE_ID, ATTEMPT_ID)
    assert name == naming.pipeline_task_name(PIPELINE_ID, ATTEMPT_ID)
    assert naming.is_dns1123_label(name)
    assert name.startswith("dptr-shellcommandactivityobj-")
    assert naming.job_name(PIPELINE_ID, ATTEMPT_ID) == name


def test_distinct_attempts_never_collide() -> None:
    # Attempts that differ only in characters the readable part drops, in the attempt
    # number, in case, or only in their pipeline, must still get distinct names.
    attempts = [
        f"@{comp}_2024-05-01T{h:02d}:00:00_Attempt={n}"
        for comp, h, n in itertools.product(["Act", "act", "A-ct", "A_ct", "A.ct"], range(24), range(1, 6))
    ]
    names = {naming.pipeline_task_name(p, a) for p in ("df-A", "df-B") for a in attempts}
    assert len(names) == 2 * len(attempts)
    assert all(naming.is_dns1123_label(n) for n in names)


def test_long_and_odd_attempt_ids() -> None:
    long_id = "@" + "VeryLongActivityName" * 60 + "_2024-05-01T00:00:00_Attempt=1"
    other = long_id[:-1] + "2"  # differs only beyond the readable cut
    a, b = naming.pipeline_task_name("df-1", long_id), naming.pipeline_task_name("df-1", other)
    assert a != b
    # At most 57: the Job's pods are named <job>-<5 characters> with nothing cut.
    assert len(a) == len(b) == naming.MAX_TASK_NAME_LENGTH == 57
    for odd in ["@@@", "_", "日本語のアクティビティ", "-x-", "\udcff"]:
        name = naming.pipeline_task_name("df-1", odd)
        assert naming.is_dns1123_label(name), name


def test_hash_separates_parts() -> None:
    assert naming.short_hash("ab", "c") != naming.short_hash("a", "bc")
    assert naming.pipeline_task_name("df-1", "x") != naming.pipeline_task_name("df-1x", "")


@pytest.mark.parametrize("value", ["df-07346251SGV6UVKGZ5ZO", "etl", "a.b_c-d", "", "A" * 63])
def test_valid_label_values_are_unchanged(value: str) -> None:
    assert naming.label_value(value) == value


@pytest.mark.parametrize(
    "value",
    [
        "@Act_2024-05-01T00:00:00_Attempt=1",
        "x" * 64,
        "-lead",
        "trail-",
        "a b",
        "日本",
        "@@@",
        "a" * 300 + "!",
    ],
)
def test_label_values_are_sanitized(value: str) -> None:
    label = naming.label_value(value)
    assert naming.is_label_value(label)
    assert label
    assert label == naming.label_value(value)


def test_sanitized_label_values_keep_distinct_values_distinct() -> None:
    assert naming.label_value("a:b") != naming.label_value("a;b")
    assert naming.label_value("x" * 70 + "1") != naming.label_value("x" * 70 + "2")


def test_keys_live_under_the_domain() -> None:
    keys = [getattr(naming, k) for k in dir(naming) if k.startswith(("LABEL_", "ANNOTATION_"))]
    assert keys
    for key in keys:
        assert key.startswith("dptr.dev/") or key == naming.LABEL_MANAGED_BY
