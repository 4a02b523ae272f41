"""Multi-label losses on (N, C) logits with 0/1 targets: asymmetric loss (ASL) and a pairwise ranking loss.

Pure functions first, thin modules second (as in ``contrastive.py``).

* ASL (Ridnik et al., "Asymmetric Loss For Multi-Label Classification", ICCV 2021). With
  ``p = sigmoid(logit)`` and the shifted probability ``p_m = max(p - clip, 0)`` for negatives::

      L+ = (1 - p)^gamma_pos * log(p)            for y = 1
      L- = p_m^gamma_neg * log(1 - p_m)          for y = 0
      loss = -sum_c [y L+ + (1 - y) L-]

  ``gamma_pos = gamma_neg = 0, clip = 0`` is plain binary cross-entropy. Shifting discards very
  easy negatives (``p <= clip`` gives exactly zero loss and gradient), which matters when most of
  the C labels are absent from a sample. The focusing weights are treated as constants in the
  backward pass only when ``detach_focusing=True`` (the reference code offers both; default: the
  plain formula, fully differentiated).
* Ranking: a hinge on every (positive, negative) pair of a sample,
  ``max(0, margin - s_pos + s_neg)``, averaged over the sample's pairs. Samples without a
  positive or without a negative have no pair and are left out of the batch mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

REDUCTIONS = ("mean", "sum", "none")


def _check(logits: Tensor, targets: Tensor) -> Tensor:
    if logits.dim() != 2 or logits.shape != targets.shape:
        raise ValueError(f"logits and targets must both be (N, C), got {tuple(logits.shape)} and {tuple(targets.shape)}")
    return targets.to(logits.dtype)


def _reduce(per_sample: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "none":
        return per_sample
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def asymmetric_loss(logits: Tensor, targets: Tensor, gamma_neg: float = 4.0, gamma_pos: float = 0.0,
                    clip: float = 0.05, eps: float = 1e-8, reduction: str = "mean",
                    detach_focusing: bool = False) -> Tensor:
    """Asymmetric loss (ASL) summed over classes.

    Args:
        logits: (N, C) raw scores.
        targets: (N, C) 0/1 (float or bool).
        gamma_neg: focusing exponent for negatives (down-weights easy negatives).
        gamma_pos: focusing exponent for positives.
        clip: probability margin ``m`` for negatives, ``p_m = max(p - m, 0)``; 0 switches shifting off.
        eps: floor inside the logarithms.
        reduction: ``"mean"`` over samples (of the per-sample sum over classes), ``"sum"``, or
            ``"none"`` for the (N,) per-sample losses.
        detach_focusing: treat the focusing weights as constants in the backward pass.

    Returns:
        A scalar, or (N,) with ``reduction="none"``.
    """
    y = _check(logits, targets)
    p = torch.sigmoid(logits)                                          # (N, C)
    p_m = (p - clip).clamp(min=0) if clip > 0 else p
    log_pos = torch.log(p.clamp(min=eps))
    log_neg = torch.log((1 - p_m).clamp(min=eps))
    w_pos = (1 - p) ** gamma_pos if gamma_pos else torch.ones_like(p)
    w_neg = p_m ** gamma_neg if gamma_neg else torch.ones_like(p)
    if detach_focusing:
        w_pos, w_neg = w_pos.detach(), w_neg.detach()
    loss = -(y * w_pos * log_pos + (1 - y) * w_neg * log_neg)          # (N, C)
    return _reduce(loss.sum(1), reduction)


def ranking_loss(logits: Tensor, targets: Tensor, margin: float = 1.0, reduction: str = "mean") -> Tensor:
    """Pairwise hinge ranking loss: every present label should score ``margin`` above every absent one.

    Args:
        logits: (N, C) scores.
        targets: (N, C) 0/1.
        margin: required gap between a positive and a negative score.
        reduction: ``"mean"`` over samples that have at least one (positive, negative) pair,
            ``"sum"`` over those samples, or ``"none"`` for (N,) per-sample means (0 without pairs).

    Returns:
        A scalar (0 when no sample has a pair), or (N,) with ``reduction="none"``.
    """
    y = _check(logits, targets)
    # diff[n, i, j] = margin - s_i + s_j for i positive, j negative.
    hinge = F.relu(margin - logits.unsqueeze(2) + logits.unsqueeze(1))  # (N, C, C)
    pair = y.unsqueeze(2) * (1 - y).unsqueeze(1)                       # (N, C, C) 1 on (pos, neg)
    n_pairs = pair.sum((1, 2))                                         # (N,)
    per_sample = (hinge * pair).sum((1, 2)) / n_pairs.clamp(min=1)     # (N,)
    if reduction == "none":
        return per_sample
    has = n_pairs > 0
    if not has.any():
        return logits.sum() * 0.0                                      # keeps the graph
    return _reduce(per_sample[has], reduction)


class AsymmetricLoss(nn.Module):
    """Module form of :func:`asymmetric_loss` (same arguments, fixed at construction)."""

    def __init__(self, gamma_neg: float = 4.0, gamma_pos: float = 0.0, clip: float = 0.05, eps: float = 1e-8,
                 reduction: str = "mean", detach_focusing: bool = False):
        super().__init__()
        self.kwargs = dict(gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip, eps=eps, reduction=reduction,
                           detach_focusing=detach_focusing)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        return asymmetric_loss(logits, targets, **self.kwargs)


class RankingLoss(nn.Module):
    """Module form of :func:`ranking_loss`."""

    def __init__(self, margin: float = 1.0, reduction: str = "mean"):
        super().__init__()
        self.margin, self.reduction = margin, reduction

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        return ranking_loss(logits, targets, self.margin, self.reduction)
