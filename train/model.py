"""Query encoders over frozen features: (reference image embedding, text embedding) -> query embedding.

Both models map ``ref_emb: float32[B, d]`` and ``text_emb: float32[B, d]`` (L2-normalized, one
embedding space for the gallery and another for text) to ``float32[B, d]`` L2-normalized query
embeddings that are compared with gallery image embeddings by cosine.

- :class:`Combiner` (CLIP4Cir, Baldrati et al. 2022): text and image projections, concatenation, a
  combiner MLP and a learned dynamic scalar λ;
  ``out = normalize(mlp + λ·text + (1−λ)·image)``. Widths are multiples of ``d`` (CLIP4Cir uses
  4·d for the projections and 8·d hidden; ``width`` scales both down for CPU).
- :class:`AttentionFusion`: the two projected features are two tokens; one multi-head attention
  layer lets each attend to the other, a sigmoid gate mixes the attended tokens per channel, and
  the same λ residual as the combiner keeps the zero-shot sum reachable at initialisation.
- :class:`DQEFusion` (DQE-CIR's learnable attribute weights): the combiner's hidden state feeds a
  global query and one sub-query per attribute head (colour-specific and shape-specific by
  default, :data:`ATTR_HEADS`); text-conditioned softmax weights mix them,
  ``out = normalize(w_0·q_global + Σ_s w_s·q_s)``. :meth:`DQEFusion.parts` also returns the unit
  sub-queries and the weights for the attribute-aware margin loss
  (:func:`cir_mine.train.loss.attribute_margin`), which asks sub-query s to rank the target above
  every negative that differs from it in head s's groups.
- :class:`SumFusion`: ``normalize(image + text)``, no parameters: the zero-shot baseline.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cir_mine.data.errors import UsageError

MODELS = ("combiner", "attention", "dqe", "sum")
# DQE attribute heads: head name -> the attribute groups (gallery "group:value" tags) it answers for.
# Colour-specific (colour and surface: pattern, texture, fabric) and shape-specific (cut and parts).
ATTR_HEADS = {
    "color": ("color", "pattern", "texture", "fabric"),
    "shape": ("sleeve", "length", "neckline", "shape", "part", "style"),
}
# A head may also answer for one attribute group alone: "group:neckline".
GROUP_HEAD = "group:"


def head_groups(name: str) -> tuple:
    """The attribute groups DQE head ``name`` answers for: a named head's, or a "group:NAME" head's one."""
    return (name[len(GROUP_HEAD) :],) if name.startswith(GROUP_HEAD) else ATTR_HEADS[name]


@dataclass
class ModelConfig:
    # fmt: off
    kind: str = "combiner"     # combiner | attention | sum (zero-shot, no parameters)
    dim: int = 512             # embedding dimension d of the workspace
    width: float = 2.0         # projection width = width·d, hidden width = 2·width·d (CLIP4Cir: 4, 8)
    dropout: float = 0.1       # dropout after the projections and inside the combiner MLP
    heads: int = 4             # attention heads (attention model only)
    attr_heads: tuple = tuple(ATTR_HEADS)  # dqe: attribute sub-queries, names of ATTR_HEADS or "group:NAME" (one group)
    # fmt: on

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if "attr_heads" in d:
            d["attr_heads"] = tuple(d["attr_heads"])
        return cls(**d)


def _mixing_scalar(width_in: int, hidden: int, dropout: float) -> nn.Module:
    """MLP -> sigmoid: the dynamic λ of CLIP4Cir (one scalar per query)."""
    return nn.Sequential(
        nn.Linear(width_in, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 1), nn.Sigmoid()
    )


class Combiner(nn.Module):
    """CLIP4Cir Combiner; ``forward(ref_emb[B,d], text_emb[B,d]) -> float32[B,d]`` unit rows."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, p = cfg.dim, max(8, int(round(cfg.width * cfg.dim)))
        h = 2 * p
        self.text_proj = nn.Sequential(nn.Linear(d, p), nn.ReLU(), nn.Dropout(cfg.dropout))
        self.image_proj = nn.Sequential(nn.Linear(d, p), nn.ReLU(), nn.Dropout(cfg.dropout))
        self.combiner = nn.Sequential(nn.Linear(2 * p, h), nn.ReLU(), nn.Dropout(cfg.dropout))
        self.output = nn.Linear(h, d)
        self.mix = _mixing_scalar(2 * p, h, cfg.dropout)

    def forward(self, ref_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        cat = torch.cat([self.text_proj(text_emb), self.image_proj(ref_emb)], dim=-1)
        lam = self.mix(cat)
        out = self.output(self.combiner(cat)) + lam * text_emb + (1 - lam) * ref_emb
        return F.normalize(out, dim=-1)


class AttentionFusion(nn.Module):
    """Gated attention over the image and text tokens; same signature as :class:`Combiner`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, p = cfg.dim, max(8, int(round(cfg.width * cfg.dim)))
        heads = cfg.heads if p % cfg.heads == 0 else 1
        self.text_proj = nn.Sequential(nn.Linear(d, p), nn.ReLU(), nn.Dropout(cfg.dropout))
        self.image_proj = nn.Sequential(nn.Linear(d, p), nn.ReLU(), nn.Dropout(cfg.dropout))
        self.type_embed = nn.Parameter(torch.zeros(2, p))
        self.attn = nn.MultiheadAttention(p, heads, dropout=cfg.dropout, batch_first=True)
        self.norm = nn.LayerNorm(p)
        self.gate = nn.Linear(2 * p, p)
        self.output = nn.Linear(p, d)
        self.mix = _mixing_scalar(2 * p, 2 * p, cfg.dropout)

    def forward(self, ref_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        tokens = torch.stack([self.image_proj(ref_emb), self.text_proj(text_emb)], dim=1) + self.type_embed
        attended, _ = self.attn(tokens, tokens, tokens, need_weights=False)
        tokens = self.norm(tokens + attended)  # [B, 2, p]
        img, txt = tokens[:, 0], tokens[:, 1]
        cat = torch.cat([img, txt], dim=-1)
        g = torch.sigmoid(self.gate(cat))
        lam = self.mix(cat)
        out = self.output(g * img + (1 - g) * txt) + lam * text_emb + (1 - lam) * ref_emb
        return F.normalize(out, dim=-1)


class DQEFusion(nn.Module):
    """Combiner with text-conditioned weights over attribute-specific sub-queries; same signature
    as :class:`Combiner`. ``parts(ref, text) -> (out[B,d], subs[B,S,d], weights[B,S+1])``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, p = cfg.dim, max(8, int(round(cfg.width * cfg.dim)))
        h = 2 * p
        self.n_sub = len(cfg.attr_heads)
        self.text_proj = nn.Sequential(nn.Linear(d, p), nn.ReLU(), nn.Dropout(cfg.dropout))
        self.image_proj = nn.Sequential(nn.Linear(d, p), nn.ReLU(), nn.Dropout(cfg.dropout))
        self.combiner = nn.Sequential(nn.Linear(2 * p, h), nn.ReLU(), nn.Dropout(cfg.dropout))
        self.output = nn.Linear(h, d * (1 + self.n_sub))  # global query + one sub-query per head
        self.mix = _mixing_scalar(2 * p, h, cfg.dropout)
        self.weights = nn.Linear(p, 1 + self.n_sub)  # text-conditioned attribute weights
        nn.init.zeros_(self.weights.weight)  # start from equal weights
        nn.init.zeros_(self.weights.bias)

    def parts(self, ref_emb: torch.Tensor, text_emb: torch.Tensor):
        tp = self.text_proj(text_emb)
        cat = torch.cat([tp, self.image_proj(ref_emb)], dim=-1)
        lam = self.mix(cat)
        base = (lam * text_emb + (1 - lam) * ref_emb).unsqueeze(1)  # [B, 1, d]
        heads = self.output(self.combiner(cat)).view(ref_emb.shape[0], 1 + self.n_sub, -1) + base
        heads = F.normalize(heads, dim=-1)  # [B, 1+S, d]
        w = torch.softmax(self.weights(tp), dim=-1)  # [B, 1+S]
        out = F.normalize((w.unsqueeze(-1) * heads).sum(1), dim=-1)
        return out, heads[:, 1:], w

    def forward(self, ref_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        return self.parts(ref_emb, text_emb)[0]


def attribute_head_codes(attributes, heads=tuple(ATTR_HEADS)):
    """Per gallery image and DQE head, an id of its values in the head's groups: int64[n, S].

    ``attributes``: list[n] of "group:value" lists. Two images differ for head s when their ids
    differ (an image without any of the head's groups gets the id of the empty set)."""
    import numpy as np

    out = np.zeros((len(attributes), len(heads)), np.int64)
    for j, name in enumerate(heads):
        groups = set(head_groups(name))
        ids: dict = {}
        for i, tags in enumerate(attributes):
            key = tuple(sorted(a for a in tags if a.split(":", 1)[0] in groups))
            out[i, j] = ids.setdefault(key, len(ids))
    return out


class SumFusion(nn.Module):
    """``normalize(ref + text)``: the zero-shot baseline (no parameters)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()

    def forward(self, ref_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        return F.normalize(ref_emb + text_emb, dim=-1)


def check_attr_heads(heads: tuple) -> None:
    """DQE head names: each a name of ATTR_HEADS or "group:NAME", at least one, none twice."""
    unknown = [h for h in heads if h not in ATTR_HEADS and not (h.startswith(GROUP_HEAD) and h[len(GROUP_HEAD) :])]
    repeated = sorted({h for h in heads if list(heads).count(h) > 1})
    if unknown or repeated or not heads:
        raise UsageError(
            f"attribute heads {', '.join(unknown or repeated) or '(none)'}: use one or more of "
            f"{', '.join(ATTR_HEADS)} or {GROUP_HEAD}NAME (one attribute group, such as "
            f"{GROUP_HEAD}neckline), each once.",
            params=("attr_heads",),
        )


def build_model(cfg: ModelConfig) -> nn.Module:
    kinds = {"combiner": Combiner, "attention": AttentionFusion, "dqe": DQEFusion, "sum": SumFusion}
    if cfg.kind not in kinds:
        raise UsageError(f"model {cfg.kind!r}: use one of {', '.join(MODELS)}.", params=("model",))
    if cfg.kind == "dqe":
        check_attr_heads(cfg.attr_heads)
    if cfg.width <= 0:
        raise UsageError(f"width {cfg.width}: must be positive.", params=("width",))
    return kinds[cfg.kind](cfg)


@torch.no_grad()
def encode_queries(model: nn.Module, ref_emb, text_emb, batch_size: int = 4096):
    """Embed queries in eval mode. numpy float32[m, d] x2 -> numpy float32[m, d] unit rows."""
    import numpy as np

    was_training = model.training
    model.eval()
    out = np.empty_like(np.asarray(ref_emb, dtype=np.float32))
    for s in range(0, out.shape[0], batch_size):
        r = torch.from_numpy(np.array(ref_emb[s : s + batch_size], dtype=np.float32))
        t = torch.from_numpy(np.array(text_emb[s : s + batch_size], dtype=np.float32))
        out[s : s + batch_size] = model(r, t).numpy()
    model.train(was_training)
    return out
