"""Content digests of files: SHA-256 over a file's bytes, cached per process while the file is the
same (path, size, mtime, inode), and over a sequence of bytes and files (a workspace split's hash,
:meth:`~cir_mine.data.workspace.Workspace.split_hash`)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

_DIGESTS: dict = {}


def file_fingerprint(path) -> bytes:
    """sha256 of a file's bytes (the content, not its times), cached per process by path, size,
    mtime and inode (of the file as opened), so a command pays one read of each table at most.
    ``path``: a path, or a file already opened in binary mode (read from its start, left open)."""
    if isinstance(path, (str, os.PathLike)):
        with open(path, "rb") as fh:
            return file_fingerprint(fh)
    fh = path
    st = os.fstat(fh.fileno())
    key = (str(Path(fh.name).resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        fh.seek(0)
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
        _DIGESTS[key] = h.digest()
    return _DIGESTS[key]


OPEN_TO_HASH = 64  # a split of more files is hashed before it is read, one file open at a time


def opened(inputs: list) -> list:
    """``inputs`` with each path replaced by the file opened (all closed again on an error)."""
    out: list = []
    try:
        for item in inputs:
            out.append(item if isinstance(item, bytes) else open(item, "rb"))
    except BaseException:
        close_all(out)
        raise
    return out


def hash_of(inputs: list) -> str:
    """16 hex digits of the SHA-256 over ``inputs`` (bytes, and paths or opened files by their
    :func:`file_fingerprint`), opened files closed after."""
    h = hashlib.sha256()
    try:
        for item in inputs:
            h.update(item if isinstance(item, bytes) else file_fingerprint(item))
    finally:
        close_all(inputs)
    return h.hexdigest()[:16]


def close_all(inputs: list) -> None:
    for item in inputs:
        if hasattr(item, "close"):
            item.close()


def file_digest(path: Path) -> str:
    """:func:`file_fingerprint` as 16 hex digits."""
    return file_fingerprint(path).hex()[:16]
