"""Learning-rate schedules as pure functions of the step (so a resumed run needs no scheduler state)."""
from __future__ import annotations

import math

SCHEDULES = ("cosine", "constant")   # the values `optim.schedule` may take


def lr_at(step: int, base_lr: float, total_steps: int, warmup_steps: int = 0,
          schedule: str = "cosine", min_lr_ratio: float = 0.0) -> float:
    """Learning rate for optimizer step `step` (0-based).

    Args:
        step: the optimizer step about to be taken.
        base_lr: peak learning rate.
        total_steps: length of the run in optimizer steps.
        warmup_steps: linear warm-up from base_lr / warmup_steps to base_lr.
        schedule: "cosine" (to min_lr_ratio * base_lr at the end) or "constant".
        min_lr_ratio: floor of the cosine as a fraction of base_lr.
    Returns:
        The learning rate.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    if schedule != "cosine":
        raise ValueError(f"optim.schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    floor = base_lr * min_lr_ratio
    return floor + (base_lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))
