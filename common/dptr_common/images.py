"""Container image references, parsed as the container runtimes parse them, and the
TaskRunner's image allow-list matched on their parts, never on their text.

A task may pick its image with the ``myImage`` field; the TaskRunner's
``imagePolicy.allowedImages`` says which.  A string prefix is the wrong tool:
``registry.example.com/etl*`` admits ``registry.example.com/etl-secret/x`` and
``registry.example.com*`` admits ``registry.example.com.evil.io/x``.  So both sides are
parsed with the grammar of github.com/distribution/reference (the library containerd and
Docker use), normalised the way they normalise (``debian`` is
``docker.io/library/debian``), and compared by registry host (exactly), repository path
(on ``/`` boundaries), tag and digest.

Allow-list entries:

``registry.example.com/etl/*``
    any repository below ``etl/`` on exactly that registry, any tag or digest;
``registry.example.com/*``
    any repository on that registry;
``registry.example.com/etl/runner:*``
    that repository, any tag or digest;
``registry.example.com/etl/runner:1.4``
    that tag (with or without a digest pinned to it);
``registry.example.com/etl/runner@sha256:<hex>``
    exactly that digest;
``registry.example.com/etl/runner``
    that repository untagged (``:latest``), as a runtime would pull it.

``requireDigest: true`` additionally refuses any ``myImage`` without ``@sha256:...``.
Whitespace, control characters and anything else outside the grammar are refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "ALLOWED_IMAGE_PATTERN",
    "ImageReference",
    "InvalidReference",
    "image_allowed",
    "parse_pattern",
    "parse_reference",
]

_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[_.]|__|[-]+)"
_PATH_COMPONENT = rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])"
_DOMAIN = rf"{_HOST}(?::[0-9]+)?"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
_NAME = rf"(?:{_DOMAIN}/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*"
_REFERENCE = re.compile(rf"({_NAME})(?::({_TAG}))?(?:@({_DIGEST}))?", re.ASCII)
#: An allow-list entry: a reference, or a name followed by ``/*`` or ``:*``.  The CRD's
#: CEL rule uses this same expression (a unit test checks that they agree).
ALLOWED_IMAGE_PATTERN = rf"^(?:{_DOMAIN}/\*|{_NAME}/\*|{_NAME}:\*|{_NAME}(?::{_TAG})?(?:@{_DIGEST})?)$"
_PATTERN = re.compile(ALLOWED_IMAGE_PATTERN, re.ASCII)
#: distribution/reference's limit on the name part.
NAME_MAX = 255

DEFAULT_DOMAIN = "docker.io"


class InvalidReference(ValueError):  # noqa: N818 - reads as what it is
    """Not an image reference (or allow-list entry) by the grammar."""


@dataclass(frozen=True)
class ImageReference:
    """A normalised image reference: ``domain/path[:tag][@digest]``."""

    domain: str
    path: str
    tag: str | None = None
    digest: str | None = None

    def __str__(self) -> str:
        text = f"{self.domain}/{self.path}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def _is_domain(component: str) -> bool:
    return "." in component or ":" in component or component == "localhost" or component.lower() != component


def _split_name(name: str, *, library: bool = True) -> tuple[str, str]:
    """(domain, path) normalised as Docker and containerd do (``library``: a one-part
    Docker Hub name is an official image, ``library/<name>``)."""
    first, sep, rest = name.partition("/")
    if sep and _is_domain(first):
        domain, path = first, rest
    else:
        domain, path = DEFAULT_DOMAIN, name
    if domain == "index.docker.io":
        domain = DEFAULT_DOMAIN
    if library and domain == DEFAULT_DOMAIN and "/" not in path:
        path = f"library/{path}"
    return domain.lower(), path


def parse_reference(text: str) -> ImageReference:
    """Parse an image reference; raises :class:`InvalidReference`."""
    match = _REFERENCE.fullmatch(text)
    if match is None or len(match.group(1)) > NAME_MAX:
        raise InvalidReference(f"{text!r} is not a valid image reference")
    domain, path = _split_name(match.group(1))
    return ImageReference(domain, path, match.group(2), match.group(3))


@dataclass(frozen=True)
class _Pattern:
    domain: str
    path: str  # "" for "host/*"
    kind: str  # "below" (path/*), "any-tag" (path:*), "exact"
    reference: ImageReference | None = None


def parse_pattern(text: str) -> _Pattern:
    """Parse an allow-list entry; raises :class:`InvalidReference`."""
    if _PATTERN.fullmatch(text) is None:
        raise InvalidReference(
            f"allowedImages entry {text!r} is neither an image reference nor one ending in '/*' or ':*'"
        )
    if text.endswith("/*"):
        name = text[:-2]
        if "/" not in name and _is_domain(name):
            return _Pattern(name.lower(), "", "below")
        domain, path = _split_name(name, library=False)
        return _Pattern(domain, path, "below")
    if text.endswith(":*"):
        domain, path = _split_name(text[:-2])
        return _Pattern(domain, path, "any-tag")
    reference = parse_reference(text)
    return _Pattern(reference.domain, reference.path, "exact", reference)


def _matches(pattern: _Pattern, image: ImageReference) -> bool:
    if image.domain != pattern.domain:
        return False
    if pattern.kind == "below":
        return not pattern.path or image.path.startswith(pattern.path + "/")
    if image.path != pattern.path:
        return False
    if pattern.kind == "any-tag":
        return True
    want = pattern.reference
    assert want is not None
    if want.digest:
        return image.digest == want.digest and (want.tag is None or image.tag == want.tag)
    if want.tag:
        return image.tag == want.tag
    return image.tag in (None, "latest")


def image_allowed(image: str, allowed_images: list[str], *, require_digest: bool = False) -> bool:
    """Whether ``image`` (a task's ``myImage``) is allowed; raises :class:`InvalidReference`
    when it is not an image reference at all."""
    reference = parse_reference(image)
    if require_digest and reference.digest is None:
        return False
    return any(_matches(parse_pattern(p), reference) for p in allowed_images)
