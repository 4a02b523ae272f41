"""SHE-Net evaluation: video-text retrieval with the hierarchical (syntax-guided) similarity, scored in blocks,
and the attention-hit rates on the MovingShapes ground truth (the `shenet_retrieval` row of `eval/tasks.py`)."""
from __future__ import annotations

import torch
from torch import Tensor

from ..data.text import trim_padding
from ..models.hierarchy import (HierarchyConfig, TextFeatures, VideoFeatures, attention_hit, encode_text_features,
                                encode_video_features, hierarchical_similarity, patch_box_mask)


@torch.no_grad()
def _encode_videos(model, records, num_frames, strategy, batch_size, progress, on_bad_record, where):
    """Video features of the readable records, their sampled frames' source indices, and the records kept."""
    from .video_retrieval import clip_batches
    feats, kept, sources, side = [], [], [], None
    for idx, frames, valid, clips in clip_batches(model, records, num_frames, strategy, batch_size, progress,
                                                  on_bad_record, where):
        f = encode_video_features(model, frames, valid)
        feats.append(VideoFeatures(f.video.float().cpu(), f.frames.float().cpu(), f.patches.float().cpu(),
                                   f.valid.cpu()))
        side = frames.shape[-1]
        for i, clip in zip(idx, clips):
            kept.append(records[i])
            fps = float(records[i].get("fps") or 0)
            # Which frame of the source video each sampled frame is (the world's ground truth is per source frame).
            sources.append([int(round(float(t) * fps)) if fps else k for k, t in enumerate(clip.times)])
    cat = lambda name: torch.cat([getattr(f, name) for f in feats])
    return VideoFeatures(cat("video"), cat("frames"), cat("patches"), cat("valid")), kept, sources, side


@torch.no_grad()
def encode_text_nodes(model, texts: list[str], parses: dict, batch_size: int = 256, max_nodes: int = 4,
                      max_tokens: int = 8) -> TextFeatures:
    """Text features (sentence + nodes) of captions whose parses are in `parses`, `batch_size` at a time."""
    from ..data.syntax import batch_nodes, readout_shift
    device = next(model.parameters()).device
    tok, pad = model.tokenizer, model.config.text.pad_token_id
    shift = readout_shift(model.config.text)
    parts = []
    for s in range(0, len(texts), batch_size):
        chunk = texts[s:s + batch_size]
        ids = trim_padding(tok(chunk), pad)
        nodes = batch_nodes(tok, chunk, [parses[t] for t in chunk], tok.context_length, shift,
                            {k: max_nodes for k in ("verb", "noun", "adj")}, max_tokens)
        parts.append(encode_text_features(model, ids.to(device), {k: v.to(device) for k, v in nodes.items()}))
    return _cat_text(parts)


def _cat_text(parts: list[TextFeatures]) -> TextFeatures:
    """Concatenate text features whose node counts (K) may differ: pad K with invalid nodes."""
    def pad(x: Tensor, K: int, value) -> Tensor:
        if x.shape[1] == K:
            return x
        shape = list(x.shape)
        shape[1] = K - x.shape[1]
        return torch.cat([x, torch.full(shape, value, dtype=x.dtype, device=x.device)], 1)
    kinds = parts[0].nodes.keys()
    Ks = {k: max(p.nodes[k].shape[1] for p in parts) for k in kinds}
    return TextFeatures(
        torch.cat([p.sentence.float().cpu() for p in parts]),
        {k: torch.cat([pad(p.nodes[k].float().cpu(), Ks[k], 0.0) for p in parts]) for k in kinds},
        {k: torch.cat([pad(p.node_valid[k].cpu(), Ks[k], False) for p in parts]) for k in kinds},
        {k: torch.cat([pad(p.heads[k].cpu(), Ks[k], -1) for p in parts]) for k in parts[0].heads})



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


def shenet_retrieval_task(model, manifest, lang: str = "en", limit: int = 0, progress: bool = False, cache=None,
                          on_bad_record: str = "error", num_frames: int = 8, strategy: str = "uniform",
                          verb_weight: float = 1.0, noun_weight: float = 1.0, adj_weight: float = 0.0,
                          tau: float = 0.1, noun_frames: str = "verb", block: int = 64, max_nodes: int = 4,
                          max_node_tokens: int = 8, hits: bool = True) -> dict:
    """Video-text retrieval with SHE-Net's hierarchical similarity, plus attention-hit rates (the TASKS row).

    Args:
        model: a `VideoCLIP` over a CLIP (or a CLIP: frames are mean-pooled).
        manifest: video records with captions (`caption` and/or `captions`).
        lang: "en" (spaCy) or "zh" (jieba, no attachments): which captions are parsed and scored.
        limit, progress, on_bad_record, num_frames, strategy: as `video_retrieval`.
        cache: unused (the eval table passes it to every task).
        verb_weight, noun_weight, adj_weight, tau, noun_frames: the hierarchy (`HierarchyConfig`).
        block: texts x videos scored at once (memory ~ block^2 * K * T * P floats).
        max_nodes, max_node_tokens: node limits, as in training.
        hits: also compute the attention-hit rates (records need `action_frames`, `boxes`, `nouns`).
    Returns:
        `text_to_video_R@{1,5,10}`, `video_to_text_R@{1,5,10}`, `text_to_video_median_rank` (MdR),
        `text_to_video_mean_rank`, `mean_recall`, `num_videos`, `num_texts`, and the `hit_rates` keys.
    """
    from ..data.syntax import ParseCache, cache_path
    from .retrieval import metrics_from_rows
    from .suite import captions_by_record, read_records
    del cache
    cfg = HierarchyConfig(verb_weight, noun_weight, adj_weight, tau, noun_frames)
    key = "caption" if lang == "en" else f"caption_{lang}"
    records = read_records(manifest, limit, on_bad_record, required=("video",), media="video")
    video, records, sources, side = _encode_videos(model, records, num_frames, strategy, 16, progress, on_bad_record,
                                             str(manifest))
    texts, owner = captions_by_record(records, key, manifest)
    own = [r[key] for r in records] if hits else []
    parses = ParseCache(cache_path(manifest, lang), lang=lang)
    parses.update(texts + own)
    text = encode_text_nodes(model, texts, parses.parses, max_nodes=max_nodes, max_tokens=max_node_tokens)
    Nv, Nt = len(video), len(text)
    t2v = torch.tensor(owner, dtype=torch.long)

    def video_rows(i0, i1):                                                  # (c, Nt)
        v = video[i0:i1]
        return torch.cat([hierarchical_similarity(text[j0:j0 + block], v, cfg).total
                          for j0 in range(0, Nt, block)], dim=0).T

    with torch.no_grad():
        pair_scores = torch.cat([hierarchical_similarity(text[j0:j0 + block], video[t2v[j0:j0 + block]], cfg,
                                                         pairs=True).total[:, 0]
                                 for j0 in range(0, Nt, block)])                  # (Nt,) text with its video
        metrics = metrics_from_rows(video_rows, pair_scores, t2v, Nv, (1, 5, 10), block)
    out = {k.replace("image", "video"): v for k, v in metrics.items()}
    out.update(num_videos=Nv, num_texts=Nt)
    if hits:
        own_text = encode_text_nodes(model, own, parses.parses, max_nodes=max_nodes, max_tokens=max_node_tokens)
        out.update(hit_rates(model, records, sources, video, own_text, [parses.parses[c] for c in own], cfg, side))
    return out


