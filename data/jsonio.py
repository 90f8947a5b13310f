"""JSON loading that names the file on every failure."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cir_mine.data.errors import DataError


def load_json(path: str | Path, expect: type | tuple = (list, dict), hint: str = "") -> Any:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found.{(' ' + hint) if hint else ''}")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e}).") from None
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}: malformed JSON at line {e.lineno}, column {e.colno} ({e.msg}). Re-download or repair the file."
        ) from None
    if not isinstance(obj, expect):
        names = expect.__name__ if isinstance(expect, type) else " or ".join(t.__name__ for t in expect)
        raise DataError(f"{path}: expected a JSON {names} at the top level, found {type(obj).__name__}.")
    return obj


def require_str(value: Any, path: Path, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{path}: {where} must be a non-empty string, found {value!r}.")
    return value
