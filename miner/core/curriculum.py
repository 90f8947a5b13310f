"""Curricula: which mix of strategies to mine with (and train on) at each epoch or refresh round.

Spec: ``"0:random,2:midzone,4:hardest"`` (epoch:strategy entries separated by commas) or, when an
entry is itself a mix, entries separated by ``;``: ``"0:random;2:midzone:0.7,random:0.3"``.
The parsed schedule is stored in the negatives table's metadata; cir-train reads it with
:func:`mix_at` to know which mix a refresh at a given epoch should mine.
"""

from __future__ import annotations

from dataclasses import dataclass

from cir_mine.data.errors import UsageError

from cir_mine.miner.core.strategies import parse_mix


def parse_schedule(spec: str) -> list[dict]:
    """-> [{"from_epoch": int, "mix": [[name, share], ...]}] sorted by epoch, starting at 0."""
    text = str(spec).strip()
    entries = [e.strip() for e in (text.split(";") if ";" in text else text.split(",")) if e.strip()]
    out = []
    for e in entries:
        epoch, sep, mix = e.partition(":")
        try:
            ep = int(epoch)
        except ValueError:
            raise UsageError(
                f"bad schedule entry {e!r}: use EPOCH:MIX, e.g. 0:random,2:midzone,4:hardest.", params=("schedule",)
            ) from None
        if not sep or ep < 0:
            raise UsageError(f"bad schedule entry {e!r}: use EPOCH:MIX with EPOCH >= 0.", params=("schedule",))
        out.append({"from_epoch": ep, "mix": [[n, w] for n, w in parse_mix(mix)]})
    if not out:
        raise UsageError("empty schedule: use e.g. 0:random,2:midzone,4:hardest.", params=("schedule",))
    out.sort(key=lambda d: d["from_epoch"])
    epochs = [d["from_epoch"] for d in out]
    if len(set(epochs)) != len(epochs):
        raise UsageError(f"schedule {spec!r} names an epoch twice.", params=("schedule",))
    if epochs[0] != 0:
        raise UsageError(f"schedule {spec!r} must start at epoch 0.", params=("schedule",))
    return out


def mix_at(schedule: list[dict], epoch: int) -> list[tuple[str, float]]:
    """The mix in force at ``epoch``: the last entry with from_epoch <= epoch."""
    current = schedule[0]
    for entry in schedule:
        if entry["from_epoch"] <= epoch:
            current = entry
    return [(n, float(w)) for n, w in current["mix"]]


def mix_spec(mix: dict) -> str:
    """{strategy: share} -> the miner's mix string 'midzone:0.7,random:0.3'."""
    return ",".join(f"{name}:{share:g}" for name, share in mix.items())


@dataclass(frozen=True)
class Curriculum:
    # fmt: off
    spec: str              # the --schedule text
    entries: tuple         # parse_schedule(spec), as a tuple
    # fmt: on

    @classmethod
    def parse(cls, text: str) -> "Curriculum":
        return cls(text, tuple(parse_schedule(text)))

    def mix_at(self, epoch: int) -> dict:
        """{strategy: share} in force at 0-based ``epoch`` (shares sum to 1)."""
        return dict(mix_at(list(self.entries), epoch))

    def strategies(self) -> set:
        return {n for e in self.entries for n, _ in e["mix"]}
