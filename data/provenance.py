"""What produced a file: the library versions and the time, written into manifests and footers."""

from __future__ import annotations

import datetime as _dt
import platform


def library_versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("numpy", "pyarrow", "faiss-cpu", "faiss-gpu-cu12", "torch", "open_clip_torch", "duckdb"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
