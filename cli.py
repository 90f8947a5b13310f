"""Command-line entry points: ``cir-mine`` and ``cir-train``.

Thin by design: each command parses options, calls one library function, and renders the result.
Library code raises typed exceptions (data.errors); :func:`cli_errors` turns them into one
``Error: ...`` line on stderr and exit code 1 (2 for usage errors), without a traceback.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import sys
from pathlib import Path
from typing import Iterator, List, Optional

import typer

from data.errors import CirMineError

mine_app = typer.Typer(
    name="cir-mine",
    help="Offline hard-negative mining for composed image retrieval (CIR).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
train_app = typer.Typer(
    name="cir-train",
    help="Train a CIR combiner on cached features with mined negatives.",
    add_completion=False,
    pretty_exceptions_enable=False,
)


# ------------------------------------------------------------------------------------------------
# Shared plumbing


def fail(message: str, code: int = 1) -> None:
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(code)


def cli_errors(fn):
    """Turn library exceptions into ``Error: ...`` and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CirMineError as e:
            fail(str(e), e.exit_code)
        except MemoryError:
            fail("out of memory. Lower --batch-size or --query-batch, or use a smaller index.")
        except KeyboardInterrupt:
            fail("interrupted; rerun the same command to resume.", 130)

    return wrapper


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@contextlib.contextmanager
def progress_bar(label: str, total: Optional[int], quiet: bool = False, unit: str = "items") -> Iterator:
    """Yield ``advance(n)``; a rich bar on stderr unless ``quiet`` or stderr is not a TTY."""
    if quiet or not sys.stderr.isatty():
        yield lambda n=1: None
        return
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeRemainingColumn)

    class Rate(TextColumn):
        def render(self, task):
            speed = task.finished_speed or task.speed
            from rich.text import Text

            return Text(f"{speed:,.0f} {unit}/s" if speed else "")

    cols = [TextColumn(label), BarColumn(), MofNCompleteColumn(), Rate(""), TimeRemainingColumn()]
    with Progress(*cols, console=Console(stderr=True), transient=False) as prog:
        task = prog.add_task(label, total=total)
        yield lambda n=1: prog.advance(task, n)


QUIET = typer.Option(False, "--quiet", "-q", help="No progress bar.")
VERBOSE = typer.Option(False, "--verbose", "-v", help="Log what each stage does.")
WORK = typer.Option(..., "--work", "-w", help="Workspace directory (see docs/formats.md).")
SPLIT = typer.Option("train", "--split", "-s", help="Split name (gallery.{split}.parquet).")


# ------------------------------------------------------------------------------------------------
# cir-mine: workspace commands


@mine_app.command()
@cli_errors
def synth(
    out: Path = typer.Option(..., "--out", "-o", help="Workspace directory to write."),
    n_gallery: int = typer.Option(20000, "--n-gallery", help="Gallery images (targets included)."),
    n_triplets: int = typer.Option(5000, "--n-triplets", help="Queries (reference + caption -> target)."),
    dim: int = typer.Option(128, "--dim", help="Embedding dimension."),
    seed: int = typer.Option(0, "--seed", help="World and item seed (same seed, same files)."),
    split: str = SPLIT,
    salience: Optional[str] = typer.Option(None, "--salience", help="Per-group weights, e.g. color=1.0,sleeve=0.5."),
    item_noise: float = typer.Option(2.0, "--item-noise", help="Per-image noise norm."),
    text_noise: float = typer.Option(1.0, "--text-noise", help="Per-caption noise norm."),
    unmentioned: float = typer.Option(0.15, "--unmentioned-change", help="Chance a target also differs in an unmentioned group."),
    quiet: bool = QUIET,
):
    """Generate a synthetic CIR world (gallery + triplets with ground-truth attributes)."""
    from data.synthetic import SynthConfig, generate, parse_salience

    cfg = SynthConfig(n_gallery=n_gallery, n_triplets=n_triplets, dim=dim, seed=seed, split=split,
                      salience=parse_salience(salience), item_noise=item_noise, text_noise=text_noise,
                      unmentioned_change=unmentioned)
    with progress_bar("synth", n_gallery + n_triplets, quiet) as advance:
        state = {"done": 0}

        def cb(done, total):
            advance(done - state["done"])
            state["done"] = done

        manifest = generate(cfg, out, progress=cb)
    typer.echo(f"wrote {out}: {manifest['counts']} (d={manifest['dim']})")


@mine_app.command()
@cli_errors
def info(work: Path = WORK):
    """Validate a workspace and print its splits, counts and manifest."""
    from data.workspace import Workspace

    ws = Workspace(work).require()
    m = ws.manifest()
    typer.echo(f"workspace {ws.root}  (manifest {'derived' if m.get('derived') else 'manifest.json'}, hash {ws.manifest_hash()})")
    typer.echo(f"encoder: {m.get('encoder', {}).get('name')}  dim: {m.get('dim')}  source: {m.get('source')}")
    for split in ws.splits():
        g, t = ws.load(split) if ws.triplets_path(split).exists() else (ws.gallery(split), None)
        cats = sorted(set(g.categories.tolist()))
        typer.echo(f"  {split}: {len(g)} images, {0 if t is None else len(t)} triplets, "
                   f"categories: {', '.join(c or '-' for c in cats)}  [valid]")


class Dataset(str, __import__("enum").Enum):
    fashioniq = "fashioniq"
    cirr = "cirr"


@mine_app.command()
@cli_errors
def check(
    dataset: Dataset = typer.Option(..., "--dataset", "-d", help="Annotation layout."),
    root: Path = typer.Option(..., "--root", "-r", help="Dataset root (captions/, image_splits/, ...)."),
    split: str = SPLIT,
):
    """Read a dataset's annotations and print what they hold (no embedding)."""
    from data.adapters import load_dataset

    images, queries = load_dataset(dataset.value, root, split)
    with_path = sum(1 for i in images if i.path)
    with_attr = sum(1 for i in images if i.attributes)
    cats = sorted({q.category for q in queries})
    typer.echo(f"{dataset.value} {split}: {len(images)} images ({with_path} with image files, "
               f"{with_attr} with attributes), {len(queries)} queries, categories: "
               f"{', '.join(c or '-' for c in cats)}")


# ------------------------------------------------------------------------------------------------
# cir-mine demo


@mine_app.command()
@cli_errors
def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", "-o", help="Where the demo writes its workspace and runs."),
    quiet: bool = QUIET,
):
    """Run the synthetic default through every stage and print what happened."""
    from data.synthetic import SynthConfig, generate

    work = out / "work"
    m = generate(SynthConfig(n_gallery=20000, n_triplets=5000, dim=128, seed=0), work)
    typer.echo(f"[1/1] synthetic world -> {work}: {m['counts']} (d={m['dim']})")


# ------------------------------------------------------------------------------------------------
# cir-train


# -- issue 5 (cir-train): training, refresh, evaluation ------------------------------------------


@train_app.command()
@cli_errors
def train(
    work: Optional[Path] = typer.Option(None, "--work", "-w", help="Workspace with the training split (not needed with --resume)."),
    split: str = SPLIT,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory (checkpoints, metrics, curves)."),
    negatives: Optional[Path] = typer.Option(None, "--negatives", "-n", help="Negatives table (cir-mine negatives); without it: in-batch negatives only."),
    eval_work: Optional[Path] = typer.Option(None, "--eval-work", help="Evaluation workspace (default: hold out --dev-fraction of the training queries)."),
    eval_split: str = typer.Option("val", "--eval-split", help="Split of --eval-work."),
    dev_fraction: float = typer.Option(0.1, "--dev-fraction", help="Seeded share of training queries held out for evaluation when no --eval-work."),
    dev_seed: int = typer.Option(0, "--dev-seed", help="Seed of the held-out dev queries (fixed across --seed)."),
    epochs: int = typer.Option(10, "--epochs", "-e", help="Training epochs (0: zero-shot evaluation)."),
    batch_size: int = typer.Option(256, "--batch-size", "-b", help="Queries per step (in-batch negatives)."),
    seed: int = typer.Option(0, "--seed", help="Seed of init, shuffles, negative sampling and the dev split."),
    model: str = typer.Option("combiner", "--model", help="combiner (CLIP4Cir) or attention (gated attention fusion)."),
    width: float = typer.Option(2.0, "--width", help="Projection width as a multiple of d (hidden = 2x)."),
    dropout: float = typer.Option(0.1, "--dropout", help="Dropout inside the model."),
    lr: float = typer.Option(1e-3, "--lr", help="AdamW learning rate."),
    weight_decay: float = typer.Option(1e-4, "--weight-decay", help="AdamW weight decay."),
    lr_schedule: str = typer.Option("cosine", "--lr-schedule", help="cosine (decay to 0 over training) or constant."),
    temperature: float = typer.Option(0.05, "--temperature", help="Softmax temperature (InfoNCE, static bank)."),
    loss: str = typer.Option("infonce", "--loss", help="infonce, triplet or both."),
    margin: float = typer.Option(0.2, "--margin", help="Triplet margin in cosine distance."),
    triplet_weight: float = typer.Option(1.0, "--triplet-weight", help="Weight of the triplet terms."),
    neg_per_query: int = typer.Option(4, "--neg-per-query", help="Mined negatives per query per step."),
    neg_share: float = typer.Option(1.0, "--neg-share", help="Share of queries per batch that get mined negatives."),
    share_warmup: int = typer.Option(0, "--share-warmup", help="Epochs over which --neg-share ramps up from 0."),
    schedule: Optional[str] = typer.Option(None, "--schedule", help='Mix per epoch, e.g. "0:random,2:midzone,4:hardest".'),
    category_batches: bool = typer.Option(False, "--category-batches", help="Draw each batch within one category (in-batch negatives of the target's category)."),
    online_hard: int = typer.Option(0, "--online-hard", help="Hardest in-batch non-targets per query fed to a triplet loss."),
    static_bank: int = typer.Option(0, "--static-bank", help="Extra epochs of the SPN static-bank stage (whole gallery as negatives)."),
    bank_k: int = typer.Option(0, "--bank-k", help="Static bank: gallery negatives sampled per step (0 = all)."),
    refresh_every: int = typer.Option(0, "--refresh-every", help="Re-embed queries and re-mine every N epochs."),
    exclude_reference: bool = typer.Option(False, "--exclude-reference", help="FashionIQ protocol: remove the reference from the gallery."),
    zero_shot: bool = typer.Option(False, "--zero-shot", help="Evaluate normalize(image + text) without training."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this directory."),
    threads: int = typer.Option(0, "--threads", help="Torch threads (0 = default)."),
    quiet: bool = QUIET,
    verbose: bool = VERBOSE,
):
    """Train a combiner on cached features with in-batch and mined negatives; evaluate every epoch."""
    from data.errors import UsageError
    from train.loop import TrainConfig, resume_config, train as run_training

    setup_logging(verbose)
    if resume is not None:
        cfg = resume_config(resume)
    else:
        if work is None or out is None:
            raise UsageError("--work and --out are required (or --resume RUN to continue a run).")
        cfg = TrainConfig(
            work=str(work), split=split, out=str(out), negatives=str(negatives) if negatives else None,
            eval_work=str(eval_work) if eval_work else None, eval_split=eval_split,
            dev_fraction=dev_fraction, dev_seed=dev_seed, epochs=epochs, batch_size=batch_size, seed=seed, model=model,
            width=width, dropout=dropout, lr=lr, weight_decay=weight_decay, lr_schedule=lr_schedule, temperature=temperature,
            loss=loss, margin=margin, triplet_weight=triplet_weight, neg_per_query=neg_per_query,
            neg_share=neg_share, share_warmup=share_warmup, schedule=schedule, category_batches=category_batches, online_hard=online_hard,
            static_bank=static_bank, bank_k=bank_k, refresh_every=refresh_every,
            exclude_reference=exclude_reference, zero_shot=zero_shot, threads=threads)
    remine = _miner_remine(cfg) if cfg.validate().refresh_every else None
    total = 0 if cfg.zero_shot or cfg.epochs == 0 else cfg.epochs + cfg.static_bank
    with progress_bar("train", total, quiet, unit="epochs") as advance:
        def on_epoch(rec):
            advance(1)
            if not quiet:
                typer.echo(f"epoch {rec['epoch']}: loss {rec['loss']:.4f}  R@10 {rec.get('R@10', float('nan')):.2f}", err=True)

        m = run_training(cfg, remine=remine, resume=resume is not None, progress=on_epoch)
    keys = [k for k in ("R@1", "R@5", "R@10", "R@50", "Rs@1", "Rs@2", "Rs@3") if k in m]
    typer.echo(f"{cfg.out}: {m['model']} after {m['epochs']} epoch(s): " + "  ".join(f"{k} {m[k]:.2f}" for k in keys))
    for cat, v in m.get("per_category", {}).items():
        typer.echo(f"  {cat}: R@10 {v['R@10']:.2f}  R@50 {v['R@50']:.2f}  ({v['n']} queries)")
    typer.echo(f"metrics: {Path(cfg.out) / 'metrics.json'}  curves: {Path(cfg.out) / 'curves.png'}")


def _miner_remine(cfg):
    """The refresh's miner call for the table cfg.negatives (see train.refresh)."""
    from train.refresh import miner_remine

    return miner_remine(cfg.work, cfg.split, cfg.negatives, cfg.schedule)


def mine_main() -> None:
    mine_app()


def train_main() -> None:
    train_app()


if __name__ == "__main__":
    mine_main()
