"""File-system basics: hidden names beside a file, folders made with clear errors, write failures
(a full disk, a read-only folder, no permission) raised as one :class:`DataError` naming the path."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

from cir_mine.data.errors import DataError


def short_name(name: str, limit: int = 200) -> str:
    """``name`` itself, or (when longer than ``limit`` bytes) its start plus a digest, so that the temp
    and backup names built on it (``.{name}.{pid}.XXXX.tmp``) stay within the 255 bytes of a file name."""
    raw = name.encode()
    if len(raw) <= limit:
        return name
    digest = hashlib.sha256(raw).hexdigest()[:12]
    return raw[: limit - 13].decode("utf-8", "ignore") + "~" + digest


def side_name(path: Path, tag: str) -> Path:
    """A hidden sibling of ``path`` for this process: ``.{name}.{pid}.{tag}`` (name shortened if needed)."""
    return path.with_name(f".{short_name(path.name)}.{os.getpid()}.{tag}")


# errno values (and the messages of libraries that drop errno, e.g. Arrow, FAISS) that mean "cannot write here"
_WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EFBIG}
_WRITE_TEXTS = ("No space left", "Read-only file system", "Permission denied", "Disk quota exceeded", "File too large")


def is_write_error(e: BaseException) -> bool:
    """Whether ``e`` says the file system refuses the write (full, read-only, no permission)."""
    return getattr(e, "errno", None) in _WRITE_ERRNOS or any(t in str(e) for t in _WRITE_TEXTS)


def disk_full(folder: Path) -> bool:
    """Whether the file system of ``folder`` has (almost) no free space left for this user."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 64 * 1024


def write_error(path: Path, e: BaseException, full: bool = False) -> DataError:
    reason = None
    for t in _WRITE_TEXTS:  # Arrow and FAISS put the OS message inside a longer text
        if t in str(e):
            reason = t.replace("No space left", "No space left on device")
            break
    if reason is None:
        reason = os.strerror(errno.ENOSPC) if full else (getattr(e, "strerror", None) or str(e).splitlines()[0])
    return DataError(f"{path}: cannot write ({reason}). Free some space, or choose a writable location.")


def make_dirs(path: Path) -> None:
    """``mkdir -p`` that names the path on failure (a parent that is a file, a read-only folder)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise DataError(f"{path}: exists and is not a folder. Choose another output location.") from None
    except NotADirectoryError:
        raise DataError(
            f"{path}: a parent of this path is a file, not a folder. Choose another output location."
        ) from None
    except OSError as e:
        if is_write_error(e):
            raise write_error(path, e) from None
        raise DataError(f"{path}: cannot create the folder ({e.strerror or e}).") from None


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM
    return True


def check_readable_file(path: str | os.PathLike) -> None:
    """DataError for a missing file, a dangling link, a symlink loop or a folder, each named as such."""
    path = Path(path)
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise DataError(f"{path}: is a symlink loop. Point it at a real file.") from None
        if path.is_symlink():
            raise DataError(f"{path}: is a symlink to a missing file ({os.readlink(path)}).") from None
        raise DataError(f"{path}: file not found.") from None
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not a file.")
