"""Multi-label recognition metrics: per-class AP / mAP and precision, recall, F1.

* ``average_precision`` equals scikit-learn's ``average_precision_score`` per class
  (no interpolation; samples with equal scores form one threshold, so tie order never
  matters): ``AP = (1/P) * sum over positives of precision at the end of its tie group``.
* Classes with no positive target have no AP: they get NaN in ``AP_per_class`` (``null``
  in JSON via ``polymodal.eval.report.write_json``) and are left out of ``mAP``.
* Precision/recall/F1 in "micro" (pool all decisions) and "macro" (mean over classes)
  form. A per-class value that is 0/0 (precision of a never-predicted class, recall of a
  class without positives, F1 with neither) is undefined and left out of the macro mean,
  as scikit-learn does with ``zero_division=np.nan``. ``f1_macro`` is the mean of per-class
  F1 (scikit-learn); ``f1_macro_hm`` is the harmonic mean of ``precision_macro`` and
  ``recall_macro`` (the "CF1" of many multi-label papers).
* Top-k predictions take the k highest scores per sample; ties go to the lower class index
  (stable sort). Threshold predictions are ``score >= threshold`` (use 0.5 for
  probabilities, 0 for logits).

All values are in percent.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _check(scores: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    scores, targets = torch.as_tensor(scores), torch.as_tensor(targets)
    if scores.dim() != 2 or scores.shape != targets.shape:
        raise ValueError(f"scores and targets must both be (N, C), got {tuple(scores.shape)} and {tuple(targets.shape)}")
    if scores.shape[0] == 0 or scores.shape[1] == 0:
        raise ValueError(f"need at least one sample and one class, got shape {tuple(scores.shape)}")
    if not torch.isfinite(scores.double()).all():
        raise ValueError("scores contain NaN or inf")
    if not ((targets == 0) | (targets == 1)).all():
        raise ValueError("targets must be 0/1 (or False/True)")
    return scores.double().cpu(), targets.double().cpu()


def _nanmean(x: Tensor) -> float:
    x = x[~torch.isnan(x)]
    return float(x.mean()) if len(x) else math.nan


def average_precision(scores: Tensor, targets: Tensor) -> dict:
    """Per-class average precision and their mean, as scikit-learn defines AP.

    Args:
        scores: (N, C) scores, higher = more likely present.
        targets: (N, C) 0/1 ground truth.

    Returns:
        ``{"AP_per_class": [C floats, % or NaN], "mAP": %, "num_classes_with_positives": int}``.

    Raises:
        ValueError: bad shapes, NaN scores, non-binary targets, or no class with a positive.
    """
    scores, targets = _check(scores, targets)
    n = scores.shape[0]
    order = torch.sort(scores, dim=0, descending=True, stable=True)
    s = order.values                                                   # (N, C) descending per class
    t = targets.gather(0, order.indices)                               # (N, C) targets in that order
    tp = t.cumsum(0)                                                   # true positives in the top i+1
    # The last row of each run of equal scores is a threshold; every row uses its run's end.
    is_end = torch.ones_like(s, dtype=torch.bool)
    is_end[:-1] = s[:-1] != s[1:]
    pos = torch.arange(n).unsqueeze(1).expand_as(s)
    end = torch.where(is_end, pos, torch.full_like(pos, n))
    end = end.flip(0).cummin(0).values.flip(0)                         # (N, C) index of the run's end
    precision_at_end = tp.gather(0, end) / (end + 1)                   # (N, C)
    num_pos = t.sum(0)                                                 # (C,)
    ap = (t * precision_at_end).sum(0) / num_pos                       # NaN where num_pos == 0
    ap = 100.0 * ap
    valid = num_pos > 0
    if not valid.any():
        raise ValueError("no class has a positive target, so mAP is undefined")
    return {"AP_per_class": [float(v) for v in ap],
            "mAP": float(ap[valid].mean()),
            "num_classes_with_positives": int(valid.sum())}


def _prf(pred: Tensor, targets: Tensor) -> dict[str, float]:
    """Micro and macro precision/recall/F1 (percent) of 0/1 predictions against 0/1 targets."""
    tp = (pred * targets).sum(0)                                       # (C,)
    n_pred, n_pos = pred.sum(0), targets.sum(0)
    nan = torch.full_like(tp, math.nan)

    def ratio(a, b):
        return torch.where(b > 0, a / b.clamp(min=1), nan)

    p_c, r_c, f_c = ratio(tp, n_pred), ratio(tp, n_pos), ratio(2 * tp, n_pred + n_pos)
    P = float(tp.sum() / n_pred.sum()) if n_pred.sum() > 0 else math.nan
    R = float(tp.sum() / n_pos.sum()) if n_pos.sum() > 0 else math.nan
    F = float(2 * tp.sum() / (n_pred.sum() + n_pos.sum())) if n_pred.sum() + n_pos.sum() > 0 else math.nan
    pm, rm = _nanmean(p_c), _nanmean(r_c)
    hm = 2 * pm * rm / (pm + rm) if pm + rm > 0 else (0.0 if pm == pm and rm == rm else math.nan)
    out = {"precision_micro": P, "recall_micro": R, "f1_micro": F,
           "precision_macro": pm, "recall_macro": rm, "f1_macro": _nanmean(f_c), "f1_macro_hm": hm}
    return {k: 100.0 * v for k, v in out.items()}                      # NaN stays NaN


def f1_at_topk(scores: Tensor, targets: Tensor, k: int = 3) -> dict[str, float]:
    """Precision/recall/F1 when each sample predicts its k highest-scoring classes.

    Args:
        scores: (N, C). targets: (N, C) 0/1. k: labels predicted per sample (capped at C).

    Returns:
        ``precision_micro, recall_micro, f1_micro, precision_macro, recall_macro, f1_macro,
        f1_macro_hm`` in percent (NaN where undefined, see the module docstring).
    """
    scores, targets = _check(scores, targets)
    if int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(int(k), scores.shape[1])
    top = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    pred = torch.zeros_like(scores).scatter_(1, top, 1.0)
    return _prf(pred, targets)


def f1_at_threshold(scores: Tensor, targets: Tensor, threshold: float = 0.5) -> dict[str, float]:
    """Precision/recall/F1 when every class with ``score >= threshold`` is predicted.

    Returns:
        The same keys as :func:`f1_at_topk`.
    """
    scores, targets = _check(scores, targets)
    return _prf((scores >= threshold).double(), targets)


def multilabel_metrics(scores: Tensor, targets: Tensor, k: int = 3, threshold: float = 0.5) -> dict:
    """mAP plus top-k and threshold precision/recall/F1.

    Returns:
        ``{"mAP", "AP_per_class", "num_classes_with_positives", "top{k}_<metric>", ...,
        "threshold{threshold}_<metric>", ...}`` with ``<metric>`` the keys of :func:`f1_at_topk`,
        e.g. ``top3_f1_micro`` and ``threshold0.5_f1_macro``.
    """
    out = dict(average_precision(scores, targets))
    out.update({f"top{k}_{name}": v for name, v in f1_at_topk(scores, targets, k).items()})
    out.update({f"threshold{threshold:g}_{name}": v for name, v in f1_at_threshold(scores, targets, threshold).items()})
    return out
