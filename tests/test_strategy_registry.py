"""A strategy is one module: a toy one registered here joins the registry, the mix parser, the
flat options of MineConfig and the miner, with nothing else changed."""

from dataclasses import dataclass, fields

import numpy as np
import pytest

from cir_mine.data.errors import UsageError
from cir_mine.data.workspace import Workspace
from cir_mine.miner.core.guards import GuardConfig
from cir_mine.miner.core.mine import MineConfig, mine_negatives
from cir_mine.miner.core.strategies import REGISTRY, parse_mix, register, unregister
from cir_mine.miner.core.strategies.selection import Picks, pick


@dataclass(frozen=True)
class LastRanksParams:
    # fmt: off
    last_n: int = 5                       # pick among the last last_n ranks of the search
    # fmt: on

    def validate(self) -> None:
        if self.last_n < 1:
            raise UsageError(f"last_n must be at least 1 (got {self.last_n}).", params=("last_n",))


def last_ranks(ctx, k: int, stream: int, p: LastRanksParams) -> Picks:
    """The deepest ``last_n`` ranks of the query's ranking."""
    c = ctx.ranked
    return pick(ctx, c, c.valid & (c.ranks >= ctx.depth - p.last_n), k, stream, "top")


@pytest.fixture
def toy():
    register("last-ranks", LastRanksParams, ranked=True, hint="raise --last-n")(last_ranks)
    yield "last-ranks"
    unregister("last-ranks")


def test_toy_strategy_joins_registry_mix_parser_and_config(toy):
    assert REGISTRY[toy].fn is last_ranks and REGISTRY[toy].ranked
    assert parse_mix(f"{toy}:0.5,random:0.5") == [(toy, 0.5), ("random", 0.5)]
    cfg = MineConfig.of(strategy=toy, last_n=7)
    assert cfg.params_of(toy) == LastRanksParams(7) and cfg.options()["last_n"] == 7
    assert MineConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(UsageError, match=r"^last_n must be at least 1 \(got 0\)\.$"):
        MineConfig.of(strategy=toy, last_n=0).validate()


def test_toy_strategy_mines(toy, synth_work):
    res = mine_negatives(
        Workspace(synth_work),
        "train",
        MineConfig.of(mix=f"{toy}:0.5,random:0.5", k=4, candidates=64, last_n=10, rho=None),
    )
    t = res.table
    ranks = np.asarray([r["rank"] for r in t.to_pylist() if r["strategy"] == toy])
    assert ranks.size > 0 and ranks.min() >= 64 - 10
    assert set(t["strategy"].to_pylist()) == {toy, "random"}


def test_unknown_strategy_is_refused_after_unregister(toy):
    unregister(toy)
    with pytest.raises(UsageError, match="unknown strategy 'last-ranks'"):
        parse_mix(toy)


def test_registration_refuses_taken_or_defaultless_parameters():
    @dataclass(frozen=True)
    class Clash:
        # fmt: off
        delta_lo: float = 0.0             # midzone's already
        # fmt: on

    @dataclass(frozen=True)
    class NoDefault:
        # fmt: off
        width: float                      # no default
        # fmt: on

    with pytest.raises(TypeError, match="delta_lo is already midzone's"):
        register("clash", Clash)(last_ranks)
    with pytest.raises(TypeError, match="needs a default"):
        register("no-default", NoDefault)(last_ranks)
    assert "clash" not in REGISTRY and "no-default" not in REGISTRY


def test_every_builtin_strategy_has_its_own_module_and_params():
    names = [
        "random",
        "in-batch",
        "hardest",
        "semihard",
        "midzone",
        "category",
        "category-discrepant",
        "attribute-mismatch",
        "soft",
        "semantic",
        "verified",
    ]
    assert list(REGISTRY)[: len(names)] == names
    for name in names:
        s = REGISTRY[name]
        assert s.fn.__module__ == "cir_mine.miner.core.strategies." + name.replace("-", "_")
        s.params()  # every field has a default


def test_flat_option_names_are_unique():
    owners = MineConfig.option_owners()
    config = [f.name for f in fields(MineConfig) if f.name not in ("guards", "params")]
    guards = [f.name for f in fields(GuardConfig)]
    params = [f.name for s in REGISTRY.values() for f in fields(s.params)]
    assert len(owners) == len(config) + len(guards) + len(params)


def test_config_reads_the_flat_form_of_earlier_tables():
    flat = {
        "strategy": "midzone",
        "k": 5,
        "delta_lo": 0.05,
        "rho": None,
        "category_shares": [0.5, 0.3, 0.2],
        "exclude_target": True,
    }
    cfg = MineConfig.from_dict(flat)
    assert cfg.guards.rho is None and cfg.params_of("midzone").delta_lo == 0.05
    assert cfg.params_of("category").category_shares == (0.5, 0.3, 0.2)
    with pytest.raises(UsageError, match="unknown mining config key"):
        MineConfig.from_dict({"delta_low": 0.1})


def test_negatives_help_names_every_registered_strategy():
    """--strategy's help lists the registry's names, in its order."""
    import typer.main

    from cir_mine.cli import mine_app

    cmd = typer.main.get_command(mine_app).commands["negatives"]
    help = next(p.help for p in cmd.params if p.name == "strategy")
    assert help.endswith(": " + ", ".join(REGISTRY) + ".")


def _stable_picks(key, eligible, fill, k):
    """What select keeps of the stable argsort: the eligible columns among the first k, in order."""
    order = np.argsort(np.where(eligible, key, fill), axis=1, kind="stable")[:, :k]
    return np.where(np.take_along_axis(eligible, order, 1), order, -1)


@pytest.mark.parametrize("high", [4, 1 << 62])
def test_first_k_stable_picks_as_the_stable_sort_with_ties_and_fill_keys(high):
    from cir_mine.miner.core.strategies.selection import first_k_stable

    rng = np.random.default_rng(high % 97)
    fill = np.iinfo(np.uint64).max
    key = rng.integers(0, high, (300, 40), dtype=np.int64).astype(np.uint64)  # high=4: ties everywhere
    key[::7, 3] = fill  # an eligible key equal to the fill value
    eligible = rng.random(key.shape) < 0.6
    for k in (1, 10, 40):
        got = first_k_stable(np.where(eligible, key, fill), eligible, fill, k)
        assert np.array_equal(
            np.where(np.take_along_axis(eligible, got, 1), got, -1), _stable_picks(key, eligible, fill, k)
        )


@pytest.mark.parametrize("kind", ["uint64", "int64", "columns"])
@pytest.mark.parametrize("high", [4, 1 << 62])
def test_compiled_first_k_is_the_stable_sort_column_for_column(kind, high):
    """The compiled selection returns the very columns of the stable argsort (eligible or not), for
    uint64 and int64 keys (negative ones too), column order, ties, an eligible key equal to the fill,
    rows with fewer than k eligible and lines longer than the kernel's insertion sort."""
    from cir_mine.miner.core.strategies import selection

    if selection.KERNELS is None:
        pytest.skip("the selection kernels are not built in this install")
    rng = np.random.default_rng(high % 89)
    for L in (1, 40, 700):
        eligible = rng.random((200, L)) < 0.6
        eligible[::11] = False  # nothing eligible
        eligible[5::13] = True  # everything eligible
        if kind == "columns":
            key, ref = None, np.broadcast_to(np.arange(L, dtype=np.int64), (200, L))
        else:
            key = rng.integers(-high if kind == "int64" else 0, high, (200, L), dtype=np.int64)
            key = key.astype(np.uint64) if kind == "uint64" else key
            key[::7, 0] = np.iinfo(key.dtype).max  # an eligible key equal to the fill value
            ref = key
        fill = np.iinfo(ref.dtype).max
        for k in sorted({1, min(10, L), L}):
            got = selection.first_k_order(key, eligible, k)
            want = np.argsort(np.where(eligible, ref, fill), axis=1, kind="stable")[:, :k]
            assert np.array_equal(got, want)
            slow = selection.first_k_order(key, eligible, k, kernels=False)  # the numpy code: the same picks
            picked = lambda o: np.where(np.take_along_axis(eligible, o, 1), o, -1)
            assert np.array_equal(picked(slow), picked(got))


def test_compiled_hash_keys_are_the_numpy_keys():
    from cir_mine.miner.core.strategies import selection

    if selection.KERNELS is None:
        pytest.skip("the selection kernels are not built in this install")
    rng = np.random.default_rng(3)
    qhash = rng.integers(0, 1 << 63, 50, dtype=np.int64).astype(np.uint64) * np.uint64(2)
    values = rng.integers(-1, 1 << 40, (50, 33), dtype=np.int64)
    for stream in (0, 1, 17, (1 << 64) - 1):
        got = selection.hash_keys(qhash, values, stream)
        assert np.array_equal(got, selection.hash_keys(qhash, values, stream, kernels=False))
    view = np.broadcast_to(np.arange(33, dtype=np.int64), (50, 33))  # a broadcast view, as random draws pass
    assert np.array_equal(selection.hash_keys(qhash, view, 5), selection.hash_keys(qhash, view, 5, kernels=False))
