"""Shared fixtures: the read-only data beside the checkout (skipped cleanly when absent), synthetic
worlds (generated once per session and configuration) and tiny dataset folders."""

import os
from pathlib import Path

import pytest

from cir_mine.data.synthetic import SynthConfig, generate
from tests.fixtures import make_cirr, make_fashioniq

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CIR_MINE_SHARED", REPO.parent / "shared"))


def shared_path(*parts) -> Path:
    """A path under ../shared (or $CIR_MINE_SHARED); the calling test is skipped when it is absent."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} is absent (the read-only ../shared data beside the checkout)")
    return p


# -- the shared data (read-only) --------------------------------------------------------------------


@pytest.fixture
def fiq_proxy() -> Path:
    """The fiq-proxy workspace (FashionIQ-like, 8847 training queries, MiniLM text)."""
    return shared_path("fiq-proxy")


@pytest.fixture
def shared_fashioniq() -> Path:
    """The FashionIQ annotations (captions, image_splits, tags; no images)."""
    return shared_path("fashion-iq")


@pytest.fixture
def shared_cirr() -> Path:
    """The CIRR annotations."""
    return shared_path("cirr")


# -- synthetic worlds ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def synth_world(tmp_path_factory):
    """``synth_world(**SynthConfig fields) -> Path``: a synthetic workspace generated once per session
    and configuration. Read-only: a test that writes into a workspace copies it first."""
    made: dict = {}

    def make(**fields) -> Path:
        cfg = SynthConfig(**fields)
        key = tuple(sorted(fields.items()))
        if key not in made:
            made[key] = tmp_path_factory.mktemp("world")
            generate(cfg, made[key])
        return made[key]

    return make


@pytest.fixture(scope="session")
def synth_work(synth_world) -> Path:
    """The default small synthetic workspace (train split; 3000 images, 600 queries, d=32)."""
    return synth_world(n_gallery=3000, n_triplets=600, dim=32, seed=7)


# -- tiny dataset folders --------------------------------------------------------------------------


@pytest.fixture
def fiq_root(tmp_path) -> Path:
    return make_fashioniq(tmp_path / "fiq")


@pytest.fixture
def cirr_root(tmp_path) -> Path:
    return make_cirr(tmp_path / "cirr")
