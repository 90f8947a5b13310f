"""A combiner with the interface of CLIP4Cir's ``src/combiner.py`` (written for this example):
``combine_features(image_features, text_features) -> unit query features`` and
``forward(image, text, target) -> logit_scale * query @ normalize(target).T`` (in-batch logits)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Combiner(nn.Module):
    def __init__(self, clip_feature_dim: int, projection_dim: int, hidden_dim: int, dropout: float = 0.5):
        super().__init__()
        self.text_proj = nn.Sequential(nn.Linear(clip_feature_dim, projection_dim), nn.ReLU(), nn.Dropout(dropout))
        self.image_proj = nn.Sequential(nn.Linear(clip_feature_dim, projection_dim), nn.ReLU(), nn.Dropout(dropout))
        self.mix = nn.Sequential(
            nn.Linear(2 * projection_dim, hidden_dim),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, clip_feature_dim),
        )
        self.gate = nn.Sequential(
            nn.Linear(2 * projection_dim, hidden_dim),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, 1),
            nn.Sigmoid(),
        )
        self.logit_scale = 100

    def combine_features(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        both = torch.cat([self.text_proj(text_features), self.image_proj(image_features)], -1)
        g = self.gate(both)
        return F.normalize(self.mix(both) + g * text_features + (1 - g) * image_features, dim=-1)

    def forward(self, image_features, text_features, target_features) -> torch.Tensor:
        query = self.combine_features(image_features, text_features)
        return self.logit_scale * query @ F.normalize(target_features, dim=-1).T
