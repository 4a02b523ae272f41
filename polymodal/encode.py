"""Encoding with a model: texts, image files and video clips -> features, batch by batch.

The floor between the models (and data readers) and everything that uses a model on data: evaluation,
search, data filtering, methods and benchmarks all encode through these functions, so batching, devices,
progress and unreadable files are handled once.
"""
from __future__ import annotations

import torch
from torch import Tensor


def progress_bar(iterable, total: int, desc: str, enabled: bool):
    """`iterable`, with a tqdm bar when `enabled`."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


def device_of(model) -> torch.device:
    """The device of the model's first parameter."""
    return next(model.parameters()).device


# ---- manifests -----------------------------------------------------------------------------------------------
def read_records(manifest, limit: int = 0, on_bad_record: str = "error", required=None, media: str = "image"
                 ) -> list[dict]:
    """The first `limit` records (0 = all) of a manifest, read with the bad-record policy.

    Raises:
        ManifestError: no record to use.
    """
    from .data.manifests import ManifestError, read_manifest
    if limit < 0:
        raise ValueError(f"limit must be >= 0 (0 = all records), got {limit}")
    records = read_manifest(manifest, on_bad_record=on_bad_record, required=required, media=media).records
    records = records[:limit] if limit else records
    if not records:
        raise ManifestError(f"{manifest}: no records to evaluate")
    return records


def captions_by_record(records: list[dict], caption_key: str, manifest) -> tuple[list[str], list[int]]:
    """Every caption of `caption_key` (or its plural list: `captions`, `captions_zh`) and the record it belongs to.

    Raises:
        KeyError: a record without the key, naming the manifest and line.
    """
    plural = caption_key.replace("caption", "captions", 1) if caption_key.startswith("caption") else None
    texts, owner = [], []
    for i, r in enumerate(records):
        caps = r.get(plural) or r.get(caption_key)
        if caps is None:
            raise KeyError(f"{manifest}: record on line {r.get('_line', i + 1)} has no {caption_key!r}")
        for c in ([caps] if isinstance(caps, str) else caps):
            texts.append(c)
            owner.append(i)
    return texts, owner


def group_by_media(records: list[dict], key: str, manifest) -> tuple[list[dict], list[int]]:
    """Records that name the same image / video merged into one item (retrieval scores items, not rows).

    A one-row-per-caption file (a CSV of `image,caption` rows, a flattened COCO) would otherwise count every row
    as its own image. The merged record keeps the first row's fields and every row's captions (`captions`, and
    `captions_<lang>` / `text_ids` when present), in order; a warning says how many rows became how many items.

    Returns:
        (the merged records, the index of each merged record's first row in `records`).
    """
    first: dict[str, int] = {}
    merged: list[dict] = []
    rows: list[int] = []
    for i, r in enumerate(records):
        path = r.get(key)
        if path not in first:
            first[path] = len(merged)
            merged.append({**r})
            rows.append(i)
            continue
        m = merged[first[path]]
        for field in [k for k in r if k == "caption" or k.startswith(("caption_", "captions", "text_ids"))]:
            plural = field.replace("caption", "captions", 1) if field.startswith("caption") and \
                not field.startswith("captions") else field
            have = m.get(plural) if plural in m else ([m[field]] if isinstance(m.get(field), str) else [])
            add = r[field] if isinstance(r[field], list) else [r[field]]
            m[plural] = list(have) + list(add)
            if plural != field:
                m.pop(field, None)
    if len(merged) < len(records):
        import warnings
        warnings.warn(f"{manifest}: {len(records)} records name {len(merged)} distinct {key}s; their captions were "
                      f"grouped per {key} (retrieval scores each {key} once)")
    return merged, rows


def text_queries(records: list[dict], caption_key: str, manifest) -> tuple[list[str], list]:
    """The retrieval queries of records: every caption, and the item(s) it is correct for.

    Records whose captions carry parallel `text_ids` (layouts where one text describes several images, e.g.
    MUGE / Chinese-CLIP) give one query per text id whose correct items are every record listing it; otherwise
    each caption is its own query with its record as the one correct item (`captions_by_record`).

    Returns:
        (texts, owner): owner[j] is the record index of text j, or the list of them when any text has several.
    """
    if not any("text_ids" in r for r in records):
        return captions_by_record(records, caption_key, manifest)
    plural = caption_key.replace("caption", "captions", 1) if caption_key.startswith("caption") else caption_key
    index: dict = {}
    texts: list[str] = []
    owner: list[list[int]] = []
    for i, r in enumerate(records):
        caps = r.get(plural) or r.get(caption_key)
        caps = [caps] if isinstance(caps, str) else list(caps or [])
        ids = r.get("text_ids") or [None] * len(caps)
        if len(ids) != len(caps):
            raise KeyError(f"{manifest}: record on line {r.get('_line', i + 1)} has {len(ids)} text_ids for "
                           f"{len(caps)} captions under {plural!r}")
        for text, tid in zip(caps, ids):
            key = ("id", tid) if tid is not None else ("row", i, len(texts))
            if key not in index:
                index[key] = len(texts)
                texts.append(text)
                owner.append([])
            if i not in owner[index[key]]:
                owner[index[key]].append(i)
    if not texts:
        raise KeyError(f"{manifest}: no record has {caption_key!r}")
    return texts, owner


def count_truncated(tokenizer, texts: list[str]) -> int:
    """How many texts are longer than the tokenizer's context (their end is cut); 0 for tokenizers that cannot say."""
    content = getattr(tokenizer, "_content", None)
    if content is None or not texts:
        return 0
    budget = tokenizer.context_length - 2                                    # start and end tokens
    return sum(len(ids) > budget for ids in content(list(texts)))


# ---- texts and images ----------------------------------------------------------------------------------------
@torch.no_grad()
def encode_texts(model, texts: list[str], batch_size: int = 256, progress: bool = False) -> Tensor:
    """L2-normalised text embeddings (N, E) on the CPU, using only the CLS/EOT feature (chunks kept on disk
    inside `feature_cache.caching`)."""
    from .data.text import trim_padding
    from .feature_cache import chunked
    device, pad = device_of(model), model.config.text.pad_token_id

    def chunk(first: int, stop: int) -> dict:
        out = []
        starts = range(first, stop, batch_size)
        for s in progress_bar(starts, len(starts), "texts", progress):
            ids = trim_padding(model.tokenizer(texts[s:min(s + batch_size, stop)]), pad)
            out.append(model.encode_text(ids.to(device)).float().cpu())
        return {"emb": torch.cat(out) if out else torch.zeros(0, 0)}
    parts = [c["emb"] for c in chunked("texts", len(texts), lambda: list(texts), {"fn": "encode_texts"}, chunk)
             if c["emb"].numel()]
    return torch.cat(parts) if parts else torch.zeros(0, 0)


@torch.no_grad()
def encode_image_files(model, paths: list[str], batch_size: int = 128, progress: bool = False,
                       skip_unreadable: bool = False) -> tuple[Tensor, list[int]]:
    """(embeddings (M, E) on the CPU, indices of the M paths encoded): each file is decoded once.

    Args:
        skip_unreadable: leave out a file that cannot be decoded instead of raising (its `ImageError` names it).
    """
    from .data.images import load_image
    from .feature_cache import chunked
    device = device_of(model)

    def chunk(first: int, stop: int) -> dict:
        out, kept = [], []
        starts = range(first, stop, batch_size)
        for s in progress_bar(starts, len(starts), "images", progress):
            pixels = []
            for i in range(s, min(s + batch_size, stop)):
                try:
                    image = load_image(paths[i])
                except Exception:   # decoders raise many types
                    if not skip_unreadable:
                        raise
                    continue
                pixels.append(model.image_transform(image))
                kept.append(i)
            if pixels:
                out.append(model.encode_image(torch.stack(pixels).to(device)).float().cpu())
        return {"emb": torch.cat(out) if out else torch.zeros(0, 0), "kept": kept}
    parts = chunked("images", len(paths), lambda: [str(p) for p in paths],
                    {"fn": "encode_image_files", "skip": skip_unreadable}, chunk)
    embs = [c["emb"] for c in parts if c["emb"].numel()]
    return (torch.cat(embs) if embs else torch.zeros(0, 0)), [i for c in parts for i in c["kept"]]


def encode_images(model, paths: list[str], batch_size: int = 128, progress: bool = False) -> Tensor:
    """L2-normalised image embeddings (N, E) of image files (an `ImageError` names a bad file)."""
    return encode_image_files(model, paths, batch_size, progress)[0]


# ---- videos --------------------------------------------------------------------------------------------------
def encode_clips(model, frames: Tensor, valid: Tensor | None = None) -> Tensor:
    """(B, T, 3, H, W) frames -> (B, E) L2-normalised video embeddings.

    A model with `encode_video` uses it; any other image-text model gets the zero-shot baseline: the mean of
    its normalised frame embeddings over the valid frames, normalised again.
    """
    if hasattr(model, "encode_video"):
        return model.encode_video(frames, valid)
    B, T = frames.shape[:2]
    per_frame = model.encode_image(frames.flatten(0, 1)).view(B, T, -1)          # (B, T, E)
    w = torch.ones(B, T, device=frames.device) if valid is None else valid.to(per_frame.dtype)
    mean = (per_frame * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1)  # (B, E)
    return torch.nn.functional.normalize(mean, dim=-1)


class _DecodeClips(torch.utils.data.Dataset):
    """Record i -> (i, frames (T, 3, H, W), the clip without its raw frames) or (i, None, the error message):
    decoding and the image transform, picklable for DataLoader workers."""

    def __init__(self, records: list[dict], transform, num_frames: int, strategy: str):
        self.records, self.transform, self.num_frames, self.strategy = records, transform, num_frames, strategy

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        from .data.video import VideoError, read_video
        try:
            clip = read_video(self.records[i]["video"], num_frames=self.num_frames, strategy=self.strategy)
        except VideoError as e:
            return i, None, str(e)
        frames = clip.pixels(self.transform)                                          # (T, 3, H, W)
        clip.frames = clip.frames[:0]                                                 # times and validity travel
        return i, frames, clip


def _stack_decoded(items):
    """A worker's batch of `_DecodeClips` items as one message: the readable videos' frames stacked into one
    tensor (one shared-memory transfer instead of one per video), the rest as they are."""
    frames = [f for _, f, _ in items if f is not None]
    if frames and all(f.shape == frames[0].shape for f in frames):
        return [(i, f is not None, c) for i, f, c in items], torch.stack(frames)
    return items, None


def _unstack_decoded(batch):
    """The items of a `_stack_decoded` batch, frames as views of the stacked tensor."""
    items, stacked = batch
    if stacked is None:
        yield from items
        return
    k = 0
    for i, ok, clip in items:
        if ok:
            yield i, stacked[k], clip
            k += 1
        else:
            yield i, None, clip


class ClipBatches:
    """Decode the records' videos and yield them in batches ready for the model.

    With `workers` > 0 the videos are decoded and transformed in that many worker processes (a DataLoader, order
    kept), so decoding overlaps the model's encoding; 0 decodes in this process.

    Under `on_bad_record="skip"` a video that cannot be read is left out and counted (`skipped`, with the
    first reasons in `skip_examples`); under "error" it stops with a `ManifestError` naming the manifest line
    and the video's error.

    Yields:
        (indices into `records`, frames (B, T, 3, H, W) and valid (B, T) on the model's device, the `VideoClip`s,
        whose raw frames are dropped: their times and validity stay).
    Raises:
        ManifestError: a bad video under "error", or no readable video at all.
    """

    def __init__(self, model, records: list[dict], num_frames: int = 8, strategy: str = "uniform",
                 batch_size: int = 16, progress: bool = False, on_bad_record: str = "error", where: str = "manifest",
                 workers: int = 0):
        self.model, self.records, self.where = model, records, where
        self.num_frames, self.strategy, self.batch_size = num_frames, strategy, batch_size
        self.progress, self.on_bad_record, self.workers = progress, on_bad_record, workers
        self.skipped = 0
        self.skip_examples: list[str] = []

    def _decoded(self):
        """(i, frames, clip) or (i, None, error message) per record, in record order."""
        data = _DecodeClips(self.records, self.model.image_transform, self.num_frames, self.strategy)
        if self.workers <= 0:
            return (data[i] for i in range(len(data)))
        # Workers send a batch of videos at a time: per-video messages cost as much as the decoding they hide.
        loader = torch.utils.data.DataLoader(data, batch_size=self.batch_size, num_workers=self.workers,
                                             collate_fn=_stack_decoded, prefetch_factor=2)
        return (item for batch in loader for item in _unstack_decoded(batch))

    def __iter__(self):
        from .data.manifests import SKIP_HINT, ManifestError
        device = device_of(self.model)
        pending: list[tuple[int, Tensor, object]] = []
        yielded = 0

        def batch():
            frames = torch.stack([f for _, f, _ in pending]).to(device)                  # (B, T, 3, H, W)
            valid = torch.stack([c.valid for _, _, c in pending]).to(device)             # (B, T)
            return [i for i, _, _ in pending], frames, valid, [c for _, _, c in pending]

        records = self.records
        for i, frames, clip in progress_bar(self._decoded(), len(records), "videos", self.progress):
            if frames is None:
                r = records[i]
                if self.on_bad_record == "error":
                    raise ManifestError(f"{self.where} line {r.get('_line', '?')}: {clip}; {SKIP_HINT}")
                self.skipped += 1
                if len(self.skip_examples) < 3:
                    self.skip_examples.append(f"line {r.get('_line', '?')}: {clip}")
                continue
            pending.append((i, frames, clip))
            if len(pending) == self.batch_size:
                yield batch()
                yielded += len(pending)
                pending.clear()
        if pending:
            yield batch()
            yielded += len(pending)
        if not yielded:
            raise ManifestError(f"{self.where}: no readable video to evaluate")


def clip_batches(model, records: list[dict], num_frames: int = 8, strategy: str = "uniform", batch_size: int = 16,
                 progress: bool = False, on_bad_record: str = "error", where: str = "manifest",
                 workers: int = 0) -> ClipBatches:
    """The batches of `ClipBatches` (iterate it; its `skipped` count is set once the iteration ends)."""
    return ClipBatches(model, records, num_frames, strategy, batch_size, progress, on_bad_record, where, workers)


@torch.no_grad()
def encode_videos(model, records: list[dict], num_frames: int = 8, strategy: str = "uniform", batch_size: int = 16,
                  progress: bool = False, on_bad_record: str = "error", where: str = "manifest"
                  ) -> tuple[Tensor, list[dict]]:
    """(N, E) embeddings (CPU) of the records' readable videos and the N records kept (see `ClipBatches`)."""
    out, kept = [], []
    for idx, frames, valid, _ in clip_batches(model, records, num_frames, strategy, batch_size, progress,
                                              on_bad_record, where):
        out.append(encode_clips(model, frames, valid).float().cpu())
        kept.extend(records[i] for i in idx)
    return torch.cat(out), kept


__all__ = ["progress_bar", "device_of", "read_records", "captions_by_record", "group_by_media", "text_queries", "count_truncated", "encode_texts", "encode_image_files",
           "encode_images", "encode_clips", "ClipBatches", "clip_batches", "encode_videos"]
