"""The open_clip encoder's public names in one place: loading (:mod:`~cir_mine.miner.encode.model`,
:mod:`~cir_mine.miner.encode.checkpoint`), image batches (:mod:`~cir_mine.miner.encode.images`),
image embedding in this process (:mod:`~cir_mine.miner.encode.local`; the pipeline
it runs in: :mod:`~cir_mine.miner.encode.pipeline`) and zero-shot attributes
(:mod:`~cir_mine.miner.encode.attributes`)."""

from __future__ import annotations

from cir_mine.miner.encode.attributes import AttributePrompts, load_prompts, zero_shot_attributes
from cir_mine.miner.encode.checkpoint import Checkpoint, load_weights, quickgelu_model, read_checkpoint
from cir_mine.miner.encode.config import DEFAULT_PROMPTS, EncoderConfig, ImageRun
from cir_mine.miner.encode.images import (
    Embedded,
    ImageFiles,
    default_workers,
    forward_images,
    image_loader,
    input_shape,
    launch_images,
    load_pixels,
)
from cir_mine.miner.encode.local import embed_dataset, embed_images
from cir_mine.miner.encode.model import (
    RANDOM_WEIGHTS,
    Encoder,
    autocast_dtype,
    convolutional,
    embed_texts,
    load_encoder,
    normalize_pixels,
    pick_device,
    resolve_model,
    resolve_pretrained,
    split_transform,
    text_encoder_from_manifest,
    warn_random_weights,
)
from cir_mine.miner.encode.pipeline import key_label, plan_fingerprint

__all__ = [
    "AttributePrompts",
    "Checkpoint",
    "DEFAULT_PROMPTS",
    "Embedded",
    "Encoder",
    "EncoderConfig",
    "ImageFiles",
    "ImageRun",
    "RANDOM_WEIGHTS",
    "autocast_dtype",
    "convolutional",
    "default_workers",
    "embed_dataset",
    "embed_images",
    "embed_texts",
    "forward_images",
    "image_loader",
    "input_shape",
    "key_label",
    "launch_images",
    "load_encoder",
    "load_pixels",
    "load_prompts",
    "load_weights",
    "normalize_pixels",
    "pick_device",
    "plan_fingerprint",
    "quickgelu_model",
    "read_checkpoint",
    "resolve_model",
    "resolve_pretrained",
    "split_transform",
    "text_encoder_from_manifest",
    "warn_random_weights",
    "zero_shot_attributes",
]
