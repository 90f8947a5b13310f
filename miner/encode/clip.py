"""open_clip encoders: loading (names or config JSON, offline-safe weights), batched image and text
embedding with resumable shards, and zero-shot attributes.

Image embedding runs a DataLoader whose workers decode and transform the files (the model's own
open_clip eval transform), so the main process only runs the forward pass. On a GPU (the one device
rule, ``cir_mine.miner.accel.device``) the forward runs under autocast (bf16 where supported, else
fp16; ``precision`` chooses), convolutional image towers take channels-last input, batches arrive
in pinned host memory from one decoding worker per spare CPU core, and each batch's embeddings are
copied back while the next batch runs, so the device does not wait for the host. Every output is
L2-normalized float32.

Resumability: images are cut into shards of ``shard_size`` in a fixed order; each finished shard is
written atomically to ``WORK/.embed-{split}/shard-NNNNN.npz`` beside a ``plan.json`` fingerprint. A
rerun with the same plan loads the finished shards and embeds the rest. Batches never cross a shard
boundary, so a resumed run feeds the model exactly the batches an uninterrupted run does and the
tables are identical.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from cir_mine.data.errors import DataError, UsageError, WeightsUnavailableError
from cir_mine.data.io import atomic_path, write_json_atomic
from cir_mine.miner.accel.device import choose_device
from cir_mine.miner.encode.config import DEFAULT_PROMPTS, EncoderConfig, ImageRun  # noqa: F401  (re-exported)
from cir_mine.miner.encode.preprocess import check_preprocess, image_transform
from cir_mine.miner.encode.preprocess import describe as describe_preprocess

log = logging.getLogger(__name__)

Progress = Optional[Callable[[int], None]]
# Test hook: SIGKILL this process right after writing this many shards (resume tests).
KILL_AFTER_ENV = "CIR_MINE_EMBED_KILL_AFTER_SHARDS"
HF_HOST = ("huggingface.co", 443)


# ----------------------------------------------------------------------------------------------
# Loading


@dataclass
class Encoder:
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

    def describe(self) -> dict:
        out = {"name": self.name, "pretrained": self.pretrained, "dim": self.dim, "library": "open_clip",
               "model": self.model_arg or self.name}
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
            raise DataError(f"{p}: model config not found. Pass an open_clip model name or the path of a model-config JSON.")
        try:
            cfg = json.loads(p.read_text())
        except ValueError as e:
            raise DataError(f"{p}: malformed JSON ({e}).") from None
        missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if not isinstance(cfg, dict) or k not in cfg]
        if missing:
            raise DataError(f"{p}: not an open_clip model config (missing {', '.join(missing)}). "
                            f"See open_clip's model_configs/*.json for the format.")
        open_clip.add_model_config(p)
        return p.stem
    if model not in open_clip.list_models():
        raise UsageError(f"--model {model!r}: not an open_clip model name (e.g. ViT-B-32, RN50) and not a "
                         f"config JSON path. `python -c 'import open_clip; print(open_clip.list_models())'` lists them.")
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
            f"--pretrained {pretrained!r}: not a local file and not an open_clip tag of {model_name} "
            f"(tags: {', '.join(tags) or 'none'}). Pass a checkpoint path or none."
        )
    hit = cached_weights(tag_cfg)
    if hit:
        return hit
    fix = ("No weights can be downloaded on this machine: pass --pretrained PATH (a local open_clip "
           "checkpoint) or --pretrained none (random weights).")
    if not _hub_reachable():
        raise WeightsUnavailableError(
            f"--pretrained {pretrained}: weights for {model_name} are not cached and the download "
            f"host is unreachable (offline). {fix}")
    try:
        return download_pretrained(tag_cfg)
    except Exception as e:  # noqa: BLE001 - any download failure has the same fix
        raise WeightsUnavailableError(
            f"--pretrained {pretrained}: download of {model_name} weights failed ({str(e).splitlines()[0][:200]}). {fix}"
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


# Buffers OpenAI's TorchScript archives hold beside the weights (no model parameter).
OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


@dataclass
class Checkpoint:
    state_dict: dict             # tensor name -> tensor, as the CLIP model names them
    layout: str                  # torchscript | clip4cir | open_clip | state_dict | safetensors
    openai: bool                 # OpenAI-trained weights: the text (and ViT) blocks use QuickGELU
    why: str = ""                # how ``openai`` was told (for messages)


def _is_torchscript(path: Path) -> bool:
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def read_checkpoint(path: str | Path) -> Checkpoint:
    """A checkpoint file -> its CLIP state dict and where it came from.

    Reads OpenAI's TorchScript archives (``ViT-B-32.pt``, ``RN50x4.pt``), CLIP4Cir's
    ``{'epoch': E, 'CLIP': state_dict}`` (``clip_fine_tune.py``'s ``tuned_clip_*.pt``), open_clip's
    training checkpoints (``{'state_dict': ...}``, ``module.`` prefixes dropped), plain state dicts and
    ``.safetensors``. TorchScript archives, state dicts holding their extra buffers and CLIP4Cir's
    layout (it fine-tunes OpenAI's CLIP) are OpenAI-trained. Loads tensors only (``weights_only``)."""
    path = Path(path)
    where = f"pretrained {path}"
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
        return Checkpoint(_strip(sd), "safetensors", any(k in sd for k in OPENAI_EXTRA_KEYS), "OpenAI's buffers")
    if _is_torchscript(path):
        try:
            sd = torch.jit.load(str(path), map_location="cpu").state_dict()
        except Exception as e:  # noqa: BLE001 - a damaged archive raises many kinds
            raise DataError(f"{where}: unreadable TorchScript archive ({_first_line(e)}).", params=("pretrained",)) from None
        return Checkpoint(_strip(dict(sd)), "torchscript", True, "an OpenAI TorchScript archive")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle, zip and torch errors alike
        raise DataError(f"{where}: not a checkpoint torch reads as tensors ({_first_line(e)}). Pass an OpenAI "
                        f"TorchScript archive, a CLIP4Cir {{'CLIP': state_dict}} file, an open_clip checkpoint or a "
                        f"state dict.", params=("pretrained",)) from None
    if isinstance(obj, dict) and isinstance(obj.get("CLIP"), dict):
        return Checkpoint(_strip(obj["CLIP"]), "clip4cir", True, "CLIP4Cir's {'CLIP': ...} layout, a fine-tuned OpenAI CLIP")
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        sd = obj["state_dict"]
        return Checkpoint(_strip(sd), "open_clip", any(k in sd for k in OPENAI_EXTRA_KEYS), "OpenAI's buffers")
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return Checkpoint(_strip(obj), "state_dict", any(k in obj for k in OPENAI_EXTRA_KEYS), "OpenAI's buffers")
    keys = ", ".join(map(str, list(obj)[:6])) if isinstance(obj, dict) else type(obj).__name__
    hint = (" It holds a CLIP4Cir Combiner: pass the CLIP checkpoint (tuned_clip_*.pt) instead."
            if isinstance(obj, dict) and "Combiner" in obj else "")
    raise DataError(f"{where}: holds {keys}, not CLIP weights (a state dict, {{'CLIP': state_dict}} or "
                    f"{{'state_dict': ...}}).{hint}", params=("pretrained",))


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def _strip(sd: dict) -> dict:
    """Drop OpenAI's extra buffers and a ``module.`` prefix every key has (DataParallel)."""
    sd = {k: v for k, v in sd.items() if k not in OPENAI_EXTRA_KEYS}
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def quickgelu_model(name: str, model_arg: str, ckpt: Optional[Checkpoint], pretrained: str) -> str:
    """The model to build for ``ckpt``: OpenAI-trained weights need QuickGELU (open_clip's
    ``NAME-quickgelu`` configs); the plain name builds GELU blocks and loads them without an error,
    giving other embeddings. Picks ``NAME-quickgelu`` when open_clip has it; a config without
    ``"quick_gelu": true`` and no such variant raises UsageError."""
    import open_clip

    if ckpt is None or not ckpt.openai or (open_clip.get_model_config(name) or {}).get("quick_gelu"):
        return name
    variant = f"{name}-quickgelu"
    if variant in open_clip.list_models():
        log.warning("pretrained %s holds OpenAI-trained weights (%s), which use QuickGELU: embedding with %s, "
                    "not %s", pretrained, ckpt.why, variant, name)
        return variant
    where = str(Path(model_arg).resolve()) if name != model_arg else name
    fix = (f'add "quick_gelu": true to {where}' if name != model_arg else
           'pass a model config JSON with "quick_gelu": true')
    raise UsageError(f"pretrained {pretrained} holds OpenAI-trained weights ({ckpt.why}), which use QuickGELU "
                     f"activations, but model {name} uses GELU and open_clip has no {variant}: {fix}.",
                     params=("pretrained", "model"))


def _names(keys: list, n: int = 5) -> str:
    more = f", ... (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_weights(model: torch.nn.Module, ckpt: Checkpoint, name: str, pretrained: str) -> None:
    """Load ``ckpt`` into ``model`` (open_clip's conversions: a custom text tower, resized position
    embeddings, scalar logit_scale). A key or shape mismatch raises DataError naming every kind of
    mismatch, with counts and the first names."""
    from open_clip.factory import (convert_state_dict, convert_to_custom_text_state_dict, resize_pos_embed,
                                   resize_text_pos_embed)

    sd = convert_state_dict(model, dict(ckpt.state_dict))
    if "positional_embedding" in sd and not hasattr(model, "positional_embedding"):
        sd = convert_to_custom_text_state_dict(sd)
    for key in ("logit_scale", "logit_bias"):
        own = getattr(model, key, None)
        if key in sd and own is not None and own.ndim != sd[key].ndim:
            sd[key] = sd[key].reshape(own.shape)
    want = model.state_dict()
    transient = {n for n, _ in model.named_buffers()} - set(want)      # non-persistent buffers (attn_mask)
    sd = {k: v for k, v in sd.items() if k not in transient}
    try:
        resize_pos_embed(sd, model)
        resize_text_pos_embed(sd, model)
    except Exception:  # noqa: BLE001 - a shape the resizers do not know is reported below
        pass
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    shapes = [f"{k} {list(sd[k].shape)} in the checkpoint, {list(want[k].shape)} in {name}"
              for k in want if k in sd and tuple(sd[k].shape) != tuple(want[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} of its {len(want)} tensors missing ({_names(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} tensors it does not have ({_names(unexpected)})")
        if shapes:
            parts.append(f"{len(shapes)} of another shape ({_names(shapes, 3)})")
        raise DataError(f"pretrained {pretrained}: the checkpoint ({ckpt.layout}) does not fit {name}: "
                        f"{'; '.join(parts)}. Pass as model the architecture the checkpoint was trained as.",
                        params=("pretrained", "model"))
    model.load_state_dict(sd, strict=True)


RANDOM_WEIGHTS = ("pretrained none: random weights. Their embeddings, and any negatives mined from them, are "
                  "meaningless; they only try out the pipeline. Pass a trained checkpoint for real negatives "
                  "(a local file: OpenAI's .pt, CLIP4Cir's tuned_clip_*.pt, an open_clip checkpoint; or an "
                  "open_clip tag).")


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
    elif path is not None:                        # big_vision .npz weights: open_clip's own loader
        open_clip.load_checkpoint(model, path)
    model = model.to(device)
    model.eval()
    amp = autocast_dtype(cfg.precision, device)
    channels_last = cfg.channels_last if cfg.channels_last is not None else (
        device.type == "cuda" and convolutional(model.visual))
    if channels_last:
        model.visual.to(memory_format=torch.channels_last)
    dim = int(model.text_projection.shape[1]) if getattr(model, "text_projection", None) is not None \
        else int(open_clip.get_model_config(name)["embed_dim"])
    log.info("encoder %s (pretrained=%s, d=%d, preprocess %s) on %s%s%s", built, cfg.pretrained, dim, cfg.preprocess,
             device, f" with {amp} autocast" if amp else "", ", channels-last" if channels_last else "")
    pp = getattr(model.visual, "preprocess_cfg", None) or {}
    mean_std = (tuple(pp["mean"]), tuple(pp["std"])) if "mean" in pp and "std" in pp else split_transform(preprocess)[1]
    size = model.visual.image_size
    preprocess = image_transform(cfg.preprocess, preprocess, (size, size) if isinstance(size, int) else tuple(size),
                                 mean_std, cfg.target_ratio)
    pil_transform, mean_std = split_transform(preprocess)
    model_arg = str(Path(cfg.model).resolve()) if name != cfg.model else built
    return Encoder(model, preprocess, open_clip.get_tokenizer(built), device, built, cfg.pretrained, dim, amp,
                   pil_transform, mean_std, model_arg, describe_preprocess(cfg.preprocess, cfg.target_ratio), bool(channels_last))


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


# ----------------------------------------------------------------------------------------------
# Images


class ImageFiles(torch.utils.data.Dataset):
    """Decodes and transforms one image per item (in DataLoader workers).

    Item ``i`` -> (pixels, i, error str): pixels are uint8[3, H, W] when ``uint8`` (the PIL stages
    only; normalization happens per batch) else float32[3, H, W]. An unreadable file gives zeros
    and a non-empty error; the caller drops it (never replaced by another image).
    """

    def __init__(self, paths: Sequence[Optional[str]], transform: Callable, shape: tuple[int, int, int],
                 uint8: bool = False):
        self.paths, self.transform, self.shape, self.uint8 = list(paths), transform, shape, uint8
        self.dtype = torch.uint8 if uint8 else torch.float32

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        x, err = load_pixels(self.paths[i], self.transform, self.shape, self.uint8)
        return x, i, err


def load_pixels(source, transform: Callable, shape: tuple[int, int, int], uint8: bool = False):
    """One image -> (pixels, error str): ``source`` is a file path, a ``TAR::MEMBER`` path (webdataset
    shards) or the encoded bytes. Pixels are uint8[3, H, W] (PIL stages only) when ``uint8`` else
    float32[3, H, W]; an unreadable image gives zeros and a non-empty error."""
    import io

    from PIL import Image

    from cir_mine.data.webdataset import is_member, read_member

    zeros = lambda: torch.zeros(shape, dtype=torch.uint8 if uint8 else torch.float32)  # noqa: E731
    if isinstance(source, (bytes, bytearray, memoryview, np.ndarray)):
        fp = io.BytesIO(bytes(source))
    elif is_member(source):
        try:
            fp = io.BytesIO(read_member(source))
        except (KeyError, OSError) as e:
            return zeros(), f"missing file {source} ({type(e).__name__})"
    elif not source or not os.path.isfile(source):
        return zeros(), f"missing file {source}"
    else:
        fp = source
    try:
        with Image.open(fp) as im:
            im.load()
            x = transform(im.convert("RGB"))
        if uint8:
            x = torch.from_numpy(np.array(x, dtype=np.uint8)).permute(2, 0, 1).contiguous()
    except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt files
        return zeros(), f"unreadable ({type(e).__name__}: {str(e)[:120]})"
    if tuple(x.shape) != shape:
        return zeros(), f"transform gave shape {tuple(x.shape)}"
    return x, ""


def _collate(items):
    xs, idx, err = zip(*items)
    return torch.stack(xs), torch.as_tensor(idx, dtype=torch.int64), list(err)


def input_shape(encoder: Encoder) -> tuple[int, int, int]:
    size = encoder.model.visual.image_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (3, int(h), int(w))


@torch.inference_mode()
def forward_images(encoder: Encoder, pixels: torch.Tensor) -> np.ndarray:
    """float32[b, 3, H, W] (model input) or uint8[b, 3, H, W] (PIL stages only; normalized here, on
    the device) -> L2-normalized float32[b, d] numpy."""
    return launch_images(encoder, pixels).numpy()


class Embedded:
    """One batch's embeddings on their way to the host: on a GPU the copy goes to pinned memory
    without waiting, so the next batch is queued before :meth:`numpy` waits for this one."""

    def __init__(self, z: torch.Tensor):
        self.event = None
        if z.device.type == "cuda":
            self.host = torch.empty(z.shape, dtype=z.dtype, pin_memory=True)
            self.host.copy_(z, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = z

    def numpy(self) -> np.ndarray:
        if self.event is not None:
            self.event.synchronize()
        return self.host.numpy()


@torch.inference_mode()
@torch.inference_mode()
def launch_images(encoder: Encoder, pixels: torch.Tensor) -> "Embedded":
    """:func:`forward_images` without waiting for the device: -> :class:`Embedded`."""
    x = pixels.to(encoder.device, non_blocking=True)
    if x.dtype == torch.uint8:
        x = normalize_pixels(x, encoder.mean_std)
    if encoder.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with encoder.autocast():
        z = encoder.model.encode_image(x)
    return Embedded(torch.nn.functional.normalize(z.float(), dim=-1))


def _shard_batches(shards: Sequence[int], shard_size: int, n: int, batch_size: int):
    for s in shards:
        lo, hi = s * shard_size, min(n, (s + 1) * shard_size)
        for b in range(lo, hi, batch_size):
            yield list(range(b, min(hi, b + batch_size)))


def key_label(key: str) -> str:
    """A resume key ``category\0image_id\0path`` as it reads in a message: ``image_id (path)``."""
    parts = key.split("\0")
    if len(parts) != 3:
        return key.replace("\0", " ")
    cat, image_id, path = parts
    return f"{image_id} ({path})" if path and path != "None" else image_id


def plan_fingerprint(encoder: Encoder, keys: Sequence[str], shard_size: int, batch_size: int) -> dict:
    h = hashlib.sha256()
    for k in keys:
        h.update(k.encode())
        h.update(b"\0")
    plan = {"encoder": encoder.describe(), "device": encoder.device.type, "autocast": str(encoder.amp_dtype),
            "items": len(keys), "keys_sha256": h.hexdigest(), "shard_size": shard_size, "batch_size": batch_size}
    if encoder.channels_last:
        plan["channels_last"] = True
    return plan


def _write_shard(path: Path, emb: np.ndarray, errors: list[str]) -> None:
    with atomic_path(path, journal=False) as tmp:     # resume scratch: kept when the job fails
        with open(tmp, "wb") as fh:
            np.savez(fh, emb=emb, errors=np.asarray(errors, dtype=str))


def _read_shard(path: Path, n: int, dim: int) -> Optional[tuple[np.ndarray, list[str]]]:
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            emb, errors = z["emb"], z["errors"].tolist()
    except Exception:  # noqa: BLE001 - a damaged shard is simply recomputed
        log.warning("%s: unreadable shard; recomputing it", path)
        return None
    if emb.shape != (n, dim) or len(errors) != n:
        return None
    return emb, errors


def default_workers(device: torch.device) -> int:
    """Decoding workers when none are asked for: on a GPU, one per CPU core the main process leaves
    (at most 16; a ViT-B-32 forward outruns one decoding core many times over), on the CPU 2 (the
    forward shares the cores; docs/benchmarks.md)."""
    if device.type != "cuda":
        return 2
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    return int(max(2, min(16, cores - 1)))


def image_loader(encoder: Encoder, paths: Sequence[Optional[str]], batches: list[list[int]], workers: Optional[int]):
    """A DataLoader yielding (pixels uint8|float32[b, 3, H, W], rows int64[b], errors list[str]) for
    ``batches`` (lists of rows into ``paths``), decoded by ``workers`` processes (None:
    :func:`default_workers`), in pinned memory on a GPU."""
    workers = default_workers(encoder.device) if workers is None else workers
    split = encoder.pil_transform is not None
    dataset = ImageFiles(paths, encoder.pil_transform if split else encoder.preprocess, input_shape(encoder),
                         uint8=split)
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, num_workers=workers, collate_fn=_collate,
        pin_memory=encoder.device.type == "cuda", prefetch_factor=4 if workers else None,
    )


def embed_images(encoder: Encoder, paths: Sequence[Optional[str]], keys: Sequence[str],
                 shard_dir: str | Path, run: ImageRun = ImageRun(), progress: Progress = None
                 ) -> tuple[np.ndarray, list[str]]:
    """Embed image files. Returns (emb float32[n, d], errors list[n] with "" for embedded images).

    ``keys`` identify the items (e.g. "category/image_id/path") for the resume fingerprint. Rows with
    an error are zeros and must be dropped by the caller. Finished shards under ``shard_dir`` are reused.
    """
    if run.batch_size < 1 or run.shard_size < 1 or (run.workers is not None and run.workers < 0):
        raise UsageError("batch_size and shard_size must be >= 1 and workers >= 0.",
                         params=("batch_size", "shard_size", "workers"))
    n, dim = len(paths), encoder.dim
    shard_dir = Path(shard_dir)
    plan = plan_fingerprint(encoder, keys, run.shard_size, run.batch_size)
    plan_path = shard_dir / "plan.json"
    if plan_path.exists():
        try:
            old = json.loads(plan_path.read_text())
        except ValueError:
            old = None
        if old != plan:
            log.info("%s: shards from a different run; starting over", shard_dir)
            shutil.rmtree(shard_dir)
    created = not shard_dir.exists()
    shard_dir.mkdir(parents=True, exist_ok=True)
    if not plan_path.exists():
        try:
            write_json_atomic(plan_path, plan, journal=False)
        except BaseException:
            if created:                 # nothing to resume from: leave no scratch folder behind
                shutil.rmtree(shard_dir, ignore_errors=True)
            raise

    n_shards = (n + run.shard_size - 1) // run.shard_size
    emb = np.zeros((n, dim), dtype=np.float32)
    errors = [""] * n
    todo = []
    for s in range(n_shards):
        lo, hi = s * run.shard_size, min(n, (s + 1) * run.shard_size)
        got = _read_shard(shard_dir / f"shard-{s:05d}.npz", hi - lo, dim)
        if got is None:
            todo.append(s)
            continue
        emb[lo:hi], errors[lo:hi] = got
        if progress:
            progress(hi - lo)
    if todo and n_shards - len(todo):
        log.info("resuming: %d of %d shards already done", n_shards - len(todo), n_shards)
    if not todo:
        return emb, errors

    loader = image_loader(encoder, paths, list(_shard_batches(todo, run.shard_size, n, run.batch_size)), run.workers)
    kill_after = int(os.environ.get(KILL_AFTER_ENV, "0") or 0)
    pending = {s: min(n, (s + 1) * run.shard_size) - s * run.shard_size for s in todo}
    written = 0

    def finish(idx_np: np.ndarray, ok: np.ndarray, out: Optional[Embedded]) -> None:
        nonlocal written
        if out is not None:
            emb[idx_np[ok]] = out.numpy()
        s = int(idx_np[0]) // run.shard_size
        pending[s] -= len(idx_np)
        if progress:
            progress(len(idx_np))
        if pending[s] == 0:
            lo, hi = s * run.shard_size, min(n, (s + 1) * run.shard_size)
            _write_shard(shard_dir / f"shard-{s:05d}.npz", emb[lo:hi], errors[lo:hi])
            written += 1
            if kill_after and written >= kill_after:
                os.kill(os.getpid(), signal.SIGKILL)

    previous = None              # the batch whose embeddings are on their way to the host
    for pixels, idx, errs in loader:
        idx_np = idx.numpy()
        ok = np.asarray([not e for e in errs])
        for i, e in zip(idx_np.tolist(), errs):
            if e:
                errors[i] = e
                log.warning("skipped image %s: %s", key_label(keys[i]), e)
        # Only readable images go through the model: batch composition is the same on resume.
        out = launch_images(encoder, pixels[torch.from_numpy(ok)] if not ok.all() else pixels) if ok.any() else None
        if previous is not None:
            finish(*previous)    # this batch is queued on the device before the host waits for the last
        previous = (idx_np, ok, out)
    if previous is not None:
        finish(*previous)
    return emb, errors


# ----------------------------------------------------------------------------------------------
# Text


@torch.inference_mode()
def embed_texts(encoder: Encoder, texts: Sequence[str], batch_size: int = 256, progress: Progress = None) -> np.ndarray:
    """Captions -> L2-normalized float32[n, d] with the CLIP tokenizer and text tower."""
    out = np.zeros((len(texts), encoder.dim), dtype=np.float32)
    for s in range(0, len(texts), batch_size):
        tokens = encoder.tokenizer(list(texts[s:s + batch_size])).to(encoder.device)
        with encoder.autocast():
            z = encoder.model.encode_text(tokens)
        out[s:s + len(tokens)] = torch.nn.functional.normalize(z.float(), dim=-1).cpu().numpy()
        if progress:
            progress(len(tokens))
    return out


# ----------------------------------------------------------------------------------------------
# Zero-shot attributes


@dataclass(frozen=True)
class AttributePrompts:
    template: str                          # default prompt, e.g. "a photo of a {value} {category}"
    groups: dict                           # group -> {value: phrase used in the prompt}
    templates: dict                        # group -> template overriding ``template``
    default_category: str = "garment"      # {category} for images without one


def load_prompts(path: str | Path) -> AttributePrompts:
    """Read an attribute prompt file (see docs/formats.md, "Attribute prompt files")."""
    from cir_mine.data.jsonio import load_json

    path = Path(path)
    obj = load_json(path, dict)
    groups = obj.get("groups")
    if not isinstance(groups, dict) or not groups:
        raise DataError(f"{path}: 'groups' must be an object of group -> list of values (or value -> phrase).")
    norm = {}
    for g, vals in groups.items():
        if isinstance(vals, list) and vals and all(isinstance(v, str) for v in vals):
            norm[g] = {v: v for v in vals}
        elif isinstance(vals, dict) and vals and all(isinstance(v, str) for v in vals.values()):
            norm[g] = dict(vals)
        else:
            raise DataError(f"{path}: group '{g}' must be a non-empty list of strings or an object value -> phrase.")
    template = obj.get("template", "a photo of a {value} {category}")
    templates = obj.get("templates", {}) or {}
    for t in [template, *templates.values()]:
        if not isinstance(t, str) or "{value}" not in t:
            raise DataError(f"{path}: template {t!r} must be a string containing {{value}}.")
    return AttributePrompts(template, norm, templates, obj.get("default_category", "garment"))


def zero_shot_attributes(encoder: Encoder, image_emb: np.ndarray, categories: Sequence[str],
                         prompts: AttributePrompts) -> tuple[list[list[str]], list[list[float]]]:
    """Best value per group for each image: (``group:value`` lists, probability lists).

    image_emb: float32[n, d] L2-normalized. The probability is the softmax over the group's
    values of the CLIP logits (logit_scale * cosine), per image category.
    """
    n = image_emb.shape[0]
    attrs: list[list[str]] = [[] for _ in range(n)]
    scores: list[list[float]] = [[] for _ in range(n)]
    cats = np.asarray(list(categories), dtype=object)
    scale = float(encoder.model.logit_scale.exp().item()) if hasattr(encoder.model, "logit_scale") else 100.0
    for cat in sorted(set(cats.tolist())):
        rows = np.flatnonzero(cats == cat)
        noun = cat or prompts.default_category
        for g, values in prompts.groups.items():
            tmpl = prompts.templates.get(g, prompts.template)
            texts = [tmpl.format(value=phrase, category=noun) for phrase in values.values()]
            t = embed_texts(encoder, texts)
            logits = scale * (image_emb[rows] @ t.T)
            logits -= logits.max(axis=1, keepdims=True)
            p = np.exp(logits)
            p /= p.sum(axis=1, keepdims=True)
            best = p.argmax(axis=1)
            names = list(values)
            for r, b, pb in zip(rows.tolist(), best.tolist(), p[np.arange(len(rows)), best].tolist()):
                attrs[r].append(f"{g}:{names[b]}")
                scores[r].append(float(pb))
    return attrs, scores
