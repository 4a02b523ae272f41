"""The recipe's `data` section and the one place a `SampleBuilder` is made from it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .datasets import SampleBuilder
from .manifests import BAD_RECORD_POLICIES


@dataclass
class DataConfig:
    train: str = ""                      # manifest (JSONL/CSV)
    shards: str = ""                     # webdataset shard folder; used instead of `train` when set
    batch_size: int = 64                 # per rank
    num_workers: int = 0                 # loader worker processes (0 = load in the training process)
    worker_timeout: float = 300.0        # seconds a loader worker may take for one batch before it is an error
    on_bad_record: str = "error"         # "error" | "skip"
    max_image_pixels: int = 40_000_000   # images larger than this (width x height, read from the header) are bad
    caption_key: str = "caption"         # the record field used as the training text
    num_subcaptions: int = 0             # LoTLIP: sub-captions sampled from the long caption
    subcaption_sentences: list = field(default_factory=lambda: [1, 3])  # LoTLIP: [min, max] sentences each
    langs: list = field(default_factory=lambda: ["en"])  # caption languages mixed in training
    num_frames: int = 8                  # video records: frames per clip
    frame_strategy: str = "uniform"      # video records: "uniform" | "keyframes" | "scene"
    frame_jitter: bool = False           # video records, uniform: a random point of each segment (seeded per
                                         # sample and epoch) instead of its centre
    max_frame_side: int = 0              # video records: shrink frames on decode to this longer side (0 = off)

    def validate(self, where: str = "data") -> None:
        """Check every value before anything is read; errors name `where.<key>`."""
        if self.batch_size < 1:
            raise ValueError(f"{where}.batch_size: {self.batch_size} must be >= 1 (samples per rank)")
        if self.num_workers < 0:
            raise ValueError(f"{where}.num_workers: {self.num_workers} must be >= 0")
        if not self.worker_timeout > 0:
            raise ValueError(f"{where}.worker_timeout: {self.worker_timeout} must be > 0 seconds")
        if self.on_bad_record not in BAD_RECORD_POLICIES:
            raise ValueError(f"{where}.on_bad_record: {self.on_bad_record!r} is not one of "
                             f"{', '.join(BAD_RECORD_POLICIES)}")
        if self.max_image_pixels < 1:
            raise ValueError(f"{where}.max_image_pixels: {self.max_image_pixels} must be >= 1")
        if self.num_subcaptions < 0:
            raise ValueError(f"{where}.num_subcaptions: {self.num_subcaptions} must be >= 0")
        lo_hi = list(self.subcaption_sentences)
        if len(lo_hi) != 2 or not all(isinstance(v, int) for v in lo_hi) or not 1 <= lo_hi[0] <= lo_hi[1]:
            raise ValueError(f"{where}.subcaption_sentences: {self.subcaption_sentences!r} must be [min, max] "
                             f"with 1 <= min <= max")
        if not self.langs or not all(isinstance(v, str) and v for v in self.langs):
            raise ValueError(f"{where}.langs: {self.langs!r} must be a non-empty list of language codes (en, zh)")
        if self.num_frames < 1:
            raise ValueError(f"{where}.num_frames: {self.num_frames} must be >= 1")
        if self.max_frame_side < 0:
            raise ValueError(f"{where}.max_frame_side: {self.max_frame_side} must be >= 0 (0 = off)")
        if self.frame_strategy not in ("uniform", "keyframes", "scene"):
            raise ValueError(f"{where}.frame_strategy: {self.frame_strategy!r} is not one of uniform, keyframes, "
                             f"scene")
        if self.shards and list(self.langs) != ["en"]:
            raise ValueError(f"data.langs={list(self.langs)} needs data.train (a manifest): streams from "
                             f"data.shards read only the `{self.caption_key}` captions")

    def caption_keys(self) -> list[str]:
        """The caption field of each training language: `caption`, `caption_zh`, ..."""
        return [self.caption_key] + [f"{self.caption_key}_{lang}" for lang in self.langs if lang != "en"]


def builder_from_config(cfg: DataConfig, transform: Callable | None, tokenizer=None, seed: int = 0,
                        caption_key: str | None = None, media: str = "image", **extra) -> SampleBuilder:
    """The `SampleBuilder` a data section describes.

    Args:
        cfg: the data section.
        transform: the model's image transform (None for text-only records).
        tokenizer: the model's tokenizer (samples are tokenized in the workers).
        seed: the run's seed (caption choice, sub-captions).
        caption_key: override `cfg.caption_key` (one builder per training language).
        media: "image" | "video" | "none".
        **extra: further `SampleBuilder` arguments a method needs (e.g. `num_classes`).
    Returns:
        The builder.
    """
    return SampleBuilder(transform, tokenizer, caption_key=caption_key or cfg.caption_key,
                         long_caption_key="long_caption" if cfg.num_subcaptions else None,
                         num_subcaptions=cfg.num_subcaptions, subcaption_sentences=tuple(cfg.subcaption_sentences),
                         seed=seed, context_length=getattr(tokenizer, "context_length", None), media=media, **extra)
