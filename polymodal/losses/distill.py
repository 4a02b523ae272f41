"""Multi-label scene losses and self-distillation between streams.

* `multilabel_softmax_loss`: over the positive set P and negative set N of a sample,
  ``log(1 + sum_{j in N} e^{z_j}) + log(1 + sum_{i in P} e^{-z_i})``. Zero is the decision boundary
  (the loss pushes positives above 0 and negatives below it), so a threshold of 0 on the logits is its
  natural operating point. A row without positives has a second term of log(1 + 0) = 0 (and a row without
  negatives a first term of 0): such rows are fine and need no special case.
* `multilabel_loss(kind=...)`: that loss, or ASL / BCE from `losses.multilabel`.
* `distillation_kl`: KL(teacher || student) at temperature tau, the teacher detached, times tau^2 (so
  gradient sizes do not shrink with tau). `kind="softmax"` treats the C scores of a sample as one
  distribution (softmax over labels); `kind="bernoulli"` compares each label's sigmoid separately
  (a sum over labels of two-outcome KLs).
* `self_distillation`: every stream towards the detached mean of all streams' logits (the ensemble).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .multilabel import asymmetric_loss

LOSS_KINDS = ("softmax", "asl", "bce")
DISTILL_KINDS = ("softmax", "bernoulli")


def _check(logits: Tensor, targets: Tensor) -> Tensor:
    if logits.dim() != 2 or logits.shape != targets.shape:
        raise ValueError(f"logits and targets must both be (N, C), got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}")
    return targets.to(torch.bool)


def _log1p_sum_exp(x: Tensor, mask: Tensor) -> Tensor:
    """log(1 + sum over the masked entries of e^x), per row, stably: logsumexp over [0, x_masked]."""
    x = x.masked_fill(~mask, float("-inf"))                        # (N, C)
    zero = torch.zeros_like(x[:, :1])                              # (N, 1): the "1 +"
    return torch.logsumexp(torch.cat([zero, x], dim=1), dim=1)     # (N,)


def multilabel_softmax_loss(logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    """log(1 + sum_neg e^{z}) + log(1 + sum_pos e^{-z}) per sample.

    Args:
        logits: (N, C) scores.
        targets: (N, C) 0/1.
        reduction: "mean" over samples, "sum", or "none" for (N,).
    Returns:
        A scalar, or (N,).
    """
    y = _check(logits, targets)
    loss = _log1p_sum_exp(logits, ~y) + _log1p_sum_exp(-logits, y)   # (N,)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be one of mean, sum, none, got {reduction!r}")


def multilabel_loss(logits: Tensor, targets: Tensor, kind: str = "softmax", gamma_neg: float = 4.0,
                    gamma_pos: float = 0.0, clip: float = 0.05) -> Tensor:
    """The scene classifier loss of `kind`, mean over samples.

    Args:
        logits: (N, C). targets: (N, C) 0/1.
        kind: "softmax" (`multilabel_softmax_loss`), "asl" (`asymmetric_loss` with the gammas and clip) or
            "bce" (binary cross-entropy summed over labels: ASL with no focusing and no shift).
        gamma_neg, gamma_pos, clip: ASL settings.
    Returns:
        A scalar.
    """
    if kind == "softmax":
        return multilabel_softmax_loss(logits, targets)
    if kind == "asl":
        return asymmetric_loss(logits, targets.to(logits.dtype), gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip)
    if kind == "bce":
        _check(logits, targets)
        return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), reduction="none").sum(1).mean()
    raise ValueError(f"loss kind must be one of {', '.join(LOSS_KINDS)}, got {kind!r}")


def distillation_kl(student: Tensor, teacher: Tensor, tau: float = 2.0, kind: str = "softmax") -> Tensor:
    """tau^2 * KL(teacher || student) on (N, C) logits at temperature tau, mean over samples.

    The teacher is detached here, so no gradient reaches whatever produced it.

    Args:
        student: (N, C) logits that receive the gradient.
        teacher: (N, C) target logits.
        tau: temperature (> 0).
        kind: "softmax" (one distribution over the C labels) or "bernoulli" (per-label sigmoids, summed).
    Returns:
        A scalar >= 0 (0 when student equals teacher).
    """
    if student.shape != teacher.shape or student.dim() != 2:
        raise ValueError(f"student and teacher must both be (N, C), got {tuple(student.shape)} and "
                         f"{tuple(teacher.shape)}")
    if not tau > 0:
        raise ValueError(f"distillation temperature must be > 0, got {tau}")
    t = teacher.detach() / tau
    s = student / tau
    if kind == "softmax":
        kl = F.kl_div(F.log_softmax(s, dim=1), F.log_softmax(t, dim=1), reduction="none", log_target=True).sum(1)
    elif kind == "bernoulli":
        # KL(Bern(q) || Bern(p)) with log-probabilities from logsigmoid (stable for large |logits|).
        lq, lnq = F.logsigmoid(t), F.logsigmoid(-t)
        lp, lnp = F.logsigmoid(s), F.logsigmoid(-s)
        kl = (lq.exp() * (lq - lp) + lnq.exp() * (lnq - lnp)).sum(1)
    else:
        raise ValueError(f"distillation kind must be one of {', '.join(DISTILL_KINDS)}, got {kind!r}")
    return tau * tau * kl.mean()


def self_distillation(stream_logits: list[Tensor], tau: float = 2.0, kind: str = "softmax") -> tuple[Tensor, Tensor]:
    """Each stream towards the detached ensemble (the mean of all streams' logits).

    Args:
        stream_logits: S tensors (N, C).
        tau, kind: see `distillation_kl`.
    Returns:
        (the mean over streams of their KL terms, the detached ensemble logits (N, C)).
    """
    if not stream_logits:
        raise ValueError("self_distillation needs at least one stream")
    ensemble = torch.stack(stream_logits).mean(0).detach()         # (N, C): a target, never trained through
    loss = sum(distillation_kl(z, ensemble, tau, kind) for z in stream_logits) / len(stream_logits)
    return loss, ensemble


__all__ = ["multilabel_softmax_loss", "multilabel_loss", "distillation_kl", "self_distillation", "LOSS_KINDS",
           "DISTILL_KINDS"]
