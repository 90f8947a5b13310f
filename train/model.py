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
- :class:`SumFusion`: ``normalize(image + text)``, no parameters: the zero-shot baseline.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cir_mine.data.errors import UsageError

MODELS = ("combiner", "attention", "sum")


@dataclass
class ModelConfig:
    kind: str = "combiner"     # combiner | attention | sum (zero-shot, no parameters)
    dim: int = 512             # embedding dimension d of the workspace
    width: float = 2.0         # projection width = width·d, hidden width = 2·width·d (CLIP4Cir: 4, 8)
    dropout: float = 0.1       # dropout after the projections and inside the combiner MLP
    heads: int = 4             # attention heads (attention model only)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def _mixing_scalar(width_in: int, hidden: int, dropout: float) -> nn.Module:
    """MLP -> sigmoid: the dynamic λ of CLIP4Cir (one scalar per query)."""
    return nn.Sequential(nn.Linear(width_in, hidden), nn.ReLU(), nn.Dropout(dropout),
                         nn.Linear(hidden, 1), nn.Sigmoid())


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
        tokens = self.norm(tokens + attended)                       # [B, 2, p]
        img, txt = tokens[:, 0], tokens[:, 1]
        cat = torch.cat([img, txt], dim=-1)
        g = torch.sigmoid(self.gate(cat))
        lam = self.mix(cat)
        out = self.output(g * img + (1 - g) * txt) + lam * text_emb + (1 - lam) * ref_emb
        return F.normalize(out, dim=-1)


class SumFusion(nn.Module):
    """``normalize(ref + text)``: the zero-shot baseline (no parameters)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()

    def forward(self, ref_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        return F.normalize(ref_emb + text_emb, dim=-1)


def build_model(cfg: ModelConfig) -> nn.Module:
    kinds = {"combiner": Combiner, "attention": AttentionFusion, "sum": SumFusion}
    if cfg.kind not in kinds:
        raise UsageError(f"model {cfg.kind!r}: use one of {', '.join(MODELS)}.", params=("model",))
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
        r = torch.from_numpy(np.array(ref_emb[s:s + batch_size], dtype=np.float32))
        t = torch.from_numpy(np.array(text_emb[s:s + batch_size], dtype=np.float32))
        out[s:s + batch_size] = model(r, t).numpy()
    model.train(was_training)
    return out
