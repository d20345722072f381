"""A stand-in for EKS's pod identity webhook (IRSA), as a real mutating admission webhook.

The webhook's Go module (github.com/aws/amazon-eks-pod-identity-webhook) is not served to
these machines, so the test bed runs this small one instead, registered with a real
MutatingWebhookConfiguration over TLS, so pods pass through the API server's real
admission path.  It applies the contract the webhook's README documents:

* the pod's ServiceAccount carries ``eks.amazonaws.com/role-arn`` (no annotation: no
  change); ``eks.amazonaws.com/audience`` (default ``sts.amazonaws.com``) and
  ``eks.amazonaws.com/token-expiration`` (default 86400 s) shape the token;
  ``eks.amazonaws.com/sts-regional-endpoints: "true"`` adds
  ``AWS_STS_REGIONAL_ENDPOINTS=regional``;
* a projected ServiceAccount token volume ``aws-iam-token`` (path ``token``) is added to
  the pod, and every container and init container not named in the pod annotation
  ``eks.amazonaws.com/skip-containers`` (comma-separated) gets ``AWS_ROLE_ARN``,
  ``AWS_WEB_IDENTITY_TOKEN_FILE=/var/run/secrets/eks.amazonaws.com/serviceaccount/token``
  and that volume mounted read-only there;
* a container that already sets ``AWS_ROLE_ARN`` or ``AWS_WEB_IDENTITY_TOKEN_FILE`` is
  left alone (this stand-in's reading of "does not overwrite").

Scope it to one namespace (``namespaceSelector``) so that a test bed shared by many tests
only mutates the pods of the test that asked for it.
"""

from __future__ import annotations

import base64
import json
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from .controlplane import RunningTestbed
from .pki import Pki

__all__ = ["IdentityWebhook", "mutation"]

ROLE_ANNOTATION = "eks.amazonaws.com/role-arn"
AUDIENCE_ANNOTATION = "eks.amazonaws.com/audience"
EXPIRATION_ANNOTATION = "eks.amazonaws.com/token-expiration"
REGIONAL_ANNOTATION = "eks.amazonaws.com/sts-regional-endpoints"
SKIP_ANNOTATION = "eks.amazonaws.com/skip-containers"
VOLUME = "aws-iam-token"
MOUNT_PATH = "/var/run/secrets/eks.amazonaws.com/serviceaccount"


def mutation(pod: dict[str, Any], account: dict[str, Any]) -> list[dict[str, Any]]:
    """The JSONPatch the webhook's contract makes of ``pod`` under ``account`` (pure)."""
    annotations = (account.get("metadata") or {}).get("annotations") or {}
    role = annotations.get(ROLE_ANNOTATION)
    spec = pod.get("spec") or {}
    if not role or any(v.get("name") == VOLUME for v in spec.get("volumes") or []):
        return []
    audience = annotations.get(AUDIENCE_ANNOTATION) or "sts.amazonaws.com"
    expiration = int(annotations.get(EXPIRATION_ANNOTATION) or 86400)
    skip = {
        name.strip()
        for name in ((pod.get("metadata") or {}).get("annotations") or {}).get(SKIP_ANNOTATION, "").split(",")
        if name.strip()
    }
    env = [
        {"name": "AWS_ROLE_ARN", "value": role},
        {"name": "AWS_WEB_IDENTITY_TOKEN_FILE", "value": f"{MOUNT_PATH}/token"},
    ]
    if str(annotations.get(REGIONAL_ANNOTATION, "")).lower() == "true":
        env.append({"name": "AWS_STS_REGIONAL_ENDPOINTS", "value": "regional"})
    mount = {"name": VOLUME, "mountPath": MOUNT_PATH, "readOnly": True}
    volume = {
        "name": VOLUME,
        "projected": {
            "sources": [
                {
                    "serviceAccountToken": {
                        "audience": audience,
                        "expirationSeconds": expiration,
                        "path": "token",
                    }
                }
            ]
        },
    }
    patch: list[dict[str, Any]] = []
    if spec.get("volumes"):
        patch.append({"op": "add", "path": "/spec/volumes/-", "value": volume})
    else:
        patch.append({"op": "add", "path": "/spec/volumes", "value": [volume]})
    for kind in ("initContainers", "containers"):
        for index, container in enumerate(spec.get(kind) or []):
            names = {e.get("name") for e in container.get("env") or []}
            if container.get("name") in skip or names & {"AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE"}:
                continue
            base = f"/spec/{kind}/{index}"
            for field, values in (("env", env), ("volumeMounts", [mount])):
                if container.get(field):
                    patch += [{"op": "add", "path": f"{base}/{field}/-", "value": v} for v in values]
                else:
                    patch.append({"op": "add", "path": f"{base}/{field}", "value": list(values)})
    return patch


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        review = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        request = review.get("request") or {}
        response: dict[str, Any] = {"uid": request.get("uid", ""), "allowed": True}
        try:
            pod = request.get("object") or {}
            namespace = request.get("namespace") or (pod.get("metadata") or {}).get("namespace")
            name = (pod.get("spec") or {}).get("serviceAccountName") or "default"
            account = json.loads(
                self.server.bed.kubectl("get", "serviceaccount", name, "-n", str(namespace), "-o", "json")
            )
            patch = mutation(pod, account)
            if patch:
                response["patchType"] = "JSONPatch"
                response["patch"] = base64.b64encode(json.dumps(patch).encode()).decode()
                self.server.mutated.append(str((pod.get("metadata") or {}).get("generateName") or ""))
        except Exception as exc:  # a broken stand-in must be visible, never mutate silently
            response = {
                "uid": response["uid"],
                "allowed": False,
                "status": {"message": f"identity webhook: {exc}"},
            }
        body = json.dumps(
            {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}
        )
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    bed: RunningTestbed
    mutated: list[str]


class IdentityWebhook:
    """Serve the webhook on loopback over TLS and register it for pods of ``namespace``."""

    def __init__(self, bed: RunningTestbed, namespace: str) -> None:
        self.bed = bed
        self.namespace = namespace
        self.name = f"dptr-testbed-identity-{namespace}"[:253]
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.bed = bed
        self._server.mutated = []
        self.port = self._server.server_address[1]
        pki = Pki(Path(bed.state_dir) / "pki")
        pair = pki.issue(
            f"identity-webhook-{self.port}", cn="identity-webhook", server=True, ips=("127.0.0.1",)
        )
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(pair.cert), str(pair.key))
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self._ca = pki.ca.cert.read_bytes()
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def mutated(self) -> list[str]:
        """The pods (their generateName) it changed."""
        return list(self._server.mutated)

    def __enter__(self) -> IdentityWebhook:
        self._thread.start()
        config = {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": self.name},
            "webhooks": [
                {
                    "name": "pod-identity-webhook.dptr-testbed.local",
                    "clientConfig": {
                        "url": f"https://127.0.0.1:{self.port}/mutate",
                        "caBundle": base64.b64encode(self._ca).decode(),
                    },
                    "rules": [
                        {
                            "operations": ["CREATE"],
                            "apiGroups": [""],
                            "apiVersions": ["v1"],
                            "resources": ["pods"],
                        }
                    ],
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": self.namespace}},
                    # As the real one: a pod is not created without its identity.
                    "failurePolicy": "Fail",
                    "sideEffects": "None",
                    "admissionReviewVersions": ["v1"],
                    "timeoutSeconds": 10,
                    "reinvocationPolicy": "IfNeeded",
                }
            ],
        }
        self.bed.kubectl("apply", "-f", "-", input=json.dumps(config))
        return self

    def __exit__(self, *exc: object) -> None:
        self.bed.kubectl(
            "delete", "mutatingwebhookconfiguration", self.name, "--ignore-not-found", check=False
        )
        self._server.shutdown()
        self._server.server_close()
