"""Reading what the task left in a volume it shares with the sidecar, trusting none of it.

The task container writes ``/dptr/logs`` and ``/dptr/staging``; the sidecar reads them
after the task exits, with the TaskRunner's AWS keys in its env and its API token in its
own mount.  Whatever the task put there (a symbolic link to ``/proc/self/environ`` or to
the token directory, ``..``, a FIFO, a device, a huge sparse file) must never make the
sidecar read anything but a regular file the task wrote inside the volume, nor hang it.

So every path below the volume's root is opened one component at a time, relative to
the directory opened before it, with ``O_NOFOLLOW`` (a link anywhere is refused, not
followed) and ``O_NONBLOCK`` (opening a FIFO never waits for a writer); the final
``fstat`` must show a regular file on the volume's own device, and only the size it had
then is read.  Names come from the volume's own listing, which never holds ``..``.
The root itself is the sidecar's own mount point and the only path taken on trust.
(``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`` would do the same in one call;
Python has no binding for it and seccomp profiles differ on allowing it.)
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Literal

__all__ = ["CHUNK", "SharedFile", "SharedVolume", "UnsafeFile", "file_slice"]

CHUNK = 1024 * 1024

Reason = Literal["Symlink", "NotRegularFile", "TooLarge", "Unreadable", "OutsideVolume"]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY


class UnsafeFile(Exception):  # noqa: N818 - reads as what it is
    """A path in a shared volume that the sidecar refuses to read, and why."""

    def __init__(self, path: str, reason: Reason, detail: str) -> None:
        super().__init__(f"{path}: {detail}")
        self.path = path
        self.reason = reason
        self.detail = detail


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a directory"),
    ):
        if test(mode):
            return name
    return "not a regular file"


class _Slice(io.RawIOBase):
    """``length`` bytes of the descriptor ``fd`` from ``offset``: readable, seekable, and
    never past its end, whatever the file does meanwhile (``pread``, no shared position)."""

    def __init__(self, fd: int, offset: int, length: int) -> None:
        super().__init__()
        self._fd, self._offset, self._length, self._position = fd, offset, length, 0

    def __len__(self) -> int:
        return self._length - self._position

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._length}[whence]
        self._position = min(max(base + offset, 0), self._length)
        return self._position

    def read(self, size: int | None = -1) -> bytes:
        remaining = self._length - self._position
        if size is None or size < 0 or size > remaining:
            size = remaining
        if size <= 0:
            return b""
        data = os.pread(self._fd, size, self._offset + self._position)
        self._position += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def file_slice(fd: int, offset: int, length: int) -> io.RawIOBase:
    """``length`` bytes of ``fd`` from ``offset`` as a seekable reader (see :class:`_Slice`)."""
    return _Slice(fd, offset, length)


@dataclass
class SharedFile:
    """A regular file opened safely: read at most the ``size`` it had when opened."""

    path: str
    size: int
    fd: int

    def chunks(self, chunk: int = CHUNK) -> Iterator[bytes]:
        """The file's bytes from the start (each call reads it again)."""
        offset = 0
        while offset < self.size:
            data = os.pread(self.fd, min(chunk, self.size - offset), offset)
            if not data:
                return  # truncated meanwhile: what is there is all there is
            offset += len(data)
            yield data

    def reader(self) -> io.RawIOBase:
        """A seekable reader of exactly the file's ``size`` bytes (for uploads that retry)."""
        return _Slice(self.fd, 0, self.size)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)

    def __enter__(self) -> SharedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SharedVolume:
    """A volume the task may have written, rooted at the sidecar's own mount point."""

    def __init__(self, root: str) -> None:
        self.root = root
        self._fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._dev = os.fstat(self._fd).st_dev

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)

    def __enter__(self) -> SharedVolume:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _shown(self, parts: tuple[str, ...]) -> str:
        return str(PurePosixPath(self.root, *parts))

    def _parts(self, relative: str) -> tuple[str, ...]:
        parts = PurePosixPath(relative).parts
        if PurePosixPath(relative).is_absolute() or any(p in ("", ".", "..") for p in parts):
            raise UnsafeFile(relative, "OutsideVolume", "the path leaves the volume")
        return parts

    def _refuse(self, fd: int, name: str, shown: str, *, want_dir: bool) -> UnsafeFile:
        """Why ``name`` (in the directory ``fd``) could not be opened as wanted."""
        try:
            mode = os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode
        except FileNotFoundError:
            return UnsafeFile(shown, "Unreadable", "it does not exist")
        except OSError as exc:
            return UnsafeFile(shown, "Unreadable", f"cannot be read: {exc.strerror}")
        if stat.S_ISLNK(mode):
            return UnsafeFile(shown, "Symlink", "it is a symbolic link; dptr never follows links here")
        wanted = "a directory" if want_dir else "a regular file"
        return UnsafeFile(shown, "NotRegularFile", f"it is {_kind(mode)}, not {wanted}")

    def _open_dir(self, parts: tuple[str, ...]) -> int:
        """A descriptor of the directory ``parts`` below the root (the caller closes it)."""
        fd = os.dup(self._fd)
        for depth, name in enumerate(parts):
            try:
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError:
                err = self._refuse(fd, name, self._shown(parts[: depth + 1]), want_dir=True)
                os.close(fd)
                raise err from None
            os.close(fd)
            fd = child
            if os.fstat(fd).st_dev != self._dev:
                os.close(fd)
                raise UnsafeFile(self._shown(parts[: depth + 1]), "OutsideVolume", "it is another mount")
        return fd

    def exists(self, relative: str) -> bool:
        """Whether anything (of any kind) is at ``relative``, without following a link."""
        parts = self._parts(relative)
        try:
            fd = self._open_dir(parts[:-1])
        except UnsafeFile:
            return False
        try:
            os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
        except OSError:
            return False
        finally:
            os.close(fd)
        return True

    def is_dir(self, relative: str) -> bool:
        """Whether ``relative`` is a real directory (raises :class:`UnsafeFile` for a link)."""
        parts = self._parts(relative)
        try:
            fd = self._open_dir(parts)
        except UnsafeFile as exc:
            if exc.reason == "Unreadable":
                return False
            raise
        os.close(fd)
        return True

    def open(self, relative: str, *, max_bytes: int | None = None) -> SharedFile:
        """Open the regular file ``relative``; raises :class:`UnsafeFile` (and
        ``FileNotFoundError`` when nothing is there)."""
        parts = self._parts(relative)
        shown = self._shown(parts)
        parent = self._open_dir(parts[:-1])
        try:
            try:
                fd = os.open(parts[-1], _FILE_FLAGS, dir_fd=parent)
            except FileNotFoundError:
                raise
            except OSError:
                raise self._refuse(parent, parts[-1], shown, want_dir=False) from None
        finally:
            os.close(parent)
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise UnsafeFile(shown, "NotRegularFile", f"it is {_kind(info.st_mode)}, not a regular file")
        if info.st_dev != self._dev:
            os.close(fd)
            raise UnsafeFile(shown, "OutsideVolume", "it is on another filesystem")
        if max_bytes is not None and info.st_size > max_bytes:
            os.close(fd)
            raise UnsafeFile(
                shown, "TooLarge", f"it is {info.st_size} bytes, more than the limit of {max_bytes}"
            )
        return SharedFile(shown, info.st_size, fd)

    def files(self, relative: str) -> list[tuple[str, int]]:
        """Every regular file below the directory ``relative``, as (path relative to it,
        size), sorted.  Any link, FIFO, device or socket below it raises
        :class:`UnsafeFile`: refusing is safer than skipping what the task meant to write."""
        base = self._parts(relative) if relative not in ("", ".") else ()
        found: list[tuple[str, int]] = []

        def walk(parts: tuple[str, ...]) -> None:
            fd = self._open_dir(parts)
            try:
                names = sorted(os.listdir(fd))
                for name in names:
                    info = os.stat(name, dir_fd=fd, follow_symlinks=False)
                    shown = self._shown((*parts, name))
                    if stat.S_ISDIR(info.st_mode):
                        walk((*parts, name))
                    elif stat.S_ISREG(info.st_mode):
                        found.append(("/".join((*parts, name)[len(base) :]), info.st_size))
                    elif stat.S_ISLNK(info.st_mode):
                        raise UnsafeFile(
                            shown, "Symlink", "it is a symbolic link; dptr never follows links here"
                        )
                    else:
                        raise UnsafeFile(
                            shown, "NotRegularFile", f"it is {_kind(info.st_mode)}, not a regular file"
                        )
            finally:
                os.close(fd)

        walk(base)
        return found
