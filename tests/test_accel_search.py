"""The torch search back-end on torch's CPU device: the same rows and scores as the CPU path in every
precision, selection kernel, memory budget and batch, the same mined tables for every strategy; and
the one device rule."""

import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from cir_mine.data.errors import UsageError
from cir_mine.data.workspace import Workspace
from cir_mine.miner.accel.device import choose_device
from cir_mine.miner.accel.open import device_search
from cir_mine.miner.accel.search import TorchSearch, block_topk, score_roundoff
from cir_mine.miner.core.mine import MineConfig, mine_negatives
from cir_mine.miner.core.search.backends import ExactSearch
from cir_mine.miner.core.search.exact import gathered_dot, rounding_gap
from cir_mine.miner.core.strategies import REGISTRY
from tests.search_probe import near_ties


def _unit(a):
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


def _same(a, b):
    return np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("kernel", ["heap", "topk"])
def test_rows_and_scores_equal_the_cpu_path(precision, kernel, tmp_path):
    """On a gallery whose scores crowd within float32 rounding (where a low-precision score cannot
    tell hundreds of rows apart) and on a plain one, in one batch and in batches of 7, with the
    gallery on the device and streamed from a memory-mapped file in small blocks."""
    rng = np.random.default_rng(1)
    for xb, xq in (near_ties(), (_unit(rng.standard_normal((4000, 48))), _unit(rng.standard_normal((90, 48))))):
        for k in (1, 10, 100):
            ref = ExactSearch(xb, device="cpu").search(xq, k)
            resident = TorchSearch(xb, "cpu", precision, kernels=(kernel,))
            assert resident.gallery is not None
            assert _same(resident.search(xq, k), ref), (precision, kernel, k)
            parts = [resident.search(xq[s : s + 7], k) for s in range(0, len(xq), 7)]
            assert _same((np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])), ref)
        path = tmp_path / f"g{xb.shape[1]}.npy"
        np.save(path, xb)
        mapped = np.load(path, mmap_mode="r")
        streamed = TorchSearch(mapped, "cpu", precision, memory=1 << 20, block_rows=700, kernels=(kernel,))
        assert streamed.gallery is None and streamed.chunk_queries(200) < len(xq)
        assert _same(streamed.search(xq, 100), ExactSearch(xb, device="cpu").search(xq, 100))


def test_low_precision_widens_its_scan_where_scores_crowd():
    """bf16 cannot separate the near-tie rows: the first scans fill up, the back-end scans wider for
    the next batches, and the rows stay the exact ones."""
    xb, xq = near_ties()
    ref = ExactSearch(xb, device="cpu").search(xq, 50)
    ts = TorchSearch(xb, "cpu", "bf16", kernels=("topk",))
    before = ts.scan_depth(66)
    for s in range(0, len(xq), 20):
        assert _same(ts.search(xq[s : s + 20], 50), (ref[0][s : s + 20], ref[1][s : s + 20]))
    assert ts.scan_depth(66) > before


def test_concurrent_searches_equal_sequential():
    """Prefetch searches the next batch in a worker thread while a strategy searches the same
    back-end: nothing is shared between the two searches."""
    rng = np.random.default_rng(5)
    xb = _unit(rng.standard_normal((6000, 32)))
    qa, qb = _unit(rng.standard_normal((300, 32))), _unit(rng.standard_normal((200, 32)))
    ts = TorchSearch(xb, "cpu", "bf16")
    ref = {"a": ts.search(qa, 40), "b": ts.search(qb, 90)}
    out, errors = {}, []

    def work(name, xq, k):
        try:
            out[name] = [ts.search(xq, k) for _ in range(4)]
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=a) for a in (("a", qa, 40), ("b", qb, 90))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(_same(got, ref[name]) for name, runs in out.items() for got in runs)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    b=st.integers(1, 6),
    R=st.integers(1, 700),
    L=st.integers(1, 80),
    group=st.sampled_from([1, 2, 4, 8, 32]),
    levels=st.sampled_from([3, 50, None]),
)
def test_block_topk_returns_the_best_values(seed, b, R, L, group, levels):
    """The grouped top-k returns each row's best L values (ties among few distinct values too) and
    the columns that hold them."""
    L = min(L, R)
    rng = np.random.default_rng(seed)
    S = rng.standard_normal((b, R)).astype(np.float32)
    if levels:
        S = np.round(S * levels) / levels
    S = torch.from_numpy(S)
    v, cols = block_topk(S, L, group)
    assert torch.equal(torch.sort(v, 1, descending=True).values, torch.topk(S, L, dim=1).values)
    assert torch.equal(S.gather(1, cols), v)
    assert all(len(set(r)) == L for r in cols.tolist())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_the_rounding_bound_covers_the_device_scores(precision):
    """Device scores of unit queries stay within the bound exact_cut is given, and the bound is not
    idle: without the precision's own share, bf16 and fp16 scores break it."""
    rng = np.random.default_rng(2)
    d = 256
    xb = _unit(rng.standard_normal((3000, d)) + 2.0)  # large, equal-signed elements
    xq = _unit(rng.standard_normal((64, d)) + 2.0)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    dev = torch.mm(torch.from_numpy(xq).to(dtype), torch.from_numpy(xb).to(dtype).T).float().numpy()
    exact = gathered_dot(xb, np.broadcast_to(np.arange(len(xb)), (len(xq), len(xb))).copy(), xq)
    err = np.abs(dev.astype(np.float64) - exact).max()
    extra = score_roundoff(precision, torch.device("cpu"), d, 1.0)
    assert err <= rounding_gap(d) + extra
    assert err > rounding_gap(d) + score_roundoff("fp32", torch.device("cpu"), d, 1.0)


def test_fp32_bound_follows_torchs_matmul_precision():
    """A float32 matmul allowed to round its inputs (torch's 'high' / 'medium') gets a wider bound."""
    cpu = torch.device("cpu")
    before = torch.get_float32_matmul_precision()
    try:
        strict = score_roundoff("fp32", cpu, 128, 1.0)
        torch.set_float32_matmul_precision("medium")
        assert score_roundoff("fp32", cpu, 128, 1.0) >= score_roundoff("bf16", cpu, 128, 1.0) > strict
    finally:
        torch.set_float32_matmul_precision(before)


def test_bad_options_name_their_parameter():
    xb = _unit(np.random.default_rng(0).standard_normal((50, 8)))
    with pytest.raises(UsageError, match="precision 'fp8'") as e:
        TorchSearch(xb, "cpu", "fp8")
    assert e.value.params == ("precision",)
    with pytest.raises(UsageError, match="choose among") as e:
        TorchSearch(xb, "cpu", kernels=("gemm",))
    assert e.value.params == ("kernels",)
    with pytest.raises(UsageError, match="float16 scores") as e:
        TorchSearch(xb * 1e5, "cpu", "fp16")
    assert e.value.params == ("precision",)


# -- mined tables ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ws(synth_work):
    return Workspace(synth_work)


STRATEGIES = sorted(n for n in REGISTRY if n not in ("in-batch", "verified")) + ["midzone:0.5,category:0.3,random:0.2"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_torch_backend_mines_the_cpu_table(ws, strategy):
    """Every strategy (and a mix) mines the numpy exact path's table through the torch back-end:
    fp32 (kernels raced) and bf16 (torch's top-k, the GPU's kernel), with prefetch, batches of any
    size and deepening."""
    base = dict(mix=strategy, k=8, seed=1, candidates=24, max_candidates=600, query_batch=128)
    ref = mine_negatives(ws, "train", MineConfig.of(**base))
    assert ref.table.num_rows > 0
    for precision, kernels, extra in (("fp32", None, {}), ("bf16", ("topk",), {"prefetch": True, "query_batch": 77})):
        res = mine_negatives(
            ws,
            "train",
            MineConfig.of(**{**base, **extra}),
            index=lambda xb, cfg: TorchSearch(xb, "cpu", precision, kernels=kernels),
        )
        assert res.table.equals(ref.table), (strategy, precision)
        searched = ref.meta["search"]["index"] != "none"  # random and category search nothing
        assert not searched or (res.meta["search"]["backend"], res.meta["search"]["source"]) == ("torch", "built")


def test_footer_records_the_torch_search_and_its_stages(ws):
    res = mine_negatives(
        ws, "train", MineConfig.of(strategy="hardest", k=5), index=lambda xb, cfg: TorchSearch(xb, "cpu", "bf16")
    )
    search, timing = res.meta["search"], res.meta["timing"]
    assert (search["backend"], search["device"], search["precision"], search["gpu"]) == ("torch", "cpu", "bf16", False)
    assert search["prefetch"] is False and timing["search_s"] > 0 and timing["rerank_s"] > 0


# -- the one device rule ---------------------------------------------------------------------------


def test_device_rule_on_a_machine_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_device("cpu") == "cpu" and choose_device("auto") == "cpu"
    with pytest.raises(UsageError, match=r"^device cuda: torch .* sees no GPU\. Use device auto or cpu") as e:
        choose_device("cuda")
    assert e.value.params == ("device",)
    with pytest.raises(UsageError, match=r"^device 'gpu': use auto, cpu or cuda\.$") as e:
        choose_device("gpu")
    assert e.value.params == ("device",)
    with pytest.raises(UsageError, match=r"^device 'gpu': use auto, cpu or cuda\.$"):
        MineConfig.of(strategy="hardest", device="gpu").validate()  # the core checks the spelling


def test_device_rule_with_cuda_picks_it_and_the_torch_backend(monkeypatch):
    """Where torch sees CUDA, 'auto' means it, and exact mining opens the torch back-end there; a
    FAISS index stays FAISS's (the core's) and 'cpu' is the core's exact search with the bfloat16
    scan in its race."""
    import cir_mine.miner.accel.open as open_mod

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "a test GPU")
    assert choose_device("auto") == "cuda" and choose_device("cuda:0") == "cuda:0"
    with pytest.raises(UsageError, match="sees 1 GPU"):
        choose_device("cuda:3")
    made = []
    monkeypatch.setattr(open_mod, "TorchSearch", lambda xb, device: made.append(device) or "torch back-end")
    xb = np.zeros((4, 2), np.float32)
    assert device_search(xb, MineConfig.of(device="auto")) == "torch back-end" and made == ["cuda"]
    assert device_search(xb, MineConfig.of(device="auto", index="ivf")) is None
    cpu = device_search(xb, MineConfig.of(device="cpu"))
    assert isinstance(cpu, ExactSearch) and set(cpu.scans) == {"bf16"} and made == ["cuda"]


def test_encoder_and_search_share_the_rule(monkeypatch):
    """Embedding asks the same function: a CUDA request without a GPU fails with the same message."""
    from cir_mine.miner.encode.clip import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError) as a:
        pick_device("cuda")
    with pytest.raises(UsageError) as b:
        choose_device("cuda")
    assert str(a.value) == str(b.value)
    assert pick_device("auto") == torch.device("cpu")


def test_cli_device_cuda_without_a_gpu_is_one_error_for_mining_and_embedding(synth_work, tmp_path, monkeypatch):
    """`--device cuda` where torch sees no GPU: the same `Error:` line (exit 2) from cir-mine negatives
    and cir-mine embed, before any search or embedding; `--device auto` mines on the CPU."""
    from typer.testing import CliRunner

    from cir_mine.cli import mine_app
    from tests.fixtures import make_folder

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    runner = CliRunner()
    want = (
        f"Error: --device cuda: torch {torch.__version__} ({'built for CUDA ' + torch.version.cuda if torch.version.cuda else 'a CPU-only build'}) "
        f"sees no GPU. Use --device auto or cpu, or run on a machine with a GPU."
    )
    r = runner.invoke(
        mine_app,
        [
            "negatives",
            "--work",
            str(synth_work),
            "--strategy",
            "hardest",
            "-k",
            "4",
            "--out",
            str(tmp_path / "n.parquet"),
            "--device",
            "cuda",
            "-q",
        ],
    )
    assert r.exit_code == 2 and r.output.strip().splitlines()[-1] == want, r.output
    assert not (tmp_path / "n.parquet").exists()
    root = make_folder(tmp_path / "folder")
    r = runner.invoke(
        mine_app,
        ["embed", "--dataset", "folder", "--root", str(root), "--work", str(tmp_path / "w"), "--device", "cuda", "-q"],
    )
    assert r.exit_code == 2 and r.output.strip().splitlines()[-1] == want, r.output
    r = runner.invoke(
        mine_app,
        [
            "negatives",
            "--work",
            str(synth_work),
            "--strategy",
            "hardest",
            "-k",
            "4",
            "--out",
            str(tmp_path / "a.parquet"),
            "--device",
            "auto",
            "-q",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "backend" not in read_negatives_meta(tmp_path / "a.parquet")["search"]


def read_negatives_meta(path):
    from cir_mine.miner.core.tables import read_negatives_meta as read

    return read(path)
