"""Scaled positives, captioners: describe a pair's attribute changes as a modification text.

``TemplateCaptioner`` is offline and seeded; ``CommandCaptioner`` pipes the pairs through a user
command (one JSON line in, one caption line out).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shlex
import subprocess
import threading
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from cir_mine.data.checks import check_range
from cir_mine.data.errors import DataError, UsageError

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
    verbs = {
        "fabric": ("is {v}", "is made of {v}", "has {v}"),
        "part": ("has {v}", "has a {v}", "has {v}"),
        "style": ("is more {v}", "is {v}", "looks more {v}"),
        "category": ("is a {v}", "is a {v}", "is {v}"),
        "color": ("is {v}", "is {v} colored", "is in {v}"),
    }
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
    ``{"captions": [...]}`` on stdout (so a user with a multimodal LLM can plug one in).

    What is read back is bounded: at most one line per pair, ``max_line_bytes`` per line,
    ``max_total_bytes`` in all and ``timeout`` seconds; past a bound the program is killed and a
    DataError says which bound it crossed.
    """

    # fmt: off
    command: str                            # program reading JSON lines of pairs on stdin
    timeout: float = 3600.0                 # seconds the program may run
    max_line_bytes: int = 64 * 1024         # bytes per output line
    max_total_bytes: int = 256 * 1024 ** 2  # bytes of output in all
    # fmt: on

    def caption(self, pairs: Sequence[PairDiff]) -> list[list[str]]:
        payload = "".join(
            json.dumps(
                {
                    "ref_id": p.ref_id,
                    "target_id": p.target_id,
                    "category": p.category,
                    "changes": [
                        {"group": c.group, "removed": list(c.removed), "added": list(c.added)} for c in p.changes
                    ],
                }
            )
            + "\n"
            for p in pairs
        ).encode()
        lines = self._run(payload, len(pairs))
        if len(lines) != len(pairs):
            raise DataError(
                f"captioner command {self.command!r} returned {len(lines)} lines for {len(pairs)} pairs; "
                f"it must print one JSON line per input line."
            )
        out = []
        for i, line in enumerate(lines):
            try:
                caps = json.loads(line)["captions"]
            except (ValueError, KeyError, TypeError):
                raise DataError(
                    f'captioner command {self.command!r}: line {i + 1} is not {{"captions": [...]}}.'
                ) from None
            if not isinstance(caps, list) or not any(isinstance(c, str) and c.strip() for c in caps):
                raise DataError(f"captioner command {self.command!r}: line {i + 1} has no caption.")
            out.append([str(c) for c in caps])
        return out

    def _run(self, payload: bytes, n_lines: int) -> list[str]:
        """Run the program, feed ``payload``, read at most ``n_lines`` non-empty lines within the bounds."""
        try:
            proc = subprocess.Popen(
                shlex.split(self.command), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
        except (OSError, ValueError) as e:
            raise DataError(f"captioner command {self.command!r} failed to run ({e}).") from None
        lines: list[bytes] = []
        state = {"error": None}
        tail = bytearray()

        def stop(why: str) -> None:
            state["error"] = why
            with contextlib.suppress(OSError):
                proc.kill()

        def feed() -> None:
            with contextlib.suppress(OSError):  # a program that stops reading early
                proc.stdin.write(payload)
            with contextlib.suppress(OSError):
                proc.stdin.close()

        def read_out() -> None:
            buf, total = b"", 0
            while True:
                chunk = proc.stdout.read1(1 << 16)
                if not chunk:
                    break
                total += len(chunk)
                if total > self.max_total_bytes:
                    return stop(f"printed more than {self.max_total_bytes} bytes")
                buf += chunk
                *done, buf = buf.split(b"\n")
                for ln in done:
                    if len(ln) > self.max_line_bytes:
                        return stop(f"printed a line longer than {self.max_line_bytes} bytes")
                    if ln.strip():
                        lines.append(ln)
                        if len(lines) > n_lines:
                            return stop(
                                f"printed more than {n_lines} lines for {n_lines} pairs; it must print "
                                f"one JSON line per input line"
                            )
                if len(buf) > self.max_line_bytes:
                    return stop(f"printed a line longer than {self.max_line_bytes} bytes")
            if buf.strip():
                lines.append(buf)

        def read_err() -> None:
            while True:
                chunk = proc.stderr.read1(1 << 16)
                if not chunk:
                    break
                tail.extend(chunk)
                del tail[:-2000]

        threads = [threading.Thread(target=f, daemon=True) for f in (feed, read_out, read_err)]
        for t in threads:
            t.start()
        try:
            rc = proc.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            stop(
                f"gave no complete answer within {self.timeout:g} s and was stopped; raise `command_timeout` "
                f"or check the command"
            )
            rc = proc.wait()
        for t in threads:
            t.join(5)
        if state["error"]:
            raise DataError(
                f"captioner command {self.command!r} {state['error']}.",
                params=("command_timeout",) if "`command_timeout`" in state["error"] else (),
            )
        if rc != 0:
            raise DataError(
                f"captioner command {self.command!r} exited with {rc}: {tail.decode('utf-8', 'replace').strip()[-300:]}"
            )
        return [ln.decode("utf-8", "replace") for ln in lines]


# the captioners ``make_captioner`` knows, by name
CAPTIONERS = ("template", "command")


def make_captioner(captioner: str, command: dict, seed: int = 0) -> Captioner:
    """The captioner named ``captioner``: template (offline, seeded with ``seed``) or command (a
    :class:`CommandCaptioner` of ``command``'s fields; its ``timeout`` is checked either way)."""
    if captioner == "command" and not command["command"]:
        raise UsageError("`captioner` command needs `command` PROGRAM.", params=("captioner", "command"))
    if captioner not in CAPTIONERS:
        raise UsageError(f"unknown captioner {captioner!r}: use template or command.")
    check_range("command_timeout", command["timeout"], 0.0, None, lo_open=True)
    return CommandCaptioner(**command) if captioner == "command" else TemplateCaptioner(seed)
