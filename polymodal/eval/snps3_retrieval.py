"""SNP-S3 evaluation (the `snps3_retrieval` row of `eval/tasks.py`): dual-encoder video-text retrieval (with
optional re-ranking of the top-k by the cross encoder), masked-token accuracy on significant vs other words,
and word-level retrieval through the LVWM scores."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.text import trim_padding
from ..losses.matching import lvwm_scores


@torch.no_grad()
def _video_passes(model, records, num_frames, strategy, batch_size, on_bad_record="error", where="manifest"):
    """The model's video pass over the readable records: (means, valid, clips, video) and the records kept."""
    from .video_retrieval import clip_batches
    means, valid, clips, video, kept = [], [], [], [], []
    for idx, frames, frame_valid, _ in clip_batches(model, records, num_frames, strategy, batch_size,
                                                    on_bad_record=on_bad_record, where=where):
        vp = model.video_pass(frames, frame_valid)
        means.append(vp.means)
        valid.append(vp.valid)
        clips.append(vp.clips)
        video.append(vp.video)
        kept.extend(records[i] for i in idx)
    return torch.cat(means), torch.cat(valid), torch.cat(clips), torch.cat(video), kept


def _ranks_after_rerank(sim: Tensor, owner: Tensor, cross: Tensor, top: Tensor) -> Tensor:
    """1-based text->video ranks (pessimistic ties) when each text's top-k videos by `sim` (N_t, N_v) are
    re-ordered by their cross scores `cross` (N_t, k); `top` (N_t, k) holds those videos."""
    ranks = []
    for t in range(sim.shape[0]):
        o = int(owner[t])
        hit = (top[t] == o).nonzero()
        if len(hit):
            ranks.append(int((cross[t] >= cross[t, int(hit[0])]).sum()))
        else:                                            # outside the top-k: the dual-encoder rank (> k)
            ranks.append(int((sim[t] >= sim[t, o]).sum()))
    return torch.tensor(ranks)


@torch.no_grad()
def snps3_retrieval_task(model, manifest, limit: int = 0, num_frames: int = 8, strategy: str = "uniform",
                         rerank_top_k: int = 0, significant_words: str = "", batch_size: int = 16,
                         max_mask_queries: int = 2000, progress: bool = False, cache=None, lang: str = "en",
                         on_bad_record: str = "error") -> dict:
    """SNP-S3 evaluation on a video manifest (see the module docstring for the numbers).

    Args:
        model: an `SNPS3Model` with its tokenizer and image transform attached.
        manifest: JSONL/CSV manifest with `video` and `caption`/`captions`.
        limit: the first `limit` records (0 = all).
        num_frames, strategy: frame sampling.
        rerank_top_k: re-rank each text's top-k videos by the level-2 cross score (0 = off).
        significant_words: the run's significant-word JSON (default: the list attached to the model).
        max_mask_queries: at most this many (caption, position) queries for masked-token accuracy.
    Returns:
        `text_to_video_R@{1,5,10}`, `video_to_text_R@{1,5,10}`, ranks, `rerank_text_to_video_R@k` (with
        re-ranking), `masked_acc_significant`, `masked_acc_other`, `word_P@1`, `word_mAP`, `word_chance`.
    """
    from ..data.masking import SignificantWords, masking_rule
    from .retrieval import retrieval_metrics
    from .suite import captions_by_record, read_records
    tok = model.tokenizer
    rule = (masking_rule(tok, SignificantWords.load(significant_words)) if significant_words
            else getattr(model, "masking_rule", None))
    if rule is None:
        raise ValueError("snps3_retrieval: no significant-word list; give the option significant_words "
                         "(the run's significant_words.json)")
    device = next(model.parameters()).device
    key = "caption" if lang == "en" else f"caption_{lang}"
    records = read_records(manifest, limit, on_bad_record, required=("video",), media="video")
    means, cvalid, clips, video, records = _video_passes(model, records, num_frames, strategy, batch_size,
                                                         on_bad_record, str(manifest))
    texts, owner = captions_by_record(records, key, manifest)
    owner = torch.tensor(owner)
    ids_all = tok(texts).to(device)
    tps = [model.text_pass(trim_padding(ids_all[s:s + 256], tok.pad_id)) for s in range(0, len(texts), 256)]
    feats = torch.cat([t.feature for t in tps])                                           # (N_t, W)
    sim = (feats @ video.T).float().cpu()                                                  # (N_t, N_v)
    out = {k.replace("image", "video"): v for k, v in retrieval_metrics(sim.T, owner).items()}
    out.update(num_videos=len(records), num_texts=len(texts))
    # Re-ranking by the cross encoder.
    if rerank_top_k > 0:
        k = min(rerank_top_k, len(records))
        top = sim.topk(k, dim=1).indices                                                   # (N_t, k)
        tt = torch.arange(len(texts)).repeat_interleave(k)                                 # (N_t * k,)
        vv = top.flatten()
        cross = torch.cat([model.cross_score(ids_all[tt[s:s + 256].to(device)], means[vv[s:s + 256].to(device)],
                                             cvalid[vv[s:s + 256].to(device)]).float().cpu()
                           for s in range(0, len(tt), 256)]).view(len(texts), k)
        ranks = _ranks_after_rerank(sim, owner, cross, top)
        for kk in (1, 5, 10):
            out[f"rerank_text_to_video_R@{kk}"] = 100.0 * float((ranks <= kk).float().mean())
    # Masked-token accuracy: every content token masked alone, with the caption's own video.
    queries = []
    for t in range(len(texts)):
        row = ids_all[t]
        for p in torch.nonzero(rule.content(row)).flatten().tolist():
            queries.append((t, p))
    if len(queries) > max_mask_queries:
        pick = np.random.default_rng(0).choice(len(queries), max_mask_queries, replace=False)
        queries = [queries[i] for i in sorted(pick)]
    hits = {True: [], False: []}
    for s in range(0, len(queries), 256):
        chunk = queries[s:s + 256]
        tt = torch.tensor([q[0] for q in chunk], device=device)
        pp = torch.tensor([q[1] for q in chunk], device=device)
        rows = ids_all[tt].clone()
        target = rows[torch.arange(len(chunk)), pp]
        rows[torch.arange(len(chunk)), pp] = rule.mask_id
        vids = owner.to(device)[tt]
        h, _ = model.cross_pass(rows, means[vids], cvalid[vids])
        pred = model.mlm_logits(h[torch.arange(len(chunk)), pp]).argmax(-1)
        sig = rule.is_significant(target)
        for hit, is_sig in zip((pred == target).tolist(), sig.tolist()):
            hits[bool(is_sig)].append(hit)
    out["masked_acc_significant"] = 100.0 * float(np.mean(hits[True])) if hits[True] else float("nan")
    out["masked_acc_other"] = 100.0 * float(np.mean(hits[False])) if hits[False] else float("nan")
    # Word-level retrieval with the LVWM score.
    contains = [set() for _ in range(len(records))]
    for t in range(len(texts)):
        contains[int(owner[t])].update(ids_all[t][rule.is_significant(ids_all[t])].tolist())
    p1, aps, chance = [], [], []
    tokens = torch.cat([F.pad(t.tokens, (0, 0, 0, ids_all.shape[1] - t.tokens.shape[1])) for t in tps])
    for t in range(len(texts)):
        row = ids_all[t]
        for p in torch.nonzero(rule.is_significant(row)).flatten().tolist():
            wid = int(row[p])
            pos = torch.tensor([wid in c for c in contains])
            if pos.all():
                continue                                                                 # nothing to retrieve
            s = lvwm_scores(tokens[t, p][None, None], clips.masked_fill(~cvalid[..., None], 0))[0]  # (N_v, n)
            s = s.masked_fill(~cvalid, float("-inf")).max(-1).values.float().cpu()
            order = torch.argsort(s, descending=True, stable=True)
            rel = pos[order].float()
            p1.append(float(rel[0]))
            prec = rel.cumsum(0) / torch.arange(1, len(rel) + 1)
            aps.append(float((prec * rel).sum() / rel.sum()))
            chance.append(float(pos.float().mean()))
    if aps:
        out.update({"word_P@1": 100.0 * float(np.mean(p1)), "word_mAP": 100.0 * float(np.mean(aps)),
                    "word_chance": 100.0 * float(np.mean(chance)), "word_queries": len(aps)})
    return out
