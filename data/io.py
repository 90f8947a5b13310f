"""Atomic writes and lock files: no half-written file is ever visible under its final name."""
from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import signal
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from cir_mine.data.errors import DataError, LockedError, SchemaError


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to ``final``; on success fsync and ``os.replace`` it into place.

    On an exception the temp file is removed and ``final`` is left untouched. The temp name
    ``.{name}.{pid}.XXXX.tmp`` carries the writer's pid, so temp files of killed writers are swept
    by the next write of the same file.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale_temps(final)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.{os.getpid()}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; final files get the usual mode
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        _kill_hook(final)
        os.replace(tmp_path, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


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


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


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


class DirLock:
    """An exclusive lock file ``DIR/.cir-mine.lock`` for a workspace or run directory.

    A second process fails fast with :class:`LockedError`. A directory the lock created is removed
    again on release when nothing was written into it. A lock left by a killed process
    (same host, pid no longer alive) is taken over, so a SIGKILL never blocks the rerun.
    """

    NAME = ".cir-mine.lock"

    def __init__(self, directory: str | os.PathLike, purpose: str = "writing"):
        self.directory = Path(directory)
        self.path = self.directory / self.NAME
        self.purpose = purpose
        self._held = False
        self._created = False

    def acquire(self) -> "DirLock":
        self._created = not self.directory.exists()
        self.directory.mkdir(parents=True, exist_ok=True)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "purpose": self.purpose}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                other = self._read()
                stale = (
                    other is not None
                    and other.get("host") == info["host"]
                    and not _pid_alive(int(other.get("pid", -1)))
                )
                if other is None or stale:
                    with contextlib.suppress(FileNotFoundError):
                        self.path.unlink()
                    continue
                raise LockedError(
                    f"{self.directory} is in use by process {other.get('pid')} "
                    f"({other.get('purpose', 'writing')}). Wait for it to finish, or delete "
                    f"{self.path} if that process is gone."
                )
            with os.fdopen(fd, "w") as fh:
                json.dump(info, fh)
            self._held = True
            return self
        raise LockedError(f"could not take the lock {self.path}; delete it if no job is running.")

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text() or "null")
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self._held:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self._held = False
            if self._created:  # a job that failed before writing anything leaves no empty directory behind
                with contextlib.suppress(OSError):
                    self.directory.rmdir()

    def __enter__(self) -> "DirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ------------------------------------------------------------------------------------------------
# Parquet: open a file or fail clearly


def read_parquet(path: str | os.PathLike, columns=None):
    """The Parquet table at ``path`` (only those of ``columns`` it has, when given) -> pa.Table.

    Raises DataError when the file is missing, SchemaError when it is not readable Parquet."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found.")
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
