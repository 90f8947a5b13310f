"""Checkpoint files of CLIP weights: OpenAI's TorchScript archives, CLIP4Cir's fine-tuned CLIP,
open_clip's training checkpoints, plain state dicts and safetensors; QuickGELU for OpenAI-trained
weights; loading with a message that names every mismatch."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from cir_mine.data.errors import DataError, UsageError

log = logging.getLogger(__name__)


# Buffers OpenAI's TorchScript archives hold beside the weights (no model parameter).
OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


@dataclass
class Checkpoint:
    # fmt: off
    state_dict: dict             # tensor name -> tensor, as the CLIP model names them
    layout: str                  # torchscript | clip4cir | open_clip | state_dict | safetensors
    openai: bool                 # OpenAI-trained weights: the text (and ViT) blocks use QuickGELU
    why: str = ""                # how ``openai`` was told (for messages)
    # fmt: on


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
            raise DataError(
                f"{where}: unreadable TorchScript archive ({_first_line(e)}).", params=("pretrained",)
            ) from None
        return Checkpoint(_strip(dict(sd)), "torchscript", True, "an OpenAI TorchScript archive")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle, zip and torch errors alike
        raise DataError(
            f"{where}: not a checkpoint torch reads as tensors ({_first_line(e)}). Pass an OpenAI "
            f"TorchScript archive, a CLIP4Cir {{'CLIP': state_dict}} file, an open_clip checkpoint or a "
            f"state dict.",
            params=("pretrained",),
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("CLIP"), dict):
        return Checkpoint(
            _strip(obj["CLIP"]), "clip4cir", True, "CLIP4Cir's {'CLIP': ...} layout, a fine-tuned OpenAI CLIP"
        )
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        sd = obj["state_dict"]
        return Checkpoint(_strip(sd), "open_clip", any(k in sd for k in OPENAI_EXTRA_KEYS), "OpenAI's buffers")
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return Checkpoint(_strip(obj), "state_dict", any(k in obj for k in OPENAI_EXTRA_KEYS), "OpenAI's buffers")
    keys = ", ".join(map(str, list(obj)[:6])) if isinstance(obj, dict) else type(obj).__name__
    hint = (
        " It holds a CLIP4Cir Combiner: pass the CLIP checkpoint (tuned_clip_*.pt) instead."
        if isinstance(obj, dict) and "Combiner" in obj
        else ""
    )
    raise DataError(
        f"{where}: holds {keys}, not CLIP weights (a state dict, {{'CLIP': state_dict}} or "
        f"{{'state_dict': ...}}).{hint}",
        params=("pretrained",),
    )


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def _strip(sd: dict) -> dict:
    """Drop OpenAI's extra buffers and a ``module.`` prefix every key has (DataParallel)."""
    sd = {k: v for k, v in sd.items() if k not in OPENAI_EXTRA_KEYS}
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
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
        log.warning(
            "pretrained %s holds OpenAI-trained weights (%s), which use QuickGELU: embedding with %s, not %s",
            pretrained,
            ckpt.why,
            variant,
            name,
        )
        return variant
    where = str(Path(model_arg).resolve()) if name != model_arg else name
    fix = (
        f'add "quick_gelu": true to {where}'
        if name != model_arg
        else 'pass a model config JSON with "quick_gelu": true'
    )
    raise UsageError(
        f"pretrained {pretrained} holds OpenAI-trained weights ({ckpt.why}), which use QuickGELU "
        f"activations, but model {name} uses GELU and open_clip has no {variant}: {fix}.",
        params=("pretrained", "model"),
    )


def _names(keys: list, n: int = 5) -> str:
    more = f", ... (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_weights(model: torch.nn.Module, ckpt: Checkpoint, name: str, pretrained: str) -> None:
    """Load ``ckpt`` into ``model`` (open_clip's conversions: a custom text tower, resized position
    embeddings, scalar logit_scale). A key or shape mismatch raises DataError naming every kind of
    mismatch, with counts and the first names."""
    from open_clip.factory import (
        convert_state_dict,
        convert_to_custom_text_state_dict,
        resize_pos_embed,
        resize_text_pos_embed,
    )

    sd = convert_state_dict(model, dict(ckpt.state_dict))
    if "positional_embedding" in sd and not hasattr(model, "positional_embedding"):
        sd = convert_to_custom_text_state_dict(sd)
    for key in ("logit_scale", "logit_bias"):
        own = getattr(model, key, None)
        if key in sd and own is not None and own.ndim != sd[key].ndim:
            sd[key] = sd[key].reshape(own.shape)
    want = model.state_dict()
    transient = {n for n, _ in model.named_buffers()} - set(want)  # non-persistent buffers (attn_mask)
    sd = {k: v for k, v in sd.items() if k not in transient}
    try:
        resize_pos_embed(sd, model)
        resize_text_pos_embed(sd, model)
    except Exception:  # noqa: BLE001 - a shape the resizers do not know is reported below
        pass
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    shapes = [
        f"{k} {list(sd[k].shape)} in the checkpoint, {list(want[k].shape)} in {name}"
        for k in want
        if k in sd and tuple(sd[k].shape) != tuple(want[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} of its {len(want)} tensors missing ({_names(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} tensors it does not have ({_names(unexpected)})")
        if shapes:
            parts.append(f"{len(shapes)} of another shape ({_names(shapes, 3)})")
        raise DataError(
            f"pretrained {pretrained}: the checkpoint ({ckpt.layout}) does not fit {name}: "
            f"{'; '.join(parts)}. Pass as model the architecture the checkpoint was trained as.",
            params=("pretrained", "model"),
        )
    model.load_state_dict(sd, strict=True)
