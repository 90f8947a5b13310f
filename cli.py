"""Command-line entry points: ``cir-mine`` and ``cir-train``.

Each command parses its options, calls one library function and renders the result (the text comes
from cir_mine.miner.inspection.render and cir_mine.train.render). The options that set a config field
are made from the config dataclass (cir_mine.data.options): the field's name, default and comment are
the option's, so a default is stated once, in its dataclass. Library code raises typed exceptions
(cir_mine.data.errors) naming parameters; :func:`command` turns them into one ``Error: ...`` line on
stderr with each parameter spelled as the option that sets it, and exit code 1 (2 for usage errors),
without a traceback.
"""
from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import itertools
import sys
from pathlib import Path
from typing import Iterator, List, Optional

import typer

from cir_mine import __version__
from cir_mine.data.errors import CirMineError, failure, spell_calls
from cir_mine.data.fields import PATH, PATH_OR_EMPTY, PATHS, Options, Spell, comma_numbers
from cir_mine.data.logs import configure_logging
from cir_mine.data.memory import prefer_fast_pool
from cir_mine.data.options import changed_options, configs, flag, option_flags
from cir_mine.data.synthetic import SynthConfig, parse_salience
from cir_mine.miner.core.mine import MineConfig
from cir_mine.miner.core.strategies import REGISTRY
from cir_mine.miner.distributed.mine import EngineConfig
from cir_mine.miner.distributed.ray_shards import RayConfig
from cir_mine.miner.distributed.shards import ShardConfig
from cir_mine.miner.encode.config import DEFAULT_PROMPTS, EmbedJob, EncoderConfig, ImageRun, RayEmbedRun
from cir_mine.miner.negatives import GUARD_SWITCHES, off_value
from cir_mine.miner.positives.captioners import CommandCaptioner
from cir_mine.miner.positives.pairs import PositivesConfig
from cir_mine.train.config import TrainConfig
from cir_mine.train.demo import DemoConfig

mine_app = typer.Typer(name="cir-mine", help="Offline hard-negative mining for composed image retrieval (CIR).", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
train_app = typer.Typer(name="cir-train", help="Train a CIR combiner on cached features with mined negatives.", add_completion=False, pretty_exceptions_enable=False)


# ------------------------------------------------------------------------------------------------
# Options the commands share (config fields become options through cir_mine.data.options)

QUIET = typer.Option(False, "--quiet", "-q", help="No progress bar and no notes on stderr (errors and warnings still).")
VERBOSE = typer.Option(False, "--verbose", "-v", help="Log what each stage does.")
COMMON = {"quiet": QUIET, "verbose": VERBOSE}
WORK = typer.Option(..., "--work", "-w", help="Workspace directory (see docs/formats.md).")
OVERWRITE = typer.Option(False, "--overwrite", help="Replace an existing output (without it, an existing output is an error).")
SPLIT = typer.Option("train", "--split", "-s", help="Split name (gallery.{split}.parquet).")
DATASET = typer.Option(..., "--dataset", "-d", help="Dataset layout (folder: images + triplets CSV/JSONL; webdataset: img2dataset tar shards, --root 'DIR/{00000..00099}.tar').")
ROOT = typer.Option(..., "--root", "-r", help="Dataset root (captions/, image_splits/, images ...).")
QUERY_IDS = typer.Option(None, "--query-ids", help="With --query-emb: a text file with the query id of each row (one per line, or a JSON list), for rows in your own order; unknown, repeated or missing queries are refused.")
NEGS = typer.Argument(..., help="Negatives table(s) written by `cir-mine negatives`.")
ROOT_OF_PATHS = typer.Option(None, "--root", "-r", help="Dataset root the gallery `path` column is relative to (default: the root `cir-mine embed` recorded).")
ENGINE = Options(EngineConfig, only=("name",), names={"name": "engine"})
Dataset = enum.Enum("Dataset", {n: n for n in ("fashioniq", "cirr", "folder", "webdataset")}, type=str)
ExportFormat = enum.Enum("ExportFormat", {n: n for n in ("ntuple", "wide", "jsonl")}, type=str)
SqlFormat = enum.Enum("SqlFormat", {n: n for n in ("table", "csv", "json")}, type=str)


# ------------------------------------------------------------------------------------------------
# Errors, logging, progress


def command(app: typer.Typer, name: Optional[str] = None, *, flags: Optional[dict] = None, **groups: Options):
    """Register the decorated function as a command of ``app``: the parameters named in ``groups`` become
    the options of their configs (:func:`configs`), logging follows its --quiet/--verbose, and a library
    error becomes one ``Error: ...`` line on stderr, parameters spelled as the command's flags (and as
    ``flags`` says), and an exit code (:func:`cir_mine.data.errors.failure`)."""
    def deco(fn):
        fn = configs(COMMON, **groups)(fn)
        spelled = {**option_flags(fn), **(flags or {})}

        @functools.wraps(fn)
        def cli_errors(**kwargs):
            configure_logging(kwargs.get("verbose", False), kwargs.get("quiet", False))
            try:
                return fn(**kwargs)
            except (CirMineError, MemoryError, OSError, KeyboardInterrupt) as e:
                shown = failure(e, functools.partial(flag, flags=spelled))
                if shown is None:
                    raise
                typer.echo(f"Error: {shown[0]}", err=True)
                raise typer.Exit(shown[1])

        cli_errors.flags = spelled
        return app.command(name)(cli_errors)

    return deco


@contextlib.contextmanager
def progress_bar(label: str, total: Optional[int], quiet: bool = False, unit: str = "items") -> Iterator:
    """Yield ``advance(n)``; a rich bar on stderr unless ``quiet`` or stderr is not a TTY."""
    if quiet or not sys.stderr.isatty():
        yield lambda n=1, total=None: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.text import Text

    class Rate(TextColumn):
        def render(self, task):
            speed = task.finished_speed or task.speed
            return Text(f"{speed:,.0f} {unit}/s" if speed else "")

    cols = [TextColumn(label), BarColumn(), MofNCompleteColumn(), Rate(""), TimeRemainingColumn()]
    with Progress(*cols, console=Console(stderr=True), transient=False) as prog:
        task = prog.add_task(label, total=total)
        # ``total`` lets a library set the total once it knows it (None keeps it).
        yield lambda n=1, total=None: prog.update(task, advance=n, total=total)


def _version_option(prog: str):
    def show(value: bool) -> None:
        if value:
            typer.echo(f"{prog} {__version__}")
            raise typer.Exit()

    return typer.Option(False, "--version", callback=show, is_eager=True, help="Print the version and exit.")


@mine_app.callback()
def mine_options(version: bool = _version_option("cir-mine")):
    """Offline hard-negative mining for composed image retrieval (CIR)."""


# ------------------------------------------------------------------------------------------------
# cir-mine: workspaces, datasets, captions


@command(mine_app, cfg=Options(SynthConfig, only=("n_gallery", "n_triplets", "dim", "seed", "split", "salience",
                                                  "item_noise", "text_noise", "unmentioned_change"),
                               flags={"split": ("--split", "-s")}, notes={"salience": ", e.g. color=1.0,sleeve=0.5"},
                               spell={"salience": Spell(Optional[str], lambda v: None, parse_salience)}))
def synth(out: Path = typer.Option(..., "--out", "-o", help="Workspace directory to write."), cfg: SynthConfig = None,
          overwrite: bool = OVERWRITE, quiet: bool = QUIET):
    """Generate a synthetic CIR world (gallery + triplets with ground-truth attributes)."""
    from cir_mine.data.synthetic import generate

    with progress_bar("synth", cfg.n_gallery + cfg.n_triplets, quiet) as advance:
        manifest = generate(cfg, out, progress=advance, overwrite=overwrite)
    typer.echo(f"wrote {out}: {manifest['counts']} (d={manifest['dim']})")


@command(mine_app)
def info(work: Path = WORK):
    """Validate a workspace and print its splits, counts and manifest."""
    from cir_mine.data.workspace import Workspace
    from cir_mine.miner.inspection.render import workspace_lines

    typer.echo(workspace_lines(Workspace(work).summary()))


@command(mine_app)
def check(dataset: Dataset = DATASET, root: Path = ROOT, split: str = SPLIT):
    """Read a dataset's annotations and print what they hold (no embedding)."""
    from cir_mine.data.adapters import dataset_summary
    from cir_mine.miner.inspection.render import dataset_line

    typer.echo(dataset_line(dataset.value, split, dataset_summary(dataset.value, root, split)))


@command(mine_app, cfg=Options(PositivesConfig, flags={"ignore_groups": ("--ignore-group",)},
                               spell={"ignore_groups": Spell(List[str], list, tuple)},
                               notes={"ignore_groups": " (repeatable)"}),
         command=Options(CommandCaptioner, only=("command", "timeout"), names={"timeout": "command_timeout"},
                         lead="--captioner command: ", spell={"command": Spell(Optional[str])}, build=dict))
def positives(
    work: Path = WORK,
    split: str = SPLIT,
    out: Path = typer.Option(..., "--out", "-o", help="Triplets-schema Parquet file to write."),
    cfg: PositivesConfig = None,
    captioner: str = typer.Option("template", "--captioner", help="template (offline) or command."),
    command: dict = None,
    text_encoder: str = typer.Option("auto", "--text-encoder", help="auto|synthetic|minilm|open_clip: the workspace's text encoder."),
    overwrite: bool = OVERWRITE,
):
    """Generate extra training triplets from attribute differences of near neighbours (SPN stage 1)."""
    from cir_mine.data.workspace import Workspace
    from cir_mine.miner.inspection.render import positives_line
    from cir_mine.miner.positives.captioners import make_captioner
    from cir_mine.miner.positives.generate import generate_positives

    cap = make_captioner(captioner, command, cfg.seed)
    r = generate_positives(Workspace(work).require(), split, cfg, out, captioner=cap, text_encoder=text_encoder,
                           overwrite=overwrite)
    typer.echo(positives_line(r))


@command(mine_app)
def attributes(
    texts: List[str] = typer.Argument(..., help="Captions to read, e.g. \"is red with no sleeves\"."),
    vocabulary: Optional[Path] = typer.Option(None, "--vocabulary", help="Vocabulary JSON (default: the shipped miner/core/vocabulary.json)."),
):
    """Print the attributes a caption asks for (+ wanted, - ruled out, ~ comparative)."""
    from cir_mine.miner.core.attributes import extract_many, load_vocabulary
    from cir_mine.miner.inspection.render import attribute_lines

    typer.echo(attribute_lines(texts, extract_many(texts, load_vocabulary(vocabulary))))


# ------------------------------------------------------------------------------------------------
# cir-mine embed, index, demo


PROMPTS = Spell(Optional[Path], to_field=lambda p: DEFAULT_PROMPTS if p is not None and str(p) == "default" else p)


@command(mine_app, encoder=Options(EncoderConfig, only=("model", "pretrained", "preprocess", "target_ratio", "device")),
         run=Options(ImageRun, flags={"batch_size": ("--batch-size", "-b")}),
         job=Options(EmbedJob, only=("attribute_prompts", "index", "triplets_file"), flags={"triplets_file": ("--triplets",)},
                     spell={"attribute_prompts": PROMPTS}, build=dict),
         engine=ENGINE,
         ray=Options(RayEmbedRun, only=("actors", "part_size", "cpus_per_actor", "address"), names={"address": "ray_address"},
                     shared={"batch_size": "batch_size"}, lead="--engine ray: "))
def embed(dataset: Dataset = DATASET, root: Path = ROOT, split: str = SPLIT, work: Path = WORK,
          encoder: EncoderConfig = None, run: ImageRun = None, job: dict = None, engine: EngineConfig = None,
          ray: RayEmbedRun = None, overwrite: bool = OVERWRITE, quiet: bool = QUIET):
    """Embed a dataset's images and captions with open_clip into a workspace (+ FAISS index). Resumable."""
    from cir_mine.miner.embed import embed as embed_job
    from cir_mine.miner.inspection.render import embed_line

    with progress_bar("embed", None, quiet, unit="images") as advance:
        m = embed_job(EmbedJob(dataset.value, root, split, work, encoder, run, **job), engine.name, ray,
                      progress=advance, overwrite=overwrite)
    typer.echo(embed_line(work, split, m))


@command(mine_app, "index")
def index_cmd(
    work: Path = WORK,
    split: str = SPLIT,
    index: str = typer.Option("flat", "--index", help="flat | ivf | ivfpq | hnsw | a FAISS factory string ('none': no index)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda (auto: a GPU when one is visible)."),
    fp16: bool = typer.Option(False, "--fp16", help="GPU FAISS: store vectors in float16."),
    from_features: Optional[Path] = typer.Option(None, "--from-features", help="Import precomputed features (.npy with --ids, .parquet, or a clip-retrieval folder img_emb/ + metadata/) as the gallery first."),
    ids: Optional[Path] = typer.Option(None, "--ids", help="With a .npy: one image id per line (optionally id<TAB>category)."),
    encoder_name: str = typer.Option("unknown", "--encoder-name", help="With --from-features: the encoder that made the features."),
    npy: bool = typer.Option(False, "--npy", help="Also write gallery.{split}.npy, the row-aligned embeddings that mining memory-maps (galleries larger than memory)."),
    npy_dtype: str = typer.Option("float32", "--npy-dtype", help="With --npy: float32 or float16."),
    overwrite: bool = typer.Option(False, "--overwrite", help="With --from-features: replace an existing gallery of the split (the index alone is always rebuilt)."),
    allow_encoder_change: bool = typer.Option(False, "--allow-encoder-change", help="With --from-features: import features of another encoder than the workspace's triplets."),
):
    """(Re)build the FAISS index of a split's gallery, or import precomputed features."""
    from cir_mine.miner.embed import build_index
    from cir_mine.miner.inspection.render import index_lines

    meta = build_index(work, split, index, device, fp16, npy_dtype if npy else None, from_features, ids, encoder_name,
                       allow_encoder_change, overwrite)
    typer.echo(index_lines(work, split, meta, npy))


@command(mine_app, cfg=Options(DemoConfig, only=("epochs", "world")))
def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", "-o", help="Where the demo writes its workspace, tables and runs."),
    cfg: DemoConfig = None,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the outputs of an earlier demo in --out."),
    quiet: bool = QUIET,
):
    """Synthetic world -> negatives (random, midzone, attribute-mismatch, hardest re-mined halfway) -> short trainings (combiner; DQE on hardest) -> R@10/R@50 table."""
    from cir_mine.train.demo import run_demo
    from cir_mine.train.render import demo_lines

    steps = itertools.count(1)
    say = (lambda msg: None) if quiet else (lambda msg: typer.echo(f"[{next(steps)}] {msg}"))
    typer.echo(demo_lines(out, run_demo(out, cfg, on_step=say, overwrite=overwrite)))


# ------------------------------------------------------------------------------------------------
# cir-mine negatives, export, eval

# parameters as the API spells them -> the options that set them: --no-deepen, --no-guard NAME
NEGATIVES_SPELLINGS = {"max_candidates=None": "--no-deepen", **{f + ("" if off_value(f) is False else "=None"): f"--no-guard {g}"
                                                                for g, f in GUARD_SWITCHES.items()}}
MINE = Options(MineConfig, skip=tuple(f for f in GUARD_SWITCHES.values() if off_value(f) is False),
               flags={"k": ("-k", "--k"), "prefetch": ("--prefetch/--no-prefetch",)},
               spell={"category_shares": comma_numbers("category_shares"),
                      "target_recall": Spell(float, lambda v: v or 0, lambda v: v or None)},
               notes={"strategy": f": {', '.join(REGISTRY)}", "target_recall": "; 0: None"}, build=MineConfig.of)


@command(mine_app, flags=NEGATIVES_SPELLINGS, cfg=MINE, engine=ENGINE,
         shard=Options(ShardConfig, only=("shards", "index", "nprobe"), shared={"seed": "seed"},
                       names={"index": "shard_index", "nprobe": "shard_nprobe"}),
         ray=Options(RayConfig, only=("address", "cpus_per_shard"), names={"address": "ray_address"}, lead="--engine ray: "))
def negatives(
    work: Path = WORK,
    split: str = SPLIT,
    out: Path = typer.Option(..., "--out", "-o", help="Negatives table to write (Parquet, see docs/formats.md)."),
    cfg: MineConfig = None,
    mining_round: int = typer.Option(0, "--round", help="Mining round (0 offline, r-th refresh)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="A cir-train checkpoint whose model encodes the queries."),
    query_emb: Optional[Path] = typer.Option(None, "--query-emb", help="Your own model's query embeddings: a .npy float32[n_queries, d], in the triplets' row order (or any order, with --query-ids)."),
    query_ids: Optional[Path] = QUERY_IDS,
    no_deepen: bool = typer.Option(False, "--no-deepen", help="Never search short queries again."),
    no_guard: List[str] = typer.Option([], "--no-guard", help=f"Switch a guard off (repeatable): {', '.join(GUARD_SWITCHES)}."),
    engine: EngineConfig = None,
    shard: ShardConfig = None,
    ray: RayConfig = None,
    overwrite: bool = OVERWRITE,
    quiet: bool = QUIET,
    verbose: bool = VERBOSE,
):
    """Mine negatives for every query of a split into one Parquet table."""
    from cir_mine.miner.negatives import mine_file, stages_line, summary, switch_off
    from cir_mine.train.checkpoint import query_source

    cfg = switch_off(cfg, no_guard, no_deepen)
    queries = query_source(checkpoint, query_emb, query_ids)
    with progress_bar("negatives", None, quiet, unit="queries") as advance:
        res = mine_file(work, split, cfg, out, engine=dataclasses.replace(engine, shard=shard, ray=ray), queries=queries,
                        mining_round=mining_round, overwrite=overwrite, progress=advance)
    typer.echo(spell_hints(summary(out, res.meta)))
    if verbose:
        typer.echo(stages_line(res.meta))


NEGATIVES_FLAGS = negatives.flags


def spell_hints(text: str, flags: dict = NEGATIVES_FLAGS) -> str:
    """Library text that names parameters as ``MineConfig.of(rho=...)`` (shortfall hints), with flags."""
    return spell_calls(text, functools.partial(flag, flags=flags))


@command(mine_app)
def export(
    negs: Path = typer.Argument(..., help="Negatives table written by `cir-mine negatives`."),
    fmt: ExportFormat = typer.Option(..., "--format", "-f", help="ntuple: sentence-transformers' positional n-tuple Parquet (anchor caption, positive, negative_1..k; needs --work); wide: one Parquet row per query with ids and lists; jsonl: one JSON line per query, or with --root CLIP4Cir caption files."),
    out: Path = typer.Option(..., "--out", "-o", help="File to write (with --format jsonl --root: the folder for the caption files)."),
    work: Optional[Path] = typer.Option(None, "--work", "-w", help="ntuple: the workspace the table was mined from (captions, image ids and paths)."),
    images: str = typer.Option("id", "--images", help="ntuple: image columns as gallery ids (id) or image file paths (path)."),
    root: Optional[Path] = typer.Option(None, "--root", "-r", help="jsonl: the FashionIQ/CIRR root; writes each captions/cap.*.json the table covers with a `negatives` list added. ntuple --images path: the folder relative paths are joined to (default: the root `cir-mine embed` recorded)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing output files."),
):
    """Export a negatives table: sentence-transformers n-tuples (ntuple), wide per-query Parquet (wide), JSON lines or CLIP4Cir caption files (jsonl)."""
    from cir_mine.data.workspace import Workspace
    from cir_mine.miner.core.export import export_negatives
    from cir_mine.miner.inspection.render import export_line

    ws = Workspace(work).require() if work is not None else None
    r = export_negatives(negs, fmt.value, out, root=root, overwrite=overwrite, ws=ws, images=images)
    typer.echo(export_line(r, fmt.value, caption_files=root is not None and fmt.value == "jsonl"))


@command(mine_app, "eval")
def eval_cmd(
    work: Path = WORK,
    split: str = typer.Option("val", "--split", "-s", help="Split whose queries the embeddings are of (gallery.{split}.parquet is the gallery)."),
    query_emb: Path = typer.Option(..., "--query-emb", help="Your model's query embeddings: a .npy float32[n_queries, d], in the triplets' row order (or any order, with --query-ids)."),
    query_ids: Optional[Path] = QUERY_IDS,
    exclude_reference: bool = typer.Option(False, "--exclude-reference", help="FashionIQ: also remove each query's reference image from its category's gallery (CLIP4Cir's validate.py keeps it; CIRR always removes it)."),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as one JSON object."),
):
    """Evaluate your own model's query embeddings: FashionIQ R@10/R@50 per category, CIRR R@K and Recall_subset@K."""
    import json

    from cir_mine.miner.negatives import QueryFile
    from cir_mine.train.metrics import evaluate_file, format_metrics

    m = evaluate_file(work, split, QueryFile(query_emb, query_ids), exclude_reference=exclude_reference)
    typer.echo(json.dumps(m, sort_keys=True) if as_json else format_metrics(split, m))


# ------------------------------------------------------------------------------------------------
# cir-mine stats / sql / inspect / report: see the negatives


@command(mine_app)
def stats(
    negs: List[Path] = NEGS,
    work: Optional[Path] = typer.Option(None, "--work", "-w", help="Workspace (checks the tables belong to it; adds negative categories)."),
    split: Optional[str] = typer.Option(None, "--split", "-s", help="Split (default: the tables' own)."),
):
    """Negatives per query, Δ quantiles and histogram, category and attribute mix, shortfall, round overlap."""
    from cir_mine.miner.inspection.stats import format_stats, summarize

    typer.echo(spell_hints(format_stats(summarize(negs, work, split))), nl=False)


@command(mine_app)
def sql(
    query: str = typer.Argument(..., help="SQL over the views negs, gallery, triplets, gallery_emb, triplet_emb."),
    negs: Optional[List[Path]] = typer.Argument(None, help="Negatives table(s) (the view negs)."),
    work: Optional[Path] = typer.Option(None, "--work", "-w", help="Workspace (views gallery, triplets)."),
    split: Optional[str] = typer.Option(None, "--split", "-s", help="Split (default: the tables' own, else train)."),
    fmt: SqlFormat = typer.Option(SqlFormat.table, "--format", "-f", help="Output format."),
):
    """Run DuckDB SQL over negatives tables and the workspace (see docs/queries.md)."""
    from cir_mine.miner.inspection.sql import format_rows, sql_query

    typer.echo(format_rows(sql_query(query, negs or [], work, split), fmt.value), nl=False)


@command(mine_app)
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
):
    """Contact sheet: reference, caption, target, then negatives labelled with Δ, score, category, attributes."""
    from cir_mine.miner.inspection.contact_sheet import contact_sheet
    from cir_mine.miner.inspection.render import sheet_lines

    r = contact_sheet(negs, work, out, query_id or [], sample, root, split, max_negatives, seed, overwrite=overwrite)
    typer.echo(sheet_lines(r))


@command(mine_app)
def report(
    negs: List[Path] = NEGS,
    work: Path = WORK,
    out: Path = typer.Option(..., "--out", "-o", help="HTML file to write (self-contained, plots embedded)."),
    split: Optional[str] = typer.Option(None, "--split", "-s", help="Split (default: the tables' own)."),
    root: Optional[Path] = ROOT_OF_PATHS,
    n_sheet_queries: int = typer.Option(3, "--sheets", help="Queries drawn in the contact sheets (0: none)."),
    max_negatives: int = typer.Option(6, "--max-negatives", help="Negatives per query in the contact sheets."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sampled queries and scatter points."),
    overwrite: bool = OVERWRITE,
):
    """One self-contained HTML report: Δ per strategy, scores, mixes, shortfall, top negatives, rounds, sheets."""
    from cir_mine.miner.inspection.render import report_line
    from cir_mine.miner.inspection.report import write_report

    r = write_report(negs, work, out, overwrite=overwrite, split=split, root=root, n_sheet_queries=n_sheet_queries,
                     max_negatives=max_negatives, seed=seed)
    typer.echo(report_line(out, r))


# ------------------------------------------------------------------------------------------------
# cir-train

TRAIN = Options(TrainConfig, flags={"work": ("--work", "-w"), "split": ("--split", "-s"), "out": ("--out", "-o"),
                                    "negatives": ("--negatives", "-n"), "epochs": ("--epochs", "-e"),
                                    "batch_size": ("--batch-size", "-b")},
                spell={"work": PATH_OR_EMPTY, "out": PATH_OR_EMPTY, "negatives": PATH, "eval_work": PATH,
                       "extra_triplets": PATHS})


@command(train_app, cfg=TRAIN, ray=Options(RayConfig, only=("address",), names={"address": "ray_address"},
                                          lead="refresh of a table mined with --engine ray: "))
def train(
    cfg: TrainConfig = None,
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this directory."),
    ray: RayConfig = None,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run already in --out (without it, an existing run is an error)."),
    version: bool = _version_option("cir-train"),
    quiet: bool = QUIET,
    ctx: typer.Context = None,
):
    """Train a combiner on cached features with in-batch and mined negatives; evaluate every epoch."""
    from cir_mine.train.render import epoch_line, ignored_line, run_lines
    from cir_mine.train.session import remine_line, run_training

    note = (lambda text: None) if quiet else functools.partial(typer.echo, err=True)
    used = []
    with progress_bar("train", None, quiet, unit="epochs") as advance:
        def on_config(run: TrainConfig) -> None:
            used.append(run)
            ignored = changed_options(ctx, TRAIN, run.to_dict()) if resume is not None else []
            if ignored:
                typer.echo(ignored_line(resume, ignored, functools.partial(flag, flags=train.flags)), err=True)
            advance(0, total=run.epochs_to_run())

        def on_epoch(rec: dict) -> None:
            advance(1)
            note(epoch_line(rec))

        m = run_training(None if resume is not None else cfg, resume=resume, ray_address=ray.address,
                         overwrite=overwrite, on_config=on_config, on_epoch=on_epoch,
                         on_remine=lambda mining_round, epoch, meta: note(remine_line(mining_round, epoch, meta)))
    typer.echo(run_lines(used[0].out, m))


def mine_main() -> None:
    prefer_fast_pool()
    mine_app()


def train_main() -> None:
    prefer_fast_pool()
    train_app()


if __name__ == "__main__":
    mine_main()
