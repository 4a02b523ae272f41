"""Multi-label video scene recognition: mAP, micro/macro F1 at a threshold, hit@k, hierarchy consistency.

`scene_eval_task(model, manifest, **options)` is the `scene` row of `eval/tasks.py::TASKS`. The model is a
`polymodal.models.scene.SceneModel` (what `polymodal.load_model` returns for a saved scene model). Each record has a
`video` and `labels` (names or indices of the model's label hierarchy, or of `classes` when given).

Numbers (percent):

* ``mAP`` (classes without a positive left out, as `eval.multilabel.average_precision`), and ``mAP_<group>``
  over each label group of the hierarchy (MovingShapes: ``temporal`` = order-dependent labels,
  ``frame_level`` = labels one frame shows);
* ``f1_micro`` / ``f1_macro`` (and precision / recall) at ``threshold``: the option's value (default 0, the
  natural boundary of the multi-label softmax loss) or, with ``val=<manifest>``, the threshold that maximises
  micro F1 on that validation manifest (reported as ``threshold``);
* ``hit@k`` (k = 1, 3, 5): share of videos with at least one positive whose k best-scored labels include one;
* ``consistency``: share of predicted labels with a parent whose parent is also predicted (NaN when none);
* the same mAP / group mAP / consistency for each stream alone: ``temporal/...`` and ``frame/...``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .multilabel import average_precision, f1_at_threshold

HIT_KS = (1, 3, 5)


def hit_at_k(scores: Tensor, targets: Tensor, k: int) -> float:
    """Percent of samples (with at least one positive) whose top-k scored labels contain a positive.

    Ties go to the lower label index (stable sort). NaN when no sample has a positive.
    """
    k = min(int(k), scores.shape[1])
    top = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]   # (N, k)
    hit = targets.gather(1, top).amax(1) > 0                                       # (N,)
    has = targets.amax(1) > 0
    return 100.0 * float(hit[has].float().mean()) if has.any() else math.nan


def best_threshold(scores: Tensor, targets: Tensor, max_candidates: int = 256) -> float:
    """The threshold (score >= t) with the highest micro F1; candidates are the distinct scores (or evenly
    spaced quantiles of them when there are more than `max_candidates`), ties broken towards the lower one."""
    flat = torch.unique(scores.double().flatten())
    if len(flat) > max_candidates:
        flat = torch.quantile(flat, torch.linspace(0, 1, max_candidates, dtype=torch.float64))
    best, best_f1 = 0.0, -1.0
    for t in flat.tolist():
        f1 = f1_at_threshold(scores, targets, t)["f1_micro"]
        if f1 == f1 and f1 > best_f1:
            best, best_f1 = t, f1
    return float(best)


def chance_of(targets: Tensor) -> dict:
    """What random scores give on these targets: `mAP_chance` (the mean prevalence of the labels with a
    positive) and `hit@k_chance` (the chance that a random top k holds one of a video's positives)."""
    from math import comb
    t = targets.float()
    prev = t.mean(0)
    out = {"mAP_chance": 100.0 * float(prev[prev > 0].mean()) if (prev > 0).any() else math.nan}
    C = t.shape[1]
    m = t.sum(1).long().tolist()
    for k in HIT_KS:
        kk = min(k, C)
        hits = [1.0 - comb(C - mi, kk) / comb(C, kk) for mi in m if mi > 0]
        out[f"hit@{k}_chance"] = 100.0 * sum(hits) / len(hits) if hits else math.nan
    return out


def scene_metrics(scores: Tensor, targets: Tensor, hierarchy, threshold: float = 0.0) -> dict:
    """mAP, group mAPs, F1 at `threshold`, hit@k and consistency of (N, C) scores against 0/1 targets."""
    out = {"mAP": average_precision(scores, targets)["mAP"]}
    for group in hierarchy.groups:
        cols = hierarchy.group_mask(group)
        sub = targets[:, cols]
        out[f"mAP_{group}"] = average_precision(scores[:, cols], sub)["mAP"] if sub.any() else math.nan
    prf = f1_at_threshold(scores, targets, threshold)
    out.update({k: prf[k] for k in ("f1_micro", "f1_macro", "precision_micro", "recall_micro")})
    out.update({f"hit@{k}": hit_at_k(scores, targets, k) for k in HIT_KS})
    out.update(chance_of(targets))
    out["consistency"] = hierarchy.consistency(scores >= threshold)
    out["threshold"] = float(threshold)
    return out


@torch.no_grad()
def scene_scores(model, records: list[dict], num_frames: int = 8, strategy: str = "uniform", batch_size: int = 16,
                 text_key: str = "caption", on_bad_record: str = "error", where: str = "manifest",
                 progress: bool = False) -> tuple[dict, list[dict]]:
    """Logits of every stream for the records' videos.

    Returns:
        ({"ensemble": (N, C), "temporal": (N, C) or absent, "frame": ...}, the N records kept).
    """
    from ..encode import clip_batches
    device = next(model.parameters()).device
    out: dict[str, list[Tensor]] = {}
    kept = []
    for idx, frames, valid, _ in clip_batches(model, records, num_frames, strategy, batch_size, progress,
                                              on_bad_record, where):
        rows = [records[i] for i in idx]
        text = None
        if model.config.use_text:
            text = model.tokenizer([str(r.get(text_key, "")) for r in rows]).to(device)
        o = model(frames, valid, text)
        for name, z in (("ensemble", o.logits), ("temporal", o.temporal), ("frame", o.frame)):
            if z is not None:
                out.setdefault(name, []).append(z.float().cpu())
        kept.extend(rows)
    return {k: torch.cat(v) for k, v in out.items()}, kept


def scene_eval_task(model, manifest, classes: str = "", lang: str = "en", limit: int = 0, progress: bool = False,
                    cache=None, on_bad_record: str = "error", num_frames: int = 8, strategy: str = "uniform",
                    threshold: float = 0.0, val: str = "", batch_size: int = 16) -> dict:
    """The `scene` eval task.

    Args:
        model: a SceneModel (a saved scene run's `out_dir/model`).
        manifest: records with `video` and `labels`.
        classes: the label hierarchy file (default: the model's own labels).
        lang: which record text feeds a model with `use_text` (``caption`` or ``caption_<lang>``).
        limit: first N records (0 = all).
        progress: progress bars. cache: unused (videos are not shared between tasks).
        on_bad_record: "error" | "skip" for unreadable videos.
        num_frames, strategy: frame sampling (as for training).
        threshold: decision threshold on the logits when no `val` manifest is given.
        val: a validation manifest; the threshold becomes the one with the best micro F1 on it.
        batch_size: videos per forward call.
    Returns:
        The numbers listed in the module docstring plus ``num_videos`` and ``num_labels``.
    """
    from ..data.labels import load_hierarchy
    from ..data.manifests import ManifestError
    from ..encode import read_records
    from ..models.scene import SceneModel
    if not isinstance(model, SceneModel):
        raise ValueError(f"scene: the model is a {type(model).__name__}, not a scene model (model_type 'scene', the "
                         f"out_dir/model of a `method: scene` run)")
    scene = model
    hierarchy = load_hierarchy(classes) if classes else scene.hierarchy
    if hierarchy.names != scene.hierarchy.names:
        raise ValueError(f"scene: {classes} has {len(hierarchy)} labels that differ from the model's "
                         f"{len(scene.hierarchy)} labels; evaluate with the classes file the model was trained on")
    text_key = "caption" if lang == "en" else f"caption_{lang}"
    was_training = scene.training
    scene.eval()
    try:
        def run(path, n):
            records = read_records(path, n, on_bad_record, required=("video",), media="video")
            missing = [r for r in records if "labels" not in r]
            if missing:
                raise ManifestError(f"{path}: record on line {missing[0].get('_line', '?')} has no 'labels'")
            scores, kept = scene_scores(scene, records, num_frames, strategy, batch_size, text_key, on_bad_record,
                                        str(path), progress)
            return scores, hierarchy.targets([r["labels"] for r in kept], where=str(path))

        if val:
            val_scores, val_targets = run(val, 0)
            threshold = best_threshold(val_scores["ensemble"], val_targets)
        scores, targets = run(manifest, limit)
    finally:
        scene.train(was_training)
    out = scene_metrics(scores["ensemble"], targets, hierarchy, threshold)
    for stream in ("temporal", "frame"):
        if stream in scores and scene.config.streams == "both":
            m = scene_metrics(scores[stream], targets, hierarchy, threshold)
            out.update({f"{stream}/{k}": v for k, v in m.items()
                        if k == "mAP" or k.startswith("mAP_") or k == "consistency"})
    out.update(num_videos=len(targets), num_labels=len(hierarchy))
    return out


__all__ = ["scene_eval_task", "scene_metrics", "scene_scores", "hit_at_k", "best_threshold"]
