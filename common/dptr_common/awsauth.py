"""botocore sessions for dptr's AWS calls: static keys, the pod's own identity, and an IAM
role assumed on top of either, per TaskRunner.

A TaskRunner may name ``credentials.roleArn``: then the operator (for polling and its
heartbeats) and the sidecar (for its heartbeats, SetTaskStatus and S3) call AWS as that
role, assumed with STS AssumeRole from their own credentials.  So each team's worker
groups can be fenced with IAM (the ``datapipeline:workerGroup`` condition key of
PollForTask), and its buckets with bucket policies, while the operator keeps one identity
of its own.  Everything here goes through botocore's own machinery: the STS call and the
refresh before expiry are botocore's ``AssumeRoleCredentialFetcher`` and
``DeferredRefreshableCredentials``; the STS endpoint follows botocore's own settings
(``AWS_ENDPOINT_URL_STS``, regional endpoints).

``ExternalId`` is always ``dptr:<namespace of the TaskRunner>``: a role's trust policy can
require it, so that a TaskRunner in another namespace cannot have the operator assume it
(the confused-deputy guard AWS recommends).  docs/security.md has the policies.

The EC2 instance metadata service stays out of every chain unless asked for: a pod must
not silently act as its node.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["AssumedRole", "StaticCredentials", "external_id_for", "make_session", "session_name_for"]

#: What AssumeRole accepts in RoleSessionName: [\w+=,.@-]{2,64}.
_SESSION_UNSAFE = re.compile(r"[^\w+=,.@-]")


@dataclass(frozen=True)
class StaticCredentials:
    """Explicit access keys (from a Secret)."""

    access_key_id: str
    secret_access_key: str
    session_token: str | None = None

    def __repr__(self) -> str:  # never print the secret
        return f"StaticCredentials(access_key_id={self.access_key_id!r}, secret_access_key='***')"

    @classmethod
    def from_mapping(cls, data: Mapping[str, str]) -> StaticCredentials:
        """From ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN`` keys
        (a Secret's data, decoded) or their snake_case forms; ValueError without both keys."""

        def pick(*keys: str) -> str | None:
            for key in keys:
                if data.get(key):
                    return data[key]
            return None

        access = pick("AWS_ACCESS_KEY_ID", "aws_access_key_id", "access_key_id", "accessKeyId")
        secret = pick(
            "AWS_SECRET_ACCESS_KEY", "aws_secret_access_key", "secret_access_key", "secretAccessKey"
        )
        if not access or not secret:
            raise ValueError("the credentials need an access key id and a secret access key")
        token = pick("AWS_SESSION_TOKEN", "aws_session_token", "session_token", "sessionToken")
        return cls(access, secret, token)


@dataclass(frozen=True)
class AssumedRole:
    """An IAM role to assume for every call of one TaskRunner."""

    role_arn: str
    session_name: str
    external_id: str | None = None

    ENV = ("DPTR_ROLE_ARN", "DPTR_ROLE_SESSION_NAME", "DPTR_ROLE_EXTERNAL_ID")

    def to_env(self) -> dict[str, str]:
        values = (self.role_arn, self.session_name, self.external_id)
        return {name: value for name, value in zip(self.ENV, values, strict=True) if value}

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> AssumedRole | None:
        arn = (env.get("DPTR_ROLE_ARN") or "").strip()
        if not arn:
            return None
        return cls(
            arn,
            env.get("DPTR_ROLE_SESSION_NAME") or "dptr",
            env.get("DPTR_ROLE_EXTERNAL_ID") or None,
        )


def session_name_for(namespace: str, name: str, who: str) -> str:
    """``dptr-<who>-<namespace>-<name>``, fitted to AssumeRole's RoleSessionName rules; it
    names the TaskRunner in CloudTrail."""
    text = _SESSION_UNSAFE.sub("-", f"dptr-{who}-{namespace}-{name}")
    return text[:64]


def external_id_for(namespace: str) -> str:
    return f"dptr:{namespace}"


def make_session(
    keys: StaticCredentials | None = None,
    role: AssumedRole | None = None,
    *,
    region: str | None = None,
    instance_metadata: bool = False,
) -> Any:
    """A botocore session with the right credentials: ``keys`` (else botocore's default
    chain: environment, web identity/IRSA, EKS Pod Identity, shared files), and on top
    ``role`` assumed through STS in ``region`` (its regional endpoint) and refreshed
    before it expires."""
    import botocore.session
    from botocore.credentials import (
        AssumeRoleCredentialFetcher,
        CredentialProvider,
        CredentialResolver,
        Credentials,
        DeferredRefreshableCredentials,
    )

    session = botocore.session.get_session()
    if keys is None and not instance_metadata:
        session.get_component("credential_provider").remove("iam-role")
    if keys is not None:
        session.set_credentials(keys.access_key_id, keys.secret_access_key, keys.session_token)
    if role is None:
        return session

    source_session = session
    source: Credentials | None = source_session.get_credentials()
    role_arn = role.role_arn
    extra: dict[str, Any] = {"RoleSessionName": role.session_name}
    if role.external_id:
        extra["ExternalId"] = role.external_id

    class _Role(CredentialProvider):  # type: ignore[misc]
        METHOD = "assume-role"
        CANONICAL_NAME = "dptr-assume-role"

        def load(self) -> Any:
            if source is None:
                from botocore.exceptions import NoCredentialsError

                raise NoCredentialsError()
            fetcher = AssumeRoleCredentialFetcher(
                client_creator=functools.partial(source_session.create_client, region_name=region),
                source_credentials=source,
                role_arn=role_arn,
                extra_args=extra,
            )
            return DeferredRefreshableCredentials(method=self.METHOD, refresh_using=fetcher.fetch_credentials)

    assumed = botocore.session.get_session()
    assumed.register_component("credential_provider", CredentialResolver(providers=[_Role()]))
    return assumed
