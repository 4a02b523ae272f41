"""The ASD fairness loss (arXiv 2408.06569): E = mean_i exp(-Skew(P_i)) * L_AR(i).

L_AR(i) is sample i's answer-token NLL and Skew(P_i) its skew (see `polymodal.eval.fairness.sample_skew`):
over-represented (concept, attribute value) pairs (Skew > 0) are down-weighted, under-represented ones
(Skew < 0) up-weighted. The weights are constants of the step (no gradient flows into the skew).

A pairing the model never chooses has Skew = ln(0) = -inf, so the paper's weight is unbounded. `bound_skews`
floors every Skew at -ln(max_weight) (ours), which caps the weight at `max_weight` and bounds what the
resampler's accumulator gains per epoch; `fairness_weights(max_weight=...)` caps the weight itself as well.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor


def bound_skews(skews, max_weight: float) -> np.ndarray:
    """Floor each Skew at -ln(max_weight), so its loss weight exp(-Skew) is at most `max_weight`.

    Positive skews are already bounded (Skew <= ln(number of values), since p_observed <= 1) and stay as they
    are; -inf (a pairing the model never chooses) and NaN become the floor.

    Args:
        skews: (R,) per-sample Skew (array-like).
        max_weight: the largest loss weight (>= 1).
    Returns:
        (R,) float64 skews in [-ln(max_weight), +inf).
    """
    if not max_weight >= 1:
        raise ValueError(f"max_weight must be >= 1 (a weight cap below 1 would down-weight fair samples), got {max_weight}")
    s = np.asarray(skews, dtype=np.float64)
    floor = -math.log(max_weight)
    return np.where(np.isnan(s) | (s < floor), floor, s)


def fairness_weights(skews: Tensor, max_weight: float | None = None) -> Tensor:
    """exp(-Skew) per sample, detached, capped at `max_weight` when given: (B,) -> (B,)."""
    w = torch.exp(-skews.detach().float())
    return w if max_weight is None else w.clamp(max=float(max_weight))


def fairness_loss(nll: Tensor, skews: Tensor, max_weight: float | None = None) -> Tensor:
    """mean_i min(exp(-Skew_i), max_weight) * nll_i.

    Args:
        nll: (B,) per-sample answer NLL (with gradient).
        skews: (B,) per-sample Skew (0 for samples without a concept, e.g. task questions).
        max_weight: cap on a sample's weight (None: the paper's uncapped exp(-Skew)).
    Returns:
        Scalar.
    """
    if nll.shape != skews.shape:
        raise ValueError(f"fairness_loss: nll {tuple(nll.shape)} and skews {tuple(skews.shape)} differ")
    return (fairness_weights(skews, max_weight).to(nll.dtype) * nll).mean()
