"""Zero-shot attributes: prompt files and the best value per attribute group for each image."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from cir_mine.data.errors import DataError
from cir_mine.miner.encode.model import Encoder, embed_texts


@dataclass(frozen=True)
class AttributePrompts:
    # fmt: off
    template: str                          # default prompt, e.g. "a photo of a {value} {category}"
    groups: dict                           # group -> {value: phrase used in the prompt}
    templates: dict                        # group -> template overriding ``template``
    default_category: str = "garment"      # {category} for images without one
    # fmt: on


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


def zero_shot_attributes(
    encoder: Encoder, image_emb: np.ndarray, categories: Sequence[str], prompts: AttributePrompts
) -> tuple[list[list[str]], list[list[float]]]:
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
