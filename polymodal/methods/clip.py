"""CLIP-style contrastive training: the task every dual encoder uses (CLIP, M2-Encoder; LoTLIP builds on it)."""
from __future__ import annotations

from torch import Tensor, nn

from ..data.text import trim_padding
from ..losses.contrastive import LossConfig, build_contrastive_loss
from .base import Method


class ContrastiveTask(nn.Module):
    """Image-text contrastive objective over a dual encoder.

    Args:
        model: anything with `encode_image`, `encode_text` and `scale()` (CLIP, M2Encoder).
        loss: the recipe's `loss` section (kind, gather mode, groups).
    """

    def __init__(self, model: nn.Module, loss: LossConfig | None = None):
        super().__init__()
        self.model = model
        self.loss = build_contrastive_loss(loss)

    def text_ids(self, batch: dict) -> Tensor:
        pad = self.model.config.text.pad_token_id
        return trim_padding(batch["input_ids"], pad)

    def forward(self, batch: dict) -> dict:
        image = self.model.encode_image(batch["pixels"])          # (B, E)
        text = self.model.encode_text(self.text_ids(batch))       # (B, E)
        loss = self.loss(image, text, self.model.scale())
        return {"loss": loss, "contrastive": loss.detach(), "logit_scale": self.model.scale().detach()}


class CLIPMethod(Method):
    """Contrastive training of any dual encoder (`method: clip`, and `method: m2` with an M2 model)."""


__all__ = ["CLIPMethod", "ContrastiveTask", "LossConfig", "trim_padding"]
