"""Curriculum: which mix of mined strategies each epoch trains on (and a refresh re-mines).

``--schedule`` uses the miner's syntax (miner.schedule): ``"0:random,2:midzone,4:hardest"`` means
epochs 0-1 use the table's ``random`` rows, epochs 2-3 ``midzone``, 4 on ``hardest`` (easy first,
harder later); ``"0:random;3:midzone:0.7,random:0.3"`` weights a mix. Without a refresh the trainer
samples each query's negatives from the table rows of the strategies in force, in proportion to the
shares (mine a table whose mix holds every strategy the schedule names); with ``--refresh-every``
each refresh re-mines the mix in force at that epoch.
"""
from __future__ import annotations

from dataclasses import dataclass

from miner.schedule import mix_at, parse_schedule


def mix_spec(mix: dict) -> str:
    """{strategy: share} -> the miner's mix string 'midzone:0.7,random:0.3'."""
    return ",".join(f"{name}:{share:g}" for name, share in mix.items())


@dataclass(frozen=True)
class Curriculum:
    spec: str              # the --schedule text
    entries: tuple         # miner.schedule.parse_schedule(spec), as a tuple

    @classmethod
    def parse(cls, text: str) -> "Curriculum":
        return cls(text, tuple(parse_schedule(text)))

    def mix_at(self, epoch: int) -> dict:
        """{strategy: share} in force at 0-based ``epoch`` (shares sum to 1)."""
        return dict(mix_at(list(self.entries), epoch))

    def strategies(self) -> set:
        return {n for e in self.entries for n, _ in e["mix"]}
