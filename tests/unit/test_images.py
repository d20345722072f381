"""The image allow-list matches parsed references, never string prefixes (issue: bypasses)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from dptr_common.images import (
    ALLOWED_IMAGE_PATTERN,
    InvalidReference,
    image_allowed,
    parse_pattern,
    parse_reference,
)

CRD = Path(__file__).resolve().parents[2] / "charts" / "dptr" / "crds" / "taskrunners.yaml"
DIGEST = "sha256:" + "a" * 64
OTHER_DIGEST = "sha256:" + "b" * 64

# (allow-list, image, allowed?)
CASES = [
    # The bypasses of a string-prefix match.
    (["registry.example.com/etl/*"], "registry.example.com/etl-secret/x:1", False),
    (["registry.example.com/etl/*"], "registry.example.com/etl/x:1", True),
    (["registry.example.com/etl/*"], "registry.example.com/etl/team/x@" + DIGEST, True),
    (["registry.example.com/etl/*"], "registry.example.com/etl:1", False),
    (["registry.example.com/*"], "registry.example.com.evil.io/x:1", False),
    (["registry.example.com/*"], "registry.example.com:5000/x:1", False),
    (["registry.example.com/*"], "registry.example.com/x:1", True),
    (["registry.example.com/*"], "REGISTRY.example.com/x:1", True),
    (["registry.example.com/*"], "evil.io/registry.example.com/x:1", False),
    (["registry.example.com:5000/*"], "registry.example.com:5000/x:1", True),
    (["registry.example.com:5000/*"], "registry.example.com/x:1", False),
    (["localhost/*"], "localhost/probe:dev", True),
    # Repository, tag and digest rules.
    (["registry.example.com/etl/runner:*"], "registry.example.com/etl/runner:1.4", True),
    (["registry.example.com/etl/runner:*"], "registry.example.com/etl/runner@" + DIGEST, True),
    (["registry.example.com/etl/runner:*"], "registry.example.com/etl/runner-x:1", False),
    (["registry.example.com/etl/runner:*"], "registry.example.com/etl/runner/sub:1", False),
    (["registry.example.com/etl/runner:1.4"], "registry.example.com/etl/runner:1.4", True),
    (["registry.example.com/etl/runner:1.4"], "registry.example.com/etl/runner:1.4@" + DIGEST, True),
    (["registry.example.com/etl/runner:1.4"], "registry.example.com/etl/runner:1.40", False),
    (["registry.example.com/etl/runner:1.4"], "registry.example.com/etl/runner", False),
    (["registry.example.com/etl/runner@" + DIGEST], "registry.example.com/etl/runner@" + DIGEST, True),
    (["registry.example.com/etl/runner@" + DIGEST], "registry.example.com/etl/runner@" + OTHER_DIGEST, False),
    (["registry.example.com/etl/runner@" + DIGEST], "registry.example.com/etl/runner:1.4", False),
    (["registry.example.com/etl/runner"], "registry.example.com/etl/runner", True),
    (["registry.example.com/etl/runner"], "registry.example.com/etl/runner:latest", True),
    (["registry.example.com/etl/runner"], "registry.example.com/etl/runner:1.4", False),
    # Docker Hub normalisation on both sides.
    (["debian:bookworm"], "docker.io/library/debian:bookworm", True),
    (["docker.io/library/debian:*"], "debian:bookworm", True),
    (["index.docker.io/library/debian:*"], "debian:bookworm", True),
    (["library/*"], "debian:bookworm", True),
    (["debian/*"], "debian:bookworm", False),
    (["debian/*"], "debian/tools:1", True),
    (["docker.io/*"], "quay.io/x:1", False),
]

#: Not image references: whitespace, control characters, wildcards elsewhere.
INVALID_IMAGES = [
    "registry.example.com/etl/x:1\n",
    " registry.example.com/etl/x:1",
    "registry.example.com/etl/x:1 ",
    "registry.example.com/etl/x:1\x00",
    "registry.example.com/etl/x\t:1",
    "registry.example.com/etl/*",
    "registry.example.com/ETL/x:1",
    "registry.example.com/etl/x:",
    "registry.example.com/etl/x@sha256:abc",
    "registry.example.com//x",
    "",
]
INVALID_PATTERNS = [
    "registry.example.com/etl*",
    "registry.example.com*",
    "registry.example.com/*/x",
    "*",
    "registry.example.com/etl/x:1\n",
    "registry.example.com/etl/ *",
    "registry.example.com/etl/x:1*",
]


@pytest.mark.parametrize(("allowed", "image", "expected"), CASES)
def test_allow_list(allowed: list[str], image: str, expected: bool) -> None:
    assert image_allowed(image, allowed) is expected


@pytest.mark.parametrize("image", INVALID_IMAGES)
def test_invalid_references_are_refused(image: str) -> None:
    with pytest.raises(InvalidReference):
        image_allowed(image, ["registry.example.com/*", "docker.io/*"])


@pytest.mark.parametrize("pattern", INVALID_PATTERNS)
def test_invalid_patterns_are_refused(pattern: str) -> None:
    with pytest.raises(InvalidReference):
        parse_pattern(pattern)


def test_require_digest() -> None:
    allowed = ["registry.example.com/etl/*"]
    assert not image_allowed("registry.example.com/etl/x:1", allowed, require_digest=True)
    assert image_allowed("registry.example.com/etl/x@" + DIGEST, allowed, require_digest=True)
    assert image_allowed("registry.example.com/etl/x:1@" + DIGEST, allowed, require_digest=True)


def test_parse_reference_normalises() -> None:
    ref = parse_reference("debian:bookworm")
    assert (ref.domain, ref.path, ref.tag, ref.digest) == ("docker.io", "library/debian", "bookworm", None)
    assert str(parse_reference("Registry.Example.com:5000/a/b@" + DIGEST)) == (
        "registry.example.com:5000/a/b@" + DIGEST
    )


def test_the_crd_rule_is_the_same_expression() -> None:
    crd = yaml.safe_load(CRD.read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    items = spec["properties"]["imagePolicy"]["properties"]["allowedImages"]["items"]
    (rule,) = items["x-kubernetes-validations"]
    assert rule["rule"] == f'self.matches(r"{ALLOWED_IMAGE_PATTERN}")'
    # And the expression itself accepts exactly what parse_pattern accepts.
    for allowed, _, _ in CASES:
        assert re.fullmatch(ALLOWED_IMAGE_PATTERN, allowed[0])
    for pattern in INVALID_PATTERNS:
        assert not re.fullmatch(ALLOWED_IMAGE_PATTERN, pattern)
