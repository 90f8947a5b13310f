"""The transaction journal: a job's writes all or nothing.

Inside :func:`transaction` every file written through :func:`cir_mine.data.atomic.atomic_path`,
every folder replaced (:func:`replace_dir`), removed (:func:`discard`) or made is recorded; if the
job fails they are removed again or put back as they were. Open transactions are per process.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from cir_mine.data.files import is_write_error, side_name, write_error
from cir_mine.data.signals import signals_blocked

_JOURNALS: list = []  # open transactions (innermost last) of this process


def in_transaction() -> bool:
    """Whether a :func:`transaction` is open in this process."""
    return bool(_JOURNALS)


def journal_file(final: Path) -> None:
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


def journal_created(folder: Path) -> None:
    """Inside :func:`transaction`: a folder this job made; a rollback removes it again when empty."""
    if _JOURNALS:
        _JOURNALS[-1].append((folder, _CREATED))


_CREATED = "created"  # journal mark: a folder the job made (removed on rollback when empty)


def discard(path: str | os.PathLike) -> None:
    """Remove the file or folder ``path``; inside :func:`transaction` it comes back if the job fails."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        if not _JOURNALS:
            shutil.rmtree(path)
            return
        entries = _JOURNALS[-1]
        if any(f == path for f, _ in entries):  # written by this job: nothing to restore
            shutil.rmtree(path)
            return
        backup = side_name(path, "bak.tmp")
        shutil.rmtree(backup, ignore_errors=True)
        with signals_blocked():
            os.replace(path, backup)
            entries.append((path, backup))
        return
    if _JOURNALS:
        journal_file(path)
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
    through :func:`~cir_mine.data.atomic.atomic_path`, every folder it replaced (:func:`replace_dir`), removed
    (:func:`discard`) or made is removed again, or restored to its previous version. A
    transaction inside another one joins the outer one."""
    if _JOURNALS:
        yield
        return
    entries: list = []
    _JOURNALS.append(entries)
    undo = (
        rollback_on
        if callable(rollback_on) and not isinstance(rollback_on, type)
        else (lambda e: isinstance(e, rollback_on))
    )
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
