"""Output paths: refused before anything is written (an input, a workspace's own file, a folder
where a file goes, an existing file without overwrite)."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path
from typing import Sequence

from cir_mine.data.errors import DataError, UsageError

# A workspace's own files: the tables, indexes, manifest and lock (see docs/formats.md).
WORKSPACE_FILE_RE = re.compile(
    r"^(gallery|triplets)\.[^/]+\.parquet$|^index\.[^/]+\.faiss(\.json)?$"
    r"|^manifest\.json$|^\.cir-mine\.lock$"
)


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
    except RuntimeError:  # a symlink loop (Python < 3.13)
        raise DataError(f"{path}: is a symlink loop. Point it at a real file.") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise DataError(f"{path}: is a symlink loop. Point it at a real file.") from None
        raise


def param_name(name: str) -> str:
    """The parameter an output is given by: ``out``, ``work`` (a command-line spelling such as
    ``--work`` is read as its parameter)."""
    return name.lstrip("-").replace("-", "_")


def check_output(
    out: str | os.PathLike,
    reads: Sequence = (),
    overwrite: bool = False,
    flag: str = "out",
    workspace_files: bool = True,
) -> Path:
    """Refuse an output file before anything is written; returns ``out``.

    Refused (:class:`UsageError`, exit 2): ``out`` is an existing folder, a path below a file, one of
    the files the command reads (``reads``; paths resolved, symlinks and hard links included), a
    workspace's own file (gallery, triplets, index, manifest or lock; unless ``workspace_files`` is
    False, for the commands that write a workspace), or an existing file without ``overwrite``.
    The messages name the output by ``flag``, the parameter that gives it (see :func:`param_name`).
    """
    flag = param_name(flag)
    out = Path(out)
    real = _resolve(out)
    for parent in real.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(
                    f"{flag} {out}: {parent} is a file, not a folder. Choose another {flag}.", params=(flag,)
                )
            break
    if real.is_dir():
        raise UsageError(
            f"{flag} {out}: is a folder; {flag} names the file to write "
            f"(e.g. {out / ('out' + (out.suffix or '.parquet'))}).",
            params=(flag,),
        )
    for r in reads:
        if r is None:
            continue
        r = Path(r)
        if same_file(real, r):
            raise UsageError(
                f"{flag} {out}: is an input of this command ({r}). Choose another {flag}; "
                f"outputs never replace inputs.",
                params=(flag,),
            )
    if workspace_files and WORKSPACE_FILE_RE.match(real.name) and is_workspace(real.parent):
        raise UsageError(
            f"{flag} {out}: is a file of the workspace {real.parent}. Choose another {flag}; "
            f"a workspace's files are written only by synth, embed and index.",
            params=(flag,),
        )
    if real.exists() and not overwrite:
        raise UsageError(
            f"{flag} {out}: already exists. Pass overwrite to replace it, or choose another {flag}.",
            params=(flag, "overwrite"),
        )
    return out


def check_output_dir(out: str | os.PathLike, reads: Sequence = (), flag: str = "out") -> Path:
    """Refuse an output folder that is a file, lies below a file, or holds (or is) an input (the
    messages name it by ``flag``, as :func:`check_output` does)."""
    flag = param_name(flag)
    out = Path(out)
    real = _resolve(out)
    if real.exists() and not real.is_dir():
        raise UsageError(f"{flag} {out}: is a file, not a folder. Choose another {flag}.", params=(flag,))
    for parent in real.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(
                    f"{flag} {out}: {parent} is a file, not a folder. Choose another {flag}.", params=(flag,)
                )
            break
    for r in reads:
        if r is None:
            continue
        rr = _resolve(Path(r))
        if rr == real:
            raise UsageError(f"{flag} {out}: is an input of this command ({r}). Choose another {flag}.", params=(flag,))
    return out
