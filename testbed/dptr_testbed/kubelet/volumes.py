"""A pod's volumes as host directories, filled the way kubelet fills them.

Each volume is a directory under the pod's scratch directory; containers see
it only if they mount it (the launcher bind-mounts it inside the container's
own mount namespace). Secret, configMap, downwardAPI and projected volumes are
written with kubelet's atomic-writer layout (a timestamped directory, the
``..data`` symlink, and one symlink per top-level name), so updates (token
refreshes) replace the whole set at once, and subPath mounts keep the old
files, as they do on a real node.
"""

from __future__ import annotations

import base64
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import spec
from .api import Api, ApiError

JSON = dict[str, Any]
DEFAULT_MODE = 0o644
FileSet = dict[str, tuple[bytes, int]]


class VolumeError(Exception):
    """A volume cannot be set up (yet); kubelet would report FailedMount."""


def write_atomic(target: Path, files: Mapping[str, tuple[bytes, int]], uid: int = 0, gid: int = 0) -> None:
    """Replace the content of ``target`` with ``files`` in one rename."""
    target.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("..%Y_%m_%d_%H_%M_%S.", time.gmtime()) + os.urandom(4).hex()
    data_dir = target / stamp
    data_dir.mkdir(mode=0o755)
    os.chown(data_dir, uid, gid)
    for rel, (content, mode) in files.items():
        path = data_dir / rel
        for parent in reversed(path.relative_to(data_dir).parents[:-1]):
            sub = data_dir / parent
            if not sub.exists():
                sub.mkdir(mode=0o755)
                os.chown(sub, uid, gid)
        path.write_bytes(content)
        os.chown(path, uid, gid)
        path.chmod(mode & 0o777)
    tmp = target / "..data_tmp"
    if tmp.is_symlink():
        tmp.unlink()
    os.symlink(stamp, tmp)
    old = os.readlink(target / "..data") if (target / "..data").is_symlink() else None
    os.rename(tmp, target / "..data")
    tops = {rel.split("/", 1)[0] for rel in files}
    for top in tops:
        link = target / top
        if not link.is_symlink():
            os.symlink(f"..data/{top}", link)
    for entry in target.iterdir():
        if entry.is_symlink() and not entry.name.startswith("..") and entry.name not in tops:
            entry.unlink()
    if old and old != stamp:
        shutil.rmtree(target / old, ignore_errors=True)


def _check_path(rel: str) -> str:
    parts = rel.split("/")
    if not rel or rel.startswith("/") or ".." in parts or any(p.startswith("..") for p in parts):
        raise VolumeError(f"invalid item path {rel!r}")
    return rel


def _keyed_files(
    *,
    kind: str,
    name: str,
    data: Mapping[str, bytes],
    items: list[JSON] | None,
    default_mode: int,
    optional: bool,
) -> FileSet:
    files: FileSet = {}
    if items:
        for item in items:
            key = item["key"]
            if key not in data:
                if optional:
                    continue
                raise VolumeError(f"{kind} {name!r} has no key {key!r}")
            files[_check_path(item["path"])] = (data[key], int(item.get("mode", default_mode)))
    else:
        for key, value in data.items():
            files[_check_path(key)] = (value, default_mode)
    return files


@dataclass
class PodVolumes:
    """The volumes of one pod, under ``root`` (``<pod dir>/volumes``)."""

    api: Api
    pod: JSON
    root: Path
    paths: dict[str, Path] = field(default_factory=dict)
    refresh_at: float | None = None

    @property
    def ready(self) -> bool:
        return all(v["name"] in self.paths for v in self.pod["spec"].get("volumes") or [])

    def prepare(self) -> None:
        """Set up every volume not set up yet; raises VolumeError for the first that fails."""
        for volume in self.pod["spec"].get("volumes") or []:
            if volume["name"] not in self.paths:
                self.paths[volume["name"]] = self._setup(volume)

    def refresh(self) -> None:
        """Rewrite projected volumes whose service-account tokens are due (kubelet
        refreshes at 80% of a token's lifetime)."""
        if self.refresh_at is None or time.time() < self.refresh_at:
            return
        self.refresh_at = None
        for volume in self.pod["spec"].get("volumes") or []:
            if "projected" in volume and volume["name"] in self.paths:
                self.paths[volume["name"]] = self._setup(volume)

    # ---- one volume ----------------------------------------------------------
    def _setup(self, volume: JSON) -> Path:
        name: str = volume["name"]
        target: Path = self.root / name
        uid, gid = spec.volume_owner(self.pod)
        if "emptyDir" in volume:
            target.mkdir(parents=True, exist_ok=True)
            target.chmod(0o777)
            return target
        if "hostPath" in volume:
            return self._host_path(volume["hostPath"])
        if "secret" in volume:
            src = volume["secret"]
            files = self._secret_files(src, int(src.get("defaultMode", DEFAULT_MODE)))
        elif "configMap" in volume:
            src = volume["configMap"]
            files = self._config_map_files(src, int(src.get("defaultMode", DEFAULT_MODE)))
        elif "downwardAPI" in volume:
            src = volume["downwardAPI"]
            files = self._downward_files(src.get("items") or [], int(src.get("defaultMode", DEFAULT_MODE)))
        elif "projected" in volume:
            files = self._projected_files(volume["projected"])
        else:
            kinds = sorted(k for k in volume if k != "name")
            raise VolumeError(
                f"volume {name!r}: type {kinds} is not supported by the test bed's kubelet stand-in"
            )
        write_atomic(target, files, uid, gid)
        target.chmod(0o755)
        if gid:
            os.chown(target, uid, gid)
        return target

    def _host_path(self, src: JSON) -> Path:
        path = Path(src["path"])
        kind = src.get("type") or ""
        if kind == "DirectoryOrCreate":
            path.mkdir(parents=True, exist_ok=True)
        elif kind == "FileOrCreate":
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch(exist_ok=True)
        elif kind == "Directory" and not path.is_dir():
            raise VolumeError(f"hostPath type check failed: {path} is not a directory")
        elif kind == "File" and not path.is_file():
            raise VolumeError(f"hostPath type check failed: {path} is not a file")
        return path

    def _get(self, kind: str, name: str) -> JSON | None:
        ns = self.pod["metadata"]["namespace"]
        try:
            obj: JSON = self.api.get(f"/api/v1/namespaces/{ns}/{kind}s/{name}")
        except ApiError as err:
            if err.status == 404:
                return None
            raise VolumeError(f"cannot read {kind} {name!r}: {err}") from err
        return obj

    def _secret_files(self, src: JSON, default_mode: int) -> FileSet:
        name = src.get("secretName") or src.get("name") or ""
        optional = bool(src.get("optional", False))
        obj = self._get("secret", name)
        if obj is None:
            if optional:
                return {}
            raise VolumeError(f'secret "{name}" not found')
        data = {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
        return _keyed_files(
            kind="secret",
            name=name,
            data=data,
            items=src.get("items"),
            default_mode=default_mode,
            optional=optional,
        )

    def _config_map_files(self, src: JSON, default_mode: int) -> FileSet:
        name = src.get("name") or ""
        optional = bool(src.get("optional", False))
        obj = self._get("configmap", name)
        if obj is None:
            if optional:
                return {}
            raise VolumeError(f'configmap "{name}" not found')
        data = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
        data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
        return _keyed_files(
            kind="configmap",
            name=name,
            data=data,
            items=src.get("items"),
            default_mode=default_mode,
            optional=optional,
        )

    def _downward_files(self, items: list[JSON], default_mode: int) -> FileSet:
        files: FileSet = {}
        for item in items:
            path = _check_path(item["path"])
            mode = int(item.get("mode", default_mode))
            try:
                if "fieldRef" in item:
                    value = spec.field_ref(self.pod, item["fieldRef"]["fieldPath"])
                else:
                    ref = item["resourceFieldRef"]
                    container = next(
                        (
                            c
                            for c in spec.containers_of(self.pod) + spec.init_containers_of(self.pod)
                            if c["name"] == ref.get("containerName")
                        ),
                        None,
                    )
                    value = spec.resource_field_ref(container, ref)
            except (ValueError, KeyError) as err:
                raise VolumeError(f"downwardAPI item {path!r}: {err}") from err
            files[path] = (value.encode(), mode)
        return files

    def _projected_files(self, src: JSON) -> FileSet:
        default_mode = int(src.get("defaultMode", DEFAULT_MODE))
        files: FileSet = {}
        for source in src.get("sources") or []:
            if "serviceAccountToken" in source:
                tok = source["serviceAccountToken"]
                mode = default_mode
                files[_check_path(tok["path"])] = (self._token(tok).encode(), mode)
            elif "configMap" in source:
                files.update(self._config_map_files(source["configMap"], default_mode))
            elif "secret" in source:
                files.update(self._secret_files(source["secret"], default_mode))
            elif "downwardAPI" in source:
                files.update(self._downward_files(source["downwardAPI"].get("items") or [], default_mode))
            else:
                kinds = sorted(source)
                raise VolumeError(
                    f"projected source {kinds} is not supported by the test bed's kubelet stand-in"
                )
        return files

    def _token(self, src: JSON) -> str:
        """A bound token from the TokenRequest API, as kubelet requests it."""
        meta = self.pod["metadata"]
        sa = self.pod["spec"].get("serviceAccountName") or "default"
        expiration = int(src.get("expirationSeconds") or 3600)
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "audiences": [src["audience"]] if src.get("audience") else [],
                "expirationSeconds": expiration,
                "boundObjectRef": {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": meta["name"],
                    "uid": meta["uid"],
                },
            },
        }
        try:
            answer = self.api.request(
                "POST", f"/api/v1/namespaces/{meta['namespace']}/serviceaccounts/{sa}/token", body=body
            )
        except ApiError as err:
            raise VolumeError(f"failed to fetch token for serviceaccount {sa!r}: {err}") from err
        status = answer.get("status") or {}
        issued = time.time()
        lifetime = float(expiration)
        if status.get("expirationTimestamp"):
            lifetime = max(60.0, spec.parse_time(status["expirationTimestamp"]) - issued)
        due = issued + 0.8 * lifetime
        self.refresh_at = due if self.refresh_at is None else min(self.refresh_at, due)
        return str(status.get("token", ""))
