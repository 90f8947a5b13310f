"""A CLIP4Cir-shaped combiner training loop with mined negatives (CLIP4Cir's
``combiner_training_fiq``: frozen CLIP, features per batch, in-batch cross-entropy), written for this
example. The lines marked ``# cir-mine`` are everything cir-mine adds to such a loop: the mined
negatives ride along with each dataset item, enter the loss as extra logits, and are re-mined with
the model's own query embeddings every ``--remine-every`` epochs.

Run on the generated fixture (CPU, seconds)::

    python examples/clip4cir/fixture.py /tmp/c4c
    cir-mine embed --dataset fashioniq --root /tmp/c4c/fashionIQ_dataset --split train --work /tmp/c4c/work \\
        --model /tmp/c4c/tiny-clip.json --pretrained /tmp/c4c/tuned_clip_best.pt --preprocess targetpad
    python examples/clip4cir/combiner_train.py --root /tmp/c4c/fashionIQ_dataset --work /tmp/c4c/work \\
        --clip-model /tmp/c4c/tiny-clip.json --clip-model-path /tmp/c4c/tuned_clip_best.pt

docs/clip4cir.md says what to change in CLIP4Cir's own ``combiner_train.py``.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import optim
from torch.utils.data import DataLoader

from combiner import Combiner
from data_utils import FashionIQDataset, targetpad_transform
from cir_mine import Clip4CirNegatives, MineConfig, Remine, Workspace, mine_negatives  # cir-mine


def collate_fn(batch: list):
    """CLIP4Cir's collate: drop items that failed to load, then torch's default collate."""
    return torch.utils.data.dataloader.default_collate([b for b in batch if b is not None])


def load_clip(model: str, checkpoint: Optional[str]):
    """The frozen CLIP: an open_clip model (a name or config JSON) with CLIP4Cir's fine-tuned weights."""
    import open_clip

    name = model
    if model.endswith(".json"):
        open_clip.add_model_config(model)
        name = Path(model).stem
    clip_model = open_clip.create_model(name)
    if checkpoint:
        clip_model.load_state_dict(torch.load(checkpoint, map_location="cpu")["CLIP"])
    return clip_model.eval(), open_clip.get_tokenizer(name)


def randomized_captions(captions: list, rng: random.Random) -> list:
    """CLIP4Cir's training captions: "c1 and c2", "c2 and c1", c1 or c2, at random."""
    out = []
    for c1, c2 in zip(*captions):
        c1, c2 = c1.strip(".?, "), c2.strip(".?, ")
        out.append(
            rng.choice([f"{c1.capitalize()} and {c2}", f"{c2.capitalize()} and {c1}", c1.capitalize(), c2.capitalize()])
        )
    return out


@torch.no_grad()
def query_embeddings(clip_model, combiner, dataset, tokenizer, batch_size: int = 64) -> np.ndarray:
    """The combiner's query of every dataset item, in the dataset's order: float32[n, d]."""
    combiner.eval()
    out = []
    for ref, _, captions in DataLoader(dataset, batch_size=batch_size, collate_fn=collate_fn):
        text = [f"{c1.strip('.?, ').capitalize()} and {c2.strip('.?, ')}" for c1, c2 in zip(*captions)]
        out.append(
            combiner.combine_features(
                clip_model.encode_image(ref).float(), clip_model.encode_text(tokenizer(text)).float()
            )
        )
    combiner.train()
    return torch.cat(out).numpy()


def combiner_training_fiq(
    root: str,
    work: str,
    clip_model_name: str,
    clip_model_path: Optional[str] = None,
    num_epochs: int = 4,
    batch_size: int = 32,
    k: int = 4,
    remine_every: int = 2,
    projection_dim: int = 64,
    hidden_dim: int = 128,
    lr: float = 1e-3,
    target_ratio: float = 1.25,
    num_workers: int = 0,
    seed: int = 0,
    on_batch: Optional[Callable] = None,
) -> dict:
    """Train a combiner on FashionIQ's train split (CLIP4Cir's dress order) with mined negatives.

    on_batch(record): called after each step with the epoch, the batch's captions, CLIP reference
    features, negative features and mask (the test checks every item's negatives through it).
    Returns {"losses": per-epoch mean loss, "rounds": the negatives tables used, round by round}."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    clip_model, tokenizer = load_clip(clip_model_name, clip_model_path)
    size = clip_model.visual.image_size
    preprocess = targetpad_transform(target_ratio, size if isinstance(size, int) else size[0])
    feature_dim = clip_model.text_projection.shape[1]
    relative_train_dataset = FashionIQDataset("train", ["dress", "toptee", "shirt"], "relative", preprocess, root)

    ws = Workspace(work)  # cir-mine
    cfg = MineConfig(strategy="hardest", k=k)  # cir-mine
    rounds = [mine_negatives(ws, "train", cfg)]  # cir-mine
    train_set = Clip4CirNegatives(relative_train_dataset, rounds[0], ws=ws)  # cir-mine
    remine = Remine(ws, "train", cfg=cfg)  # cir-mine

    loader = DataLoader(
        train_set,
        batch_size=batch_size,
        shuffle=True,
        drop_last=False,
        collate_fn=collate_fn,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
    )
    combiner = Combiner(feature_dim, projection_dim, hidden_dim)
    optimizer = optim.Adam(combiner.parameters(), lr=lr)
    crossentropy_criterion = torch.nn.CrossEntropyLoss()
    losses = []
    for epoch in range(num_epochs):
        combiner.train()
        total, seen = 0.0, 0
        for reference_images, target_images, captions, neg_features, neg_mask in loader:  # cir-mine
            with torch.no_grad():
                reference_features = clip_model.encode_image(reference_images).float()
                target_features = clip_model.encode_image(target_images).float()
                text_features = clip_model.encode_text(tokenizer(randomized_captions(captions, rng))).float()
            query = combiner.combine_features(reference_features, text_features)
            logits = combiner.logit_scale * query @ F.normalize(target_features, dim=-1).T
            neg_logits = combiner.logit_scale * torch.einsum("bd,bkd->bk", query, neg_features)  # cir-mine
            logits = torch.cat([logits, neg_logits.masked_fill(~neg_mask, float("-inf"))], 1)  # cir-mine
            loss = crossentropy_criterion(logits, torch.arange(len(query)))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total, seen = total + loss.item() * len(query), seen + len(query)
            if on_batch is not None:
                on_batch(
                    {
                        "epoch": epoch,
                        "captions": captions,
                        "reference_features": reference_features,
                        "neg_features": neg_features,
                        "neg_mask": neg_mask,
                    }
                )
        losses.append(total / max(seen, 1))
        if remine_every and (epoch + 1) % remine_every == 0 and epoch + 1 < num_epochs:  # cir-mine
            query_emb = query_embeddings(clip_model, combiner, relative_train_dataset, tokenizer)  # cir-mine
            keep = train_set.has_query  # cir-mine
            rounds.append(remine(query_emb[keep], query_ids=train_set.query_ids[keep], epoch=epoch + 1))  # cir-mine
            train_set.set_negatives(rounds[-1])  # cir-mine
        print(
            f"epoch {epoch}: loss {losses[-1]:.4f}, negatives round {len(rounds) - 1}: "
            f"{int(train_set.mask.sum())} for {len(train_set)} items"
        )
    remine.close()  # cir-mine
    return {"losses": losses, "rounds": rounds, "combiner": combiner}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", required=True, help="the FashionIQ folder (captions/, image_splits/, images/)")
    p.add_argument("--work", required=True, help="the cir-mine workspace `cir-mine embed` wrote from --root")
    p.add_argument("--clip-model", required=True, help="open_clip model name or config JSON")
    p.add_argument("--clip-model-path", help="CLIP4Cir's fine-tuned CLIP checkpoint ({'CLIP': state_dict})")
    p.add_argument("--num-epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--k", type=int, default=4, help="mined negatives per item")
    p.add_argument("--remine-every", type=int, default=2, help="re-mine with the model's queries every N epochs")
    p.add_argument("--target-ratio", type=float, default=1.25)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    return combiner_training_fiq(
        a.root,
        a.work,
        a.clip_model,
        a.clip_model_path,
        a.num_epochs,
        a.batch_size,
        a.k,
        a.remine_every,
        target_ratio=a.target_ratio,
        num_workers=a.num_workers,
        seed=a.seed,
    )


if __name__ == "__main__":
    main()
