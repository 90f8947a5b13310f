"""Atomic writes and lock files: no half-written file is ever visible under its final name."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from cir_mine.data.errors import DataError, Interrupted, LockedError, SchemaError, UsageError


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, journal: bool = True) -> Iterator[Path]:
    """Yield a temp path next to ``final``; on success fsync and ``os.replace`` it into place.

    On any exception or interruption the temp file is removed and ``final`` is left untouched. The
    temp name ``.{name}.{pid}.XXXX.tmp`` carries the writer's pid, so temp files of killed writers
    are swept by the next write of the same file (a name too long for that is shortened, see
    :func:`side_name`). A full disk, a read-only or unwritable folder raise :class:`DataError` naming
    ``final``, also when a library reports it as a ``RuntimeError`` (FAISS) or without an errno.
    Inside a :func:`transaction` the write is undone if the job fails, unless ``journal`` is False
    (resume scratch that outlives a failed job).
    """
    final = Path(final)
    tmp_path = None
    created = [p for p in [final.parent, *final.parent.parents] if not p.exists()]
    try:
        make_dirs(final.parent)
        for d in reversed(created if journal else []):
            _journal_created(d)
        _sweep_stale_temps(final)
        fd, tmp = tempfile.mkstemp(prefix=f".{short_name(final.name)}.{os.getpid()}.", suffix=".tmp",
                                   dir=final.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; final files get the usual mode
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        _kill_hook(final)
        if journal:
            _journal(final)
        os.replace(tmp_path, final)
    except BaseException as e:
        with signals_blocked():
            full = isinstance(e, (OSError, RuntimeError)) and _disk_full(final.parent)
            if tmp_path is not None:
                with contextlib.suppress(OSError):
                    tmp_path.unlink()
            if not (_JOURNALS and journal):
                for d in created:   # folders made for this file only, deepest first
                    with contextlib.suppress(OSError):
                        d.rmdir()
        if isinstance(e, (OSError, RuntimeError)) and (is_write_error(e) or full):
            raise write_error(final, e, full) from None
        raise


def short_name(name: str, limit: int = 200) -> str:
    """``name`` itself, or (when longer than ``limit`` bytes) its start plus a digest, so that the temp
    and backup names built on it (``.{name}.{pid}.XXXX.tmp``) stay within the 255 bytes of a file name."""
    raw = name.encode()
    if len(raw) <= limit:
        return name
    digest = hashlib.sha256(raw).hexdigest()[:12]
    return raw[:limit - 13].decode("utf-8", "ignore") + "~" + digest


def side_name(path: Path, tag: str) -> Path:
    """A hidden sibling of ``path`` for this process: ``.{name}.{pid}.{tag}`` (name shortened if needed)."""
    return path.with_name(f".{short_name(path.name)}.{os.getpid()}.{tag}")


_JOURNALS: list = []   # open transactions (innermost last) of this process


def _journal(final: Path) -> None:
    """Inside :func:`transaction`: remember ``final`` (and hard-link its old version aside) before it is replaced."""
    if not _JOURNALS:
        return
    entries = _JOURNALS[-1]
    if any(f == final for f, _ in entries):
        return
    backup = None
    if os.path.lexists(final) and not final.is_dir():
        backup = side_name(final, "bak.tmp")
        with contextlib.suppress(FileNotFoundError):
            backup.unlink()
        try:
            os.link(final, backup, follow_symlinks=False)
        except OSError as e:
            raise write_error(final, e) if is_write_error(e) else e
    entries.append((final, backup))


def _journal_created(folder: Path) -> None:
    """Inside :func:`transaction`: a folder this job made; a rollback removes it again when empty."""
    if _JOURNALS:
        _JOURNALS[-1].append((folder, _CREATED))


_CREATED = "created"   # journal mark: a folder the job made (removed on rollback when empty)


def discard(path: str | os.PathLike) -> None:
    """Remove the file or folder ``path``; inside :func:`transaction` it comes back if the job fails."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        if not _JOURNALS:
            shutil.rmtree(path)
            return
        entries = _JOURNALS[-1]
        if any(f == path for f, _ in entries):    # written by this job: nothing to restore
            shutil.rmtree(path)
            return
        backup = side_name(path, "bak.tmp")
        shutil.rmtree(backup, ignore_errors=True)
        with signals_blocked():
            os.replace(path, backup)
            entries.append((path, backup))
        return
    if _JOURNALS:
        _journal(path)
    path.unlink()


def replace_dir(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Move the folder ``src`` onto ``dst`` (renames); the old ``dst`` is moved aside first and
    removed once the job succeeds, or put back if it fails (inside :func:`transaction`)."""
    src, dst = Path(src), Path(dst)
    with transaction():
        if os.path.lexists(dst):
            discard(dst)
        with signals_blocked():
            os.replace(src, dst)
            if _JOURNALS and not any(f == dst for f, _ in _JOURNALS[-1]):
                _JOURNALS[-1].append((dst, None))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def _rollback(entries: list) -> None:
    for final, backup in reversed(entries):
        with contextlib.suppress(OSError):
            if backup == _CREATED:
                final.rmdir()
            elif backup is None:
                _remove(final)
            elif backup.is_dir() and not backup.is_symlink():
                _remove(final)
                os.replace(backup, final)
            else:
                if final.is_dir() and not final.is_symlink():
                    shutil.rmtree(final)
                os.replace(backup, final)


def _commit(entries: list) -> None:
    for _, backup in entries:
        if backup is not None and backup != _CREATED:
            with contextlib.suppress(OSError):
                _remove(backup)


@contextlib.contextmanager
def transaction(rollback_on=BaseException) -> Iterator[None]:
    """Make a job's writes all-or-nothing: on any exception or interruption (``rollback_on``: the
    exception types, or a predicate of the exception, that undo the job) every file the job wrote
    through :func:`atomic_path`, every folder it replaced (:func:`replace_dir`), removed
    (:func:`discard`) or made is removed again, or restored to its previous version. A
    transaction inside another one joins the outer one."""
    if _JOURNALS:
        yield
        return
    entries: list = []
    _JOURNALS.append(entries)
    undo = rollback_on if callable(rollback_on) and not isinstance(rollback_on, type) else \
        (lambda e: isinstance(e, rollback_on))
    try:
        yield
    except BaseException as e:
        with signals_blocked():
            _JOURNALS.remove(entries)
            if undo(e):
                _rollback(entries)
            _commit(entries)
        raise
    else:
        with signals_blocked():
            _JOURNALS.remove(entries)
            _commit(entries)


# ------------------------------------------------------------------------------------------------
# Signals: SIGTERM handled like Ctrl-C


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``timeout``, a container stop, a scheduler) raised in the main thread, as
    Ctrl-C raises KeyboardInterrupt, so the same rollback runs."""


_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _raise_terminated(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def handle_signals() -> Iterator[None]:
    """While the block runs, SIGTERM raises :class:`Terminated` (a KeyboardInterrupt) in the main
    thread; Ctrl-C keeps raising KeyboardInterrupt. Elsewhere than the main thread: no change."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.getsignal(signal.SIGTERM)
    if old is _raise_terminated:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old if old is not None else signal.SIG_DFL)


@contextlib.contextmanager
def signals_blocked() -> Iterator[None]:
    """SIGINT and SIGTERM held back (delivered when the block ends): cleanup is never cut short."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def signal_name(e: BaseException) -> tuple[int, str]:
    return (signal.SIGTERM, "SIGTERM") if isinstance(e, Terminated) else (signal.SIGINT, "SIGINT")


@contextlib.contextmanager
def write_job(directory: str | os.PathLike, purpose: str, rollback_on=BaseException,
              interrupted: Optional[Callable[[], str]] = None) -> Iterator["DirLock"]:
    """The one write path of every writing command: SIGTERM handled like Ctrl-C, the lock of
    ``directory`` (:class:`DirLock`, taken and released with signals held back) and one
    :func:`transaction` (``rollback_on`` as there). An interruption becomes :class:`Interrupted`
    once the job is rolled back and the lock released; its message is ``interrupted (SIGINT); ``
    plus ``interrupted()`` (default: ``nothing was changed``), which says what a rerun resumes from."""
    with handle_signals():
        try:
            with signals_blocked():
                lock = DirLock(directory, purpose).acquire()
            try:
                with transaction(rollback_on):
                    yield lock
            finally:
                with signals_blocked():
                    lock.release()
        except KeyboardInterrupt as e:
            signum, name = signal_name(e)
            with signals_blocked():
                what = interrupted() if interrupted is not None else "nothing was changed"
            raise Interrupted(f"interrupted ({name}); {what}.", signum=int(signum)) from None


# errno values (and the messages of libraries that drop errno, e.g. Arrow, FAISS) that mean "cannot write here"
_WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EFBIG}
_WRITE_TEXTS = ("No space left", "Read-only file system", "Permission denied", "Disk quota exceeded",
                "File too large")


def is_write_error(e: BaseException) -> bool:
    """Whether ``e`` says the file system refuses the write (full, read-only, no permission)."""
    return getattr(e, "errno", None) in _WRITE_ERRNOS or any(t in str(e) for t in _WRITE_TEXTS)


def _disk_full(folder: Path) -> bool:
    """Whether the file system of ``folder`` has (almost) no free space left for this user."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 64 * 1024


def write_error(path: Path, e: BaseException, full: bool = False) -> DataError:
    reason = None
    for t in _WRITE_TEXTS:   # Arrow and FAISS put the OS message inside a longer text
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
        raise DataError(f"{path}: a parent of this path is a file, not a folder. Choose another output "
                        f"location.") from None
    except OSError as e:
        if is_write_error(e):
            raise write_error(path, e) from None
        raise DataError(f"{path}: cannot create the folder ({e.strerror or e}).") from None


def _sweep_stale_temps(final: Path) -> None:
    """Remove the temp files ``.{name}.{pid}.*.tmp`` beside ``final`` whose writer (same host) is no
    longer alive."""
    prefix = f".{short_name(final.name)}."
    for p in final.parent.glob(f"{glob.escape(prefix)}*.tmp"):
        pid = p.name[len(prefix):].split(".", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)) and not p.is_dir():
            with contextlib.suppress(OSError):
                p.unlink()


HOOK_ENV = "CIR_MINE_KILL_BEFORE_REPLACE"
_KILL_COUNTS: dict = {}
_HOOK_SIGNALS = {"KILL": signal.SIGKILL, "INT": signal.SIGINT, "TERM": signal.SIGTERM}


def _kill_hook(final: Path) -> None:
    """The crash-point hook for tests: ``CIR_MINE_KILL_BEFORE_REPLACE=NAME[:N][:SIGNAL]`` sends this
    process SIGNAL (KILL, the default; INT as Ctrl-C does; TERM as ``kill`` does) at the N-th (default
    first) atomic write of a file called NAME, after the temp file is complete and before the rename."""
    spec = os.environ.get(HOOK_ENV)
    if not spec:
        return
    name, *rest = spec.split(":")
    nth = next((x for x in rest if x.isdigit()), "1")
    sig = _HOOK_SIGNALS[next((x for x in rest if not x.isdigit()), "KILL")]
    if final.name == name:
        _KILL_COUNTS[spec] = _KILL_COUNTS.get(spec, 0) + 1
        if _KILL_COUNTS[spec] == int(nth):
            os.kill(os.getpid(), sig)


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


def write_json_atomic(path: str | os.PathLike, obj: Any, journal: bool = True) -> None:
    """Write strict JSON (non-finite numbers as null) atomically (``journal``: see :func:`atomic_path`)."""
    with atomic_path(path, journal) as tmp:
        tmp.write_text(json.dumps(json_safe(obj), indent=2, sort_keys=True, allow_nan=False) + "\n")


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
