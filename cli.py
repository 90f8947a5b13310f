"""Command-line entry points: ``cir-mine`` and ``cir-train``.

Thin by design: each command parses options, calls one library function, and renders the result.
Library code raises typed exceptions (cir_mine.data.errors); :func:`cli_errors` turns them into one
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

from cir_mine.data.errors import CirMineError

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


# Library errors name parameters as the Python API spells them; the CLI shows its flags. A name is
# its flag (--delta-lo for delta_lo) unless listed here.
FLAGS = {
    "k": "-k",
    "mining_round": "--round",
    "max_candidates=None": "--no-deepen",
}
# `cir-mine negatives` switches guards off with --no-guard NAME
NEGATIVES_FLAGS = {
    **FLAGS,
    "exclude_target": "--no-guard target",
    "exclude_reference": "--no-guard reference",
    "exclude_extra_positives": "--no-guard extra-positive",
    "trust_verified": "--no-guard trust-verified",
    "rho=None": "--no-guard cap",
    "dup_threshold=None": "--no-guard near-duplicate",
}


def flag(param: str, flags: dict = FLAGS) -> str:
    """The command-line spelling of a library parameter name."""
    return flags.get(param, "--" + param.replace("_", "-"))


def cli_errors(fn=None, *, flags: dict = FLAGS):
    """Turn library exceptions into ``Error: ...`` (parameters spelled as ``flags``) and an exit code."""
    if fn is None:
        return functools.partial(cli_errors, flags=flags)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CirMineError as e:
            fail(e.render(functools.partial(flag, flags=flags)), e.exit_code)
        except MemoryError:
            fail("out of memory. Lower --batch-size or --query-batch, or use a smaller index.")
        except OSError as e:   # an unexpected file-system failure: name the file, never a traceback
            if getattr(e, "filename", None) is None:
                raise
            fail(f"{e.filename}: {e.strerror or e}.")
        except KeyboardInterrupt:
            fail("interrupted; rerun the same command to resume.", 130)

    return wrapper


def setup_logging(verbose: bool, quiet: bool = False) -> None:
    """Warnings on stderr; with ``verbose`` also cir-mine's own INFO lines (what each stage does),
    never other libraries' (faiss.loader and the like stay at WARNING). ``quiet`` (no progress bar,
    no notes) is the commands' own and combines with ``verbose``: logs without a bar."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("cir_mine").setLevel(logging.INFO if verbose else logging.NOTSET)


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


def _version_option(prog: str):
    def show(value: bool) -> None:
        if value:
            from cir_mine import __version__

            typer.echo(f"{prog} {__version__}")
            raise typer.Exit()

    return typer.Option(False, "--version", callback=show, is_eager=True, help="Print the version and exit.")


@mine_app.callback()
def mine_options(version: bool = _version_option("cir-mine")):
    """Offline hard-negative mining for composed image retrieval (CIR)."""


QUIET = typer.Option(False, "--quiet", "-q", help="No progress bar and no notes on stderr (errors and warnings still).")
VERBOSE = typer.Option(False, "--verbose", "-v", help="Log what each stage does.")
WORK = typer.Option(..., "--work", "-w", help="Workspace directory (see docs/formats.md).")
OVERWRITE = typer.Option(False, "--overwrite", help="Replace an existing output (without it, an existing output is an error).")
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
    overwrite: bool = OVERWRITE,
    quiet: bool = QUIET,
    verbose: bool = VERBOSE,
):
    """Generate a synthetic CIR world (gallery + triplets with ground-truth attributes)."""
    setup_logging(verbose, quiet)
    from cir_mine.data.synthetic import SynthConfig, generate, parse_salience

    cfg = SynthConfig(n_gallery=n_gallery, n_triplets=n_triplets, dim=dim, seed=seed, split=split,
                      salience=parse_salience(salience), item_noise=item_noise, text_noise=text_noise,
                      unmentioned_change=unmentioned)
    with progress_bar("synth", n_gallery + n_triplets, quiet) as advance:
        state = {"done": 0}

        def cb(done, total):
            advance(done - state["done"])
            state["done"] = done

        manifest = generate(cfg, out, progress=cb, overwrite=overwrite)
    typer.echo(f"wrote {out}: {manifest['counts']} (d={manifest['dim']})")


@mine_app.command()
@cli_errors
def info(
    work: Path = WORK,
    quiet: bool = QUIET,
    verbose: bool = VERBOSE,
):
    """Validate a workspace and print its splits, counts and manifest."""
    setup_logging(verbose, quiet)
    from cir_mine.data.workspace import Workspace

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
    folder = "folder"
    webdataset = "webdataset"


DATASET = typer.Option(..., "--dataset", "-d", help="Dataset layout (folder: images + triplets CSV/JSONL; webdataset: img2dataset tar shards, --root 'DIR/{00000..00099}.tar').")
ROOT = typer.Option(..., "--root", "-r", help="Dataset root (captions/, image_splits/, images ...).")


@mine_app.command()
@cli_errors
def check(
    dataset: Dataset = DATASET,
    root: Path = ROOT,
    split: str = SPLIT,
    quiet: bool = QUIET,
    verbose: bool = VERBOSE,
):
    """Read a dataset's annotations and print what they hold (no embedding)."""
    setup_logging(verbose, quiet)
    from cir_mine.data.adapters import dataset_summary

    s = dataset_summary(dataset.value, root, split)
    typer.echo(f"{dataset.value} {split}: {s['images']} images ({s['image_files']} with image files, "
               f"{s['with_attributes']} with attributes), {s['queries']} queries, categories: "
               f"{', '.join(c or '-' for c in s['categories'])}")


# ------------------------------------------------------------------------------------------------
# cir-mine positives (scaled positives)


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
    command_timeout: float = typer.Option(3600.0, "--command-timeout", help="With --captioner command: seconds the program may run."),
    text_encoder: str = typer.Option("auto", "--text-encoder", help="auto|synthetic|minilm|open_clip: the workspace's text encoder."),
    seed: int = typer.Option(0, "--seed"),
    overwrite: bool = OVERWRITE,
    quiet: bool = QUIET,
    verbose: bool = VERBOSE,
):
    """Generate extra training triplets from attribute differences of near neighbours (SPN stage 1)."""
    setup_logging(verbose, quiet)
    from cir_mine.data.workspace import Workspace
    from cir_mine.miner.positives.captioners import CommandCaptioner, TemplateCaptioner
    from cir_mine.miner.positives.pairs import PositivesConfig
    from cir_mine.miner.positives.generate import generate_positives

    if captioner == "command" and not command:
        fail("--captioner command needs --command PROGRAM.", 2)
    if captioner not in ("template", "command"):
        fail(f"unknown captioner {captioner!r}: use template or command.", 2)
    from cir_mine.data.checks import check_range

    check_range("command_timeout", command_timeout, 0.0, None, lo_open=True)
    cap = CommandCaptioner(command, timeout=command_timeout) if captioner == "command" else TemplateCaptioner(seed)
    cfg = PositivesConfig(per_image=per_image, max_diff=max_diff, max_values=max_values, neighbors=neighbors,
                          dup_threshold=dup_threshold, max_images=max_images, ignore_groups=tuple(ignore_group), seed=seed)
    r = generate_positives(Workspace(work).require(), split, cfg, out, captioner=cap, text_encoder=text_encoder,
                           overwrite=overwrite)
    typer.echo(f"wrote {r.out}: {r.n_pairs} generated triplets from {r.n_candidates_images} gallery images "
               f"(changed groups: {r.meta['changed_groups']})")


# ------------------------------------------------------------------------------------------------
# cir-mine attributes


@mine_app.command()
@cli_errors
def attributes(
    texts: List[str] = typer.Argument(..., help="Captions to read, e.g. \"is red with no sleeves\"."),
    vocabulary: Optional[Path] = typer.Option(None, "--vocabulary", help="Vocabulary JSON (default: the shipped miner/core/vocabulary.json)."),
    quiet: bool = QUIET,
    verbose: bool = VERBOSE,
):
    """Print the attributes a caption asks for (+ wanted, - ruled out, ~ comparative)."""
    setup_logging(verbose, quiet)
    from cir_mine.miner.core.attributes import extract_many, load_vocabulary

    for text, req in zip(texts, extract_many(texts, load_vocabulary(vocabulary))):
        typer.echo(f"{text}\t{' '.join(req.as_strings()) or '(none)'}")


# ------------------------------------------------------------------------------------------------
# cir-mine embed, cir-mine index


DEVICE = typer.Option("auto", "--device", help="auto | cpu | cuda (auto: the GPU when torch sees one).")
ENGINE = typer.Option("local", "--engine", help="local (this process) or ray (a Ray cluster; the 'ray' extra).")
RAY_ADDRESS = typer.Option(None, "--ray-address", help="--engine ray: join this cluster (auto or HOST:PORT); default a local one.")
INDEX = typer.Option("flat", "--index", help="flat | ivf | ivfpq | hnsw | a FAISS factory string ('none': no index).")


@mine_app.command()
@cli_errors
def embed(
    dataset: Dataset = DATASET,
    root: Path = ROOT,
    split: str = SPLIT,
    work: Path = WORK,
    model: str = typer.Option("ViT-B-32", "--model", help="open_clip model name or path of a model-config JSON."),
    pretrained: str = typer.Option("none", "--pretrained", help="open_clip tag, local checkpoint PATH, or none (random weights)."),
    device: str = DEVICE,
    batch_size: int = typer.Option(64, "--batch-size", "-b", help="Images per forward pass."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Image-decoding worker processes (0: main process; default: one per spare CPU core on a GPU, 2 on the CPU)."),
    shard_size: int = typer.Option(4096, "--shard-size", help="Images per resumable shard."),
    attribute_prompts: Optional[Path] = typer.Option(None, "--attribute-prompts", help="Zero-shot attribute prompt JSON ('default': the shipped garment prompts)."),
    index: str = INDEX,
    triplets: Optional[Path] = typer.Option(None, "--triplets", help="folder: triplets CSV/JSONL (default ROOT/triplets.{split}.csv|jsonl); webdataset: triplets naming sample keys (none: gallery only)."),
    engine: str = ENGINE,
    actors: int = typer.Option(1, "--actors", help="--engine ray: open_clip encoder actors (with --device cuda at most one per GPU)."),
    part_size: int = typer.Option(4096, "--part-size", help="--engine ray: images per gallery part (the unit of resume)."),
    cpus_per_actor: float = typer.Option(1.0, "--cpus-per-actor", help="--engine ray: CPUs each CPU encoder actor reserves."),
    ray_address: Optional[str] = RAY_ADDRESS,
    overwrite: bool = OVERWRITE,
    quiet: bool = QUIET,
    verbose: bool = VERBOSE,
):
    """Embed a dataset's images and captions with open_clip into a workspace (+ FAISS index). Resumable."""
    setup_logging(verbose, quiet)
    from cir_mine.data.errors import UsageError
    from cir_mine.miner.encode.clip import DEFAULT_PROMPTS, EncoderConfig, ImageRun
    from cir_mine.miner.encode.dataset import EmbedJob, embed_dataset

    if engine not in ("local", "ray"):
        raise UsageError(f"--engine {engine!r}: use local or ray.")
    prompts = DEFAULT_PROMPTS if attribute_prompts is not None and str(attribute_prompts) == "default" else attribute_prompts
    job = EmbedJob(dataset.value, root, split, work, EncoderConfig(model, pretrained, device),
                   ImageRun(batch_size, workers, shard_size), prompts, index, triplets)
    with progress_bar("embed", None, quiet, unit="images") as advance:
        if engine == "ray":
            from cir_mine.miner.distributed.ray_embed import RayEmbedRun, embed_dataset_ray

            m = embed_dataset_ray(job, RayEmbedRun(actors, part_size, batch_size, cpus_per_actor, ray_address), progress=advance)
        else:
            m = embed_dataset(job, progress=advance, overwrite=overwrite)
    info = m["embed"][split]
    typer.echo(f"wrote {work}: {info['images'] - info['skipped_images']['count']} images, "
               f"{info['queries'] - info['dropped_triplets']} triplets (d={m['dim']}, {m['encoder']['name']}); "
               f"skipped {info['skipped_images']['count']} unreadable image(s), dropped {info['dropped_triplets']} triplet(s)")
    if m["encoder"].get("pretrained") == "none" and not quiet:
        typer.echo("note: random weights (--pretrained none); pass --pretrained TAG|PATH for a trained CLIP.", err=True)


@mine_app.command("index")
@cli_errors
def index_cmd(
    work: Path = WORK,
    split: str = SPLIT,
    index: str = INDEX,
    device: str = DEVICE,
    fp16: bool = typer.Option(False, "--fp16", help="GPU FAISS: store vectors in float16."),
    from_features: Optional[Path] = typer.Option(None, "--from-features", help="Import precomputed features (.npy with --ids, .parquet, or a clip-retrieval folder img_emb/ + metadata/) as the gallery first."),
    ids: Optional[Path] = typer.Option(None, "--ids", help="With a .npy: one image id per line (optionally id<TAB>category)."),
    encoder_name: str = typer.Option("unknown", "--encoder-name", help="With --from-features: the encoder that made the features."),
    npy: bool = typer.Option(False, "--npy", help="Also write gallery.{split}.npy, the row-aligned embeddings that mining memory-maps (galleries larger than memory)."),
    npy_dtype: str = typer.Option("float32", "--npy-dtype", help="With --npy: float32 or float16."),
    overwrite: bool = typer.Option(False, "--overwrite", help="With --from-features: replace an existing gallery of the split (the index alone is always rebuilt)."),
    allow_encoder_change: bool = typer.Option(False, "--allow-encoder-change", help="With --from-features: import features of another encoder than the workspace's triplets."),
    verbose: bool = VERBOSE,
    quiet: bool = QUIET,
):
    """(Re)build the FAISS index of a split's gallery, or import precomputed features."""
    setup_logging(verbose, quiet)
    from cir_mine.miner.encode.index import index_workspace
    from cir_mine.miner.encode.features import import_features

    if from_features is not None:
        meta = import_features(work, split, from_features, ids, encoder_name, index, device, fp16,
                               allow_encoder_change, overwrite=overwrite)
    else:
        meta = index_workspace(work, split, index, device, fp16, npy=npy_dtype if npy else None)
    if npy:
        typer.echo(f"wrote {work}/gallery.{split}.npy: the gallery embeddings, memory-mapped by mining")
    typer.echo(f"wrote {work}/index.{split}.faiss: {meta.get('factory')} over {meta.get('gallery_rows')} images "
               f"({'GPU' if meta.get('gpu') else 'CPU'} build)")


# ------------------------------------------------------------------------------------------------
# cir-mine demo


@mine_app.command()
@cli_errors
def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", "-o", help="Where the demo writes its workspace, tables and runs."),
    epochs: int = typer.Option(4, "--epochs", help="Training epochs per run."),
    world: str = typer.Option("fine", "--world", help="fine (fine-grained: 60k images, where mined negatives pay; adds hardest re-mined once halfway, with the combiner and with DQE's attribute sub-queries) or coarse (the synth default: 20k images, random, midzone and attribute-mismatch)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the outputs of an earlier demo in --out."),
    quiet: bool = QUIET,
    verbose: bool = VERBOSE,
):
    """Synthetic world -> negatives (random, midzone, attribute-mismatch, hardest re-mined halfway) -> short trainings (combiner; DQE on hardest) -> R@10/R@50 table."""
    setup_logging(verbose, quiet)
    from cir_mine.train.demo import DemoConfig, run_demo

    step = {"n": 0}

    def say(msg: str) -> None:
        step["n"] += 1
        if not quiet:
            typer.echo(f"[{step['n']}] {msg}")

    res = run_demo(out, DemoConfig(epochs=epochs, world=world), progress=say, overwrite=overwrite)
    typer.echo("")
    typer.echo(f"{'run':<20s} {'R@10':>7s} {'R@50':>7s}   (dev queries held out of {res.work})")
    for name, r in res.runs.items():
        typer.echo(f"{name:<20s} {r['R@10']:7.2f} {r['R@50']:7.2f}")
    typer.echo("")
    typer.echo(f"negatives tables: {', '.join(str(p) for p in res.tables.values())}")
    typer.echo(f"runs (metrics.json, curves.png, ckpt.pt): {out / 'runs'}/")
    typer.echo(f"done in {res.seconds:.0f}s")


# ------------------------------------------------------------------------------------------------
# cir-mine negatives

GUARD_SWITCHES = ("target", "reference", "extra-positive", "near-duplicate", "cap", "trust-verified")


def _floats(spec: str, what: str) -> tuple:
    from cir_mine.data.errors import UsageError

    try:
        return tuple(float(x) for x in spec.split(","))
    except ValueError:
        raise UsageError(f"{what} {spec!r}: use comma-separated numbers, e.g. 0.7,0.2,0.1.") from None


def _checkpoint_queries(checkpoint: Path, work: Path, split: str):
    from cir_mine.train.checkpoint import encode_queries

    return encode_queries(checkpoint, work, split)


def _file_queries(path: Path, loaded):
    """--query-emb: the .npy checked against the split's query ids and the gallery's dimension."""
    from cir_mine.miner.core.query_emb import read_query_embeddings

    g, t = loaded
    return read_query_embeddings(path, t.query_ids.tolist(), g.dim)


@mine_app.command()
@cli_errors(flags=NEGATIVES_FLAGS)
def negatives(
    work: Path = WORK,
    split: str = SPLIT,
    out: Path = typer.Option(..., "--out", "-o", help="Negatives table to write (Parquet, see docs/formats.md)."),
    strategy: Optional[str] = typer.Option(None, "--strategy", help="One strategy: random, in-batch, hardest, semihard, midzone, category, category-discrepant, attribute-mismatch, soft, semantic, verified, kept-mismatch, error-targeted."),
    mix: Optional[str] = typer.Option(None, "--mix", help="A mix, e.g. midzone:0.6,category:0.3,random:0.1 (k split by shares)."),
    schedule: Optional[str] = typer.Option(None, "--schedule", help="Curriculum epoch:mix, e.g. 0:random,2:midzone,4:hardest (stored for cir-train; mines the mix at --round)."),
    k: int = typer.Option(10, "-k", "--k", help="Negatives per query."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed (same seed, same table)."),
    mining_round: int = typer.Option(0, "--round", help="Mining round (0 offline, r-th refresh)."),
    query: str = typer.Option("zero-shot", "--query", help="Query embeddings: zero-shot or checkpoint."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="A cir-train checkpoint whose model encodes the queries."),
    query_emb_path: Optional[Path] = typer.Option(None, "--query-emb", help="Your own model's query embeddings: a .npy float32[n_queries, d], in the triplets' row order."),
    text_weight: float = typer.Option(1.0, "--text-weight", help="Zero-shot query: normalize(ref + w * text)."),
    candidates: Optional[int] = typer.Option(None, "--candidates", help="Search depth per query (default max(4k, range-max, 128))."),
    max_candidates: int = typer.Option(2048, "--max-candidates", help="Queries still short of k are searched again, 4x deeper, up to this depth."),
    no_deepen: bool = typer.Option(False, "--no-deepen", help="Never search short queries again."),
    query_batch: int = typer.Option(4096, "--query-batch", help="Queries per search batch (bounds memory)."),
    range_min: int = typer.Option(0, "--range-min", help="hardest: first rank of the window (0-based)."),
    range_max: Optional[int] = typer.Option(None, "--range-max", help="hardest: end of the rank window (exclusive)."),
    margin: float = typer.Option(0.1, "--margin", help="semihard: 0 < delta < margin."),
    delta_lo: float = typer.Option(0.02, "--delta-lo", help="midzone: lowest delta = s(q,t) - s(q,c)."),
    delta_hi: float = typer.Option(0.2, "--delta-hi", help="midzone: highest delta."),
    category_shares: str = typer.Option("0.7,0.2,0.1", "--category-shares", help="category: same-cat,other-cat,random shares."),
    attr_agree: float = typer.Option(1.0, "--attr-agree", help="attribute-mismatch: share of non-requested groups equal to the target's."),
    soft_lo: float = typer.Option(0.0, "--soft-lo", help="soft: attribute overlap with the target above this."),
    soft_hi: float = typer.Option(1.0, "--soft-hi", help="soft: attribute overlap with the target below this."),
    sample: Optional[str] = typer.Option(None, "--sample", help="Selection order for ranked strategies: top or random."),
    discrepant_pool: str = typer.Option("target", "--discrepant-pool", help="category-discrepant: candidates near the target or the query."),
    mismatch_ref_value: bool = typer.Option(False, "--mismatch-ref-value", help="attribute-mismatch: also negatives that contradict a requested group with the reference's own value (off: such look-alikes of the reference are dropped)."),
    discrepant_ref_value: bool = typer.Option(False, "--discrepant-ref-value", help="category-discrepant: also negatives that contradict a requested group with the reference's own value (off: such look-alikes of the reference are dropped)."),
    mismatch_kept_share: float = typer.Option(0.5, "--mismatch-kept-share", help="attribute-mismatch: share of k given to kept-mismatch negatives (satisfy the caption, break a kept group); 0: caption-contradicting negatives only."),
    discrepant_kept_share: float = typer.Option(0.5, "--discrepant-kept-share", help="category-discrepant: share of k given to kept-mismatch negatives from the query's ranking; 0: discrepant negatives only."),
    error_minimal: bool = typer.Option(False, "--error-minimal", help="error-targeted: only minimal pairs (differ from the target in the allocated group alone)."),
    dup_threshold: float = typer.Option(0.98, "--dup-threshold", help="Guard: drop near-duplicates of the target, s(c,t) >= this."),
    rho: float = typer.Option(0.95, "--rho", help="Guard: positive-aware cap, drop s(q,c) > rho*s(q,t) (sign-safe)."),
    no_guard: List[str] = typer.Option([], "--no-guard", help=f"Switch a guard off (repeatable): {', '.join(GUARD_SWITCHES)}."),
    random_draws: int = typer.Option(32, "--random-draws", help="random, category: uniform draws per query beyond 2k."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda (auto: exact search on the GPU when torch sees one; FAISS indexes on FAISS's GPU where installed)."),
    engine: str = ENGINE,
    shards: int = typer.Option(1, "--shards", help="Gallery shards, one index each, searched in parallel and merged exactly."),
    shard_index: str = typer.Option("flat", "--shard-index", help="Index per shard: flat (exact), ivf, ivfpq or a FAISS IVF factory string (trained once, copied to every shard)."),
    shard_nprobe: int = typer.Option(32, "--shard-nprobe", help="IVF shards: lists visited per query at least (more when the depth needs them)."),
    ray_address: Optional[str] = RAY_ADDRESS,
    cpus_per_shard: float = typer.Option(1.0, "--cpus-per-shard", help="--engine ray: CPUs each shard actor reserves."),
    index: str = typer.Option("flat", "--index", help="Search: flat (exact), workspace (the saved index.{split}.faiss), ivf, ivfpq, hnsw or a FAISS factory string; approximate candidates are re-ranked exactly."),
    nprobe: Optional[int] = typer.Option(None, "--nprobe", help="IVF: inverted lists visited (default: tuned to --target-recall)."),
    ef_search: Optional[int] = typer.Option(None, "--ef-search", help="HNSW: efSearch (default: tuned to --target-recall)."),
    search_params: Optional[str] = typer.Option(None, "--search-params", help="FAISS search parameters instead of --nprobe/--ef-search, e.g. nprobe=16."),
    overfetch: Optional[float] = typer.Option(None, "--overfetch", help="Approximate candidates fetched per kept one before exact re-ranking (default 1, 4 for PQ/SQ)."),
    target_recall: float = typer.Option(0.98, "--target-recall", help="Approximate index: tune nprobe/efSearch to this candidate recall@depth on sampled queries (0: FAISS defaults)."),
    tune_queries: int = typer.Option(1000, "--tune-queries", help="Sampled queries the tuning measures recall on."),
    check_recall: int = typer.Option(0, "--check-recall", help="Report candidate recall and the overlap of mined negatives with exact mining on this many sampled queries."),
    fp16: bool = typer.Option(False, "--fp16", help="GPU index: store float16 vectors (scores are still re-ranked in float32)."),
    prefetch: Optional[bool] = typer.Option(None, "--prefetch/--no-prefetch", help="Search the next query batch while the current one is guarded (default: with a GPU index)."),
    overwrite: bool = OVERWRITE,
    quiet: bool = QUIET,
    verbose: bool = VERBOSE,
):
    """Mine negatives for every query of a split into one Parquet table."""
    setup_logging(verbose, quiet)
    import pyarrow.parquet as pq

    from cir_mine.data.errors import UsageError
    from cir_mine.data.workspace import Workspace
    from cir_mine.miner.accel import device_search
    from cir_mine.miner.core.mine import MineConfig, mine_to_file

    bad = [g for g in no_guard if g not in GUARD_SWITCHES]
    if bad:
        raise UsageError(f"--no-guard {bad[0]!r}: use one of {', '.join(GUARD_SWITCHES)}.")
    if checkpoint is not None and query_emb_path is not None:
        raise UsageError("give --checkpoint or --query-emb, not both.")
    if checkpoint is not None or query_emb_path is not None:
        query = "checkpoint"
    cfg = MineConfig.of(
        strategy=strategy, mix=mix, schedule=schedule, k=k, seed=seed, query=query, text_weight=text_weight,
        candidates=candidates, max_candidates=None if no_deepen else max_candidates, query_batch=query_batch,
        sample=sample, random_draws=random_draws, device=device,
        range_min=range_min, range_max=range_max, margin=margin, delta_lo=delta_lo, delta_hi=delta_hi,
        category_shares=_floats(category_shares, "--category-shares"), attr_agree=attr_agree,
        soft_lo=soft_lo, soft_hi=soft_hi, discrepant_pool=discrepant_pool,
        mismatch_ref_value=mismatch_ref_value, discrepant_ref_value=discrepant_ref_value, error_minimal=error_minimal,
        mismatch_kept_share=mismatch_kept_share, discrepant_kept_share=discrepant_kept_share,
        exclude_target="target" not in no_guard, exclude_reference="reference" not in no_guard,
        exclude_extra_positives="extra-positive" not in no_guard,
        dup_threshold=None if "near-duplicate" in no_guard else dup_threshold,
        rho=None if "cap" in no_guard else rho, trust_verified="trust-verified" not in no_guard,
        index=index, nprobe=nprobe, ef_search=ef_search, search_params=search_params, overfetch=overfetch,
        target_recall=target_recall or None, tune_queries=tune_queries, check_recall=check_recall, fp16=fp16,
        prefetch=prefetch,
    )
    cfg.validate(mining_round)
    if cfg.query == "checkpoint" and checkpoint is None and query_emb_path is None:
        raise UsageError("--query checkpoint needs --checkpoint RUN/ckpt.pt (a model trained by cir-train).")
    ws = Workspace(work).require()
    from cir_mine.data.io import check_output

    check_output(out, [checkpoint, query_emb_path], overwrite)   # before the (slow) query encoding
    query_emb = _checkpoint_queries(checkpoint, work, split) if checkpoint is not None else None
    loaded = None
    if query_emb_path is not None:
        loaded = ws.load(split)
        query_emb = _file_queries(query_emb_path, loaded)
    tp = ws.triplets_path(split)
    n = pq.read_metadata(tp).num_rows if tp.exists() else None
    if engine not in ("local", "ray"):
        raise UsageError(f"--engine {engine!r}: use local or ray.")
    sharded = engine != "local" or shards != 1 or shard_index != "flat"
    if sharded and index != "flat":
        raise UsageError(f"--index {index} searches in one process; with --engine/--shards choose each shard's "
                         f"index with --shard-index.")
    if sharded:
        from cir_mine.miner.distributed.mine import mine_with_engine_to_file
        from cir_mine.miner.distributed.ray_shards import RayConfig
        from cir_mine.miner.distributed.shards import ShardConfig

        shard_cfg = ShardConfig(shards=shards, index=shard_index, nprobe=shard_nprobe, seed=seed)
        ray_cfg = RayConfig(address=ray_address, cpus_per_shard=cpus_per_shard)
    with progress_bar("negatives", n, quiet, unit="queries") as advance:
        if sharded:
            from cir_mine.data.io import check_output

            out = check_output(out, [checkpoint, query_emb_path], overwrite)
            res = mine_with_engine_to_file(ws, split, cfg, out, engine=engine, shard_cfg=shard_cfg, ray_cfg=ray_cfg,
                                           query_emb=query_emb, mining_round=mining_round, progress=advance,
                                           loaded=loaded)
        else:
            res = mine_to_file(ws, split, cfg, out, overwrite=overwrite, reads=[checkpoint, query_emb_path],
                               query_emb=query_emb, mining_round=mining_round, progress=advance, loaded=loaded,
                               index=device_search)
    typer.echo(negatives_summary(out, res.meta))
    if verbose:
        typer.echo(stages_line(res.meta))


def stages_line(meta: dict) -> str:
    """The run's seconds per stage (the footer's timing), and the kernel race when one ran."""
    t = meta.get("timing") or {}
    names = ("read", "prepare", "search", "rerank", "guards", "select", "table", "write")
    line = "stages: " + ", ".join(f"{n} {t[n + '_s']:.2f}s" for n in names if n + "_s" in t) + f" (total {t.get('total_s', 0):.2f}s)"
    kernels = t.get("kernels")
    if kernels:
        line += "; kernels (us/query): " + "; ".join(f"{shape} " + ", ".join(f"{k} {v:g}" for k, v in per.items())
                                                     for shape, per in kernels.items())
    return line


class ExportFormat(str, enum.Enum):
    ntuple = "ntuple"
    jsonl = "jsonl"


@mine_app.command()
@cli_errors
def export(
    negs: Path = typer.Argument(..., help="Negatives table written by `cir-mine negatives`."),
    fmt: ExportFormat = typer.Option(..., "--format", "-f", help="ntuple: wide Parquet, one row per query (sentence-transformers n-tuple, HF datasets); jsonl: one JSON line per query, or with --root CLIP4Cir caption files."),
    out: Path = typer.Option(..., "--out", "-o", help="File to write (with --root: the folder for the caption files)."),
    root: Optional[Path] = typer.Option(None, "--root", "-r", help="jsonl: the FashionIQ/CIRR root; writes each captions/cap.*.json the table covers with a `negatives` list added."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing output files."),
    quiet: bool = QUIET,
    verbose: bool = VERBOSE,
):
    """Export a negatives table: wide per-query Parquet (ntuple) or JSON lines / CLIP4Cir caption files (jsonl)."""
    from cir_mine.miner.core.export import export_negatives

    setup_logging(verbose, quiet)
    r = export_negatives(negs, fmt.value, out, root=root, overwrite=overwrite)
    what = f"{len(r.files)} caption file(s) in {r.out}" if root is not None else str(r.out)
    typer.echo(f"wrote {what}: {r.queries} queries, up to {r.k} negatives each")


def negatives_summary(out: Path, meta: dict) -> str:
    parts = ",".join(f"{p['strategy']}:{p['k']}" for p in meta["parts"])
    rows = ", ".join(f"{p['strategy']} {p['rows']}" for p in meta["parts"])
    sf = meta["shortfall"]
    guards = ", ".join(f"{g} {v['removed']}" for g, v in meta["guards"].items())
    lines = [f"wrote {out}: {meta['n_rows']} rows for {meta['n_queries']} queries (k={meta['k']}: {parts}; "
             f"bank {meta['bank']}; {meta['timing']['total_s']:.1f}s)",
             f"shortfall: {sf['count']} queries got fewer than {meta['k_mined']} negatives ({sf['missing']} missing)"
             + (f", e.g. {', '.join(sf['query_ids'][:5])}" if sf["count"] else ""),
             f"rows per strategy: {rows}",
             f"guards removed: {guards}"]
    if sf["count"]:
        lines.append("to loosen: " + "; ".join(sf["hints"]))
    lines += search_summary(meta.get("search") or {})
    return "\n".join(lines)


def search_summary(search: dict) -> list:
    """The search back-end, its tuning and its recall check, one line each (none for exact search
    without a check)."""
    lines = []
    params = ", ".join(f"{k}={v}" for k, v in (search.get("params") or {}).items())
    if search and not search.get("exact", True):
        line = (f"search: {search.get('index')} ({search.get('factory')}{', ' + params if params else ''}; "
                f"over-fetch {search.get('overfetch', 1):g}, re-ranked exactly)")
        tu = search.get("tuning")
        if tu:
            line += (f"; tuned {tu['param']}={tu['value']}: candidate recall@{tu['depth']} {tu['recall']:.3f} on "
                     f"{tu['queries']} queries ({'reached' if tu['reached'] else 'below'} {tu['target']:g})")
            deep = tu.get("deep")
            if deep:
                line += (f"; {tu['param']}={deep['value']} at depth {deep['depth']}: candidate recall "
                         f"{deep['recall']:.3f} ({'reached' if deep['reached'] else 'below'} {tu['target']:g})")
        lines.append(line)
    ck = search.get("check")
    if ck:
        rec = f"candidate recall@{ck['depth']} {ck['candidate_recall']:.3f}, " if "candidate_recall" in ck else ""
        lines.append(f"recall check on {ck['queries']} queries: {rec}"
                     f"mined negatives shared with exact mining {ck['negative_overlap']:.3f}")
    return lines


# ------------------------------------------------------------------------------------------------
# cir-mine stats / sql / inspect / report: see the negatives

NEGS = typer.Argument(..., help="Negatives table(s) written by `cir-mine negatives`.")
ROOT_OF_PATHS = typer.Option(None, "--root", "-r", help="Dataset root the gallery `path` column is relative to (default: the root `cir-mine embed` recorded).")


class SqlFormat(str, enum.Enum):
    table = "table"
    csv = "csv"
    json = "json"


@mine_app.command()
@cli_errors
def stats(
    negs: List[Path] = NEGS,
    work: Optional[Path] = typer.Option(None, "--work", "-w", help="Workspace (checks the tables belong to it; adds negative categories)."),
    split: Optional[str] = typer.Option(None, "--split", "-s", help="Split (default: the tables' own)."),
    quiet: bool = QUIET,
    verbose: bool = VERBOSE,
):
    """Negatives per query, Δ quantiles and histogram, category and attribute mix, shortfall, round overlap."""
    setup_logging(verbose, quiet)
    from cir_mine.miner.inspection.stats import format_stats, summarize

    typer.echo(format_stats(summarize(negs, work, split)), nl=False)


@mine_app.command()
@cli_errors
def sql(
    query: str = typer.Argument(..., help="SQL over the views negs, gallery, triplets, gallery_emb, triplet_emb."),
    negs: Optional[List[Path]] = typer.Argument(None, help="Negatives table(s) (the view negs)."),
    work: Optional[Path] = typer.Option(None, "--work", "-w", help="Workspace (views gallery, triplets)."),
    split: Optional[str] = typer.Option(None, "--split", "-s", help="Split (default: the tables' own, else train)."),
    fmt: SqlFormat = typer.Option(SqlFormat.table, "--format", "-f", help="Output format."),
    quiet: bool = QUIET,
    verbose: bool = VERBOSE,
):
    """Run DuckDB SQL over negatives tables and the workspace (see docs/queries.md)."""
    setup_logging(verbose, quiet)
    from cir_mine.miner.inspection.sql import format_rows, sql_query

    typer.echo(format_rows(sql_query(query, negs or [], work, split), fmt.value), nl=False)


@mine_app.command()
@cli_errors
def inspect(
    negs: Path = typer.Argument(..., help="Negatives table written by `cir-mine negatives`."),
    work: Path = WORK,
    out: Path = typer.Option(..., "--out", "-o", help="PNG contact sheet to write."),
    query_id: Optional[List[str]] = typer.Option(None, "--query-id", help="Query to draw (repeatable)."),
    sample: Optional[int] = typer.Option(None, "--sample", "-n", help="Draw N random queries of the table."),
    root: Optional[Path] = ROOT_OF_PATHS,
    split: Optional[str] = typer.Option(None, "--split", "-s", help="Split (default: the table's own)."),
    max_negatives: int = typer.Option(8, "--max-negatives", help="Negatives drawn per query (in rank order)."),
    seed: int = typer.Option(0, "--seed", help="Seed of --sample."),
    overwrite: bool = OVERWRITE,
    quiet: bool = QUIET,
    verbose: bool = VERBOSE,
):
    """Contact sheet: reference, caption, target, then negatives labelled with Δ, score, category, attributes."""
    setup_logging(verbose, quiet)
    from cir_mine.miner.inspection.contact_sheet import contact_sheet

    r = contact_sheet(negs, work, out, query_id or [], sample, root, split, max_negatives, seed, overwrite=overwrite)
    kind = "thumbnails" if r["images"] else "attribute cards (no image paths)"
    typer.echo(f"wrote {r['out']}: {len(r['queries'])} queries, {r['size'][0]}x{r['size'][1]} px, {kind}")
    for row in r["short"]:
        scope = "" if row.guards_scope == "query" else " (whole table)"
        guards = ", ".join(f"{g} {n:,}" for g, n in row.guards.items() if n) or "none recorded"
        typer.echo(f"{row.query_id}: short, {row.short}; guards removed{scope}: {guards}")


@mine_app.command()
@cli_errors
def report(
    negs: List[Path] = NEGS,
    work: Path = WORK,
    out: Path = typer.Option(..., "--out", "-o", help="HTML file to write (self-contained, plots embedded)."),
    split: Optional[str] = typer.Option(None, "--split", "-s", help="Split (default: the tables' own)."),
    root: Optional[Path] = ROOT_OF_PATHS,
    sheets: int = typer.Option(3, "--sheets", help="Queries drawn in the contact sheets (0: none)."),
    max_negatives: int = typer.Option(6, "--max-negatives", help="Negatives per query in the contact sheets."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sampled queries and scatter points."),
    overwrite: bool = OVERWRITE,
    quiet: bool = QUIET,
    verbose: bool = VERBOSE,
):
    """One self-contained HTML report: Δ per strategy, scores, mixes, shortfall, top negatives, rounds, sheets."""
    setup_logging(verbose, quiet)
    from cir_mine.miner.inspection.report import write_report

    r = write_report(negs, work, out, overwrite=overwrite, split=split, root=root, n_sheet_queries=sheets,
                     max_negatives=max_negatives, seed=seed)
    typer.echo(f"wrote {out}: {len(r.plots)} plots ({', '.join(r.plots)}), {len(r.html) // 1024} KiB")


# ------------------------------------------------------------------------------------------------
# cir-train


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
    model: str = typer.Option("combiner", "--model", help="combiner (CLIP4Cir), attention (gated attention fusion) or dqe (DQE-CIR: text-conditioned weights over colour- and shape-specific sub-queries, with the attribute-aware margin loss)."),
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
    # generated triplets (cir-mine positives) as extra training queries
    extra_triplets: Optional[list[Path]] = typer.Option(None, "--extra-triplets", help="Generated triplets (cir-mine positives) mixed into the training queries (repeatable; never into the dev split)."),
    extra_weight: float = typer.Option(1.0, "--extra-weight", help="Loss weight of each generated triplet (1 = like a real one)."),
    neg_weight: float = typer.Option(1.0, "--neg-weight", help="InfoNCE: each mined negative counts this many times in the softmax (< 1 down-weights)."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Refresh of a table mined with --engine ray: join this cluster (auto or HOST:PORT); default a local one."),
    attr_weight: float = typer.Option(0.3, "--attr-weight", help="--model dqe: weight of the attribute-aware margin loss (its margin is --margin)."),
    attr_heads: Optional[str] = typer.Option(None, "--attr-heads", help="--model dqe: comma-separated sub-query heads: color, shape (grouped) or group:NAME (one attribute group, e.g. group:neckline); 'groups': one head per attribute group of the gallery (default color,shape)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run already in --out (without it, an existing run is an error)."),
    version: bool = _version_option("cir-train"),
    quiet: bool = QUIET,
    verbose: bool = VERBOSE,
    ctx: typer.Context = None,
):
    """Train a combiner on cached features with in-batch and mined negatives; evaluate every epoch."""
    setup_logging(verbose, quiet)
    from cir_mine.data.errors import UsageError
    from cir_mine.train.loop import TrainConfig, resume_config, train as run_training

    if resume is not None:
        cfg = resume_config(resume)
        ignored = _ignored_on_resume(ctx, cfg)
        if ignored:
            typer.echo(f"warning: --resume {resume} continues with the run's own options; ignored: "
                       f"{', '.join(ignored)}.", err=True)
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
            exclude_reference=exclude_reference, zero_shot=zero_shot, threads=threads,
            extra_triplets=[str(p) for p in extra_triplets or []], extra_weight=extra_weight,
            neg_weight=neg_weight, attr_weight=attr_weight, attr_heads=attr_heads)
    remine = _miner_remine(cfg, quiet, ray_address) if cfg.validate().refresh_every else None
    total = 0 if cfg.zero_shot or cfg.epochs == 0 else cfg.epochs + cfg.static_bank
    with progress_bar("train", total, quiet, unit="epochs") as advance:
        def on_epoch(rec):
            advance(1)
            if not quiet:
                typer.echo(f"epoch {rec['epoch']}: loss {rec['loss']:.4f}  R@10 {rec.get('R@10', float('nan')):.2f}", err=True)

        m = run_training(cfg, remine=remine, resume=resume is not None, progress=on_epoch, overwrite=overwrite)
    keys = [k for k in ("R@1", "R@5", "R@10", "R@50", "Rs@1", "Rs@2", "Rs@3") if k in m]
    typer.echo(f"{cfg.out}: {m['model']} after {m['epochs']} epoch(s): " + "  ".join(f"{k} {m[k]:.2f}" for k in keys))
    for cat, v in m.get("per_category", {}).items():
        typer.echo(f"  {cat}: R@10 {v['R@10']:.2f}  R@50 {v['R@50']:.2f}  ({v['n']} queries)")
    typer.echo(f"metrics: {Path(cfg.out) / 'metrics.json'}  curves: {Path(cfg.out) / 'curves.png'}")


def _ignored_on_resume(ctx, cfg) -> list:
    """Options given on the command line beside --resume whose value differs from the run's."""
    if ctx is None:
        return []
    out = []
    run = cfg.to_dict()
    for name, value in ctx.params.items():
        if name in ("resume", "quiet", "verbose", "overwrite") or name not in run:
            continue
        src = ctx.get_parameter_source(name)
        if src is None or src.name != "COMMANDLINE":
            continue
        given = [str(p) for p in value] if isinstance(value, (list, tuple)) else (str(value) if isinstance(value, Path) else value)
        if given != run[name]:
            out.append(f"--{name.replace('_', '-')} {value if not isinstance(value, list) else ' '.join(map(str, value))} "
                       f"(the run's: {run[name]})")
    return out


def _miner_remine(cfg, quiet: bool = False, ray_address: Optional[str] = None):
    """The refresh's miner call for the table cfg.negatives (see train.refresh), printing one line
    per round on stderr unless ``quiet``: round, epoch, strategy mix, rows, time. A table mined
    through an engine (--engine, --shards) is re-mined through the same one."""
    from cir_mine.train.refresh import miner_remine

    remine = miner_remine(cfg.work, cfg.split, cfg.negatives, cfg.schedule, ray_address=ray_address)

    def remine_and_say(query_emb, round, epoch):
        table, meta = remine(query_emb, round, epoch)
        if not quiet:
            typer.echo(remine_line(round, epoch, meta), err=True)
        return table, meta

    return remine_and_say


def remine_line(round: int, epoch: int, meta: dict) -> str:
    """``re-mine round 1 (epoch 2): midzone:0.6,random:0.4, 3,120 rows, 0.4s``"""
    mix = ",".join(f"{p['strategy']}:{p['share']:g}" for p in meta["parts"])
    return f"re-mine round {round} (epoch {epoch}): {mix}, {meta['n_rows']:,} rows, {meta['timing']['total_s']:.1f}s"


def mine_main() -> None:
    mine_app()


def train_main() -> None:
    train_app()


if __name__ == "__main__":
    mine_main()
