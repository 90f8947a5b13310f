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
        yield lambda n=1, total=None: None
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
        # ``total`` lets a library set the total once it knows it (None keeps it).
        yield lambda n=1, total=None: prog.update(task, advance=n, total=total)


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
# cir-mine embed, cir-mine index (issue 3)


class EmbedDataset(str, __import__("enum").Enum):
    fashioniq = "fashioniq"
    cirr = "cirr"
    folder = "folder"


DEVICE = typer.Option("auto", "--device", help="auto | cpu | cuda (auto: a GPU when one is visible).")
INDEX = typer.Option("flat", "--index", help="flat | ivf | ivfpq | hnsw | a FAISS factory string ('none': no index).")


@mine_app.command()
@cli_errors
def embed(
    dataset: EmbedDataset = typer.Option(..., "--dataset", "-d", help="Dataset layout (folder: images + triplets CSV/JSONL)."),
    root: Path = typer.Option(..., "--root", "-r", help="Dataset root."),
    split: str = SPLIT,
    work: Path = WORK,
    model: str = typer.Option("ViT-B-32", "--model", help="open_clip model name or path of a model-config JSON."),
    pretrained: str = typer.Option("none", "--pretrained", help="open_clip tag, local checkpoint PATH, or none (random weights)."),
    device: str = DEVICE,
    batch_size: int = typer.Option(64, "--batch-size", "-b", help="Images per forward pass."),
    workers: int = typer.Option(2, "--workers", help="Image-decoding worker processes (0: main process)."),
    shard_size: int = typer.Option(4096, "--shard-size", help="Images per resumable shard."),
    attribute_prompts: Optional[Path] = typer.Option(None, "--attribute-prompts", help="Zero-shot attribute prompt JSON ('default': the shipped garment prompts)."),
    index: str = INDEX,
    triplets: Optional[Path] = typer.Option(None, "--triplets", help="folder: triplets CSV/JSONL (default ROOT/triplets.{split}.csv|jsonl)."),
    quiet: bool = QUIET,
    verbose: bool = VERBOSE,
):
    """Embed a dataset's images and captions with open_clip into a workspace (+ FAISS index). Resumable."""
    from miner.embed import DEFAULT_PROMPTS, EncoderConfig, ImageRun
    from miner.ingest import EmbedJob, embed_dataset

    setup_logging(verbose)
    prompts = DEFAULT_PROMPTS if attribute_prompts is not None and str(attribute_prompts) == "default" else attribute_prompts
    job = EmbedJob(dataset.value, root, split, work, EncoderConfig(model, pretrained, device),
                   ImageRun(batch_size, workers, shard_size), prompts, index, triplets)
    with progress_bar("embed", None, quiet, unit="images") as advance:
        m = embed_dataset(job, progress=advance)
    info = m["embed"][split]
    typer.echo(f"wrote {work}: {info['images'] - info['skipped_images']['count']} images, "
               f"{info['queries'] - info['dropped_triplets']} triplets (d={m['dim']}, {m['encoder']['name']}); "
               f"skipped {info['skipped_images']['count']} unreadable image(s), dropped {info['dropped_triplets']} triplet(s)")


@mine_app.command("index")
@cli_errors
def index_cmd(
    work: Path = WORK,
    split: str = SPLIT,
    index: str = INDEX,
    device: str = DEVICE,
    fp16: bool = typer.Option(False, "--fp16", help="GPU FAISS: store vectors in float16."),
    from_features: Optional[Path] = typer.Option(None, "--from-features", help="Import precomputed features (.npy with --ids, or .parquet) as the gallery first."),
    ids: Optional[Path] = typer.Option(None, "--ids", help="With a .npy: one image id per line (optionally id<TAB>category)."),
    encoder_name: str = typer.Option("unknown", "--encoder-name", help="With --from-features: the encoder that made the features."),
    verbose: bool = VERBOSE,
):
    """(Re)build the FAISS index of a split's gallery, or import precomputed features."""
    from miner.index import index_workspace
    from miner.ingest import import_features

    setup_logging(verbose)
    if from_features is not None:
        meta = import_features(work, split, from_features, ids, encoder_name, index, device, fp16)
    else:
        meta = index_workspace(work, split, index, device, fp16)
    typer.echo(f"wrote {work}/index.{split}.faiss: {meta.get('factory')} over {meta.get('gallery_rows')} images "
               f"({'GPU' if meta.get('gpu') else 'CPU'} build)")


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
