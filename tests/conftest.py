import os
from pathlib import Path

import pytest

from cir_mine.data.synthetic import SynthConfig, generate
from tests.fixtures import make_cirr, make_fashioniq

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CIR_MINE_SHARED", REPO.parent / "shared"))


def shared_path(*parts) -> Path:
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} is absent (the read-only ../shared data beside the checkout)")
    return p


@pytest.fixture(scope="session")
def synth_work(tmp_path_factory) -> Path:
    """A small synthetic workspace (train split), shared read-only by tests."""
    out = tmp_path_factory.mktemp("synth")
    generate(SynthConfig(n_gallery=3000, n_triplets=600, dim=32, seed=7), out)
    return out


@pytest.fixture
def fiq_root(tmp_path) -> Path:
    return make_fashioniq(tmp_path / "fiq")


@pytest.fixture
def cirr_root(tmp_path) -> Path:
    return make_cirr(tmp_path / "cirr")
