"""A PyTorch dataset over a workspace split and its mined negatives (for users' own training loops).

``NegativesDataset(ws, negatives)`` yields one item per query of the split, in the triplets' row
order: the reference, the target and the query's k negatives, either as the workspace's cached
embeddings or, given an open_clip ``preprocess``, as image tensors read from the gallery's ``path``
column (for fine-tuning the encoders), plus the cached text embedding and the caption text.
:func:`collate_negatives` stacks items into a batch. The dataset holds numpy arrays only (no open
files, no workspace handle), so it pickles and is safe with DataLoader workers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from cir_mine.data.errors import DataError, UsageError
from cir_mine.data.records import join_captions
from cir_mine.data.workspace import Workspace


def _negatives_table(ws: Workspace, negatives):
    """A NegativesTable from a path (read and checked against ``ws``), NegativesTable, MineResult or table."""
    from cir_mine.miner.core.tables import as_negatives_table

    return as_negatives_table(negatives, ws, "NegativesDataset")


class NegativesDataset(torch.utils.data.Dataset):
    """One item per query of ``split``: a dict with

    - ``query_id``: str; ``caption``: str (the captions joined FashionIQ-style);
    - ``text``: float32[d] the cached text embedding;
    - ``reference``, ``target``: float32[d] cached embeddings, or float32[3, H, W] with ``preprocess``;
    - ``negatives``: float32[k, d], or float32[k, 3, H, W] with ``preprocess`` (zeros in empty slots);
    - ``negative_mask``: bool[k] True where the slot holds a negative; ``delta``: float32[k] (NaN empty).

    ws: the workspace the table was mined from (checked); negatives: a table path,
    ``read_negatives(...)``, a MineResult (``Remine``'s) or a pyarrow Table in the negatives
    schema; split: default the table's; k: slots per query (default the table's k);
    preprocess: an open_clip image transform (PIL image -> tensor); root: folder relative
    gallery ``path`` values are relative to (default: the dataset root the workspace records).
    """

    def __init__(
        self,
        ws: Workspace,
        negatives,
        split: Optional[str] = None,
        k: Optional[int] = None,
        preprocess: Optional[Callable] = None,
        root: Optional[str | Path] = None,
    ):
        self.k_request, self.preprocess = k, preprocess
        self.root = None if root is None else Path(root)
        nt = _negatives_table(ws, negatives)
        self._ws, self.split = ws, split or nt.split
        self._loaded = ws.load(self.split)  # read once; set_negatives reuses it
        if self.root is None:
            self.root = ws.image_root(self.split)  # the dataset root `cir-mine embed` recorded
        self.set_negatives(nt)

    def set_negatives(self, negatives) -> None:
        """Swap in another table of the same split (e.g. a re-mined one); workers started after
        this call (each epoch, unless ``persistent_workers``) see it."""
        ws, (g, t) = self._ws, self._loaded
        nt = _negatives_table(ws, negatives)
        if nt.meta.get("split", self.split) != self.split:
            name = f" {nt.path}" if nt.path else ""
            raise UsageError(
                f"the negatives table{name} was mined from split '{nt.split}', this dataset holds "
                f"split '{self.split}'; make a NegativesDataset for that split."
            )
        if nt.meta:  # a bare pyarrow table has no footer to check
            grouped = nt.grouped(ws, self.split, loaded=self._loaded)
        else:
            from cir_mine.miner.core.grouped import group_negatives_table

            grouped = group_negatives_table(nt.table, None, gallery=g, triplets=t)
        k = self.k_request or grouped.k
        rows = grouped.gallery_rows[:, :k]
        if rows.shape[1] < k:
            rows = np.pad(rows, ((0, 0), (0, k - rows.shape[1])), constant_values=-1)
        delta = np.full(rows.shape, np.nan, np.float32)
        delta[:, : min(k, grouped.k)] = grouped.delta[:, :k]
        self.query_ids = grouped.query_ids
        self.neg_rows, self.delta = rows, delta
        self.ref_rows, self.target_rows = grouped.ref_rows, grouped.target_rows
        self.embeddings = g.embeddings
        self.text_emb = t.text_embeddings
        self.captions = [join_captions(c) for c in t.captions]
        if self.preprocess is not None:
            if g.paths is None:
                raise UsageError(
                    f"{ws.gallery_path(self.split)}: the gallery has no image paths "
                    f"(column 'path'), so there are no images to preprocess. Drop preprocess= "
                    f"to get cached embeddings, or embed the images with `cir-mine embed`."
                )
            self.paths = g.paths

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_ws"] = state["_loaded"] = None  # workers get arrays only, never the workspace
        return state

    @property
    def k(self) -> int:
        return int(self.neg_rows.shape[1])

    def __len__(self) -> int:
        return int(self.query_ids.shape[0])

    def _image(self, row: int) -> torch.Tensor:
        from PIL import Image

        p = Path(self.paths[row])
        if not p.is_absolute() and self.root is not None:
            p = self.root / p
        try:
            with Image.open(p) as im:
                return self.preprocess(im.convert("RGB"))
        except (OSError, ValueError) as e:
            raise DataError(
                f"{p}: cannot read gallery image (row {row}: {e}). Pass root= when the "
                f"gallery's paths are relative to the dataset root."
            ) from None

    def __getitem__(self, i: int) -> dict:
        rows = self.neg_rows[i]
        mask = rows >= 0
        item = {
            "query_id": str(self.query_ids[i]),
            "caption": self.captions[i],
            "text": torch.from_numpy(self.text_emb[i].copy()),
            "negative_mask": torch.from_numpy(mask),
            "delta": torch.from_numpy(self.delta[i].copy()),
        }
        if self.preprocess is None:
            item["reference"] = torch.from_numpy(self.embeddings[self.ref_rows[i]].copy())
            item["target"] = torch.from_numpy(self.embeddings[self.target_rows[i]].copy())
            negs = np.zeros((self.k, self.embeddings.shape[1]), np.float32)
            negs[mask] = self.embeddings[rows[mask]]
            item["negatives"] = torch.from_numpy(negs)
        else:
            ref = self._image(int(self.ref_rows[i]))
            item["reference"], item["target"] = ref, self._image(int(self.target_rows[i]))
            negs = torch.zeros((self.k, *ref.shape), dtype=ref.dtype)
            for j in np.flatnonzero(mask):
                negs[j] = self._image(int(rows[j]))
            item["negatives"] = negs
        return item


def collate_negatives(items: list) -> dict:
    """Items of :class:`NegativesDataset` -> a batch: tensors stacked on a new first axis
    (``negatives``: [B, k, ...], ``negative_mask``: bool[B, k]), strings as lists."""
    out = {}
    for key in items[0]:
        vals = [it[key] for it in items]
        out[key] = torch.stack(vals) if isinstance(vals[0], torch.Tensor) else vals
    return out
