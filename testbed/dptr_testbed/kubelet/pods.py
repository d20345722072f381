"""One pod on the stand-in's node: its containers' lifecycle and its status.

A :class:`PodRunner` is a thread per pod. Every tick it reaps exited
containers, decides what to start, restart or stop next (kubelet's order:
init containers one by one, native sidecars started in order and kept
running, main containers together; on termination main containers first,
then sidecars in reverse order), and writes the pod's status back when it
changed. The thread outlives every process it starts, which matters: the
processes die with the thread that started them (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import spec
from .api import STRATEGIC_MERGE_PATCH, ApiError
from .launch import ContainerProcess, LaunchSpec, Mount
from .volumes import PodVolumes, VolumeError

if TYPE_CHECKING:
    from .standin import StandIn

JSON = dict[str, Any]
log = logging.getLogger("dptr_testbed.kubelet")

TICK = 0.2
BACKOFF_BASE = 10.0
BACKOFF_MAX = 300.0
BACKOFF_RESET_AFTER = 600.0
MAX_TERMINATION_MESSAGE = 4096
FALLBACK_LOG_LINES = 80
FALLBACK_LOG_BYTES = 2048
LOST_MESSAGE = "The container could not be located when the pod was terminated"
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")


class ConfigError(Exception):
    """A container cannot be created yet (CreateContainerConfigError)."""


def _started(status: JSON) -> bool:
    state = status.get("state") or {}
    last = status.get("lastState") or {}
    return "running" in state or "terminated" in state or "terminated" in last


def termination_message(term_file: Path, log_file: Path, policy: str, exit_code: int) -> str:
    """Kubelet's rule: the file's content (at most 4 KiB); with
    FallbackToLogsOnError and a failed container that wrote none, the log's
    last 80 lines, at most 2 KiB."""
    try:
        with term_file.open("rb") as f:
            message = f.read(MAX_TERMINATION_MESSAGE).decode(errors="replace")
    except OSError:
        message = ""
    if message or policy != "FallbackToLogsOnError" or exit_code == 0:
        return message
    try:
        with log_file.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read()
    except OSError:
        return ""
    lines = data.splitlines(keepends=True)[-FALLBACK_LOG_LINES:]
    return b"".join(lines)[-FALLBACK_LOG_BYTES:].decode(errors="replace")


@dataclass
class ContainerRun:
    spec: JSON
    kind: str  # "init", "sidecar" or "main"
    proc: ContainerProcess | None = None
    state: JSON = field(default_factory=dict)
    last_state: JSON = field(default_factory=dict)
    restart_count: int = 0
    started_once: bool = False
    pending_restart: bool = False
    next_start: float = 0.0
    failures: int = 0
    started_mono: float = 0.0
    term_sent: bool = False
    exec_seen: bool = False
    container_id: str = ""

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def exit_code(self) -> int | None:
        term = self.state.get("terminated")
        return None if term is None else int(term["exitCode"])

    @property
    def succeeded(self) -> bool:
        return self.exit_code == 0


class PodRunner(threading.Thread):
    def __init__(self, standin: StandIn, pod: JSON) -> None:
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.standin = standin
        self.api = standin.api
        self.pod = pod
        self.uid: str = meta["uid"]
        self.namespace: str = meta["namespace"]
        self.pod_name: str = meta["name"]
        self.dir: Path = standin.root / "pods" / self.uid
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "pod").write_text(f"{self.namespace}/{self.pod_name}\n")
        self.volumes = PodVolumes(self.api, pod, self.dir / "volumes")
        self.inits = [
            ContainerRun(c, "sidecar" if spec.is_sidecar(c) else "init") for c in spec.init_containers_of(pod)
        ]
        self.mains = [ContainerRun(c, "main") for c in spec.containers_of(pod)]
        status = pod.get("status") or {}
        self.start_time: str = status.get("startTime") or spec.now()
        self.restart_policy: str = pod["spec"].get("restartPolicy") or "Always"
        self.wake = threading.Event()
        self.lock = threading.Lock()
        self.gone = False
        self.initialized = False
        self.terminating: str | None = None
        self.term_deadline = 0.0
        self.done = False
        self.reason: str | None = None
        self.message: str | None = None
        self.volume_error: str | None = None
        self.next_volume_try = 0.0
        self.last_sent: JSON | None = None
        self.cond_times: dict[str, tuple[str, str]] = {}
        self._adopt(status)

    # ---- inputs from the watch ------------------------------------------------
    def update(self, pod: JSON) -> None:
        with self.lock:
            self.pod = pod
            self.volumes.pod = pod
        self.wake.set()

    def mark_gone(self) -> None:
        self.gone = True
        self.wake.set()

    def container(self, name: str) -> ContainerRun | None:
        return next((c for c in self.inits + self.mains if c.name == name), None)

    @property
    def sidecars(self) -> list[ContainerRun]:
        return [c for c in self.inits if c.kind == "sidecar"]

    # ---- adoption ---------------------------------------------------------------
    def _adopt(self, status: JSON) -> None:
        """A pod whose containers ran before this stand-in started lost them."""
        prior = {
            s["name"]: s
            for s in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or [])
        }
        if not any(_started(s) for s in prior.values()):
            return
        for c in self.inits + self.mains:
            old = prior.get(c.name)
            if old is None:
                continue
            c.restart_count = int(old.get("restartCount") or 0)
            if not _started(old):
                continue
            state = old.get("state") or {}
            if "terminated" in state and state["terminated"].get("reason") != "ContainerStatusUnknown":
                c.state = state
                c.last_state = old.get("lastState") or {}
                c.started_once = True
                continue
            started_at = (state.get("running") or {}).get("startedAt") or self.start_time
            lost = {
                "terminated": {
                    "exitCode": 137,
                    "reason": "ContainerStatusUnknown",
                    "message": LOST_MESSAGE,
                    "startedAt": started_at,
                    "finishedAt": spec.now(),
                }
            }
            c.started_once = True
            if self.restart_policy == "Never":
                c.state = lost
            else:
                c.last_state = lost
                c.state = {"waiting": {"reason": "ContainerCreating"}}
                c.pending_restart = True
        if self.restart_policy == "Never":
            self.done = True
            self.message = "The kubelet stand-in restarted and lost the pod's containers"
        else:
            # The node "rebooted": init containers run again, then everything restarts.
            for c in self.inits:
                if c.kind == "init":
                    c.state = {}
                    c.started_once = False
                    c.pending_restart = False

    # ---- the loop -------------------------------------------------------------
    def run(self) -> None:
        try:
            while not self.done and not self.gone and not self.standin.stopping:
                try:
                    self._tick()
                except Exception:
                    log.exception("pod %s/%s: tick failed", self.namespace, self.pod_name)
                if self.done or self.gone or self.standin.stopping:
                    break
                self._flush()
                self.wake.wait(TICK)
                self.wake.clear()
            if self.gone or self.standin.stopping:
                return
            deadline = time.monotonic() + 120
            while not self.gone and not self.standin.stopping and time.monotonic() < deadline:
                if self._flush():
                    break
                time.sleep(1)
        finally:
            for c in self.inits + self.mains:
                if c.proc is not None and c.proc.poll() is None:
                    c.proc.kill_now()
            self.standin.runner_done(self)

    def _tick(self) -> None:
        now = time.monotonic()
        self._reap()
        with self.lock:
            pod = self.pod
        meta = pod["metadata"]
        if meta.get("deletionTimestamp"):
            grace = spec.grace_period(pod)
            if self.terminating is None:
                self._terminate("deleted", grace)
            else:
                self.term_deadline = min(self.term_deadline, now + grace)
        elif self.terminating is None and self._past_deadline():
            self._terminate("deadline", float(pod["spec"].get("terminationGracePeriodSeconds", 30)))
            self.reason = "DeadlineExceeded"
            self.message = "Pod was active on the node longer than the specified deadline"
        if self.terminating is not None:
            self._drive_termination()
            return
        if not self.volumes.ready:
            if now < self.next_volume_try:
                return
            try:
                self.volumes.prepare()
                self.volume_error = None
            except (VolumeError, OSError) as err:
                self.volume_error = str(err)
                self.next_volume_try = now + 2
                return
        try:
            self.volumes.refresh()
        except (VolumeError, OSError) as err:
            log.warning("pod %s/%s: volume refresh failed: %s", self.namespace, self.pod_name, err)
        if not self.initialized and not self._run_init_containers(now):
            return
        self.initialized = True
        for c in self.sidecars:
            self._maybe_restart(c, now)
        for c in self.mains:
            if not c.started_once:
                if now >= c.next_start:
                    self._start(c)
            else:
                self._maybe_restart(c, now)
        if all(c.started_once and not c.running and not c.pending_restart for c in self.mains):
            self._terminate("completed", float(pod["spec"].get("terminationGracePeriodSeconds", 30)))
            self._drive_termination()

    def _run_init_containers(self, now: float) -> bool:
        """Advance the init sequence; True once every init container is done
        (regular ones succeeded, sidecars started)."""
        for c in self.inits:
            if c.kind == "sidecar":
                if not c.started_once:
                    if now >= c.next_start:
                        self._start(c)
                    if not c.started_once:
                        return False
                self._maybe_restart(c, now)
                if not c.exec_seen:
                    return False
                continue
            if c.succeeded and not c.pending_restart:
                continue
            if c.running:
                return False
            if c.pending_restart:
                self._maybe_restart(c, now)
                return False
            if c.started_once:
                # Failed and will not be restarted (restartPolicy Never).
                self._terminate(
                    "init-failed", float(self.pod["spec"].get("terminationGracePeriodSeconds", 30))
                )
                return False
            if now >= c.next_start:
                self._start(c)
            return False
        return True

    def _past_deadline(self) -> bool:
        limit = self.pod["spec"].get("activeDeadlineSeconds")
        if limit is None:
            return False
        return time.time() >= spec.parse_time(self.start_time) + float(limit)

    # ---- starting and restarting ------------------------------------------------
    def _will_restart(self, c: ContainerRun) -> bool:
        if self.terminating is not None:
            return False
        if c.kind == "sidecar":
            return True
        if c.kind == "init" and c.succeeded:
            return False
        if self.restart_policy == "Always":
            return True
        return self.restart_policy == "OnFailure" and not c.succeeded

    def _maybe_restart(self, c: ContainerRun, now: float) -> None:
        if c.pending_restart and now >= c.next_start and self.terminating is None:
            self._start(c)

    def _reap(self) -> None:
        for c in self.inits + self.mains:
            if c.proc is None:
                continue
            if c.proc.poll() is None:
                self._promote(c)
                continue
            code, sig, start_error = c.proc.outcome()
            c.proc = None
            c.exec_seen = c.exec_seen or start_error is None
            term: JSON = {
                "exitCode": code,
                "reason": "StartError" if start_error else ("Completed" if code == 0 else "Error"),
                "startedAt": c.state.get("running", {}).get("startedAt", spec.now()),
                "finishedAt": spec.now(),
                "containerID": c.container_id,
            }
            if sig is not None:
                term["signal"] = sig
            message = start_error or termination_message(
                self._term_file(c),
                self._log_file(c),
                c.spec.get("terminationMessagePolicy") or "File",
                code,
            )
            if message:
                term["message"] = message
            c.state = {"terminated": term}
            self._schedule_restart(c)

    def _schedule_restart(self, c: ContainerRun) -> None:
        if not self._will_restart(c):
            return
        now = time.monotonic()
        if now - c.started_mono > BACKOFF_RESET_AFTER:
            c.failures = 0
        delay = 0.0 if c.failures == 0 else min(BACKOFF_MAX, BACKOFF_BASE * 2 ** (c.failures - 1))
        c.failures += 1
        c.last_state = c.state
        c.pending_restart = True
        c.next_start = now + delay
        if delay > 0:
            c.state = {
                "waiting": {
                    "reason": "CrashLoopBackOff",
                    "message": f"back-off {int(delay)}s restarting failed container={c.name} "
                    f"pod={self.pod_name}_{self.namespace}({self.uid})",
                }
            }

    def _start(self, c: ContainerRun) -> None:
        now = time.monotonic()
        try:
            ls = self._launch_spec(c)
        except ConfigError as err:
            c.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(err)}}
            c.next_start = now + 2
            return
        restarting = c.started_once
        if restarting:
            c.restart_count += 1
            if c.state.get("terminated") and not c.last_state:
                c.last_state = c.state
        c.pending_restart = False
        c.started_once = True
        c.term_sent = False
        c.started_mono = now
        c.container_id = f"dptr://{self.uid[:8]}-{c.name}-{c.restart_count}"
        if not ls.argv:
            c.state = {
                "terminated": {
                    "exitCode": 128,
                    "reason": "StartError",
                    "message": "the test bed ignores images, so a container has no image entrypoint: "
                    f"container {c.name!r} must set command",
                    "startedAt": spec.now(),
                    "finishedAt": spec.now(),
                    "containerID": c.container_id,
                }
            }
            self._schedule_restart(c)
            return
        if restarting and ls.log.exists():
            ls.log.replace(ls.log.with_name(f"{c.name}.previous.log"))
        ls.termination_log.parent.mkdir(parents=True, exist_ok=True)
        ls.termination_log.write_bytes(b"")
        ls.termination_log.chmod(0o666)
        try:
            c.proc = ContainerProcess(ls)
        except OSError as err:
            c.state = {
                "terminated": {
                    "exitCode": 128,
                    "reason": "StartError",
                    "message": str(err),
                    "startedAt": spec.now(),
                    "finishedAt": spec.now(),
                    "containerID": c.container_id,
                }
            }
            self._schedule_restart(c)
            return
        c.state = {"waiting": {"reason": "ContainerCreating"}}
        self._promote(c)

    def _promote(self, c: ContainerRun) -> None:
        """Running once the command itself runs (the namespace setup is done)."""
        if c.proc is not None and "running" not in c.state and c.proc.poll() is None and c.proc.exec_done():
            c.state = {"running": {"startedAt": spec.now()}}
            c.exec_seen = True
            log.info("pod %s/%s: started container %s", self.namespace, self.pod_name, c.name)

    def _log_file(self, c: ContainerRun) -> Path:
        return self.dir / f"{c.name}.log"

    def _term_file(self, c: ContainerRun) -> Path:
        return self.dir / "containers" / c.name / "termination-log"

    def _launch_spec(self, c: ContainerRun) -> LaunchSpec:
        cspec = c.spec
        uid, gid, non_root = spec.run_as(self.pod, cspec)
        if non_root and uid is None:
            raise ConfigError(
                "container has runAsNonRoot and image will run as root "
                f'(pod: "{self.pod_name}_{self.namespace}({self.uid})", container: {c.name})'
            )
        if non_root and uid == 0:
            raise ConfigError(
                "container's runAsUser breaks non-root policy "
                f'(pod: "{self.pod_name}_{self.namespace}({self.uid})", container: {c.name})'
            )
        env = self._env(cspec, uid)
        argv = [spec.expand(a, env) for a in (cspec.get("command") or []) + (cspec.get("args") or [])]
        if not cspec.get("command"):
            argv = []
        mounts = []
        for vm in cspec.get("volumeMounts") or []:
            source = self.volumes.paths.get(vm["name"])
            if source is None:
                raise ConfigError(f"volume {vm['name']!r} is not set up")
            sub = vm.get("subPath") or spec.expand(vm.get("subPathExpr") or "", env)
            if sub:
                if sub.startswith("/") or ".." in sub.split("/"):
                    raise ConfigError(f"invalid subPath {sub!r}")
                source = source / sub
                if not source.exists():
                    source.mkdir(parents=True, exist_ok=True)
                    source.chmod(0o777)
            mounts.append(Mount(source, vm["mountPath"], bool(vm.get("readOnly", False))))
        sc = cspec.get("securityContext") or {}
        scratch = self.dir / "containers" / c.name
        return LaunchSpec(
            argv=argv,
            env=env,
            scratch=scratch,
            log=self._log_file(c),
            termination_log=self._term_file(c),
            termination_path=cspec.get("terminationMessagePath") or "/dev/termination-log",
            mounts=mounts,
            working_dir=cspec.get("workingDir") or "/",
            hostname=spec.hostname(self.pod),
            uid=uid,
            gid=gid if gid is not None else (0 if uid is not None else None),
            groups=spec.supplemental_groups(self.pod),
            no_new_privs=sc.get("allowPrivilegeEscalation") is False,
            hide=self.standin.hidden_paths([m.target for m in mounts] + [cspec.get("workingDir") or "/"]),
            image_paths=self.standin.image_paths,
        )

    # ---- environment ------------------------------------------------------------
    def _env(self, cspec: JSON, uid: int | None) -> dict[str, str]:
        env: dict[str, str] = {
            "PATH": self.standin.default_path,
            "HOME": "/root" if not uid else "/",
            "HOSTNAME": spec.hostname(self.pod),
        }
        env.update(self.standin.service_env)
        cache: dict[tuple[str, str], JSON | None] = {}

        def read(kind: str, name: str) -> JSON | None:
            if (kind, name) not in cache:
                try:
                    cache[(kind, name)] = self.api.get(f"/api/v1/namespaces/{self.namespace}/{kind}s/{name}")
                except ApiError as err:
                    if err.status != 404:
                        raise ConfigError(f"cannot read {kind} {name!r}: {err}") from err
                    cache[(kind, name)] = None
            return cache[(kind, name)]

        def data_of(kind: str, obj: JSON) -> dict[str, str]:
            if kind == "secret":
                return {
                    k: base64.b64decode(v).decode(errors="replace")
                    for k, v in (obj.get("data") or {}).items()
                }
            return dict(obj.get("data") or {})

        for source in cspec.get("envFrom") or []:
            prefix = source.get("prefix") or ""
            for kind, key in (("configmap", "configMapRef"), ("secret", "secretRef")):
                if key not in source:
                    continue
                ref = source[key]
                obj = read(kind, ref["name"])
                if obj is None:
                    if ref.get("optional"):
                        continue
                    raise ConfigError(f'{kind} "{ref["name"]}" not found')
                for k, v in data_of(kind, obj).items():
                    if _ENV_NAME.match(prefix + k):
                        env[prefix + k] = v
        for item in cspec.get("env") or []:
            name = item["name"]
            if "valueFrom" not in item:
                env[name] = spec.expand(item.get("value") or "", env)
                continue
            source = item["valueFrom"]
            try:
                if "fieldRef" in source:
                    env[name] = spec.field_ref(self.pod, source["fieldRef"]["fieldPath"])
                elif "resourceFieldRef" in source:
                    ref = source["resourceFieldRef"]
                    target = ref.get("containerName") or cspec["name"]
                    container = self.container(target)
                    env[name] = spec.resource_field_ref(container.spec if container else cspec, ref)
                else:
                    for kind, key, label in (
                        ("configmap", "configMapKeyRef", "ConfigMap"),
                        ("secret", "secretKeyRef", "Secret"),
                    ):
                        if key not in source:
                            continue
                        ref = source[key]
                        obj = read(kind, ref["name"])
                        if obj is None:
                            if ref.get("optional"):
                                break
                            raise ConfigError(f'{kind} "{ref["name"]}" not found')
                        values = data_of(kind, obj)
                        if ref["key"] not in values:
                            if ref.get("optional"):
                                break
                            raise ConfigError(
                                f"couldn't find key {ref['key']} in {label} {self.namespace}/{ref['name']}"
                            )
                        env[name] = values[ref["key"]]
            except ValueError as err:
                raise ConfigError(str(err)) from err
        return env

    # ---- termination ------------------------------------------------------------
    def _terminate(self, why: str, grace: float) -> None:
        self.terminating = why
        self.term_deadline = time.monotonic() + max(0.0, grace)
        for c in self.inits + self.mains:
            if c.pending_restart:
                c.pending_restart = False
                if c.last_state.get("terminated") and not c.state.get("terminated"):
                    c.state, c.last_state = c.last_state, {}
        log.info("pod %s/%s: terminating (%s, grace %.0fs)", self.namespace, self.pod_name, why, grace)

    def _drive_termination(self) -> None:
        self._reap()
        kill = time.monotonic() >= self.term_deadline
        first = [c for c in self.mains + [i for i in self.inits if i.kind == "init"] if c.running]
        if first:
            for c in first:
                self._stop(c, kill)
            return
        for c in reversed(self.sidecars):
            if c.running:
                if kill:
                    for s in self.sidecars:
                        if s.running:
                            self._stop(s, True)
                else:
                    self._stop(c, False)
                return
        self.done = True

    def _stop(self, c: ContainerRun, kill: bool) -> None:
        assert c.proc is not None
        if kill:
            c.proc.signal(signal.SIGKILL)
        elif not c.term_sent and c.proc.exec_done():
            c.term_sent = c.proc.signal(signal.SIGTERM)

    # ---- status ------------------------------------------------------------------
    def phase(self) -> str:
        if self.done:
            if self.reason == "DeadlineExceeded" or self.terminating == "init-failed":
                return "Failed"
            codes = [c.exit_code for c in self.mains]
            if codes and all(code == 0 for code in codes):
                return "Succeeded"
            return "Failed"
        if not self.initialized:
            return "Pending"
        # Running once a main container's command has run (not while its
        # namespaces are being set up).
        if any(c.exec_seen or "terminated" in c.state for c in self.mains):
            return "Running"
        return "Pending"

    def _container_status(self, c: ContainerRun, waiting_reason: str) -> JSON:
        state = c.state or {"waiting": {"reason": waiting_reason}}
        if self.volume_error and "waiting" in state and state["waiting"].get("reason") == waiting_reason:
            state = {"waiting": {"reason": "ContainerCreating", "message": self.volume_error}}
        running = "running" in state and c.running
        image = str(c.spec.get("image") or "")
        status: JSON = {
            "name": c.name,
            "image": image,
            "imageID": "sha256:" + hashlib.sha256(image.encode()).hexdigest(),
            "ready": running if c.kind != "init" else c.succeeded,
            "restartCount": c.restart_count,
            "started": running,
            "state": state,
            "lastState": c.last_state,
        }
        if c.container_id:
            status["containerID"] = c.container_id
        return status

    def _conditions(self, phase: str, statuses: list[JSON], init_statuses: list[JSON]) -> list[JSON]:
        terminal = phase in ("Succeeded", "Failed")
        wanted: list[tuple[str, bool, str | None, str | None]] = []
        wanted.append(("PodReadyToStartContainers", not terminal, None, None))
        incomplete = [
            s["name"]
            for s, c in zip(init_statuses, self.inits, strict=True)
            if not (c.succeeded if c.kind == "init" else c.exec_seen)
        ]
        if self.initialized or not incomplete:
            wanted.append(("Initialized", True, "PodCompleted" if phase == "Succeeded" else None, None))
        else:
            wanted.append(
                (
                    "Initialized",
                    False,
                    "ContainersNotInitialized",
                    f"containers with incomplete status: [{' '.join(incomplete)}]",
                )
            )
        unready = [s["name"] for s in statuses if not s["ready"]]
        unready += [
            s["name"]
            for s, c in zip(init_statuses, self.inits, strict=True)
            if c.kind == "sidecar" and not s["ready"]
        ]
        if phase == "Succeeded":
            ready: tuple[bool, str | None, str | None] = (False, "PodCompleted", None)
        elif unready:
            ready = (False, "ContainersNotReady", f"containers with unready status: [{' '.join(unready)}]")
        else:
            ready = (True, None, None)
        wanted.append(("ContainersReady", *ready))
        gates = [g["conditionType"] for g in self.pod["spec"].get("readinessGates") or []]
        existing = {c["type"]: c for c in (self.pod.get("status") or {}).get("conditions") or []}
        if ready[0] and gates:
            missing = [g for g in gates if (existing.get(g) or {}).get("status") != "True"]
            if missing:
                ready = (
                    False,
                    "ReadinessGatesNotReady",
                    f"corresponding condition of pod readiness gate {missing[0]!r} does not exist.",
                )
        wanted.append(("Ready", *ready))
        out = []
        for ctype, ok, reason, message in wanted:
            status = "True" if ok else "False"
            old = existing.get(ctype) or {}
            prev = self.cond_times.get(ctype)
            if prev and prev[0] == status:
                since = prev[1]
            elif old.get("status") == status and old.get("lastTransitionTime"):
                since = old["lastTransitionTime"]
            else:
                since = spec.now()
            self.cond_times[ctype] = (status, since)
            cond: JSON = {"type": ctype, "status": status, "lastProbeTime": None, "lastTransitionTime": since}
            if reason:
                cond["reason"] = reason
            if message:
                cond["message"] = message
            out.append(cond)
        return out

    def status(self) -> JSON:
        phase = self.phase()
        inits_waiting = "PodInitializing"
        init_statuses = [self._container_status(c, inits_waiting) for c in self.inits]
        main_waiting = "PodInitializing" if self.inits else "ContainerCreating"
        statuses = [self._container_status(c, main_waiting) for c in self.mains]
        status: JSON = {
            "phase": phase,
            "conditions": self._conditions(phase, statuses, init_statuses),
            "hostIP": spec.HOST_IP,
            "hostIPs": [{"ip": spec.HOST_IP}],
            "podIP": spec.POD_IP,
            "podIPs": [{"ip": spec.POD_IP}],
            "startTime": self.start_time,
            "containerStatuses": statuses,
        }
        if init_statuses:
            status["initContainerStatuses"] = init_statuses
        if self.reason:
            status["reason"] = self.reason
        if self.message:
            status["message"] = self.message
        return status

    def _flush(self) -> bool:
        """Write the status if it changed; False if that failed."""
        status = self.status()
        if status == self.last_sent:
            return True
        body = {"metadata": {"uid": self.uid}, "status": status}
        try:
            with self.lock:
                pod = self.pod
            answer = self.api.request(
                "PATCH",
                f"/api/v1/namespaces/{self.namespace}/pods/{self.pod_name}/status",
                body=body,
                content_type=STRATEGIC_MERGE_PATCH,
            )
        except ApiError as err:
            if err.status in (404, 409):
                self.gone = True
                return True
            log.warning("pod %s/%s: status write failed: %s", self.namespace, self.pod_name, err)
            return False
        self.last_sent = status
        with self.lock:
            if self.pod is pod and isinstance(answer, dict):
                self.pod = answer
                self.volumes.pod = answer
        return True

    def kill_all(self) -> None:
        for c in self.inits + self.mains:
            if c.proc is not None and c.proc.poll() is None:
                c.proc.signal(signal.SIGKILL)
