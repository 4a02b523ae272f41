"""The ASD fairness loss (arXiv 2408.06569): E = mean_i exp(-Skew(P_i)) * L_AR(i).

L_AR(i) is sample i's answer-token NLL and Skew(P_i) its skew (see `polymodal.eval.fairness.sample_skew`):
over-represented (concept, attribute value) pairs (Skew > 0) are down-weighted, under-represented ones
(Skew < 0) up-weighted. The weights are constants of the step (no gradient flows into the skew).
"""
from __future__ import annotations

import torch
from torch import Tensor


def fairness_weights(skews: Tensor) -> Tensor:
    """exp(-Skew) per sample, detached: (B,) -> (B,)."""
    return torch.exp(-skews.detach().float())


def fairness_loss(nll: Tensor, skews: Tensor) -> Tensor:
    """mean_i exp(-Skew_i) * nll_i.

    Args:
        nll: (B,) per-sample answer NLL (with gradient).
        skews: (B,) per-sample Skew (0 for samples without a concept, e.g. task questions).
    Returns:
        Scalar.
    """
    if nll.shape != skews.shape:
        raise ValueError(f"fairness_loss: nll {tuple(nll.shape)} and skews {tuple(skews.shape)} differ")
    return (fairness_weights(skews).to(nll.dtype) * nll).mean()
