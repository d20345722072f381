"""Start a container's command as a local process, in its own namespaces.

Each container gets, through :mod:`._launcher`:

- a private mount namespace, in which only the volumes it mounts are
  bind-mounted (read-only where asked) at their mountPaths, a minimal /dev
  of its own (like runc's) with /dev/termination-log, and the test bed's
  state directory covered by an empty tmpfs, so it can read neither other
  volumes nor the bed's keys;
- a PID namespace in which its command is PID 1, so signals behave as in a
  container (PID 1 ignores SIGTERM unless it handles it) and killing PID 1
  kills everything the container started;
- a UTS namespace whose hostname is the pod's;
- the pod's user and groups (``setpriv``), and no_new_privs when
  ``allowPrivilegeEscalation`` is false.

The image is ignored: the command runs from the host's filesystem.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

LAUNCHER = Path(__file__).with_name("_launcher.py")
START_ERROR_EXIT = 128
SETUP_ARGV0 = b"dptr-container"  # $0 of the setup script (see _launcher)


def _tool(name: str) -> str:
    found = shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
    return found or f"/usr/bin/{name}"


@dataclass(frozen=True)
class Mount:
    source: Path
    target: str
    read_only: bool = False


@dataclass
class LaunchSpec:
    argv: list[str]
    env: dict[str, str]
    scratch: Path  # per-container directory on the host for the runtime's own files
    log: Path
    termination_log: Path  # host file behind terminationMessagePath
    termination_path: str = "/dev/termination-log"
    mounts: list[Mount] = field(default_factory=list)
    working_dir: str = "/"
    hostname: str = "pod"
    uid: int | None = None
    gid: int | None = None
    groups: list[int] = field(default_factory=list)
    no_new_privs: bool = False
    hide: list[Path] = field(default_factory=list)
    #: Host directories that stand in for the image's filesystem (this Python
    #: environment and the project's code). A volume mounted over a parent of
    #: one (an emptyDir at /tmp while the checkout lives under /tmp) would hide
    #: the container's own programs, so they are bound back, read-only.
    image_paths: list[Path] = field(default_factory=list)

    @property
    def errfile(self) -> Path:
        return self.scratch / "start-error"


def render_script(ls: LaunchSpec) -> str:
    """The shell script PID 1 runs before it execs the container's command."""
    q = shlex.quote
    mount, umount, mkdir, ln, setpriv = (q(_tool(n)) for n in ("mount", "umount", "mkdir", "ln", "setpriv"))
    dev = q(str(ls.scratch / "dev"))
    # Volume sources live under the bed's state dir, wherever that is (often
    # /tmp). A pod that mounts something over a parent of it (an emptyDir at
    # /tmp) would hide later sources, the error file and the termination log.
    # So the error file stays open on fd 9, and every source is first bound
    # into the container's private /dev, then onto its target, then unbound.
    stage = "/dev/.dptr-stage"
    lines = [
        f"exec 9>>{q(str(ls.errfile))} || exit {START_ERROR_EXIT}",
        f"fail() {{ printf '%s' \"$1\" >&9; exit {START_ERROR_EXIT}; }}",
        'run() { out=$("$@" 2>&1) || fail "$*: $out"; }',
        f"run {mount} --make-rprivate /",
        f"run {mount} -t proc -o nosuid,nodev,noexec proc /proc",
        f"printf '%s' {q(ls.hostname)} > /proc/sys/kernel/hostname || fail 'cannot set the hostname'",
        # A /dev of the container's own, as runc makes it.
        f"run {mkdir} -p {dev}",
        f"run {mount} -t tmpfs -o nosuid,mode=755,size=65536k dptr-dev {dev}",
        f"for n in null zero full random urandom tty; do : > {dev}/$n; run {mount} --bind /dev/$n {dev}/$n; done",
        f"run {mkdir} -m 755 {dev}/pts",
        f"run {mkdir} -m 1777 {dev}/shm",
        f"run {mount} --bind /dev/pts {dev}/pts",
        f"run {ln} -s /proc/self/fd {dev}/fd",
        f"run {ln} -s /proc/self/fd/0 {dev}/stdin",
        f"run {ln} -s /proc/self/fd/1 {dev}/stdout",
        f"run {ln} -s /proc/self/fd/2 {dev}/stderr",
        f"run {ln} -s pts/ptmx {dev}/ptmx",
    ]
    term_in_dev = ls.termination_path.startswith("/dev/") and "/" not in ls.termination_path[5:]
    if term_in_dev:
        target = f"{dev}/{q(ls.termination_path[5:])}"
        lines += [f": > {target}", f"run {mount} --bind {q(str(ls.termination_log))} {target}"]
    lines += [f"run {mount} --move {dev} /dev", f"run {mkdir} -m 700 {stage}"]
    mounts = sorted(ls.mounts, key=lambda m: m.target.rstrip("/").count("/"))
    staged: list[str] = []
    sources = [(m.source, m.source.is_dir()) for m in mounts]
    if not term_in_dev and ls.termination_path:
        sources.append((ls.termination_log, False))
    shadowed = [
        p
        for p in ls.image_paths
        if any(str(p) == t or str(p).startswith(t.rstrip("/") + "/") for t in (m.target for m in mounts))
    ]
    first_image = len(sources)
    sources += [(p, True) for p in shadowed]
    for i, (source, is_dir) in enumerate(sources):
        staged.append(f"{stage}/{i}")
        lines.append(f"run {mkdir} {staged[i]}" if is_dir else f": > {staged[i]}")
        lines.append(f"run {mount} --bind {q(str(source))} {staged[i]}")
    for i, m in enumerate(mounts):
        target = q(m.target)
        if sources[i][1]:
            lines.append(f"run {mkdir} -p {target}")
        else:
            lines.append(f"run {mkdir} -p {q(os.path.dirname(m.target) or '/')}")
            lines.append(f"[ -e {target} ] || : > {target} || fail 'cannot create mount point {m.target}'")
        lines.append(f"run {mount} --bind {staged[i]} {target}")
        if m.read_only:
            lines.append(f"run {mount} -o remount,bind,ro {target}")
    if not term_in_dev and ls.termination_path:
        target = q(ls.termination_path)
        lines += [
            f"run {mkdir} -p {q(os.path.dirname(ls.termination_path) or '/')}",
            f"[ -e {target} ] || : > {target} || fail 'cannot create {ls.termination_path}'",
            f"run {mount} --bind {staged[-1]} {target}",
        ]
    for i, path in enumerate(shadowed, start=first_image):
        target = q(str(path))
        lines += [
            f"run {mkdir} -p {target}",
            f"run {mount} --bind {staged[i]} {target}",
            f"run {mount} -o remount,bind,ro {target}",
        ]
    # The staged binds would let a container write to a volume it mounts
    # read-only; they go before the container's command starts.
    lines += [f"run {umount} {path}" for path in staged]
    # Never recursive: these are empty mount points once unbound.
    lines += [
        f"run {'rmdir' if is_dir else 'rm -f'} {path}"
        for path, (_, is_dir) in zip(staged, sources, strict=True)
    ]
    lines.append(f"run rmdir {stage}")
    for hidden in ls.hide:
        lines.append(f"run {mount} -t tmpfs -o ro,size=4k,mode=755 dptr-hidden {q(str(hidden))}")
    wd = q(ls.working_dir or "/")
    lines += [
        f"cd {wd} 2>/dev/null || {{ run {mkdir} -p {wd}; cd {wd} || fail 'cannot enter working directory'; }}",
        'command -v "$1" >/dev/null 2>&1 || fail "exec: \\"$1\\": executable file not found in \\$PATH"',
    ]
    opts = ["--pdeathsig=KILL"]
    if ls.uid is not None or ls.gid is not None:
        opts.append(f"--reuid={ls.uid if ls.uid is not None else 0}")
        opts.append(f"--regid={ls.gid if ls.gid is not None else 0}")
        opts.append(f"--groups={','.join(map(str, ls.groups))}" if ls.groups else "--clear-groups")
    elif ls.groups:
        opts.append(f"--groups={','.join(map(str, ls.groups))}")
    if ls.no_new_privs:
        opts.append("--no-new-privs")
    lines.append("exec 9>&-")
    lines.append(f'exec {setpriv} {" ".join(opts)} -- "$@"')
    return "\n".join(lines) + "\n"


class ContainerProcess:
    """One run of a container: the launcher process and its PID 1."""

    def __init__(self, ls: LaunchSpec) -> None:
        self.spec = ls
        ls.scratch.mkdir(parents=True, exist_ok=True)
        ls.errfile.unlink(missing_ok=True)
        ls.log.parent.mkdir(parents=True, exist_ok=True)
        with ls.log.open("ab") as out:
            self.popen = subprocess.Popen(
                [
                    sys.executable,
                    "-I",
                    "-S",
                    str(LAUNCHER),
                    str(os.getpid()),
                    str(ls.errfile),
                    render_script(ls),
                    *ls.argv,
                ],
                env=ls.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd="/",
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _pid1(self) -> int | None:
        try:
            children = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()
        except OSError:
            return None
        return int(children[0]) if children else None

    def exec_done(self) -> bool:
        """True once PID 1 has left the setup script for the container's command:
        only then is the container running (and able to handle signals)."""
        pid1 = self._pid1()
        if pid1 is None:
            return False
        try:
            args = Path(f"/proc/{pid1}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return not (len(args) > 3 and args[0] == b"sh" and args[1] == b"-c" and args[3] == SETUP_ARGV0)

    def poll(self) -> int | None:
        return self.popen.poll()

    def signal(self, sig: int) -> bool:
        """Signal the container's PID 1; False if it does not exist (yet)."""
        if self.popen.poll() is not None:
            return True
        pid1 = self._pid1()
        try:
            if pid1 is not None:
                os.kill(pid1, sig)
                return True
            if sig == signal.SIGKILL:
                self.popen.kill()
                return True
        except ProcessLookupError:
            return True
        return False

    def kill_now(self) -> None:
        self.signal(signal.SIGKILL)
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()

    def outcome(self) -> tuple[int, int | None, str | None]:
        """(exitCode, signal, start error) once the process has exited."""
        rc = self.popen.returncode
        assert rc is not None
        if rc < 0:
            return 128 - rc, -rc, None
        if rc == START_ERROR_EXIT:
            try:
                message = self.spec.errfile.read_text(errors="replace").strip()
            except FileNotFoundError:
                message = ""
            if message:
                return rc, None, message
        return rc, None, None
