"""A small JSON client for the Kubernetes API, shared by the stand-in's threads.

The stand-in works on plain dicts in the API's own camelCase shape, so it
talks to the API server with urllib3 directly; the kubernetes package is only
used to read the kubeconfig (it knows every way a kubeconfig can carry
credentials).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

import urllib3
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config

JSON = dict[str, Any]

MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"


class ApiError(Exception):
    """A non-2xx answer from the API server (``status`` 0: no answer at all)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class Api:
    """Thread-safe: one connection pool serves every thread."""

    def __init__(self, kubeconfig: str) -> None:
        cfg = k8s_client.Configuration()
        k8s_config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)  # type: ignore[no-untyped-call]
        self.server: str = cfg.host.rstrip("/")
        self.ca_file: str | None = cfg.ssl_ca_cert
        self._headers = {"Accept": "application/json", "User-Agent": "dptr-testbed-kubelet/0.1"}
        token = (cfg.api_key or {}).get("authorization") or (cfg.api_key or {}).get("BearerToken")
        if token:
            self._headers["Authorization"] = token if token.startswith("Bearer ") else f"Bearer {token}"
        self._pool = urllib3.PoolManager(
            num_pools=2,
            maxsize=64,
            block=False,
            cert_reqs="CERT_REQUIRED" if cfg.verify_ssl else "CERT_NONE",
            ca_certs=cfg.ssl_ca_cert,
            cert_file=cfg.cert_file,
            key_file=cfg.key_file,
            retries=False,
        )

    def _url(self, path: str, query: dict[str, str] | None) -> str:
        return self.server + path + (("?" + urlencode(query)) if query else "")

    def request(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, str] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        timeout: float = 20.0,
    ) -> Any:
        headers = dict(self._headers)
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = content_type
        try:
            resp = self._pool.request(
                method,
                self._url(path, query),
                body=data,
                headers=headers,
                timeout=urllib3.Timeout(connect=5.0, read=timeout),
            )
        except urllib3.exceptions.HTTPError as err:
            raise ApiError(0, f"{method} {path}: {err}") from err
        if resp.status >= 300:
            raise ApiError(resp.status, _message(resp.data))
        return json.loads(resp.data) if resp.data else None

    def get(self, path: str, query: dict[str, str] | None = None) -> Any:
        return self.request("GET", path, query=query)

    def watch(self, path: str, query: dict[str, str], read_timeout: float) -> Iterator[JSON]:
        """Yield watch events; a stream silent for ``read_timeout`` raises ApiError."""
        q = dict(query, watch="true")
        try:
            resp = self._pool.request(
                "GET",
                self._url(path, q),
                headers=self._headers,
                preload_content=False,
                timeout=urllib3.Timeout(connect=5.0, read=read_timeout),
            )
        except urllib3.exceptions.HTTPError as err:
            raise ApiError(0, f"watch {path}: {err}") from err
        try:
            if resp.status >= 300:
                raise ApiError(resp.status, _message(resp.read()))
            for line in resp:
                if line.strip():
                    yield json.loads(line)
        except urllib3.exceptions.HTTPError as err:
            raise ApiError(0, f"watch {path}: {err}") from err
        finally:
            # A stream left mid-way cannot go back to the pool.
            resp.close()


def _message(data: bytes) -> str:
    try:
        body = json.loads(data)
    except ValueError:
        return data.decode(errors="replace")[:500]
    if isinstance(body, dict):
        return str(body.get("message") or body)
    return str(body)
