"""Atomic writes and lock files: no half-written file is ever visible under its final name."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import os
import re
import signal
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from cir_mine.data.errors import DataError, LockedError, SchemaError, UsageError


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to ``final``; on success fsync and ``os.replace`` it into place.

    On an exception the temp file is removed and ``final`` is left untouched. The temp name
    ``.{name}.{pid}.XXXX.tmp`` carries the writer's pid, so temp files of killed writers are swept
    by the next write of the same file. A full disk, a read-only or unwritable folder raise
    :class:`DataError` naming ``final``.
    """
    final = Path(final)
    tmp_path = None
    created = [p for p in [final.parent, *final.parent.parents] if not p.exists()]
    try:
        make_dirs(final.parent)
        _sweep_stale_temps(final)
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.{os.getpid()}.", suffix=".tmp", dir=final.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; final files get the usual mode
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        _kill_hook(final)
        _journal(final)
        os.replace(tmp_path, final)
    except BaseException as e:
        if tmp_path is not None:
            with contextlib.suppress(OSError):
                tmp_path.unlink()
        for d in created:   # folders made for this file only, deepest first
            with contextlib.suppress(OSError):
                d.rmdir()
        if isinstance(e, OSError) and is_write_error(e):
            raise write_error(final, e) from None
        raise


_JOURNALS: list = []   # open transactions (innermost last) of this process


def _journal(final: Path) -> None:
    """Inside :func:`transaction`: remember ``final`` (and hard-link its old version aside) before it is replaced."""
    if not _JOURNALS:
        return
    entries = _JOURNALS[-1]
    if any(f == final for f, _ in entries):
        return
    backup = None
    if final.exists():
        backup = final.with_name(f".{final.name}.{os.getpid()}.bak.tmp")
        with contextlib.suppress(FileNotFoundError):
            backup.unlink()
        os.link(final, backup)
    entries.append((final, backup))


def discard(path: str | os.PathLike) -> None:
    """Remove ``path``; inside :func:`transaction` it comes back if the job fails."""
    path = Path(path)
    if _JOURNALS:
        _journal(path)
    path.unlink()


@contextlib.contextmanager
def transaction(rollback_on: tuple = (Exception,)) -> Iterator[None]:
    """Make a job's atomic writes all-or-nothing: on an exception of ``rollback_on`` every file the
    job wrote through :func:`atomic_path` is removed again, or restored to its previous version.
    A transaction inside another one joins the outer one."""
    if _JOURNALS:
        yield
        return
    entries: list = []
    _JOURNALS.append(entries)
    try:
        yield
    except rollback_on:
        for final, backup in reversed(entries):
            with contextlib.suppress(OSError):
                if backup is not None:
                    os.replace(backup, final)
                else:
                    final.unlink()
        raise
    finally:
        _JOURNALS.remove(entries)
        for _, backup in entries:
            if backup is not None:
                with contextlib.suppress(OSError):
                    backup.unlink()


# errno values (and the messages of libraries that drop errno, e.g. Arrow) that mean "cannot write here"
_WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EFBIG}
_WRITE_TEXTS = ("No space left", "Read-only file system", "Permission denied", "Disk quota exceeded",
                "File too large")


def is_write_error(e: OSError) -> bool:
    """Whether ``e`` says the file system refuses the write (full, read-only, no permission)."""
    return e.errno in _WRITE_ERRNOS or any(t in str(e) for t in _WRITE_TEXTS)


def write_error(path: Path, e: OSError) -> DataError:
    reason = e.strerror or str(e).splitlines()[0]
    for t in _WRITE_TEXTS:   # Arrow puts the OS message inside a longer text
        if t in str(e):
            reason = t.replace("No space left", "No space left on device")
            break
    return DataError(f"{path}: cannot write ({reason}). Free some space, or choose a writable location.")


def make_dirs(path: Path) -> None:
    """``mkdir -p`` that names the path on failure (a parent that is a file, a read-only folder)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise DataError(f"{path}: exists and is not a folder. Choose another output location.") from None
    except NotADirectoryError:
        raise DataError(f"{path}: a parent of this path is a file, not a folder. Choose another output "
                        f"location.") from None
    except OSError as e:
        if is_write_error(e):
            raise write_error(path, e) from None
        raise DataError(f"{path}: cannot create the folder ({e.strerror or e}).") from None


def _sweep_stale_temps(final: Path) -> None:
    """Remove ``.{name}.{pid}.*.tmp`` beside ``final`` whose writer (same host) is no longer alive."""
    prefix = f".{final.name}."
    for p in final.parent.glob(f"{glob.escape(prefix)}*.tmp"):
        pid = p.name[len(prefix):].split(".", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            with contextlib.suppress(OSError):
                p.unlink()


_KILL_COUNTS: dict = {}


def _kill_hook(final: Path) -> None:
    """Test hook: ``CIR_MINE_KILL_BEFORE_REPLACE=NAME[:N]`` SIGKILLs this process at the N-th (default
    first) atomic write of a file called NAME, after the temp file is complete and before the rename."""
    spec = os.environ.get("CIR_MINE_KILL_BEFORE_REPLACE")
    if not spec:
        return
    name, _, nth = spec.partition(":")
    if final.name == name:
        _KILL_COUNTS[name] = _KILL_COUNTS.get(name, 0) + 1
        if _KILL_COUNTS[name] == int(nth or 1):
            os.kill(os.getpid(), signal.SIGKILL)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, inf) replaced by None: JSON has no NaN."""
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write strict JSON (non-finite numbers as null) atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(json_safe(obj), indent=2, sort_keys=True, allow_nan=False) + "\n")


def write_atomic(path: str | os.PathLike, writer: Callable[[Path], None]) -> None:
    """Call ``writer(tmp_path)`` and move the result to ``path`` atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)


def _pid_alive(pid: int) -> bool:
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


# ----------------------------------------------------------------------------------------------
# Output paths


# A workspace's own files: the tables, indexes, manifest and lock (see docs/formats.md).
WORKSPACE_FILE_RE = re.compile(r"^(gallery|triplets)\.[^/]+\.parquet$|^index\.[^/]+\.faiss(\.json)?$"
                               r"|^manifest\.json$|^\.cir-mine\.lock$")


def is_workspace(directory: Path) -> bool:
    """A folder that holds a workspace (a manifest or a gallery table)."""
    directory = Path(directory)
    return (directory / "manifest.json").is_file() or any(directory.glob("gallery.*.parquet"))


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a == b


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file (resolved: symlinks and hard links included)."""
    ra, rb = _resolve(Path(a)), _resolve(Path(b))
    return ra == rb or (ra.exists() and rb.exists() and _same_file(ra, rb))


def _resolve(path: Path) -> Path:
    try:
        return Path(path).resolve()
    except RuntimeError:   # a symlink loop (Python < 3.13)
        raise DataError(f"{path}: is a symlink loop. Point it at a real file.") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise DataError(f"{path}: is a symlink loop. Point it at a real file.") from None
        raise


def check_output(out: str | os.PathLike, reads: Sequence = (), overwrite: bool = False,
                 flag: str = "--out", workspace_files: bool = True) -> Path:
    """Refuse an output file before anything is written; returns ``out``.

    Refused (:class:`UsageError`, exit 2): ``out`` is an existing folder, a path below a file, one of
    the files the command reads (``reads``; paths resolved, symlinks and hard links included), a
    workspace's own file (gallery, triplets, index, manifest or lock; unless ``workspace_files`` is
    False, for the commands that write a workspace), or an existing file without ``overwrite``.
    """
    out = Path(out)
    real = _resolve(out)
    for parent in real.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"{flag} {out}: {parent} is a file, not a folder. Choose another {flag}.")
            break
    if real.is_dir():
        raise UsageError(f"{flag} {out}: is a folder; {flag} names the file to write "
                         f"(e.g. {out / ('out' + (out.suffix or '.parquet'))}).")
    for r in reads:
        if r is None:
            continue
        r = Path(r)
        if same_file(real, r):
            raise UsageError(f"{flag} {out}: is an input of this command ({r}). Choose another {flag}; "
                             f"outputs never replace inputs.")
    if workspace_files and WORKSPACE_FILE_RE.match(real.name) and is_workspace(real.parent):
        raise UsageError(f"{flag} {out}: is a file of the workspace {real.parent}. Choose another {flag}; "
                         f"a workspace's files are written only by synth, embed and index.")
    if real.exists() and not overwrite:
        raise UsageError(f"{flag} {out}: already exists. Pass --overwrite to replace it, or choose another {flag}.")
    return out


def check_output_dir(out: str | os.PathLike, reads: Sequence = (), flag: str = "--out") -> Path:
    """Refuse an output folder that is a file, lies below a file, or holds (or is) an input."""
    out = Path(out)
    real = _resolve(out)
    if real.exists() and not real.is_dir():
        raise UsageError(f"{flag} {out}: is a file, not a folder. Choose another {flag}.")
    for parent in real.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"{flag} {out}: {parent} is a file, not a folder. Choose another {flag}.")
            break
    for r in reads:
        if r is None:
            continue
        rr = _resolve(Path(r))
        if rr == real:
            raise UsageError(f"{flag} {out}: is an input of this command ({r}). Choose another {flag}.")
    return out


# ----------------------------------------------------------------------------------------------
# Locks


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
                raise DataError(f"{self.path}: is a folder, not a cir-mine lock file. Remove it if no cir-mine "
                                f"job is running.") from None
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
                raise DataError(f"{self.path}: not a cir-mine lock file (expected a JSON object with an integer "
                                f"pid, found {text.strip()[:40]!r}). Delete it if no cir-mine job is running.")
            if (other is not None and other["pid"] != os.getpid() and other.get("host") == info["host"]
                    and _pid_alive(other["pid"])):
                os.close(fd)   # a live holder that took the lock without an OS lock (older cir-mine)
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

    @property
    def _held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()        # still holding the OS lock: nobody can take the old inode
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
    if not isinstance(v, dict) or not isinstance(v.get("pid"), int) or isinstance(v.get("pid"), bool) \
            or v["pid"] <= 0:
        return None
    return v


# ------------------------------------------------------------------------------------------------
# Parquet: open a file or fail clearly


def read_parquet(path: str | os.PathLike, columns=None):
    """The Parquet table at ``path`` (only those of ``columns`` it has, when given) -> pa.Table.

    Raises DataError when the file is missing, SchemaError when it is not readable Parquet."""
    import pyarrow.parquet as pq

    path = Path(path)
    check_readable_file(path)
    with _parquet_errors(path):
        if columns is not None:
            names = pq.read_schema(path).names
            columns = [c for c in columns if c in names]
        return pq.read_table(path, columns=columns)


def read_parquet_schema(path: str | os.PathLike):
    """The schema (with its footer metadata) of the Parquet file at ``path``, rows unread.

    Raises SchemaError when the file is not readable Parquet."""
    import pyarrow.parquet as pq

    with _parquet_errors(Path(path)):
        return pq.read_schema(path)


@contextlib.contextmanager
def _parquet_errors(path: Path) -> Iterator[None]:
    import pyarrow as pa

    try:
        yield
    except (pa.ArrowInvalid, OSError) as e:
        raise SchemaError(f"{path}: not a readable Parquet file ({e}).") from None
