"""CLIP-style contrastive training (`method: clip`): the `Method` defaults, i.e. `ContrastiveTask` over any dual encoder
(CLIP, M2-Encoder; LoTLIP builds on it)."""
from __future__ import annotations

from ..data.text import trim_padding
from ..losses.contrastive import LossConfig
from .base import ContrastiveTask, Method


class CLIPMethod(Method):
    """Contrastive training of any dual encoder (`method: clip`, and `method: m2` with an M2 model)."""


__all__ = ["CLIPMethod", "ContrastiveTask", "LossConfig", "trim_padding"]
