"""Runs one container: new mount, UTS and PID namespaces, then the setup script.

Started by the stand-in as ``python -I -S _launcher.py PPID ERRFILE SCRIPT
ARGV...``. It is the parent of the container's PID 1 and exits the way PID 1
did (same exit code, or killed by the same signal), so the stand-in reads a
container's exit status from this process. It dies with the stand-in's
thread that started it (PR_SET_PDEATHSIG), and PID 1 dies with it, which
takes every process of the container down: a lost node loses its containers.

Kept free of imports beyond the standard library, and fast to start.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWPID = 0x20000000
PR_SET_PDEATHSIG = 1


def _fail(errfile: str, message: str) -> None:
    try:
        with open(errfile, "w") as out:
            out.write(message)
    finally:
        os._exit(128)


def main(argv: list[str]) -> None:
    expected_parent, errfile, script, *command = argv
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0 or os.getppid() != int(expected_parent):
        os._exit(137)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    if libc.unshare(CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWPID) != 0:
        err = ctypes.get_errno()
        _fail(errfile, f"unshare: {os.strerror(err)} (the kubelet stand-in must run as root)")
    pid = os.fork()
    if pid == 0:
        # PID 1 of the container: dies if the launcher dies. (Its parent is
        # outside its PID namespace, so getppid() says 0 here.)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            os._exit(137)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        try:
            os.execv("/bin/sh", ["sh", "-c", script, "dptr-container", *command])
        except OSError as err:
            _fail(errfile, f"cannot start /bin/sh: {err}")
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except ChildProcessError:
            os._exit(137)
    if os.WIFEXITED(status):
        os._exit(os.WEXITSTATUS(status))
    termsig = os.WTERMSIG(status)
    if termsig not in (signal.SIGKILL, signal.SIGSTOP):
        signal.signal(termsig, signal.SIG_DFL)
    os.kill(os.getpid(), termsig)
    os._exit(128 + termsig)


if __name__ == "__main__":
    main(sys.argv[1:])
