"""Signals: SIGTERM handled like Ctrl-C, and cleanup that no signal cuts short."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


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
