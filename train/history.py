"""A run's history on disk: one record per epoch, ``metrics.jsonl`` (rewritten whole, so a resumed run
never duplicates lines) and ``curves.png``."""

from __future__ import annotations

import json
from pathlib import Path


def epoch_record(metrics: dict) -> dict:
    """Per-epoch record: top-level numbers plus per-category R@10 as 'R@10/cat'."""
    out = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    for cat, v in metrics.get("per_category", {}).items():
        out.update({f"{k}/{cat}": x for k, x in v.items() if k.startswith("R@")})
    return out


def write_history(path: Path, history: list) -> None:
    """One JSON line per epoch, rewritten atomically from the run's history (so a resumed run never
    duplicates lines); a non-finite number is written as null (JSON has no NaN)."""
    from cir_mine.data.io import atomic_path, json_safe

    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(json_safe(x), sort_keys=True, allow_nan=False) + "\n" for x in history))


def plot_curves(history: list, path: Path) -> None:
    """Loss and R@10 per epoch -> PNG (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from cir_mine.data.io import atomic_path

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    ep = [h["epoch"] for h in history]
    a.plot(ep, [h["loss"] for h in history], marker="o")
    a.set_xlabel("epoch"), a.set_ylabel("loss"), a.set_title("training loss")
    for key in ("R@10", "R@50"):
        b.plot(ep, [h.get(key, float("nan")) for h in history], marker="o", label=key)
    b.set_xlabel("epoch"), b.set_ylabel("recall (%)"), b.set_title("evaluation"), b.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
