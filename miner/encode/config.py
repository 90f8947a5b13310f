"""The settings of an embedding run: the encoder, the image batches, the job (what to embed where).

Torch-free, so front ends (the CLI's options) read them without loading the models.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from cir_mine.miner.encode.preprocess import TARGET_RATIO

DEFAULT_PROMPTS = Path(__file__).resolve().parent / "garment_attributes.json"


@dataclass(frozen=True)
class EncoderConfig:
    # fmt: off
    model: str = "ViT-B-32"      # open_clip model name, or path of an open_clip model-config JSON
    pretrained: str = "none"     # open_clip tag, local checkpoint path (OpenAI .pt archive, CLIP4Cir
                                 # {'CLIP': state_dict}, open_clip checkpoint or state dict; OpenAI-trained
                                 # weights get the -quickgelu model; see read_checkpoint), or none (random
                                 # weights: meaningless negatives)
    device: str = "auto"         # auto | cpu | cuda, by the one device rule (auto: a GPU when torch sees one)
    precision: str = "auto"      # auto (bf16/fp16 autocast on GPU, fp32 on CPU) | fp32 | fp16 | bf16 (autocast)
    seed: int = 0                # seed of the random init (same seed, same "none" weights: resumable)
    channels_last: Optional[bool] = None  # channels-last image input (None: on a GPU for convolutional image towers)
    preprocess: str = "clip"     # image preprocessing: clip (open_clip's), targetpad or squarepad (CLIP4Cir's;
                                 # embed with what your model was trained with)
    target_ratio: float = TARGET_RATIO  # targetpad: pad images whose long/short side ratio is above this
                                        # (CLIP4Cir's --target-ratio)
    # fmt: on


@dataclass(frozen=True)
class ImageRun:
    # fmt: off
    batch_size: int = 64         # images per forward pass
    workers: Optional[int] = None  # image-decoding worker processes (0: the main process; None: one per spare
                                   # core on a GPU, 2 on the CPU)
    shard_size: int = 4096       # images per resumable shard (a multiple of batch_size is best)
    # fmt: on


@dataclass(frozen=True)
class EmbedJob:
    # fmt: off
    dataset: str                          # fashioniq | cirr | folder | webdataset
    root: Path                            # dataset root (folder: the image directory)
    split: str                            # split name (train, val, ...)
    work: Path                            # workspace directory to write
    encoder: EncoderConfig = EncoderConfig()  # model, weights, device
    run: ImageRun = ImageRun()            # batch size, workers, shard size
    attribute_prompts: Optional[Path] = None  # zero-shot attribute prompt JSON (DEFAULT_PROMPTS, 'default' on the
                                              # command line: the shipped garment prompts; None: none)
    index: str = "flat"                   # flat | ivf | ivfpq | hnsw | a FAISS factory string ('none': no index)
    triplets_file: Optional[Path] = None  # folder: the triplets CSV/JSONL (default ROOT/triplets.{split}.csv|jsonl);
                                          # webdataset: triplets naming sample keys (none: gallery only)
    # fmt: on


@dataclass(frozen=True)
class RayEmbedRun:
    # fmt: off
    actors: int = 1                 # open_clip encoder actors (with device cuda at most one per GPU)
    part_size: int = 4096           # images per gallery part (the unit of resume)
    batch_size: int = 64            # images per forward pass inside an actor
    cpus_per_actor: Optional[float] = None  # CPUs each CPU encoder actor reserves, its torch threads max(1, floor)
                                            # (None: 1, or a fraction so that every actor fits the cluster)
    address: Optional[str] = None   # the cluster to join: auto or HOST:PORT (None: start a local one)
    # fmt: on
