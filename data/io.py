"""The one write path of every writing command (:func:`write_job`), and the names it is built from.

A writing command checks its output first (:mod:`cir_mine.data.outputs`), then runs as one
:func:`write_job`: SIGTERM handled like Ctrl-C (:mod:`cir_mine.data.signals`), the lock of the
output's directory (:mod:`cir_mine.data.lock`) and one transaction (:mod:`cir_mine.data.journal`)
over atomic writes (:mod:`cir_mine.data.atomic`).
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, Optional

from cir_mine.data.atomic import atomic_path, json_safe, write_json_atomic
from cir_mine.data.errors import Interrupted
from cir_mine.data.files import check_readable_file, is_write_error, make_dirs, short_name, side_name, write_error
from cir_mine.data.journal import discard, replace_dir, transaction
from cir_mine.data.lock import DirLock
from cir_mine.data.outputs import WORKSPACE_FILE_RE, check_output, check_output_dir, is_workspace, same_file
from cir_mine.data.parquet import read_parquet, read_parquet_schema
from cir_mine.data.signals import Terminated, handle_signals, signal_name, signals_blocked

__all__ = [
    "atomic_path",
    "json_safe",
    "write_json_atomic",
    "check_readable_file",
    "is_write_error",
    "make_dirs",
    "short_name",
    "side_name",
    "write_error",
    "discard",
    "replace_dir",
    "transaction",
    "DirLock",
    "WORKSPACE_FILE_RE",
    "check_output",
    "check_output_dir",
    "is_workspace",
    "same_file",
    "read_parquet",
    "read_parquet_schema",
    "Terminated",
    "handle_signals",
    "signal_name",
    "signals_blocked",
    "write_job",
]


@contextlib.contextmanager
def write_job(
    directory: str | os.PathLike,
    purpose: str,
    rollback_on=BaseException,
    interrupted: Optional[Callable[[], str]] = None,
    params: tuple = (),
) -> Iterator["DirLock"]:
    """The one write path of every writing command: SIGTERM handled like Ctrl-C, the lock of
    ``directory`` (:class:`DirLock`, taken and released with signals held back) and one
    :func:`transaction` (``rollback_on`` as there). An interruption becomes :class:`Interrupted`
    once the job is rolled back and the lock released; its message is ``interrupted (SIGINT); ``
    plus ``interrupted()`` (default: ``nothing was changed``), which says what a rerun resumes from
    (``params``: the parameters that text names, see :class:`~cir_mine.data.errors.CirMineError`)."""
    with handle_signals():
        try:
            lock = None
            try:
                with signals_blocked():  # a signal held back here arrives as the block ends, lock held
                    lock = DirLock(directory, purpose).acquire()
                with transaction(rollback_on):
                    yield lock
            finally:
                if lock is not None:
                    with signals_blocked():
                        lock.release()
        except KeyboardInterrupt as e:
            signum, name = signal_name(e)
            with signals_blocked():
                what = interrupted() if interrupted is not None else "nothing was changed"
            raise Interrupted(f"interrupted ({name}); {what}.", signum=int(signum), params=params) from None
