"""What cir-train and ``cir-mine demo`` say about a run, as text: one function per result. They return
lines joined by newlines and print nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

# the overall metrics a run's summary line shows, in order, where the run has them
SUMMARY_METRICS = ("R@1", "R@5", "R@10", "R@50", "Rs@1", "Rs@2", "Rs@3")


def epoch_line(rec: dict) -> str:
    """One epoch's record: ``epoch 3: loss 1.2345  R@10 41.20``."""
    return f"epoch {rec['epoch']}: loss {rec['loss']:.4f}  R@10 {rec.get('R@10', float('nan')):.2f}"


def run_lines(out: str | Path, m: dict) -> str:
    """A finished run's metrics (``metrics.json``): overall, per category, and where its files are."""
    keys = [k for k in SUMMARY_METRICS if k in m]
    lines = [f"{out}: {m['model']} after {m['epochs']} epoch(s): " + "  ".join(f"{k} {m[k]:.2f}" for k in keys)]
    lines += [
        f"  {cat}: R@10 {v['R@10']:.2f}  R@50 {v['R@50']:.2f}  ({v['n']} queries)"
        for cat, v in m.get("per_category", {}).items()
    ]
    lines.append(f"metrics: {Path(out) / 'metrics.json'}  curves: {Path(out) / 'curves.png'}")
    return "\n".join(lines)


def demo_lines(out: Path, res) -> str:
    """The demo's table of runs (:class:`cir_mine.train.demo.DemoResult`), its tables, runs and time."""
    lines = ["", f"{'run':<20s} {'R@10':>7s} {'R@50':>7s}   (dev queries held out of {res.work})"]
    lines += [f"{name:<20s} {r['R@10']:7.2f} {r['R@50']:7.2f}" for name, r in res.runs.items()]
    lines += [
        "",
        f"negatives tables: {', '.join(str(p) for p in res.tables.values())}",
        f"runs (metrics.json, curves.png, ckpt.pt): {out / 'runs'}/",
        f"done in {res.seconds:.0f}s",
    ]
    return "\n".join(lines)


def ignored_line(resume: str | Path, ignored: list, spell: Callable[[str], str]) -> str:
    """The warning that options given beside ``resume`` are ignored (``ignored``: (name, value as typed,
    the run's value) each, as cir_mine.data.options.changed_options finds them; names written by ``spell``)."""
    shown = ", ".join(f"{spell(name)} {value} (the run's: {was})" for name, value, was in ignored)
    return f"warning: {spell('resume')} {resume} continues with the run's own options; ignored: {shown}."
