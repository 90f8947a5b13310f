"""The lock of a workspace or run directory: one writing job at a time."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Optional

from cir_mine.data.errors import DataError, LockedError
from cir_mine.data.files import is_write_error, make_dirs, pid_alive, write_error


class DirLock:
    """An exclusive lock ``DIR/.cir-mine.lock`` for a workspace or run directory.

    The lock is an OS file lock (``flock``) on that file, held for the job's lifetime, so taking it
    is atomic and the kernel frees it when the holder dies; the file's JSON (pid, host, purpose)
    names the holder in the message a second process gets (:class:`LockedError`, fails fast). A
    lock file naming a live process on this host is respected even when no OS lock is held on it; a
    malformed one (not a JSON object with an integer pid, or a folder) raises :class:`DataError`.
    A directory the lock created is removed again on release when nothing was written into it.
    """

    NAME = ".cir-mine.lock"

    def __init__(self, directory: str | os.PathLike, purpose: str = "writing"):
        self.directory = Path(directory)
        self.path = self.directory / self.NAME
        self.purpose = purpose
        self._fd: Optional[int] = None
        self._created: list = []

    def _busy(self, other) -> LockedError:
        pid = other.get("pid") if isinstance(other, dict) else None
        purpose = other.get("purpose", "writing") if isinstance(other, dict) else "starting"
        return LockedError(
            f"{self.directory} is in use by process {pid if pid is not None else '?'} ({purpose}). Wait for it "
            f"to finish, or delete {self.path} if that process is gone."
        )

    def acquire(self) -> "DirLock":
        self._created = [p for p in [self.directory, *self.directory.parents] if not p.exists()]
        make_dirs(self.directory)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "purpose": self.purpose}
        for _ in range(100):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except IsADirectoryError:
                raise DataError(
                    f"{self.path}: is a folder, not a cir-mine lock file. Remove it if no cir-mine job is running."
                ) from None
            except OSError as e:
                if is_write_error(e):
                    raise write_error(self.path, e) from None
                raise
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                other = _parse_lock(_read_fd(fd))
                os.close(fd)
                raise self._busy(other) from None
            # the file may have been unlinked by its previous holder between our open and flock
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            text = _read_fd(fd)
            other = _parse_lock(text)
            if text.strip() and other is None:
                os.close(fd)
                raise DataError(
                    f"{self.path}: not a cir-mine lock file (expected a JSON object with an integer "
                    f"pid, found {text.strip()[:40]!r}). Delete it if no cir-mine job is running."
                )
            if (
                other is not None
                and other["pid"] != os.getpid()
                and other.get("host") == info["host"]
                and pid_alive(other["pid"])
            ):
                os.close(fd)  # a live holder that took the lock without an OS lock (older cir-mine)
                raise self._busy(other)
            try:
                data = json.dumps(info).encode()
                os.ftruncate(fd, 0)
                os.pwrite(fd, data, 0)
            except OSError as e:
                os.close(fd)
                raise write_error(self.path, e) if is_write_error(e) else e
            self._fd = fd
            return self
        raise LockedError(f"could not take the lock {self.path}; delete it if no job is running.")

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()  # still holding the OS lock: nobody can take the old inode
            os.close(self._fd)
            self._fd = None
            for d in self._created:  # a job that failed before writing anything leaves no empty folder behind
                try:
                    d.rmdir()
                except OSError:
                    break

    def __enter__(self) -> "DirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_fd(fd: int) -> str:
    try:
        return os.pread(fd, 4096, 0).decode("utf-8", "replace")
    except OSError:
        return ""


def _parse_lock(text: str) -> Optional[dict]:
    """The holder's info, or None when the text is empty or not a lock (a list, a bad pid)."""
    try:
        v = json.loads(text)
    except ValueError:
        return None
    if not isinstance(v, dict) or not isinstance(v.get("pid"), int) or isinstance(v.get("pid"), bool) or v["pid"] <= 0:
        return None
    return v
