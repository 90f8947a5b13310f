"""Signals: SIGTERM handled like Ctrl-C, and cleanup that no signal cuts short."""

from __future__ import annotations

import contextlib
import os
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
    """SIGINT and SIGTERM held back (delivered when the block ends): cleanup is never cut short.

    The calling thread blocks both signals, and in the main thread, where Python runs signal
    handlers, each handler is replaced by one that only notes the signal: another thread (BLAS,
    OpenMP and Arrow pools) may take a signal sent to the process, and Python then runs the
    handler in the main thread whatever that thread blocks. When the block ends the handlers come
    back and the first signal noted is handed to its handler (KeyboardInterrupt, Terminated, or the
    default action)."""
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    main = threading.current_thread() is threading.main_thread()
    noted: list = []
    handlers = {s: signal.getsignal(s) for s in _SIGNALS} if main else {}
    handlers = {s: h for s, h in handlers.items() if h is not None}  # set outside Python: left alone
    for s in handlers:
        signal.signal(s, lambda signum, frame: noted.append(signum))
    try:
        yield
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        if noted:
            _deliver(noted[0], handlers[noted[0]])


def _deliver(signum: int, handler) -> None:
    """Hand a noted signal to the handler it would have met."""
    if callable(handler):
        handler(signum, None)
    elif handler == signal.SIG_DFL:
        os.kill(os.getpid(), signum)


def signal_name(e: BaseException) -> tuple[int, str]:
    return (signal.SIGTERM, "SIGTERM") if isinstance(e, Terminated) else (signal.SIGINT, "SIGINT")
