"""The options of every command against the config dataclasses: an option that sets a config field is
made of that field (its name, its default through the option's spelling, its comment as help), every
config dataclass the CLI exposes is covered, no option restates a field by hand, and library errors
that name a parameter reach the user as the flag of the option that sets it."""

import dataclasses

import pytest
import typer.main
from typer.testing import CliRunner

from cir_mine import cli
from cir_mine.cli import GUARD_SWITCHES, NEGATIVES_FLAGS, flag, mine_app, train_app
from cir_mine.data.errors import UsageError
from cir_mine.data.fields import field_default, field_docs
from cir_mine.miner.core.mine import MineConfig
from cir_mine.miner.core.strategies import REGISTRY
from cir_mine.train.config import TrainConfig

# every config dataclass whose fields the CLI sets (Remine and the demo read their own)
EXPOSED = {
    "MineConfig",
    "GuardConfig",
    "TrainConfig",
    "SynthConfig",
    "PositivesConfig",
    "CommandCaptioner",
    "EncoderConfig",
    "ImageRun",
    "EmbedJob",
    "RayEmbedRun",
    "RayConfig",
    "ShardConfig",
    "EngineConfig",
    "DemoConfig",
} | {s.params.__name__ for s in REGISTRY.values() if dataclasses.fields(s.params)}
# fields set by an option written by hand, and why
BY_HAND = {
    ("embed", "EmbedJob", f): "no default; the options every command shares"
    for f in ("dataset", "root", "split", "work")
}


def _commands() -> dict:
    """Command name -> (click command, the function typer calls)."""
    group = typer.main.get_command(mine_app)
    fns = {c.name or c.callback.__name__.replace("_", "-"): c.callback for c in mine_app.registered_commands}
    out = {name: (cmd, fns[name]) for name, cmd in group.commands.items()}
    out["cir-train"] = (typer.main.get_command(train_app), cli.train)
    return out


COMMANDS = _commands()
GROUPS = [
    (name, key, group) for name, (_, fn) in COMMANDS.items() for key, group in getattr(fn, "option_groups", {}).items()
]


def test_every_exposed_config_is_made_into_options():
    made = {o.owner.__name__ for _, _, group in GROUPS for o in group.options()}
    assert EXPOSED <= made, f"config dataclasses no command exposes: {sorted(EXPOSED - made)}"


@pytest.mark.parametrize("name,key,group", GROUPS, ids=[f"{n}:{k}" for n, k, _ in GROUPS])
def test_every_config_option_is_its_field(name, key, group):
    params = {p.name: p for p in COMMANDS[name][0].params}
    for o in group.options():
        p = params[o.name]
        where = f"{name} {p.opts[0]} ({o.owner.__name__}.{o.field})"
        spell = group.spell.get(o.field)
        assert (spell.to_field(p.default) if spell else p.default) == field_default(o.owner, o.field), where
        doc = field_docs(o.owner)[o.field]
        assert doc and doc.lower() in p.help.lower(), f"{where}: help {p.help!r} is not the field's comment {doc!r}"
        assert set(o.flags) <= set(p.opts + p.secondary_opts) | {o.flags[0]}, where


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_no_option_restates_a_field_by_hand(name):
    cmd, fn = COMMANDS[name]
    groups = getattr(fn, "option_groups", {})
    made = {o.name for g in groups.values() for o in g.options()}
    fields = {(g.cls.__name__, f.name) for g in groups.values() for f in dataclasses.fields(g.cls)}
    for p in cmd.params:
        if p.name in made:
            continue
        for cls_name, f in fields:
            if f == p.name:
                assert (name, cls_name, f) in BY_HAND, f"{name} {p.opts[0]} restates {cls_name}.{f} by hand"


def test_every_mining_option_is_an_option_or_a_guard_switch():
    names = {p.name for p in COMMANDS["negatives"][0].params}
    for name, default in MineConfig().options().items():
        spelled = NEGATIVES_FLAGS.get(name) or NEGATIVES_FLAGS.get(name + "=None")
        if spelled and spelled.startswith("--no-guard "):
            assert spelled.split(" ", 1)[1] in GUARD_SWITCHES
            if name not in names:
                assert default is True, name
            continue
        assert name in names, f"MineConfig option {name} has no option"


def test_every_train_field_has_an_option():
    names = {p.name for p in COMMANDS["cir-train"][0].params}
    assert {f.name for f in dataclasses.fields(TrainConfig)} <= names


@pytest.mark.parametrize(
    "param,spelled",
    [
        ("k", "-k"),
        ("mining_round", "--round"),
        ("ws", "--work"),
        ("query_emb", "--query-emb"),
        ("max_candidates=None", "--no-deepen"),
        ("rho=None", "--no-guard cap"),
        ("exclude_target", "--no-guard target"),
        ("dup_threshold=None", "--no-guard near-duplicate"),
        ("index", "--index"),
        ("nprobe", "--nprobe"),
        ("shards", "--shards"),
        ("shard_index", "--shard-index"),
        ("shard_nprobe", "--shard-nprobe"),
        ("ShardConfig.index", "--shard-index"),
        ("ShardConfig.nprobe", "--shard-nprobe"),
        ("engine", "--engine"),
        ("ray_address", "--ray-address"),
        ("RayConfig.address", "--ray-address"),
        ("cpus_per_shard", "--cpus-per-shard"),
        ("delta_lo", "--delta-lo"),
        ("category_shares", "--category-shares"),
    ],
)
def test_negatives_spells_each_parameter_as_its_option(param, spelled):
    assert flag(param, NEGATIVES_FLAGS) == spelled


@pytest.mark.parametrize(
    "command,param,spelled",
    [
        ("cir-train", "batch_size", "--batch-size"),
        ("cir-train", "ray_address", "--ray-address"),
        ("embed", "address", "--ray-address"),
        ("embed", "RayEmbedRun.batch_size", "--batch-size"),
        ("embed", "triplets_file", "--triplets"),
        ("positives", "ignore_groups", "--ignore-group"),
        ("positives", "timeout", "--command-timeout"),
        ("synth", "unmentioned_change", "--unmentioned-change"),
        ("report", "n_sheet_queries", "--sheets"),
        ("demo", "world", "--world"),
    ],
)
def test_every_command_spells_its_parameters(command, param, spelled):
    assert flag(param, COMMANDS[command][1].flags) == spelled


@pytest.mark.parametrize(
    "app,args,message",
    [
        (
            mine_app,
            ["--strategy", "midzone", "--rho", "2"],
            "Error: --rho must be in (0, 1] (got 2.0); switch the cap off with --no-guard cap.",
        ),
        (
            mine_app,
            ["--strategy", "midzone", "--max-candidates", "0"],
            "Error: --max-candidates must be at least 1 (use --no-deepen to switch deepening off).",
        ),
        (mine_app, ["--strategy", "midzone", "-k", "0"], "Error: -k must be at least 1 (got 0)."),
        (mine_app, ["--strategy", "random", "--mix", "random:1"], "Error: give either --strategy or --mix, not both."),
        (
            mine_app,
            ["--strategy", "category-discrepant", "--discrepant-pool", "near"],
            "Error: --discrepant-pool 'near': use target or query.",
        ),
        (
            mine_app,
            ["--strategy", "attribute-mismatch", "--mismatch-kept-share", "2"],
            "Error: --mismatch-kept-share 2.0: must be in [0, 1].",
        ),
        (
            mine_app,
            ["--strategy", "hardest", "--index", "ivf", "--shards", "2"],
            "Error: --index ivf searches in one process; with --engine or --shards, choose each shard's search with "
            "--shard-index.",
        ),
        (
            mine_app,
            ["--strategy", "hardest", "--category-shares", "a,b"],
            "Error: --category-shares 'a,b': use comma-separated numbers, e.g. 0.7,0.2,0.1.",
        ),
        (
            train_app,
            ["--schedule", "0:random"],
            "Error: --schedule needs --negatives: it picks the mix of that table's strategies per epoch.",
        ),
        (
            train_app,
            ["--batch-size", "1"],
            "Error: --batch-size must be at least 2 (in-batch negatives need two queries).",
        ),
    ],
)
def test_library_errors_are_shown_with_flags(synth_work, tmp_path, app, args, message):
    base = (
        ["negatives", "--work", str(synth_work), "--out", str(tmp_path / "n.parquet")]
        if app is mine_app
        else ["--work", str(synth_work), "--out", str(tmp_path / "run"), "-q"]
    )
    r = CliRunner().invoke(app, base + args)
    assert r.exit_code == 2 and r.output.strip() == message, r.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "app,args,message",
    [
        (mine_app, ["synth", "--dim", "4"], "Error: --dim must be at least 8."),
        (
            mine_app,
            ["synth", "--salience", "colour=1"],
            "Error: bad --salience entry 'colour=1': use GROUP=WEIGHT with GROUP in color, sleeve, pattern, length, neckline.",
        ),
        (
            mine_app,
            ["negatives", "--schedule", "x:random"],
            "Error: bad --schedule entry 'x:random': use EPOCH:MIX, e.g. 0:random,2:midzone,4:hardest.",
        ),
        (
            mine_app,
            ["positives", "--neighbors", "1"],
            "Error: --per-image and --max-diff must be >= 1, --neighbors >= 2.",
        ),
        (train_app, ["--model", "mlp"], "Error: --model 'mlp': use one of combiner, attention, dqe, sum."),
    ],
)
def test_other_library_errors_are_shown_with_flags(synth_work, tmp_path, app, args, message):
    out = ["--out", str(tmp_path / "out" / "x.parquet")] if app is mine_app else ["--out", str(tmp_path / "run")]
    work = [] if args[0] == "synth" else ["--work", str(synth_work)]
    r = CliRunner().invoke(app, args + work + out + (["-q"] if app is train_app else []))
    assert r.exit_code == 2 and r.output.strip() == message, r.output


def test_render_spells_whole_names_only():
    e = UsageError("k (3) is above gallery k_max; see /data/k/gallery and k.", params=("k",))
    assert e.render(lambda p: flag(p, NEGATIVES_FLAGS)) == "-k (3) is above gallery k_max; see /data/k/gallery and -k."
    assert str(e).startswith("k (3)")
