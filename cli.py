"""Command-line entry points: ``cir-mine`` and ``cir-train``.

Thin by design: each command parses options, calls one library function, and renders the result.
Library code raises typed exceptions (data.errors); :func:`cli_errors` turns them into one
``Error: ...`` line on stderr and exit code 1 (2 for usage errors), without a traceback.
"""
from __future__ import annotations

import contextlib
import enum
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

    ws = Workspace(work)
    info = ws.summary()
    m = info["manifest"]
    typer.echo(f"workspace {ws.root}  (manifest {'derived' if m.get('derived') else 'manifest.json'}, hash {info['hash']})")
    typer.echo(f"encoder: {m.get('encoder', {}).get('name')}  dim: {m.get('dim')}  source: {m.get('source')}")
    for split, s in info["splits"].items():
        typer.echo(f"  {split}: {s['images']} images, {s['triplets']} triplets, "
                   f"categories: {', '.join(c or '-' for c in s['categories'])}  [valid]")


class Dataset(str, enum.Enum):
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
# cir-mine positives (issue 8: scaled positives)


@mine_app.command()
@cli_errors
def positives(
    work: Path = WORK,
    split: str = SPLIT,
    out: Path = typer.Option(..., "--out", "-o", help="Triplets-schema Parquet file to write."),
    per_image: int = typer.Option(2, "--per-image", help="New triplets per reference image at most."),
    max_diff: int = typer.Option(2, "--max-diff", help="Attribute groups that may differ (1..G)."),
    max_values: int = typer.Option(3, "--max-values", help="Attribute values that may differ in all."),
    neighbors: int = typer.Option(32, "--neighbors", help="FAISS neighbours searched per image."),
    dup_threshold: float = typer.Option(0.98, "--dup-threshold", help="Skip pairs at or above this similarity."),
    max_images: int = typer.Option(0, "--max-images", help="References considered (0 = all; seeded sample)."),
    ignore_group: List[str] = typer.Option([], "--ignore-group", help="Attribute group never described (repeatable)."),
    captioner: str = typer.Option("template", "--captioner", help="template (offline) or command."),
    command: Optional[str] = typer.Option(None, "--command", help="With --captioner command: program reading JSON lines of pairs."),
    text_encoder: str = typer.Option("auto", "--text-encoder", help="auto|synthetic|minilm|open_clip: the workspace's text encoder."),
    seed: int = typer.Option(0, "--seed"),
):
    """Generate extra training triplets from attribute differences of near neighbours (SPN stage 1)."""
    from data.workspace import Workspace
    from miner.positives import CommandCaptioner, PositivesConfig, TemplateCaptioner, generate_positives

    if captioner == "command" and not command:
        fail("--captioner command needs --command PROGRAM.", 2)
    if captioner not in ("template", "command"):
        fail(f"unknown captioner {captioner!r}: use template or command.", 2)
    cap = CommandCaptioner(command) if captioner == "command" else TemplateCaptioner(seed)
    cfg = PositivesConfig(per_image=per_image, max_diff=max_diff, max_values=max_values, neighbors=neighbors,
                          dup_threshold=dup_threshold, max_images=max_images, ignore_groups=tuple(ignore_group), seed=seed)
    r = generate_positives(Workspace(work).require(), split, cfg, out, captioner=cap, text_encoder=text_encoder)
    typer.echo(f"wrote {r.out}: {r.n_pairs} generated triplets from {r.n_candidates_images} gallery images "
               f"(changed groups: {r.meta['changed_groups']})")


# ------------------------------------------------------------------------------------------------
# issue 4 (attributes): cir-mine attributes


@mine_app.command()
@cli_errors
def attributes(
    texts: List[str] = typer.Argument(..., help="Captions to read, e.g. \"is red with no sleeves\"."),
    vocabulary: Optional[Path] = typer.Option(None, "--vocabulary", help="Vocabulary JSON (default: the shipped miner/resources/vocabulary.json)."),
):
    """Print the attributes a caption asks for (+ wanted, - ruled out, ~ comparative)."""
    from miner.attributes import extract_many, load_vocabulary

    for text, req in zip(texts, extract_many(texts, load_vocabulary(vocabulary))):
        typer.echo(f"{text}\t{' '.join(req.as_strings()) or '(none)'}")


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


@train_app.command()
@cli_errors
def train(
    work: Path = WORK,
    split: str = SPLIT,
    out: Path = typer.Option(..., "--out", "-o", help="Run directory (checkpoints, metrics)."),
):
    """Train a combiner on cached features (see docs/)."""
    fail("cir-train is not implemented yet.")


def mine_main() -> None:
    mine_app()


def train_main() -> None:
    train_app()


if __name__ == "__main__":
    mine_main()
