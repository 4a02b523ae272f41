"""Map-style manifest dataset, the sample builder, the collate function, a resumable distributed sampler
and a loader.

Sample dicts (``ManifestDataset[i]``, also yielded by ``ShardDataset``): the media entries
(``pixels`` (3, S, S) float tensor for an image record, ``frames`` (T, 3, S, S) and ``frame_valid`` (T,)
for a video record, nothing for a text-only record), ``caption`` str, optional ``long_captions`` list[str] (M
sub-captions of the long caption), ``label`` int, ``labels`` list, ``multi_hot`` (C,) float
(when ``num_classes`` is given), ``lang`` str, ``index`` int (record index in the manifest),
and ``input_ids`` (L,) / ``long_input_ids`` (M, L) when the dataset itself tokenizes.

Bad images: under ``on_bad_record="error"`` a decode failure raises :class:`ManifestError`
naming the manifest file, line and image path. Under ``"skip"`` the dataset returns a marker
``{"_bad": reason, "index": i}`` and counts it in ``dataset.bad_counts``. That counter only sees
the samples loaded in *this* process: with DataLoader workers each worker has its own copy, so
the authoritative count is the one the collate puts in every batch (``num_bad``,
``bad_reasons``), which the trainer should sum. A batch can therefore be smaller than the
batch size, or even empty (``batch["index"].numel() == 0``).

Determinism: the caption picked among several, and the sub-captions, depend only on
(seed, epoch, index), never on worker ids or the order of loading, so resuming reproduces them.
"""
from __future__ import annotations

import os
import re
from collections import Counter
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from polymodal.data.manifests import (
    BAD_RECORD_POLICIES,
    MAX_EXAMPLES_PER_REASON,
    MEDIA_KINDS,
    SKIP_HINT,
    Manifest,
    ManifestError,
    captions_of_record,
    read_manifest,
)
from polymodal.data.video import read_video

__all__ = [
    "split_sentences",
    "sentence_spans",
    "sample_subcaptions",
    "SampleBuilder",
    "SampleError",
    "BadRecords",
    "BuiltSamples",
    "ManifestDataset",
    "ImageTextCollate",
    "ShardedSampler",
    "build_loader",
    "set_loader_epoch",
]

UNREADABLE_IMAGE = "unreadable_image"
UNREADABLE_VIDEO = "unreadable_video"
BAD_LABEL = "bad_label"

# A sentence ends at ".", "!" or "?" (possibly repeated, possibly followed by closing quotes or
# brackets) when whitespace or the end of the text follows; at "。", "！", "？" always (Chinese
# puts no space after them); and at a newline. Abbreviations such as "e.g. " also end a
# sentence: a simple splitter is predictable, and sub-captions only need rough sentences.
_SENTENCE_END = re.compile(r"[.!?]+[\"'”’)\]]*(?=\s|$)|[。！？]+[”’」』）)]*|\n")


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) character spans of the sentences of `text`, without surrounding whitespace."""
    spans: list[tuple[int, int]] = []

    def add(start: int, end: int) -> None:
        piece = text[start:end]
        if piece.strip():
            lead = len(piece) - len(piece.lstrip())
            spans.append((start + lead, start + len(piece.rstrip())))

    start = 0
    for m in _SENTENCE_END.finditer(text):
        add(start, m.start() if m.group() == "\n" else m.end())
        start = m.end()
    add(start, len(text))
    return spans


def split_sentences(text: str) -> list[str]:
    """Split `text` into sentences (see ``_SENTENCE_END`` for the rule)."""
    return [text[a:b] for a, b in sentence_spans(text)]


def _rng(seed: int, epoch: int, index: int, stream: int) -> np.random.Generator:
    """A generator that depends only on (seed, epoch, index, stream)."""
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch, index, stream])


def sample_subcaptions(
    text: str, num: int, sentences: tuple[int, int], rng: np.random.Generator
) -> list[str]:
    """Sample `num` sub-captions, each a run of consecutive sentences of `text`.

    Args:
        text: the long caption.
        num: how many sub-captions (M).
        sentences: (min, max) sentences per sub-caption, inclusive; clipped to the number of
            sentences the text has.
        rng: the random generator (seed it from (seed, epoch, index) for determinism).

    Returns:
        `num` strings, each the original text from the first to the last chosen sentence
        (separators kept); [] when the text has no sentence.
    """
    spans = sentence_spans(text)
    n = len(spans)
    if n == 0:
        return []
    lo, hi = sentences
    if not 1 <= lo <= hi:
        raise ValueError(f"subcaption_sentences must satisfy 1 <= min <= max, got {sentences}")
    lo, hi = min(lo, n), min(hi, n)
    out = []
    for _ in range(num):
        k = int(rng.integers(lo, hi + 1))              # sentences in this sub-caption
        first = int(rng.integers(0, n - k + 1))        # uniform start: every sentence gets covered
        out.append(text[spans[first][0]:spans[first + k - 1][1]])
    return out


class SampleError(Exception):
    """A record that cannot become a sample (no caption, a bad label); the datasets apply `on_bad_record` to it.

    Attributes:
        reason: short tag the skip counts use (``"missing_key"``, ``"bad_label"`` ...).
        detail: what is wrong, for the message (the dataset adds where).
    """

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


class SampleBuilder:
    """Turns (record, decoded media) into a sample dict; one builder serves the map and the shard datasets.

    Records carry an ``image``, a ``video`` or only text (`media` says which); the builder turns the decoded
    media into tensors (``pixels`` (3, S, S) for an image; ``frames`` (T, 3, S, S) and ``frame_valid`` (T,)
    for a video clip) and picks the caption(s). Build one from a recipe's data section with
    :func:`builder_from_config`.

    Args:
        transform: callable PIL image -> (3, S, S) tensor (e.g. ``images.ImageTransform``); applied to
            every frame of a video. Unused for text-only records.
        tokenizer: optional; when given, samples also carry ``input_ids`` (and ``long_input_ids``),
            tokenized in the worker. Otherwise the collate tokenizes.
        caption_key: record field to read captions from; ``"caption"`` also uses ``captions`` (one is
            picked per (seed, epoch, index)).
        long_caption_key: field of the long caption (default ``"long_caption"``).
        num_subcaptions: M sub-captions sampled from the long caption per sample; 0 = none.
        subcaption_sentences: (min, max) consecutive sentences per sub-caption.
        seed: seed for caption choice and sub-caption sampling.
        num_classes: when given, samples carry a ``multi_hot`` (C,) target from ``labels``.
        class_names: names for string labels (sets ``num_classes``).
        multi_hot: build the ``multi_hot`` target when the classes are known (False: single-label data, whose
            ``label`` alone is mapped through ``class_names``).
        context_length: passed to the tokenizer.
        media: "image" | "video" | "none" (text only).
        extra_keys: record fields copied into the sample as they are (e.g. ``label``, ``lang``).
    """

    def __init__(
        self,
        transform: Callable | None = None,
        tokenizer: Callable | None = None,
        caption_key: str = "caption",
        long_caption_key: str | None = None,
        num_subcaptions: int = 0,
        subcaption_sentences: tuple[int, int] = (1, 3),
        seed: int = 0,
        num_classes: int | None = None,
        class_names: Sequence[str] | None = None,
        context_length: int | None = None,
        media: str = "image",
        extra_keys: Sequence[str] = ("label", "labels", "lang"),
        multi_hot: bool = True,
    ):
        if class_names is not None:
            if num_classes is not None and num_classes != len(class_names):
                raise ValueError(f"num_classes={num_classes} but {len(class_names)} class_names")
            num_classes = len(class_names)
        lo, hi = subcaption_sentences
        if not 1 <= lo <= hi:
            raise ValueError(f"subcaption_sentences must satisfy 1 <= min <= max, got {subcaption_sentences}")
        if media not in MEDIA_KINDS:
            raise ValueError(f"media must be one of {MEDIA_KINDS}, got {media!r}")
        if media != "none" and transform is None:
            raise ValueError(f"media={media!r} needs an image transform")
        self.transform = transform
        self.tokenizer = tokenizer
        self.caption_key = caption_key
        self.long_caption_key = long_caption_key or "long_caption"
        self.num_subcaptions = num_subcaptions
        self.subcaption_sentences = (lo, hi)
        self.seed = seed
        self.num_classes = num_classes if multi_hot else None
        self.class_index = {name: i for i, name in enumerate(class_names)} if class_names is not None else None
        self.context_length = context_length
        self.media = media
        self.extra_keys = tuple(extra_keys)

    def media_tensors(self, media: Any) -> dict:
        """The sample's media entries: ``pixels`` for an image, ``frames`` + ``frame_valid`` for a clip."""
        if self.media == "image":
            return {"pixels": self.transform(media)}
        if self.media == "video":
            return {"frames": media.pixels(self.transform), "frame_valid": media.valid.clone()}   # (T, 3, S, S)
        return {}

    def build(self, record: dict, index: int, epoch: int, media: Any = None) -> dict:
        """Build the sample dict. Raises SampleError for a record that cannot be used."""
        sample: dict[str, Any] = {**self.media_tensors(media), "index": index}
        captions = captions_of_record(record, self.caption_key)
        if not captions:
            raise SampleError("missing_key", f"no '{self.caption_key}' field")
        pick = 0 if len(captions) == 1 else int(_rng(self.seed, epoch, index, 0).integers(len(captions)))
        sample["caption"] = captions[pick]
        if self.num_subcaptions > 0:
            long_caption = record.get(self.long_caption_key) or ""
            subs = sample_subcaptions(long_caption, self.num_subcaptions, self.subcaption_sentences,
                                      _rng(self.seed, epoch, index, 1))
            # A record without a long caption falls back to its short caption so that every
            # sample has M texts and the batch stays a (B, M, L) tensor.
            sample["long_captions"] = subs or [sample["caption"]] * self.num_subcaptions
        for key in self.extra_keys:
            if key in record:
                sample[key] = record[key]
        if "label" in sample:            # the batch holds class indices: a name or a CSV cell becomes one, or is bad
            from .labels import LabelError, label_index
            try:
                sample["label"] = label_index(sample["label"], self.class_index)
            except LabelError as e:
                raise SampleError(BAD_LABEL, str(e)) from None
        if self.num_classes is not None:
            sample["multi_hot"] = self._multi_hot(record)
        if self.tokenizer is not None:
            sample["input_ids"] = self.tokenizer([sample["caption"]], context_length=self.context_length)[0]
            if "long_captions" in sample:
                sample["long_input_ids"] = self.tokenizer(sample["long_captions"], context_length=self.context_length)
        return sample

    def _multi_hot(self, record: dict) -> torch.Tensor:
        """(C,) multi-hot target from ``labels`` (or ``label``); no label gives all zeros."""
        target = torch.zeros(self.num_classes)
        labels = record["labels"] if "labels" in record else ([record["label"]] if "label" in record else [])
        for label in labels:
            if isinstance(label, str):
                if self.class_index is None or label not in self.class_index:
                    raise SampleError(BAD_LABEL, f"label {label!r} is not one of the class_names")
                label = self.class_index[label]
            if not 0 <= label < self.num_classes:
                raise SampleError(BAD_LABEL, f"label {label} outside [0, {self.num_classes})")
            target[label] = 1.0
        return target


class BadRecords:
    """The `on_bad_record` policy of a dataset: raise a `ManifestError`, or count by reason and go on.

    The counts only see the samples of *this* process (each DataLoader worker has its own copy); the
    authoritative count is the one the collate puts in every batch (``bad_reasons``).
    """

    def __init__(self, policy: str = "error"):
        if policy not in BAD_RECORD_POLICIES:
            raise ValueError(f"on_bad_record must be one of {BAD_RECORD_POLICIES}, got {policy!r}")
        self.policy = policy
        self.counts: Counter = Counter()
        self.examples: list[str] = []

    def __call__(self, index: int, reason: str, message: str, cause: BaseException | None) -> dict:
        """Raise (policy "error") or count the bad record and return its marker ``{"_bad": reason, "index": i}``."""
        if self.policy == "error":
            raise ManifestError(f"{message}; {SKIP_HINT}") from cause
        self.counts[reason] += 1
        if len(self.examples) < MAX_EXAMPLES_PER_REASON:
            self.examples.append(message)
        return {"_bad": reason, "index": index}


class BuiltSamples:
    """What the manifest and shard datasets share: a `builder`, a `bad` policy and the current `epoch`."""

    builder: SampleBuilder
    bad: BadRecords
    epoch: int = 0

    @property
    def bad_counts(self) -> Counter:
        return self.bad.counts

    @property
    def bad_examples(self) -> list[str]:
        return self.bad.examples

    @property
    def tokenizer(self) -> Callable | None:
        return self.builder.tokenizer

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch that caption choice, sub-captions (and a stream's order) depend on."""
        self.epoch = epoch


class ManifestDataset(BuiltSamples, Dataset):
    """Map-style dataset over a manifest; media are decoded lazily in ``__getitem__``.

    Args:
        manifest: a :class:`Manifest` or a manifest path (read with `on_bad_record`).
        builder: the :class:`SampleBuilder` that turns a record and its decoded media into a sample; its
            ``media`` says which field is read (``image``, ``video``, or none for text-only records).
        on_bad_record: ``"error"`` or ``"skip"`` (see the module docstring).
        image_loader: callable path -> PIL RGB image; default ``polymodal.data.images.load_image``.
        video_loader: callable `(path, index=, epoch=) -> VideoClip` (index and epoch seed frame jitter); default
            ``polymodal.data.video.read_video`` with 8 uniform frames.
    """

    def __init__(
        self,
        manifest: Manifest | str | os.PathLike,
        builder: SampleBuilder,
        on_bad_record: str = "error",
        image_loader: Callable[[str], Any] | None = None,
        video_loader: Callable[[str], Any] | None = None,
    ):
        self.bad = BadRecords(on_bad_record)
        if not isinstance(manifest, Manifest):
            manifest = read_manifest(manifest, on_bad_record=on_bad_record, media=builder.media)
        self.manifest = manifest
        self.on_bad_record = on_bad_record
        self.builder = builder
        self.image_loader = image_loader
        self.video_loader = video_loader
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.manifest)

    def _load(self, record: dict, index: int) -> Any:
        """The record's decoded media (None for text-only records)."""
        kind = self.builder.media
        if kind == "image":
            if self.image_loader is None:
                from polymodal.data.images import load_image  # lazy: keeps this module light to import
                self.image_loader = load_image
            return self.image_loader(record["image"])
        if kind == "video":
            if self.video_loader is None:
                return read_video(record["video"])
            return self.video_loader(record["video"], index=index, epoch=self.epoch)
        return None

    def __getitem__(self, i: int) -> dict:
        record = self.manifest.records[i]
        where = f"{self.manifest.path} line {record.get('_line', '?')}"
        try:
            media = self._load(record, i)
        except Exception as e:  # decoders raise many types (OSError, SyntaxError, ValueError ...)
            kind = self.builder.media
            reason = getattr(e, "reason", None) if kind == "video" else None
            return self.bad(i, reason or (UNREADABLE_IMAGE if kind == "image" else UNREADABLE_VIDEO),
                            f"{where}: {kind} '{record.get(kind)}' cannot be read ({type(e).__name__}: {e})", e)
        try:
            return self.builder.build(record, i, self.epoch, media)
        except SampleError as e:
            return self.bad(i, e.reason, f"{where}: {e.detail}", e)


def _pad_stack(tensors: list[torch.Tensor], pad_id: int) -> torch.Tensor:
    """Stack token tensors whose last dimension may differ, right-padding with `pad_id`."""
    length = max(t.shape[-1] for t in tensors)
    if all(t.shape[-1] == length for t in tensors):
        return torch.stack(tensors)
    return torch.stack([torch.nn.functional.pad(t, (0, length - t.shape[-1]), value=pad_id) for t in tensors])


class ImageTextCollate:
    """Collate sample dicts into a batch dict.

    Args:
        tokenizer: tokenizes captions the samples did not tokenize themselves.
        context_length: passed to the tokenizer.

    Returns (from ``__call__``), a dict with ``pixels`` (B,3,S,S) for images, ``frames`` (B,T,3,S,S) and
    ``frame_valid`` (B,T) for video clips, ``input_ids`` (B,L),
    ``long_input_ids`` (B,M,L) when samples have sub-captions, ``labels`` (B,) when samples
    have ``label``, ``multi_labels`` (B,C) when they have ``multi_hot``, ``index`` (B,),
    ``captions`` list[str], ``lang`` list[str] when present, ``num_bad`` int, ``bad_indices`` (reason, record
    index) of the dropped samples, and ``bad_reasons`` Counter (samples dropped from this batch: ``_bad`` markers and Nones,
    the latter counted as ``"unknown"``). If every sample was bad only ``index`` (empty),
    ``num_bad`` and ``bad_reasons`` are set.
    """

    def __init__(self, tokenizer: Callable | None = None, context_length: int | None = None):
        self.tokenizer = tokenizer
        self.context_length = context_length

    def _tokenize(self, texts: list[str]) -> torch.Tensor:
        if self.tokenizer is None:
            raise ValueError("samples are not tokenized and ImageTextCollate has no tokenizer")
        return self.tokenizer(texts, context_length=self.context_length)

    def __call__(self, samples: list[dict | None]) -> dict:
        good, bad, which = [], Counter(), []
        for s in samples:
            if s is None:
                bad["unknown"] += 1
            elif "_bad" in s:
                bad[s["_bad"]] += 1
                which.append((s["_bad"], int(s.get("index", -1))))
            else:
                good.append(s)
        # `bad_indices` lets the trainer count a bad record once per run, not once per pass over the data.
        batch: dict[str, Any] = {"num_bad": sum(bad.values()), "bad_reasons": bad, "bad_indices": which}
        if not good:
            batch["index"] = torch.zeros(0, dtype=torch.long)
            return batch
        pad_id = getattr(self.tokenizer, "pad_id", 0) or 0
        for key in ("pixels", "frames", "frame_valid"):
            if _present(good, key):
                batch[key] = torch.stack([s[key] for s in good])                      # (B, 3, S, S) | (B, T, ...)
        batch["index"] = torch.tensor([s["index"] for s in good], dtype=torch.long)  # (B,)
        batch["captions"] = [s["caption"] for s in good]
        if all("input_ids" in s for s in good):
            batch["input_ids"] = _pad_stack([s["input_ids"] for s in good], pad_id)  # (B, L)
        else:
            batch["input_ids"] = self._tokenize(batch["captions"])
        if _present(good, "long_captions"):
            if all("long_input_ids" in s for s in good):
                batch["long_input_ids"] = _pad_stack([s["long_input_ids"] for s in good], pad_id)
            else:
                texts = [t for s in good for t in s["long_captions"]]
                m = len(good[0]["long_captions"])
                ids = self._tokenize(texts)                                          # (B*M, L)
                batch["long_input_ids"] = ids.view(len(good), m, ids.shape[-1])      # (B, M, L)
        if _present(good, "label"):
            batch["labels"] = torch.tensor([s["label"] for s in good], dtype=torch.long)
        if _present(good, "multi_hot"):
            batch["multi_labels"] = torch.stack([s["multi_hot"] for s in good])     # (B, C)
        if _present(good, "lang"):
            batch["lang"] = [s["lang"] for s in good]
        return batch


def _present(samples: list[dict], key: str) -> bool:
    """True if every sample has `key`, False if none has; a mix is a data error."""
    n = sum(key in s for s in samples)
    if 0 < n < len(samples):
        missing = [s["index"] for s in samples if key not in s][:5]
        raise ValueError(f"'{key}' is present in some samples of a batch but not in others "
                         f"(missing at record indices {missing}); give every record the field or none")
    return n == len(samples)


class ShardedSampler(Sampler[int]):
    """Deterministic distributed sampler that can resume mid-epoch exactly.

    Each epoch's order is a permutation drawn from (seed, epoch) (or 0..N-1 without shuffle),
    padded by wrapping to a multiple of `num_replicas` (or truncated with `drop_last`); rank r
    takes every `num_replicas`-th index starting at r, so all ranks get the same number of
    indices and, without padding, disjoint sets that together cover the data.

    Resume: save ``state_dict()`` with the checkpoint and the number of batches done in the
    epoch; on restart ``load_state_dict(state)`` then ``skip(batches_done)``; the next
    iteration yields exactly the remaining indices of that epoch. The skip applies to one
    iteration only; ``set_epoch`` to another epoch clears it.

    Args:
        data_source: a sized dataset, or its length.
        num_replicas: world size.
        rank: this process's rank.
        shuffle: permute each epoch.
        seed: permutation seed (the same on every rank).
        drop_last: truncate instead of padding to equal per-rank lengths.
        batch_size: the loader's batch size, used by :meth:`skip`.
    """

    def __init__(self, data_source: Any, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False, batch_size: int = 1):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside [0, {num_replicas})")
        self.n = data_source if isinstance(data_source, int) else len(data_source)
        self.num_replicas, self.rank = num_replicas, rank
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.batch_size = batch_size
        self.epoch = 0
        self.start = 0                               # samples of this epoch to skip (resume)
        if drop_last:
            self.num_samples = self.n // num_replicas
        else:
            self.num_samples = -(-self.n // num_replicas)   # ceil
        if self.num_samples == 0 and self.n > 0:
            raise ValueError(f"{self.n} samples cannot give every one of {num_replicas} ranks a sample with drop_last")

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (changes the permutation; clears a pending skip for another epoch)."""
        if epoch != self.epoch:
            self.start = 0
        self.epoch = epoch

    def epoch_indices(self) -> list[int]:
        """All indices this rank gets in the current epoch (ignoring any skip)."""
        if self.shuffle:
            order = np.random.default_rng([self.seed & 0xFFFFFFFF, self.epoch]).permutation(self.n).tolist()
        else:
            order = list(range(self.n))
        total = self.num_samples * self.num_replicas
        if total > len(order) and order:
            order = (order * (-(-total // len(order))))[:total]   # pad by wrapping around
        order = order[:total]
        return order[self.rank::self.num_replicas]

    def skip(self, n_batches: int) -> None:
        """Make the next iteration start after the first `n_batches` batches of this epoch."""
        self.start = min(n_batches * self.batch_size, self.num_samples)

    def __iter__(self) -> Iterator[int]:
        indices = self.epoch_indices()[self.start:]
        self.start = 0                               # the skip is used up by this iteration
        return iter(indices)

    def __len__(self) -> int:
        return self.num_samples - self.start

    def state_dict(self) -> dict:
        """Epoch, seed and layout; enough (with the batches done) to resume exactly."""
        return {"epoch": self.epoch, "seed": self.seed, "start": self.start, "n": self.n,
                "num_replicas": self.num_replicas, "shuffle": self.shuffle, "drop_last": self.drop_last}

    def load_state_dict(self, state: dict) -> None:
        """Restore epoch and pending skip; refuses a state from a different data or layout."""
        for key in ("n", "num_replicas", "shuffle", "drop_last"):
            if state[key] != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]!r} but this sampler has "
                                 f"{getattr(self, key)!r}; the data or world size changed, exact resume is impossible")
        self.seed, self.epoch, self.start = state["seed"], state["epoch"], state["start"]


def build_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = True,
    num_workers: int = 0,
    seed: int = 0,
    drop_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
    tokenizer: Callable | None = None,
    context_length: int | None = None,
    collate_fn: Callable | None = None,
    pin_memory: bool = False,
    timeout: float = 0,
) -> DataLoader:
    """A DataLoader with a :class:`ShardedSampler` (map-style) and :class:`ImageTextCollate`.

    Workers are not persistent, so ``set_loader_epoch`` (or ``dataset.set_epoch``) before each
    epoch reaches them. An IterableDataset (e.g. ``ShardDataset``) splits itself across ranks
    and workers, so it gets no sampler; its rank/world_size come from its own constructor.

    Args:
        dataset: ``ManifestDataset``, ``ShardDataset`` or any dataset of sample dicts.
        batch_size: samples per batch (per rank).
        shuffle: shuffle each epoch (map-style only; a ShardDataset has its own shuffle).
        num_workers: DataLoader worker processes.
        seed: sampler seed.
        drop_last: drop the last incomplete batch and truncate instead of padding across ranks.
        rank, world_size: this process's place in the distributed job.
        tokenizer, context_length: for the default collate.
        collate_fn: replaces the default collate.
        pin_memory: passed to the DataLoader.
        timeout: seconds to wait for a worker's batch before failing (0 = forever; workers only), so a
            stuck worker is an error, not a hang.

    Returns:
        the DataLoader; its ``sampler`` is the ShardedSampler for map-style datasets.
    """
    collate = collate_fn or ImageTextCollate(tokenizer, context_length)
    if isinstance(dataset, IterableDataset):
        for name, value in (("rank", rank), ("world_size", world_size)):
            if getattr(dataset, name, value) != value:
                raise ValueError(f"dataset was built with {name}={getattr(dataset, name)} but build_loader got {value}")
        return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate,
                          drop_last=drop_last, pin_memory=pin_memory, timeout=timeout if num_workers else 0)
    sampler = ShardedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed,
                             drop_last=drop_last, batch_size=batch_size)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      collate_fn=collate, drop_last=drop_last, pin_memory=pin_memory,
                      timeout=timeout if num_workers else 0)


def set_loader_epoch(loader: DataLoader, epoch: int) -> None:
    """Call ``set_epoch`` on the loader's sampler and dataset (whichever have it)."""
    for obj in (loader.sampler, loader.dataset):
        if hasattr(obj, "set_epoch"):
            obj.set_epoch(epoch)
