"""CLIP-style contrastive training: the task every dual encoder uses (and LoTLIP/M2 build on)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..losses.contrastive import clip_loss, siglip_loss
from ..train import distributed as dist_utils


@dataclass
class LossConfig:
    kind: str = "infonce"          # "infonce" | "siglip"
    gather: str = "global_with_grad"  # "local" | "global" | "global_with_grad" | "grouped"
    local_loss: bool = True        # logits B x (W*B) instead of (W*B) x (W*B)
    group_size: int = -1           # grouped gather: ranks per group (-1 = all ranks)
    aggregate_nodes: int = 0       # grouped gather: >0 sets the group to this many whole machines


def group_size(loss: LossConfig) -> int:
    """The grouped gather's group size: `loss.aggregate_nodes` whole machines when set, else `loss.group_size`."""
    if loss.gather == "grouped" and loss.aggregate_nodes > 0:
        return dist_utils.group_size_from_nodes(loss.aggregate_nodes)
    return loss.group_size


def trim_padding(ids: Tensor, pad_id: int) -> Tensor:
    """Drop trailing columns that are padding in every row: (B, L) -> (B, L'), saving text compute."""
    if ids.ndim < 2 or ids.shape[-1] == 0:
        return ids
    flat = ids.reshape(-1, ids.shape[-1])
    used = (flat != pad_id).any(dim=0).nonzero()
    keep = int(used.max()) + 1 if len(used) else 1
    return ids[..., :keep]


class ContrastiveTask(nn.Module):
    """Image-text contrastive objective over a dual encoder.

    Args:
        model: anything with `encode_image`, `encode_text` and `scale()` (CLIP, M2Encoder).
        loss: gather mode and loss kind.
    """

    def __init__(self, model: nn.Module, loss: LossConfig):
        super().__init__()
        self.model = model
        self.loss_cfg = loss
        if loss.kind not in ("infonce", "siglip"):
            raise ValueError(f"loss.kind must be 'infonce' or 'siglip', got {loss.kind!r}")
        if loss.kind == "siglip":
            # SigLIP's bias starts at -10 so that the many negatives do not dominate early on.
            self.logit_bias = nn.Parameter(torch.tensor(-10.0))
        self.group_size = group_size(loss)

    def text_ids(self, batch: dict) -> Tensor:
        pad = self.model.config.text.pad_token_id
        return trim_padding(batch["input_ids"], pad)

    def contrastive(self, image: Tensor, text: Tensor) -> Tensor:
        """The configured loss on L2-normalised (B, E) features."""
        c = self.loss_cfg
        if c.kind == "siglip":
            return siglip_loss(image, text, self.model.scale(), self.logit_bias, gather=c.gather)
        return clip_loss(image, text, self.model.scale(), gather=c.gather, local_loss=c.local_loss,
                         group_size=self.group_size)

    def forward(self, batch: dict) -> dict:
        image = self.model.encode_image(batch["pixels"])          # (B, E)
        text = self.model.encode_text(self.text_ids(batch))       # (B, E)
        loss = self.contrastive(image, text)
        return {"loss": loss, "contrastive": loss.detach(), "logit_scale": self.model.scale().detach()}
