"""Typed exceptions. The CLI turns each into one ``Error: ...`` line and an exit code (:func:`failure`).

An error about a parameter names it as the Python API spells it (``delta_lo``) and lists it in
``params``; :meth:`CirMineError.render` writes those names the way a front end spells them (the CLI:
``--delta-lo``), so the library never needs to know its command-line flags. A name stands in the
text as a word (``delta_lo must be ...``), or marked: in backticks (`` `split` ``, where the word also
occurs as prose) or inside a command line in backticks (`` `cir-mine index work=W split=S npy` ``:
``name=value`` and bare names are spelled, the rest stays).
"""

from __future__ import annotations

import re
from typing import Callable, Optional


# A parameter named in running text as the API sets it: ``MineConfig.of(rho=...)``, ``MineConfig.of(rho=None)``,
# several at once ``MineConfig.of(delta_lo=..., delta_hi=...)``.
API_CALL = re.compile(r"MineConfig\.of\(([^()]*)\)")
# A parameter marked in backticks, or a command line in backticks whose parameters are spelled.
MARKED = re.compile(r"`((?:cir-mine|cir-train)\b[^`]*|[a-z_][a-z0-9_]*)`")


def spell_calls(text: str, spell: Callable[[str], str]) -> str:
    """``text`` with every ``MineConfig.of(name=...)`` written as ``spell(name)`` and every
    ``MineConfig.of(name=None)`` as ``spell("name=None")`` (several names joined by "/"): how a front
    end (the CLI: ``--rho``, ``--no-guard cap``) shows the hints the library writes in API names."""

    def one(m: re.Match) -> str:
        names = []
        for arg in (a.strip() for a in m.group(1).split(",") if a.strip()):
            name, _, value = arg.partition("=")
            names.append(spell(f"{name.strip()}=None" if value.strip() == "None" else name.strip()))
        return "/".join(names)

    return API_CALL.sub(one, text)


class CirMineError(Exception):
    """Base class for every expected failure; ``exit_code`` is what the CLI exits with."""

    exit_code = 1

    def __init__(self, message: str = "", *, params: tuple = ()):
        super().__init__(message)
        self.params = tuple(params)  # parameter names the message mentions (e.g. "delta_lo", "rho=None")

    def render(self, spell: Callable[[str], str]) -> str:
        """The message with every name in ``params`` replaced by ``spell(name)``: where it is marked (see
        the module's docstring) when it is, else as whole words, never inside a path or a file name
        (``/runs/k/``, ``out.parquet``), longest names first (``rho=None`` is spelled before ``rho``)."""
        text = spell_calls(str(self), spell)
        names, marked = set(self.params), set()

        def token(t: str) -> str:
            name, eq, value = t.partition("=")
            if name not in names:
                return t
            marked.add(name)
            return spell(name) + (" " + value if eq else "")

        def one(m: re.Match) -> str:
            inner = m.group(1)
            if inner in names:
                marked.add(inner)
                return spell(inner)
            if inner.startswith(("cir-mine", "cir-train")):
                return "`" + " ".join(token(t) for t in inner.split(" ")) + "`"
            return m.group(0)

        text = MARKED.sub(one, text)
        for name in sorted(names - marked, key=len, reverse=True):
            text = re.sub(rf"(?<![\w./-]){re.escape(name)}(?![\w=/-]|\.\w)", lambda _: spell(name), text)
        return text


class DataError(CirMineError):
    """An input file is missing, malformed, or inconsistent with another input."""


class SchemaError(DataError):
    """A Parquet table does not match its documented schema (see docs/formats.md)."""


class UsageError(CirMineError):
    """A bad option value or combination (exit code 2, like a CLI usage error)."""

    exit_code = 2


class LockedError(CirMineError):
    """Another process holds the lock of a workspace or run directory."""


class WeightsUnavailableError(CirMineError):
    """Pretrained weights cannot be loaded on this (offline) machine."""


class Interrupted(CirMineError):
    """The job was stopped by Ctrl-C (SIGINT) or ``kill`` (SIGTERM) and rolled back; the message says what
    is left (nothing, or what a rerun resumes from). Exit code 128 + the signal number, as a shell reports it."""

    def __init__(self, message: str = "", *, signum: int = 2, params: tuple = ()):
        super().__init__(message, params=params)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def failure(e: BaseException, spell: Callable[[str], str]) -> Optional[tuple]:
    """How a front end reports ``e``: (message, exit code), parameters written by ``spell``; None for an
    exception that is no expected failure (a bug: let it raise, with its traceback)."""
    if isinstance(e, CirMineError):
        return e.render(spell), e.exit_code
    if isinstance(e, MemoryError):
        return f"out of memory. Lower {spell('batch_size')} or {spell('query_batch')}, or use a smaller index.", 1
    if isinstance(e, OSError) and getattr(e, "filename", None) is not None:  # a file-system failure: name the file
        return f"{e.filename}: {e.strerror or e}.", 1
    if isinstance(e, KeyboardInterrupt):  # outside a write job (jobs raise Interrupted, saying what is left)
        return "interrupted (SIGINT).", 130
    return None
