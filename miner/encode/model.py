"""The open_clip encoder: loading (model names or config JSON, offline-safe weights, the one device
rule, autocast precision, channels-last for convolutional towers) and text embedding.

On a GPU (``cir_mine.miner.accel.device``) the forward runs under autocast (bf16 where supported,
else fp16; ``precision`` chooses) and convolutional image towers take channels-last input. Every
output is L2-normalized float32. Checkpoint files are read by :mod:`cir_mine.miner.encode.checkpoint`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from cir_mine.data.errors import DataError, UsageError, WeightsUnavailableError
from cir_mine.miner.accel.device import choose_device
from cir_mine.miner.encode.checkpoint import load_weights, quickgelu_model, read_checkpoint
from cir_mine.miner.encode.config import EncoderConfig
from cir_mine.miner.encode.preprocess import check_preprocess, image_transform
from cir_mine.miner.encode.preprocess import describe as describe_preprocess

log = logging.getLogger(__name__)

Progress = Optional[Callable[[int], None]]
HF_HOST = ("huggingface.co", 443)


@dataclass
class Encoder:
    # fmt: off
    model: torch.nn.Module       # open_clip CLIP in eval mode on ``device``
    preprocess: Callable         # PIL image -> float32[3, H, W] (the model's eval transform)
    tokenizer: Callable          # list[str] -> int64[n, context_length]
    device: torch.device
    name: str                    # registered open_clip model name
    pretrained: str              # what --pretrained said ("none", a tag, or a path)
    dim: int                     # embedding dimension
    amp_dtype: Optional[torch.dtype] = None  # autocast dtype on GPU, None for fp32
    pil_transform: Optional[Callable] = None  # PIL stages of ``preprocess`` (resize, crop); None: not split
    mean_std: Optional[tuple] = None          # Normalize's (mean, std) for batched normalization
    model_arg: str = ""                       # what --model said (a name, or the config JSON's absolute path)
    preprocess_name: str = "clip"             # clip, targetpad:RATIO or squarepad (preprocess.describe)
    channels_last: bool = False               # image input (and the image tower) in channels-last memory format
    # fmt: on

    def describe(self) -> dict:
        out = {
            "name": self.name,
            "pretrained": self.pretrained,
            "dim": self.dim,
            "library": "open_clip",
            "model": self.model_arg or self.name,
        }
        if self.preprocess_name != "clip":
            out["preprocess"] = self.preprocess_name
        return out

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def resolve_model(model: str) -> str:
    """An open_clip model name, or a config JSON path registered under its file stem."""
    import open_clip

    p = Path(model)
    if p.suffix == ".json" or p.exists():
        if not p.is_file():
            raise DataError(
                f"{p}: model config not found. Pass an open_clip model name or the path of a model-config JSON."
            )
        try:
            cfg = json.loads(p.read_text())
        except ValueError as e:
            raise DataError(f"{p}: malformed JSON ({e}).") from None
        missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if not isinstance(cfg, dict) or k not in cfg]
        if missing:
            raise DataError(
                f"{p}: not an open_clip model config (missing {', '.join(missing)}). "
                f"See open_clip's model_configs/*.json for the format."
            )
        open_clip.add_model_config(p)
        return p.stem
    if model not in open_clip.list_models():
        raise UsageError(
            f"`model` {model!r}: not an open_clip model name (e.g. ViT-B-32, RN50) and not a "
            f"config JSON path. `python -c 'import open_clip; print(open_clip.list_models())'` lists them.",
            params=("model",),
        )
    return model


def _hub_reachable(timeout: float = 2.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    try:
        socket.create_connection(HF_HOST, timeout=timeout).close()
        return True
    except OSError:
        return False


def cached_weights(tag_cfg: dict) -> Optional[str]:
    """The local file of an open_clip pretrained tag when it is already cached, else None (no network)."""
    if tag_cfg.get("file"):
        return tag_cfg["file"] if os.path.isfile(tag_cfg["file"]) else None
    hub = tag_cfg.get("hf_hub", "")
    if hub:
        try:
            from huggingface_hub import hf_hub_download

            repo, filename = os.path.split(hub)
            return hf_hub_download(repo, filename or "open_clip_pytorch_model.bin", local_files_only=True)
        except Exception:  # noqa: BLE001 - any failure means "not cached"
            pass
    url = tag_cfg.get("url", "")
    if url:
        p = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if p.is_file():
            return str(p)
    return None


def resolve_pretrained(model_name: str, pretrained: str) -> Optional[str]:
    """``none`` -> None; a local file -> its path; a tag -> its cached file, or a download when the hub
    is reachable. Raises WeightsUnavailableError at once when a tag would need a download offline."""
    import open_clip
    from open_clip.pretrained import download_pretrained, get_pretrained_cfg

    if pretrained is None or pretrained.lower() in ("none", ""):
        return None
    if os.path.isfile(pretrained):
        return pretrained
    tag_cfg = get_pretrained_cfg(model_name, pretrained)
    if not tag_cfg:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise UsageError(
            f"`pretrained` {pretrained!r}: not a local file and not an open_clip tag of {model_name} "
            f"(tags: {', '.join(tags) or 'none'}). Pass a checkpoint path or none.",
            params=("pretrained",),
        )
    hit = cached_weights(tag_cfg)
    if hit:
        return hit
    fix = (
        "No weights can be downloaded on this machine: pass `pretrained` PATH (a local open_clip "
        "checkpoint) or `pretrained` none (random weights)."
    )
    if not _hub_reachable():
        raise WeightsUnavailableError(
            f"`pretrained` {pretrained}: weights for {model_name} are not cached and the download "
            f"host is unreachable (offline). {fix}",
            params=("pretrained",),
        )
    try:
        return download_pretrained(tag_cfg)
    except Exception as e:  # noqa: BLE001 - any download failure has the same fix
        raise WeightsUnavailableError(
            f"`pretrained` {pretrained}: download of {model_name} weights failed ({str(e).splitlines()[0][:200]}). {fix}",
            params=("pretrained",),
        ) from None


def pick_device(device: str = "auto") -> torch.device:
    """The torch device the encoder runs on, by the one device rule (search uses it too)."""
    return torch.device(choose_device(device))


@contextlib.contextmanager
def _quiet_random_init_warning(active: bool):
    """open_clip warns on the root logger about random weights; with --pretrained none that is asked for."""
    flt = lambda rec: "No pretrained weights loaded" not in rec.getMessage()  # noqa: E731
    root = logging.getLogger()
    if active:
        root.addFilter(flt)
        for h in root.handlers:
            h.addFilter(flt)
    try:
        yield
    finally:
        if active:
            root.removeFilter(flt)
            for h in root.handlers:
                h.removeFilter(flt)


RANDOM_WEIGHTS = (
    "pretrained none: random weights. Their embeddings, and any negatives mined from them, are "
    "meaningless; they only try out the pipeline. Pass a trained checkpoint for real negatives "
    "(a local file: OpenAI's .pt, CLIP4Cir's tuned_clip_*.pt, an open_clip checkpoint; or an "
    "open_clip tag)."
)


def warn_random_weights(cfg: EncoderConfig) -> None:
    """Log (at WARNING, so it shows under --quiet too) that ``pretrained none`` embeds nothing real."""
    if cfg.pretrained is None or str(cfg.pretrained).lower() in ("none", ""):
        log.warning("%s", RANDOM_WEIGHTS)


def load_encoder(cfg: EncoderConfig) -> Encoder:
    """Build the open_clip model, its transform and tokenizer, and load the checkpoint (random
    weights for ``none``): see :func:`read_checkpoint` and :func:`quickgelu_model`."""
    import open_clip

    check_preprocess(cfg.preprocess, cfg.target_ratio)
    name = resolve_model(cfg.model)
    path = resolve_pretrained(name, cfg.pretrained)
    device = pick_device(cfg.device)
    ckpt = read_checkpoint(path) if path is not None and Path(path).suffix not in (".npz", ".npy") else None
    built = quickgelu_model(name, cfg.model, ckpt, cfg.pretrained)
    with _quiet_random_init_warning(True), torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model, _, preprocess = open_clip.create_model_and_transforms(built, pretrained=None, device="cpu")
    if ckpt is not None:
        load_weights(model, ckpt, built, cfg.pretrained)
    elif path is not None:  # big_vision .npz weights: open_clip's own loader
        open_clip.load_checkpoint(model, path)
    model = model.to(device)
    model.eval()
    amp = autocast_dtype(cfg.precision, device)
    channels_last = (
        cfg.channels_last if cfg.channels_last is not None else (device.type == "cuda" and convolutional(model.visual))
    )
    if channels_last:
        model.visual.to(memory_format=torch.channels_last)
    dim = (
        int(model.text_projection.shape[1])
        if getattr(model, "text_projection", None) is not None
        else int(open_clip.get_model_config(name)["embed_dim"])
    )
    log.info(
        "encoder %s (pretrained=%s, d=%d, preprocess %s) on %s%s%s",
        built,
        cfg.pretrained,
        dim,
        cfg.preprocess,
        device,
        f" with {amp} autocast" if amp else "",
        ", channels-last" if channels_last else "",
    )
    pp = getattr(model.visual, "preprocess_cfg", None) or {}
    mean_std = (tuple(pp["mean"]), tuple(pp["std"])) if "mean" in pp and "std" in pp else split_transform(preprocess)[1]
    size = model.visual.image_size
    preprocess = image_transform(
        cfg.preprocess, preprocess, (size, size) if isinstance(size, int) else tuple(size), mean_std, cfg.target_ratio
    )
    pil_transform, mean_std = split_transform(preprocess)
    model_arg = str(Path(cfg.model).resolve()) if name != cfg.model else built
    return Encoder(
        model,
        preprocess,
        open_clip.get_tokenizer(built),
        device,
        built,
        cfg.pretrained,
        dim,
        amp,
        pil_transform,
        mean_std,
        model_arg,
        describe_preprocess(cfg.preprocess, cfg.target_ratio),
        bool(channels_last),
    )


PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of ``precision`` on ``device``: 'auto' is bf16 on a GPU that supports it,
    else fp16, and none (fp32) on the CPU."""
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision not in PRECISIONS:
        raise UsageError(f"precision {precision!r}: use auto, fp32, fp16 or bf16.", params=("precision",))
    return PRECISIONS[precision]


def convolutional(tower: torch.nn.Module) -> bool:
    """Whether an image tower is a convolutional network (open_clip's ResNets, timm ConvNeXts), where
    channels-last input feeds the GPU's tensor cores without layout transposes. A ViT's only
    convolution is its patch embedding, so it keeps the default layout (channels-last changes the
    convolution algorithm, and so the last bits of the embeddings: it follows the architecture, never
    a timing, so a repeated or resumed run embeds the same bits)."""
    convs = [m for m in tower.modules() if isinstance(m, torch.nn.Conv2d)]
    return len(convs) > 1


def text_encoder_from_manifest(manifest: dict, device: str = "auto") -> Callable:
    """The text tower a workspace was embedded with, as ``encode(texts, pairs) -> float32[n, d]``
    (used to embed generated captions with the workspace's own encoder)."""
    enc = manifest.get("encoder") or {}
    if enc.get("library") != "open_clip":
        raise UsageError(f"the workspace was not embedded with open_clip (encoder: {enc.get('name', 'unknown')}).")
    encoder = load_encoder(EncoderConfig(enc.get("model") or enc["name"], enc.get("pretrained", "none"), device))
    return lambda texts, pairs=None: embed_texts(encoder, list(texts))


def split_transform(preprocess) -> tuple[Optional[Callable], Optional[tuple]]:
    """Split open_clip's eval transform ``[PIL stages..., ToTensor, Normalize]`` into the PIL stages
    (run per image in workers, giving uint8) and Normalize's (mean, std) (run per batch, on the
    device). Returns (None, None) when the transform has another shape."""
    from torchvision import transforms as T

    ts = list(getattr(preprocess, "transforms", []))
    if len(ts) < 2 or not isinstance(ts[-1], T.Normalize) or not isinstance(ts[-2], T.ToTensor):
        return None, None
    return T.Compose(ts[:-2]), (tuple(ts[-1].mean), tuple(ts[-1].std))


def normalize_pixels(x: torch.Tensor, mean_std: tuple) -> torch.Tensor:
    """uint8[b, 3, H, W] -> float32, exactly as ToTensor + Normalize compute it per image."""
    mean = torch.as_tensor(mean_std[0], dtype=torch.float32, device=x.device)[:, None, None]
    std = torch.as_tensor(mean_std[1], dtype=torch.float32, device=x.device)[:, None, None]
    return x.to(torch.float32).div(255).sub_(mean).div_(std)


@torch.inference_mode()
def embed_texts(encoder: Encoder, texts: Sequence[str], batch_size: int = 256, progress: Progress = None) -> np.ndarray:
    """Captions -> L2-normalized float32[n, d] with the CLIP tokenizer and text tower."""
    out = np.zeros((len(texts), encoder.dim), dtype=np.float32)
    for s in range(0, len(texts), batch_size):
        tokens = encoder.tokenizer(list(texts[s : s + batch_size])).to(encoder.device)
        with encoder.autocast():
            z = encoder.model.encode_text(tokens)
        out[s : s + len(tokens)] = torch.nn.functional.normalize(z.float(), dim=-1).cpu().numpy()
        if progress:
            progress(len(tokens))
    return out
