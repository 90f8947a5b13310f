"""Scaled positives, captioners: describe a pair's attribute changes as a modification text.

``TemplateCaptioner`` is offline and seeded; ``CommandCaptioner`` pipes the pairs through a user
command (one JSON line in, one caption line out).
"""
from __future__ import annotations

import json
import logging
import shlex
import subprocess
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from cir_mine.data.errors import DataError

from cir_mine.miner.positives.pairs import Change, PairDiff

log = logging.getLogger(__name__)


class Captioner(Protocol):
    def caption(self, pairs: Sequence[PairDiff]) -> list[list[str]]:
        """One list of captions (FashionIQ has two) per pair."""



def phrase_change(ch: Change, style: int) -> str:
    """A FashionIQ-style phrase for one change, e.g. "is sleeveless", "has lace", "is not striped"."""
    from cir_mine.data.synthetic import GROUPS, phrase

    if ch.group in GROUPS and len(ch.added) == 1 and len(ch.removed) == 1:
        return phrase(ch.group, ch.removed[0], ch.added[0], style)
    verbs = {"fabric": ("is {v}", "is made of {v}", "has {v}"), "part": ("has {v}", "has a {v}", "has {v}"),
             "style": ("is more {v}", "is {v}", "looks more {v}"), "category": ("is a {v}", "is a {v}", "is {v}"),
             "color": ("is {v}", "is {v} colored", "is in {v}")}
    neg = {"part": ("has no {v}", "is without {v}"), "style": ("is less {v}", "is not {v}")}
    if ch.added:
        tmpl = verbs.get(ch.group, ("is {v}", "is {v}", "has {v}"))[style % 3]
        return " and ".join(tmpl.format(v=v) for v in ch.added)
    tmpl = neg.get(ch.group, ("is not {v}", "has no {v}"))[style % 2]
    return " and ".join(tmpl.format(v=v) for v in ch.removed)



@dataclass
class TemplateCaptioner:
    """Offline default: phrases from the attribute difference, varied templates, both orders."""

    seed: int = 0

    def caption(self, pairs: Sequence[PairDiff]) -> list[list[str]]:
        rng = np.random.default_rng(self.seed)
        out = []
        for p in pairs:
            parts = [phrase_change(c, int(rng.integers(0, 6))) for c in p.changes]
            other = [phrase_change(c, int(rng.integers(0, 6))) for c in reversed(p.changes)]
            out.append([" and ".join(parts), " and ".join(other)])
        return out



@dataclass
class CommandCaptioner:
    """Any external program: reads JSON lines of pairs on stdin, writes one JSON line per pair with
    ``{"captions": [...]}`` on stdout (so a user with a multimodal LLM can plug one in)."""

    command: str
    timeout: float = 3600.0

    def caption(self, pairs: Sequence[PairDiff]) -> list[list[str]]:
        payload = "".join(json.dumps({
            "ref_id": p.ref_id, "target_id": p.target_id, "category": p.category,
            "changes": [{"group": c.group, "removed": list(c.removed), "added": list(c.added)} for c in p.changes],
        }) + "\n" for p in pairs)
        try:
            r = subprocess.run(shlex.split(self.command), input=payload, capture_output=True, text=True,
                               timeout=self.timeout)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise DataError(f"captioner command {self.command!r} failed to run ({e}).") from None
        if r.returncode != 0:
            raise DataError(f"captioner command {self.command!r} exited with {r.returncode}: "
                            f"{r.stderr.strip()[-300:]}")
        lines = [l for l in r.stdout.splitlines() if l.strip()]
        if len(lines) != len(pairs):
            raise DataError(f"captioner command {self.command!r} returned {len(lines)} lines for {len(pairs)} pairs; "
                            f"it must print one JSON line per input line.")
        out = []
        for i, line in enumerate(lines):
            try:
                caps = json.loads(line)["captions"]
            except (ValueError, KeyError, TypeError):
                raise DataError(f"captioner command {self.command!r}: line {i + 1} is not "
                                f'{{"captions": [...]}}.') from None
            if not isinstance(caps, list) or not any(isinstance(c, str) and c.strip() for c in caps):
                raise DataError(f"captioner command {self.command!r}: line {i + 1} has no caption.")
            out.append([str(c) for c in caps])
        return out

