"""Video-text retrieval: text->video and video->text R@1/5/10, median and mean rank, on a manifest of videos.

The one retrieval loop of every video model. The model supplies what is compared, as LAVIS lets a model
supply its similarity matrix:

* `video_features(frames, valid, records)` and `text_features(texts)`: feature batches (plain (N, E)
  embeddings, or a `polymodal.models.features.Rows` of token/frame features);
* `similarity(text_features, video_features, pairs=False)`: the (N_t, N_v) scores (or, with `pairs`, the
  (N,) scores of text i with video i).

`VideoCLIP` gives the pooled cosine; M2-RAAP's Mug/ACG, SHE-Net's hierarchy and SNP-S3 override the three.
An image-text model without them gets the zero-shot baseline every video paper reports (the mean of its
frame embeddings, `encode.encode_clips`) scored by cosine. Plain embedding tensors on both sides are
scored by their dot product with the exact streaming `embed_and_score`; anything else in blocks with the
model's similarity (`metrics_from_rows`), also exactly. Method extras (SHE-Net's attention hits, SNP-S3's
re-ranking and word retrieval) reuse the features of `retrieval_features` rather than encoding again.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..encode import (captions_by_record, clip_batches, count_truncated, encode_clips, group_by_media, progress_bar,
                      read_records, text_queries)
from ..models.features import concat, to_cpu


@dataclass
class RetrievalFeatures:
    """What one pass over a manifest gives: the kept records, their clips, and the features the model compares.

    Attributes:
        records: the records whose video could be read (N_v).
        clips: their decoded `VideoClip`s (frame times and validity; the frames themselves are dropped).
        video: `video_features` of the N_v videos (CPU).
        texts: every caption (N_t); owner: the record index of each (a list of them where a text has several).
        text: `text_features` of the N_t captions (CPU).
        counts: `num_skipped` (unreadable videos under on_bad_record=skip) and the model's own counts.
    """
    records: list
    clips: list
    video: object
    texts: list
    owner: list
    text: object
    counts: dict = field(default_factory=dict)


def video_features(model, frames: Tensor, valid: Tensor | None, records: list[dict]):
    """The model's `video_features`, or the zero-shot frame mean of an image-text model."""
    if hasattr(model, "video_features"):
        return model.video_features(frames, valid, records)
    return encode_clips(model, frames, valid)


def text_features(model, texts: list[str]):
    """The model's `text_features`, or the text embeddings of an image-text model."""
    if hasattr(model, "text_features"):
        return model.text_features(texts)
    from ..data.text import trim_padding
    ids = trim_padding(model.tokenizer(list(texts)), model.config.text.pad_token_id)
    return model.encode_text(ids.to(next(model.parameters()).device))


@torch.no_grad()
def retrieval_features(model, manifest, caption_key: str = "caption", limit: int = 0, num_frames: int = 8,
                       strategy: str = "uniform", batch_size: int = 16, progress: bool = False,
                       on_bad_record: str = "error", text_batch: int = 256, paragraph: bool = False,
                       decode_workers: int = 0) -> RetrievalFeatures:
    """Read a video manifest and encode its readable videos and all their captions with the model.

    Args:
        model: a video model (or any image-text model, for the zero-shot frame mean).
        manifest: JSONL/CSV manifest with `video` and captions.
        caption_key: "caption", "caption_zh", ... (a record's plural list, e.g. `captions`, when present).
        limit: the first `limit` records only (0 = all).
        num_frames, strategy: frame sampling (see `polymodal.data.video.read_video`).
        batch_size: videos per forward call; text_batch: captions per call.
        on_bad_record: "error" | "skip" (unreadable videos left out and counted).
        paragraph: one text per video, its sentences joined in order (a record's `paragraph` field when it has
            one): the DiDeMo / ActivityNet paragraph-to-video protocol.
        decode_workers: processes decoding videos while the model encodes (0 = decode in this process).
    Returns:
        A `RetrievalFeatures`.
    """
    import json

    from ..data.manifests import ManifestError
    from ..feature_cache import chunked
    records = read_records(manifest, limit, on_bad_record, required=("video",), media="video")
    records, _ = group_by_media(records, "video", manifest)                 # a video named twice is one item

    def video_chunk(first: int, stop: int) -> dict:
        batches = clip_batches(model, records[first:stop], num_frames, strategy, batch_size, progress, on_bad_record,
                               str(manifest), decode_workers)
        video, kept, clips = [], [], []
        try:
            for idx, frames, valid, batch_clips in batches:
                rows = [records[first + i] for i in idx]
                video.append(to_cpu(video_features(model, frames, valid, rows)))
                kept.extend(first + i for i in idx)
                clips.extend(batch_clips)
        except ManifestError:
            if batches.skipped < stop - first:          # not "nothing readable in this chunk": a real error
                raise
        return {"video": concat(video) if video else None, "kept": kept, "clips": clips,
                "skipped": batches.skipped, "skip_examples": batches.skip_examples}

    def keys() -> list[str]:        # a video's features may read its whole record (e.g. auxiliary captions)
        return [json.dumps({k: v for k, v in r.items() if k != "_line"}, sort_keys=True, default=str) for r in records]
    options = {"fn": "retrieval_features", "num_frames": num_frames, "strategy": strategy,
               "on_bad_record": on_bad_record}
    parts = chunked("videos", len(records), keys, options, video_chunk)
    kept = [records[i] for c in parts for i in c["kept"]]
    if not kept:
        raise ManifestError(f"{manifest}: no readable video to evaluate")
    clips = [clip for c in parts for clip in c["clips"]]
    skipped = sum(c["skipped"] for c in parts)
    skip_examples = [e for c in parts for e in c["skip_examples"]][:3]
    if paragraph:
        texts = [r.get("paragraph") or " ".join(captions_by_record([r], caption_key, manifest)[0]) for r in kept]
        owner = list(range(len(kept)))
    else:
        texts, owner = text_queries(kept, caption_key, manifest)

    def text_chunk(first: int, stop: int) -> dict:
        starts = range(first, stop, text_batch)
        return {"text": concat([to_cpu(text_features(model, texts[s:min(s + text_batch, stop)]))
                                for s in progress_bar(starts, len(starts), "texts", progress)]) if texts else None}
    text = concat([c["text"] for c in chunked("texts", len(texts), lambda: texts, {"fn": "text_features"}, text_chunk)
                   if c["text"] is not None])
    counts = {}
    truncated = count_truncated(getattr(model, "tokenizer", None), texts)
    if truncated:
        counts["num_truncated_texts"] = truncated                            # cut to the text context length
    if skipped:
        import warnings
        warnings.warn(f"{manifest}: skipped {skipped} video(s) that cannot be read ({'; '.join(skip_examples)})")
        counts["num_skipped"] = skipped
    if hasattr(model, "retrieval_counts"):
        counts.update(model.retrieval_counts(kept))
    return RetrievalFeatures(kept, clips, concat([c["video"] for c in parts if c["video"] is not None]), texts,
                             owner, text, counts)


def similarity_of(model):
    """`(text, video, pairs=False) -> scores`: the model's similarity, or the dot product of embeddings."""
    if hasattr(model, "similarity"):
        return model.similarity
    return lambda t, v, pairs=False: (t * v).sum(-1) if pairs else t @ v.T


@torch.no_grad()
def retrieval_metrics_of(model, feats: RetrievalFeatures, block: int = 64, dsl: float = 0.0) -> dict:
    """Exact text<->video metrics of the features, with "image" named "video" in the keys.

    Plain embedding tensors are scored with `embed_and_score` (their dot product, streamed); other features
    by the model's `similarity` in blocks of `block` videos x `block` texts (`metrics_from_rows`). With `dsl` > 0
    the scores are re-weighted by dual softmax (`dual_softmax`) before ranking, and the output says so
    (`dsl_inverse_temperature`).
    """
    if dsl:
        return _dsl_metrics(model, feats, block, dsl)
    from .retrieval import embed_and_score, metrics_from_rows
    owner = feats.owner
    if isinstance(feats.video, Tensor) and isinstance(feats.text, Tensor):
        metrics = embed_and_score(feats.video, feats.text, owner)
    else:
        sim, text, video = similarity_of(model), feats.text, feats.video
        n_t = len(feats.texts)
        # Every (text, correct video) pair scored aligned, then each text's best: (N_t,).
        pt = torch.tensor([j for j, o in enumerate(owner) for _ in (o if isinstance(o, list) else [o])])
        pv = torch.tensor([v for o in owner for v in (o if isinstance(o, list) else [o])])
        pair = torch.cat([sim(text[pt[p:p + block]], video[pv[p:p + block]], pairs=True)
                          for p in range(0, len(pt), block)])
        own = torch.full((n_t,), float("-inf"), dtype=pair.dtype).scatter_reduce(0, pt, pair, reduce="amax")

        def video_rows(i0: int, i1: int) -> Tensor:                                         # (i1 - i0, N_t)
            v = video[i0:i1]
            return torch.cat([sim(text[j:j + block], v) for j in range(0, n_t, block)], dim=0).T

        metrics = metrics_from_rows(video_rows, own, owner if any(isinstance(o, list) for o in owner)
                                    else torch.tensor(owner), len(feats.records), (1, 5, 10), block)
    out = {k.replace("image", "video"): v for k, v in metrics.items()}
    out.update(num_videos=len(feats.records), num_texts=len(feats.texts), **feats.counts)
    return out


def dual_softmax(scores: Tensor, inverse_temperature: float, dim: int) -> Tensor:
    """Dual-softmax re-scoring (DSL, as CAMoE / CLIP2Video apply it at inference): each score times the softmax of
    the scores along `dim` (for text->video ranks, over the texts of each video: dim 0 of (N_t, N_v)), which
    down-weights a video every text prefers. It uses every query of the test set at once (a transductive prior),
    so numbers with it are labelled and off by default.

    Args:
        scores: (N_t, N_v) similarities.
        inverse_temperature: the softmax sharpness (100 in those papers' code).
        dim: 0 for text->video ranks, 1 for video->text ranks.
    """
    return scores * torch.softmax(scores * inverse_temperature, dim=dim)


def _dsl_metrics(model, feats: RetrievalFeatures, block: int, dsl: float) -> dict:
    """Metrics with dual-softmax re-scoring: the whole (N_t, N_v) matrix, each direction from its own re-scoring."""
    from .retrieval import retrieval_metrics
    n_t, n_v = len(feats.texts), len(feats.records)
    if n_t * n_v > 400_000_000:
        raise ValueError(f"dsl: dual-softmax needs the whole {n_t} x {n_v} score matrix in memory; evaluate a "
                         f"smaller set (--limit) or without dsl")
    sim, text, video = similarity_of(model), feats.text, feats.video
    scores = torch.cat([torch.cat([sim(text[j:j + block], video[i:i + block]) for i in range(0, n_v, block)], 1)
                        for j in range(0, n_t, block)])                                # (N_t, N_v)
    owner = feats.owner if any(isinstance(o, list) for o in feats.owner) else torch.tensor(feats.owner)
    t2v = retrieval_metrics(dual_softmax(scores, dsl, 0).T.contiguous(), owner)
    v2t = retrieval_metrics(dual_softmax(scores, dsl, 1).T.contiguous(), owner)
    out = {k: v for k, v in t2v.items() if k.startswith("text_to_image")}
    out.update({k: v for k, v in v2t.items() if k.startswith("image_to_text")})
    recalls = [v for k, v in out.items() if "_R@" in k]
    out["mean_recall"] = sum(recalls) / len(recalls)
    out = {k.replace("image", "video"): v for k, v in out.items()}
    out.update(num_videos=n_v, num_texts=n_t, dsl_inverse_temperature=float(dsl), **feats.counts)
    return out


def video_retrieval_eval(model, manifest, caption_key: str = "caption", limit: int = 0, num_frames: int = 8,
                         strategy: str = "uniform", batch_size: int = 16, progress: bool = False,
                         on_bad_record: str = "error", paragraph: bool = False, dsl: float = 0.0,
                         decode_workers: int = 0) -> dict:
    """Video-text retrieval on a manifest of `video` records; every caption of `caption_key` (or its plural list).

    Args:
        model: a video model or any image-text model (zero-shot frame mean); see the module docstring.
        manifest: JSONL/CSV manifest with `video` and captions.
        caption_key: "caption", "caption_zh", ...
        limit: the first `limit` records only (0 = all).
        num_frames, strategy: frame sampling (see `polymodal.data.video.read_video`).
        on_bad_record: "error" | "skip".
        paragraph: one text per video, its sentences joined (DiDeMo / ActivityNet paragraph-to-video retrieval).
        dsl: dual-softmax re-scoring with this inverse temperature (0 = off, the default; labelled when used).
        decode_workers: processes decoding videos while the model encodes (0 = decode in this process).
    Returns:
        `text_to_video_R@{1,5,10}`, `video_to_text_R@{1,5,10}`, `text_to_video_median_rank` (MdR),
        `text_to_video_mean_rank` (MnR), `mean_recall`, `num_videos`, `num_texts`, `num_skipped` (when videos
        were skipped), `num_truncated_texts` (texts cut to the context), `dsl_inverse_temperature` (with dsl)
        and the model's own counts (e.g. M2-RAAP's `num_without_aux`).
    """
    if dsl < 0:
        raise ValueError(f"dsl: {dsl} must be >= 0 (0 = off)")
    if decode_workers < 0:
        raise ValueError(f"decode_workers: {decode_workers} must be >= 0")
    feats = retrieval_features(model, manifest, caption_key, limit, num_frames, strategy, batch_size, progress,
                               on_bad_record, paragraph=paragraph, decode_workers=decode_workers)
    return retrieval_metrics_of(model, feats, dsl=dsl)


__all__ = ["RetrievalFeatures", "retrieval_features", "retrieval_metrics_of", "video_retrieval_eval", "dual_softmax",
           "video_features", "text_features", "similarity_of"]
