"""The options of `cir-mine negatives` and `cir-train` against the config dataclasses: every field
has an option, every option's default is its field's default, and library errors that name a
parameter reach the user as its flag."""
import dataclasses

import pytest
import typer.main

from cir_mine.cli import GUARD_SWITCHES, NEGATIVES_FLAGS, flag, mine_app, train_app
from cir_mine.data.errors import UsageError
from cir_mine.miner.core.mine import MineConfig
from cir_mine.train.loop import TrainConfig

# options of the commands that are no config field, and why
NEGATIVES_ONLY = {"work", "split", "out", "checkpoint", "query_emb_path", "query_ids_path", "mining_round", "no_deepen", "no_guard", "quiet",
                  "verbose", "overwrite"}
# the search engine (ShardConfig / RayConfig, recorded in the footer as meta["engine"], not MineConfig)
NEGATIVES_ONLY |= {"engine", "shards", "shard_index", "shard_nprobe", "ray_address", "cpus_per_shard"}
# ray_address: the cluster the refresh of a --engine ray table joins
TRAIN_ONLY = {"resume", "quiet", "verbose", "version", "overwrite", "ray_address"}
# fields whose CLI default spells the dataclass default differently
TRAIN_SPELLED = {"work": (None, ""), "out": (None, ""), "extra_triplets": (None, [])}


def _command(app, name=None):
    group = typer.main.get_command(app)
    return group.commands[name] if name else group


def _options(cmd) -> dict:
    return {p.name: p for p in cmd.params if p.param_type_name == "option"}


def _by_flag(cmd) -> dict:
    return {o: p for p in cmd.params if p.param_type_name == "option" for o in p.opts}


def test_every_mining_option_has_a_flag_with_its_default():
    cmd = _command(mine_app, "negatives")
    by_flag = _by_flag(cmd)
    defaults = MineConfig().options()
    for name, default in defaults.items():
        f = flag(name, NEGATIVES_FLAGS)
        if f.startswith("--no-guard "):
            assert f.split(" ", 1)[1] in GUARD_SWITCHES and default is True, name
            continue
        assert f in by_flag, f"MineConfig option {name} has no flag {f}"
        got = by_flag[f].default
        if name == "category_shares":
            got = tuple(float(x) for x in got.split(","))
        assert got == default, f"{f}: default {got!r}, MineConfig says {default!r}"
    # the guards that are on by default have a --no-guard switch, thresholds a None spelling
    assert {NEGATIVES_FLAGS["rho=None"], NEGATIVES_FLAGS["dup_threshold=None"]} <= {f"--no-guard {s}" for s in GUARD_SWITCHES}


def test_every_negatives_option_is_a_config_field():
    cmd = _command(mine_app, "negatives")
    fields = set(MineConfig().options())
    extra = set(_options(cmd)) - fields - NEGATIVES_ONLY
    assert not extra, f"options of `cir-mine negatives` that MineConfig does not know: {sorted(extra)}"


def test_every_train_field_has_an_option_with_its_default():
    cmd = _command(train_app)
    opts = _by_flag(cmd)
    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert flag(f.name) in opts, f"TrainConfig.{f.name} has no option {flag(f.name)}"
        got = opts[flag(f.name)].default
        if f.name in TRAIN_SPELLED:
            assert (got, default) == TRAIN_SPELLED[f.name], f.name
        else:
            assert got == default, f"{flag(f.name)}: default {got!r}, TrainConfig says {default!r}"
    extra = set(_options(cmd)) - {f.name for f in dataclasses.fields(TrainConfig)} - TRAIN_ONLY
    assert not extra, f"options of cir-train that TrainConfig does not know: {sorted(extra)}"


@pytest.mark.parametrize("app,args,message", [
    (mine_app, ["--strategy", "midzone", "--rho", "2"],
     "Error: --rho must be in (0, 1] (got 2.0); switch the cap off with --no-guard cap."),
    (mine_app, ["--strategy", "midzone", "--max-candidates", "0"],
     "Error: --max-candidates must be at least 1 (use --no-deepen to switch deepening off)."),
    (mine_app, ["--strategy", "midzone", "-k", "0"], "Error: -k must be at least 1 (got 0)."),
    (mine_app, ["--strategy", "random", "--mix", "random:1"], "Error: give either --strategy or --mix, not both."),
    (mine_app, ["--strategy", "category-discrepant", "--discrepant-pool", "near"],
     "Error: --discrepant-pool 'near': use target or query."),
    (mine_app, ["--strategy", "attribute-mismatch", "--mismatch-kept-share", "2"],
     "Error: --mismatch-kept-share 2.0: must be in [0, 1]."),
    (train_app, ["--schedule", "0:random"],
     "Error: --schedule needs --negatives: it picks the mix of that table's strategies per epoch."),
    (train_app, ["--batch-size", "1"], "Error: --batch-size must be at least 2 (in-batch negatives need two queries)."),
])
def test_library_errors_are_shown_with_flags(synth_work, tmp_path, app, args, message):
    from typer.testing import CliRunner

    base = (["negatives", "--work", str(synth_work), "--out", str(tmp_path / "n.parquet")] if app is mine_app
            else ["--work", str(synth_work), "--out", str(tmp_path / "run"), "-q"])
    r = CliRunner().invoke(app, base + args)
    assert r.exit_code == 2 and r.output.strip() == message, r.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("app,args,message", [
    (mine_app, ["synth", "--dim", "4"], "Error: --dim must be at least 8."),
    (mine_app, ["synth", "--salience", "colour=1"],
     "Error: bad --salience entry 'colour=1': use GROUP=WEIGHT with GROUP in color, sleeve, pattern, length, neckline."),
    (mine_app, ["negatives", "--schedule", "x:random"],
     "Error: bad --schedule entry 'x:random': use EPOCH:MIX, e.g. 0:random,2:midzone,4:hardest."),
    (mine_app, ["positives", "--neighbors", "1"], "Error: --per-image and --max-diff must be >= 1, --neighbors >= 2."),
    (train_app, ["--model", "mlp"], "Error: --model 'mlp': use one of combiner, attention, dqe, sum."),
])
def test_other_library_errors_are_shown_with_flags(synth_work, tmp_path, app, args, message):
    from typer.testing import CliRunner

    out = ["--out", str(tmp_path / "out" / "x.parquet")] if app is mine_app else ["--out", str(tmp_path / "run")]
    work = [] if args[0] == "synth" else ["--work", str(synth_work)]
    r = CliRunner().invoke(app, args + work + out + (["-q"] if app is train_app else []))
    assert r.exit_code == 2 and r.output.strip() == message, r.output


def test_render_spells_whole_names_only():
    e = UsageError("k (3) is above gallery k_max; see /data/k/gallery and k.", params=("k",))
    assert e.render(flag) == "-k (3) is above gallery k_max; see /data/k/gallery and -k."
    assert str(e).startswith("k (3)")
