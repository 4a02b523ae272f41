"""Pairwise preference losses for reward models (Hummer; docs/methods.md)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["bradley_terry_loss"]


def bradley_terry_loss(r_chosen: Tensor, r_rejected: Tensor, margin: Tensor | None = None,
                       center_coefficient: float = 0.0) -> Tensor:
    """mean(-log sigmoid(r_w - r_l - margin)) + c * mean((r_w + r_l)^2), TRL's RewardTrainer form.

    Args:
        r_chosen: (B,) rewards of the preferred responses.
        r_rejected: (B,) rewards of the other responses.
        margin: (B,) or None; subtracted inside the sigmoid (a pair must win by at least this much).
        center_coefficient: c, TRL's `center_rewards_coefficient` (pulls rewards towards zero mean); 0 = off.
    Returns:
        Scalar loss.
    """
    diff = r_chosen - r_rejected                                          # (B,)
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    if center_coefficient:
        loss = loss + center_coefficient * ((r_chosen + r_rejected) ** 2).mean()
    return loss
