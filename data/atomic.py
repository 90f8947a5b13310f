"""Atomic writes: no half-written file is ever visible under its final name."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from cir_mine.data.crash import crash_point
from cir_mine.data.files import (
    current_umask,
    disk_full,
    is_write_error,
    make_dirs,
    pid_alive,
    short_name,
    write_error,
)
from cir_mine.data.journal import in_transaction, journal_created, journal_file
from cir_mine.data.signals import signals_blocked


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, journal: bool = True) -> Iterator[Path]:
    """Yield a temp path next to ``final``; on success fsync and ``os.replace`` it into place.

    On any exception or interruption the temp file is removed and ``final`` is left untouched. The
    temp name ``.{name}.{pid}.XXXX.tmp`` carries the writer's pid, so temp files of killed writers
    are swept by the next write of the same file (a name too long for that is shortened, see
    :func:`~cir_mine.data.files.side_name`). A full disk, a read-only or unwritable folder raise :class:`DataError` naming
    ``final``, also when a library reports it as a ``RuntimeError`` (FAISS) or without an errno.
    Between the complete temp file and the rename lies the crash point ``final``'s name
    (:mod:`cir_mine.data.crash`).
    Inside a :func:`~cir_mine.data.journal.transaction` the write is undone if the job fails, unless ``journal`` is False
    (resume scratch that outlives a failed job).
    """
    final = Path(final)
    tmp_path = None
    created = [p for p in [final.parent, *final.parent.parents] if not p.exists()]
    try:
        make_dirs(final.parent)
        for d in reversed(created if journal else []):
            journal_created(d)
        _sweep_stale_temps(final)
        with signals_blocked():  # a signal between making the temp file and holding its name would leak it
            fd, tmp = tempfile.mkstemp(
                prefix=f".{short_name(final.name)}.{os.getpid()}.", suffix=".tmp", dir=final.parent
            )
            os.close(fd)
            tmp_path = Path(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; final files get the usual mode
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        crash_point(final.name)
        if journal:
            journal_file(final)
        os.replace(tmp_path, final)
    except BaseException as e:
        with signals_blocked():
            full = isinstance(e, (OSError, RuntimeError)) and disk_full(final.parent)
            if tmp_path is not None:
                with contextlib.suppress(OSError):
                    tmp_path.unlink()
            if not (in_transaction() and journal):
                for d in created:  # folders made for this file only, deepest first
                    with contextlib.suppress(OSError):
                        d.rmdir()
        if isinstance(e, (OSError, RuntimeError)) and (is_write_error(e) or full):
            raise write_error(final, e, full) from None
        raise


def _sweep_stale_temps(final: Path) -> None:
    """Remove the temp files ``.{name}.{pid}.*.tmp`` beside ``final`` whose writer (same host) is no
    longer alive."""
    prefix = f".{short_name(final.name)}."
    for p in final.parent.glob(f"{glob.escape(prefix)}*.tmp"):
        pid = p.name[len(prefix) :].split(".", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)) and not p.is_dir():
            with contextlib.suppress(OSError):
                p.unlink()


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
