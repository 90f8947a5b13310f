"""Curriculum: which mix of mined strategies each epoch trains on.

``--schedule "0:random,2:midzone,4:hardest"`` means epochs 0-1 use the table's ``random`` rows,
epochs 2-3 ``midzone``, 4 on ``hardest`` (easy first, harder later). A mix may weight several
strategies: ``"0:random,3:random=0.5+midzone=0.5"``. The trainer samples each query's negatives
from the table rows of the strategies in the mix, in proportion to the weights.
"""
from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass

from data.errors import UsageError


def parse_mix(text: str) -> dict:
    """'random=0.5+midzone=0.5' | 'midzone' -> {strategy: weight}, weights summing to 1."""
    mix = {}
    for part in text.replace("/", "+").split("+"):
        part = part.strip()
        if not part:
            continue
        name, _, w = part.partition("=")
        try:
            weight = float(w) if w else 1.0
        except ValueError:
            raise UsageError(f"--schedule: weight {w!r} of {name!r} is not a number.") from None
        if weight < 0:
            raise UsageError(f"--schedule: weight of {name!r} must be >= 0.")
        mix[name.strip()] = mix.get(name.strip(), 0.0) + weight
    total = sum(mix.values())
    if not mix or total <= 0:
        raise UsageError(f"--schedule: mix {text!r} names no strategy with a positive weight.")
    return {k: v / total for k, v in mix.items()}


@dataclass(frozen=True)
class Curriculum:
    starts: tuple          # sorted epochs (0-based) where a mix starts
    mixes: tuple           # the mix (strategy -> weight) from that epoch on

    @classmethod
    def parse(cls, text: str) -> "Curriculum":
        entries = {}
        for item in text.split(","):
            item = item.strip()
            if not item:
                continue
            epoch, sep, mix = item.partition(":")
            if not sep or not epoch.strip().isdigit():
                raise UsageError(f"--schedule: entry {item!r} is not EPOCH:MIX "
                                 f"(e.g. \"0:random,2:midzone,4:hardest\").")
            entries[int(epoch)] = parse_mix(mix)
        if 0 not in entries:
            raise UsageError("--schedule: the first entry must start at epoch 0 (e.g. \"0:random,...\").")
        starts = tuple(sorted(entries))
        return cls(starts, tuple(entries[s] for s in starts))

    def mix_at(self, epoch: int) -> dict:
        return self.mixes[bisect_right(self.starts, epoch) - 1]

    def strategies(self) -> set:
        return {s for m in self.mixes for s in m}
