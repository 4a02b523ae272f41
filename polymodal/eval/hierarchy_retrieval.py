"""SHE-Net evaluation (the `shenet_retrieval` row of `eval/tasks.py`): video-text retrieval with the model's
hierarchical (syntax-guided) similarity, through the one retrieval loop (`eval.video_retrieval`), plus the
attention-hit rates on the MovingShapes ground truth."""
from __future__ import annotations

import torch

from ..models.hierarchy import (HierarchyConfig, TextFeatures, VideoFeatures, attention_hit,
                                hierarchical_similarity, patch_box_mask)


def hit_rates(model, records: list[dict], sources: list[list[int]], video: VideoFeatures, text: TextFeatures,
              parses: list, cfg: HierarchyConfig, frame_side: int) -> dict:
    """Attention-hit rates of matched pairs (record i's video with its `caption`, text row i).

    Verb: on videos whose action fills part of the sampled frames (distractor segments), the share of verb
    attention on the sampled frames that are action frames. Noun: for the nouns naming the actor (record
    `nouns`), on every valid frame where the actor is visible, the share of patch attention on the patches its
    box overlaps. Each beside the uniform share; means over nodes, then frames, then records. Boxes are scaled
    by `frame_side / record image_size` (square frames resized, not cropped, as MovingShapes' are). Node k of a
    kind in `text` is the k-th node of that kind in the parse (truncation and the node limit keep a prefix).

    Args:
        model: the model (its image tower gives the patch size).
        records, sources: the records and, per record, the source frame index of every sampled frame.
        video, text: their features (text row i = record i's `caption`).
        parses: the parse of each record's `caption`.
        cfg: the hierarchy.
        frame_side: the model input's frame side in pixels.

    Returns:
        `verb_hit`, `verb_uniform`, `verb_videos`, `noun_hit`, `noun_uniform`, `noun_videos` (hits in percent).
    """
    s = hierarchical_similarity(text, video, cfg, pairs=True, return_attention=True)
    va, na = s.verb_attention[:, 0], s.noun_attention[:, 0]                    # (N, Kv, T), (N, Kn, T, P)
    tower = getattr(model, "base", model).visual
    patch, P = tower.config.patch_size, na.shape[-1]
    grid = (frame_side // patch, frame_side // patch)
    if grid[0] * grid[1] != P:
        raise ValueError(f"hit_rates: {P} patches per frame, but {frame_side}px frames with {patch}px patches "
                         f"make a {grid[0]}x{grid[1]} grid (square, uncropped frames are assumed)")
    vh, vu, nh, nu = [], [], [], []
    for i, r in enumerate(records):
        valid = video.valid[i]                                                  # (T,)
        action = set(r.get("action_frames") or [])
        target = torch.tensor([src in action for src in sources[i]])
        kv = text.node_valid["verb"][i]
        n_act = int((target & valid).sum())
        if kv.any() and 0 < n_act < int(valid.sum()):
            h, u = attention_hit(va[i][kv], target.expand(int(kv.sum()), -1), valid.expand(int(kv.sum()), -1))
            vh.append(float(h.mean()))
            vu.append(float(u.mean()))
        names = {n.lower() for n in r.get("nouns") or []}
        nouns = [n for n in parses[i] if n["kind"] == "noun"]
        kn = [k for k, node in enumerate(nouns)
              if k < na.shape[1] and bool(text.node_valid["noun"][i, k]) and node["text"].lower() in names]
        boxes = r.get("boxes") or []
        scale = frame_side / float(r["image_size"]) if r.get("image_size") else 1.0
        per_frame_h, per_frame_u = [], []
        for t, src in enumerate(sources[i]):
            if not kn or not bool(valid[t]) or src >= len(boxes) or boxes[src] is None:
                continue
            mask = patch_box_mask(boxes[src], grid, patch, scale)      # (P,)
            h, u = attention_hit(na[i, kn, t], mask.expand(len(kn), -1))
            per_frame_h.append(float(h.mean()))
            per_frame_u.append(float(u.mean()))
        if per_frame_h:
            nh.append(sum(per_frame_h) / len(per_frame_h))
            nu.append(sum(per_frame_u) / len(per_frame_u))
    mean = lambda xs: 100.0 * sum(xs) / len(xs) if xs else float("nan")
    return {"verb_hit": mean(vh), "verb_uniform": mean(vu), "verb_videos": len(vh),
            "noun_hit": mean(nh), "noun_uniform": mean(nu), "noun_videos": len(nh)}


@torch.no_grad()
def shenet_retrieval_task(model, manifest, lang: str = "en", limit: int = 0, progress: bool = False, cache=None,
                          on_bad_record: str = "error", num_frames: int = 8, strategy: str = "uniform",
                          hits: bool = True) -> dict:
    """Video-text retrieval with SHE-Net's hierarchical similarity, plus attention-hit rates (the TASKS row).

    The hierarchy (level weights, temperature, node limits) is the model's own (`SHENetConfig`): the numbers
    equal `video_retrieval` on the same model, with the hit rates added.

    Args:
        model: an `SHENetModel` (a saved SHE-Net run's `out_dir/model`).
        manifest: video records with captions (`caption` and/or `captions`).
        lang: "en" (spaCy) or "zh" (jieba, no attachments): which captions are parsed and scored.
        limit, progress, on_bad_record, num_frames, strategy: as `video_retrieval`.
        cache: unused (the eval table passes it to every task).
        hits: also compute the attention-hit rates (records need `action_frames`, `boxes`, `nouns`).
    Returns:
        The `video_retrieval` keys and the `hit_rates` keys.
    """
    from ..data.syntax import ParseCache, cache_path
    from ..encode import captions_by_record, read_records
    from ..models.features import concat, to_cpu
    from ..models.hierarchy import SHENetModel
    from .video_retrieval import retrieval_features, retrieval_metrics_of
    del cache
    if not isinstance(model, SHENetModel):
        raise ValueError(f"shenet_retrieval: the model is a {type(model).__name__}, not an SHE-Net model (model_type "
                         f"'shenet', the out_dir/model of a `method: shenet` run); use --task video_retrieval for it")
    key = "caption" if lang == "en" else f"caption_{lang}"
    records = read_records(manifest, limit, on_bad_record, required=("video",), media="video")
    parses = ParseCache(cache_path(manifest, lang), lang=lang)      # parsed once per manifest, kept beside it
    texts, _ = captions_by_record(records, key, manifest)
    parses.update(texts + ([r[key] for r in records if isinstance(r.get(key), str)] if hits else []))
    model.parses.update(parses.parses)
    feats = retrieval_features(model, manifest, key, limit, num_frames, strategy, 16, progress, on_bad_record)
    out = retrieval_metrics_of(model, feats)
    if hits:
        own = [r[key] for r in feats.records]
        sources = [_source_frames(r, c) for r, c in zip(feats.records, feats.clips)]
        own_text = concat([to_cpu(model.text_features(own[s:s + 256])) for s in range(0, len(own), 256)])
        side = int(model.image_transform.image_size[-1])                  # square, uncropped frames
        out.update(hit_rates(model, feats.records, sources, feats.video, own_text, [model.parses[c] for c in own],
                             model.config.hierarchy(), side))
    return out


def _source_frames(record: dict, clip) -> list[int]:
    """Which frame of the source video each sampled frame is (the world's ground truth is per source frame)."""
    fps = float(record.get("fps") or 0)
    return [int(round(float(t) * fps)) if fps else k for k, t in enumerate(clip.times)]
