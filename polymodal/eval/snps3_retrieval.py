"""SNP-S3 evaluation (the `snps3_retrieval` row of `eval/tasks.py`): dual-encoder video-text retrieval (with
optional re-ranking of the top-k by the cross encoder), masked-token accuracy on significant vs other words,
and word-level retrieval through the LVWM scores. Retrieval and the features the extras read come from the one
retrieval loop (`eval.video_retrieval`)."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..losses.matching import lvwm_scores


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
                         rerank_top_k: int = 0, batch_size: int = 16, max_mask_queries: int = 2000,
                         progress: bool = False, cache=None, lang: str = "en", on_bad_record: str = "error") -> dict:
    """SNP-S3 evaluation on a video manifest (see the module docstring for the numbers).

    Retrieval goes through the one retrieval loop (`eval.video_retrieval`: the numbers equal `video_retrieval`
    on the same model); the masking rule is the one the saved model carries (its significant words).

    Args:
        model: an `SNPS3Model` (a saved snps3 run's `out_dir/model`).
        manifest: JSONL/CSV manifest with `video` and `caption`/`captions`.
        limit: the first `limit` records (0 = all).
        num_frames, strategy: frame sampling.
        rerank_top_k: re-rank each text's top-k videos by the level-2 cross score (0 = off).
        max_mask_queries: at most this many (caption, position) queries for masked-token accuracy.
    Returns:
        `text_to_video_R@{1,5,10}`, `video_to_text_R@{1,5,10}`, ranks, `rerank_text_to_video_R@k` (with
        re-ranking), `masked_acc_significant`, `masked_acc_other`, `word_P@1`, `word_mAP`, `word_chance`.
    """
    from .video_retrieval import retrieval_features, retrieval_metrics_of
    del cache
    rule = getattr(model, "masking_rule", None)
    if rule is None:
        raise ValueError(f"snps3_retrieval: the model ({type(model).__name__}) carries no significant-word list; "
                         f"evaluate the out_dir/model of a `method: snps3` run (its config.json holds the list)")
    device = next(model.parameters()).device
    key = "caption" if lang == "en" else f"caption_{lang}"
    feats = retrieval_features(model, manifest, key, limit, num_frames, strategy, batch_size, progress,
                               on_bad_record)
    out = retrieval_metrics_of(model, feats)
    text, video, records, texts = feats.text, feats.video, feats.records, feats.texts
    owner = torch.tensor(feats.owner)
    ids_all, means, cvalid, clips = text.ids.to(device), video.means, video.valid, video.clips
    # Re-ranking by the cross encoder.
    if rerank_top_k > 0:
        sim = model.similarity(text, video)                                                # (N_t, N_v)
        k = min(rerank_top_k, len(records))
        top = sim.topk(k, dim=1).indices                                                   # (N_t, k)
        tt = torch.arange(len(texts)).repeat_interleave(k)                                 # (N_t * k,)
        vv = top.flatten()
        cross = torch.cat([model.cross_score(ids_all[tt[s:s + 256].to(device)], means[vv[s:s + 256]].to(device),
                                             cvalid[vv[s:s + 256]].to(device)).float().cpu()
                           for s in range(0, len(tt), 256)]).view(len(texts), k)
        ranks = _ranks_after_rerank(sim, owner, cross, top)
        for kk in (1, 5, 10):
            out[f"rerank_text_to_video_R@{kk}"] = 100.0 * float((ranks <= kk).float().mean())
    dmeans, dvalid = means.to(device), cvalid.to(device)
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
        h, _ = model.cross_pass(rows, dmeans[vids], dvalid[vids])
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
    tokens = text.tokens
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
