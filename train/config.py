"""The settings of a training run (``cir-train``): one dataclass, a comment per field, checked by
:meth:`TrainConfig.validate`. Torch-free, so front ends read it without loading the trainer."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

from cir_mine.data.checks import check_numbers, check_range
from cir_mine.data.errors import UsageError

LOSSES = ("infonce", "triplet", "both")
GROUP_HEADS = "groups"  # attr_heads value: one DQE head per attribute group found in the gallery's tags


def resolve_heads(heads: tuple, attributes) -> tuple:
    """DQE head names for a gallery: ``("groups",)`` -> one "group:NAME" head per attribute group
    in its tags (sorted); otherwise ``heads``, each "group:NAME" head checked to occur in a tag."""
    from cir_mine.train.model import GROUP_HEAD

    found = sorted({a.split(":", 1)[0] for tags in attributes for a in tags if ":" in a})
    if heads == (GROUP_HEADS,):
        if not found:
            raise UsageError(
                "attr_heads groups: the gallery has no attribute tags (group:value) to make heads of.",
                params=("attr_heads",),
            )
        return tuple(GROUP_HEAD + g for g in found)
    missing = [h for h in heads if h.startswith(GROUP_HEAD) and h[len(GROUP_HEAD) :] not in found]
    if missing:
        raise UsageError(
            f"attribute heads {', '.join(missing)}: no gallery image has a tag of that group "
            f"(its groups: {', '.join(found) or 'none'}).",
            params=("attr_heads",),
        )
    return heads


@dataclass
class TrainConfig:
    # fmt: off
    work: str = ""                     # workspace with the training split (not needed to resume a run)
    split: str = "train"               # training split (gallery.{split}, triplets.{split})
    out: str = ""                      # run directory (checkpoints, metrics, curves)
    negatives: Optional[str] = None    # negatives table (cir-mine negatives); None: in-batch negatives only
    eval_work: Optional[str] = None    # evaluation workspace (None: hold out dev_fraction of the training queries)
    eval_split: str = "val"            # split of eval_work
    dev_fraction: float = 0.1          # seeded share of training queries held out for evaluation when no eval_work
    dev_seed: int = 0                  # seed of the held-out dev queries (fixed across seed, so seeds share a dev set)
    epochs: int = 10                   # training epochs (0: zero-shot evaluation only)
    batch_size: int = 256              # queries per step (in-batch negatives)
    seed: int = 0                      # seed of the model init, shuffles and negative sampling
    model: str = "combiner"            # combiner (CLIP4Cir), attention (gated attention fusion) or dqe (DQE-CIR:
                                       # text-conditioned weights over attribute sub-queries, with the
                                       # attribute-aware margin loss; see ModelConfig)
    width: float = 2.0                 # projection width as a multiple of d (hidden = 2x; see ModelConfig)
    dropout: float = 0.1               # dropout inside the model
    lr: float = 1e-3                   # AdamW learning rate
    weight_decay: float = 1e-4         # AdamW weight decay
    lr_schedule: str = "cosine"        # cosine (decay to 0 over each stage, 1-epoch-free) | constant
    temperature: float = 0.05          # softmax temperature of InfoNCE and the static bank
    loss: str = "infonce"              # infonce | triplet | both
    margin: float = 0.2                # triplet margin (cosine distance)
    triplet_weight: float = 1.0        # weight of the triplet terms (loss both, online_hard)
    neg_per_query: int = 4             # mined negatives fed per query per step
    neg_share: float = 1.0             # share of queries per batch that get mined negatives
    share_warmup: int = 0              # epochs over which neg_share ramps up linearly from 0 (curriculum)
    schedule: Optional[str] = None     # strategy mix of the negatives table per epoch, e.g. 0:random,2:midzone,4:hardest
    category_batches: bool = False     # draw each batch within one category (in-batch negatives of the target's category)
    online_hard: int = 0               # hardest in-batch non-targets per query fed to a triplet loss
    static_bank: int = 0               # extra epochs of the SPN static-bank stage (whole gallery as negatives)
    bank_k: int = 0                    # static bank: gallery negatives sampled per step (0 = all)
    refresh_every: int = 0             # re-embed the queries and re-mine every N epochs (0 = never)
    exclude_reference: bool = False    # FashionIQ evaluation: also remove each query's reference image from its
                                       # category's gallery (CLIP4Cir's validate.py keeps it; CIRR always removes it)
    zero_shot: bool = False            # evaluate normalize(image + text) without training
    threads: int = 0                   # torch threads (0 = torch's default)
    extra_triplets: list = field(default_factory=list)  # generated triplets tables (cir-mine positives) mixed into the
                                                        # training queries, never into the dev split
    extra_weight: float = 1.0          # loss weight of each generated triplet (1: like a real one)
    neg_weight: float = 1.0            # InfoNCE: each mined negative counts this many times in the softmax (< 1 down-weights)
    attr_weight: float = 0.1           # dqe: weight of the attribute-aware margin loss (its margin is margin); the best
                                       # measured with either head set (docs/benchmarks.md, attribute-aware negatives)
    attr_heads: Optional[str] = None   # dqe: comma-separated sub-query heads: color, shape (grouped) or group:NAME (one
                                       # attribute group, e.g. group:neckline); groups: one head per attribute group
                                       # of the gallery; None: color,shape
    # fmt: on

    def to_dict(self) -> dict:
        return asdict(self)

    def epochs_to_run(self) -> int:
        """The epochs a run trains (the static-bank stage's included; none for zero-shot)."""
        return 0 if self.zero_shot or self.epochs == 0 else self.epochs + self.static_bank

    def heads(self) -> tuple:
        """``attr_heads`` as a tuple of head names (``("groups",)`` until a gallery resolves it)."""
        return tuple(h.strip() for h in (self.attr_heads or "").split(",") if h.strip())

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def validate(self) -> "TrainConfig":
        """Check every option (errors name the option, see CirMineError.params)."""
        check_numbers(self)
        check_range("lr", self.lr, 0.0, None, lo_open=True)
        check_range("dropout", self.dropout, 0.0, 1.0, hi_open=True)
        check_range("width", self.width, 0.0, None, lo_open=True)
        check_range("weight_decay", self.weight_decay, 0.0)
        check_range("margin", self.margin, 0.0)
        check_range("triplet_weight", self.triplet_weight, 0.0)
        check_range("dev_fraction", self.dev_fraction, 0.0, 1.0, hi_open=True)
        if self.threads < 0:
            raise UsageError(f"threads {self.threads}: must be >= 0 (0: torch's default).", params=("threads",))
        if self.lr_schedule not in ("cosine", "constant"):
            raise UsageError(f"lr_schedule {self.lr_schedule!r}: use cosine or constant.", params=("lr_schedule",))
        if self.loss not in LOSSES:
            raise UsageError(f"loss {self.loss!r}: use one of {', '.join(LOSSES)}.", params=("loss",))
        for name in (
            "epochs",
            "static_bank",
            "refresh_every",
            "online_hard",
            "neg_per_query",
            "bank_k",
            "share_warmup",
        ):
            if getattr(self, name) < 0:
                raise UsageError(f"{name} must be >= 0.", params=(name,))
        if self.batch_size < 2:
            raise UsageError(
                "batch_size must be at least 2 (in-batch negatives need two queries).", params=("batch_size",)
            )
        if not 0.0 <= self.neg_share <= 1.0:
            raise UsageError(f"neg_share {self.neg_share}: must be in [0, 1].", params=("neg_share",))
        for name in ("extra_weight", "neg_weight", "attr_weight"):
            if getattr(self, name) < 0:
                raise UsageError(f"{name} {getattr(self, name)}: must be >= 0.", params=(name,))
        if self.temperature <= 0:
            raise UsageError("temperature must be positive.", params=("temperature",))
        if self.refresh_every and not self.negatives:
            raise UsageError(
                "refresh_every needs negatives: the refresh re-mines with that table's config.",
                params=("refresh_every", "negatives"),
            )
        if self.schedule and not self.negatives:
            raise UsageError(
                "schedule needs negatives: it picks the mix of that table's strategies per epoch.",
                params=("schedule", "negatives"),
            )
        if self.attr_heads is not None:
            if self.model != "dqe":
                raise UsageError(
                    f"attr_heads needs dqe as the model (model is {self.model}): pass model dqe, or leave "
                    f"attr_heads out.",
                    params=("attr_heads", "model"),
                )
            if self.heads() != (GROUP_HEADS,):
                from cir_mine.train.model import check_attr_heads

                check_attr_heads(self.heads())
        return self
