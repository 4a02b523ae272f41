"""Dual encoder (CLIP). LoTLIP corner tokens and bilingual vocabularies are configuration, not subclasses."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import DEFAULT_LOGIT_SCALE, ConfigDict, PolymodalModel
from .text import TextConfig, TextOutput, TextTower
from .vision import VisionConfig, VisionTower


@dataclass
class CLIPConfig(ConfigDict):
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 512
    proj_bias: bool = False                  # projections with bias (some imported towers)
    init_logit_scale: float = DEFAULT_LOGIT_SCALE
    max_logit_scale: float = 100.0           # the exp'ed scale is clamped here
    model_type: str = "clip"


@dataclass
class CLIPOutput:
    """image_embeds: (B, E) and text_embeds: (N, E), L2-normalised; logit_scale: exp'ed, clamped scalar."""
    image_embeds: Tensor
    text_embeds: Tensor
    logit_scale: Tensor


class CLIP(PolymodalModel):
    """Image tower + text tower + linear projections into a shared, L2-normalised space."""

    config_class = CLIPConfig

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.config = cfg
        self.visual = VisionTower(cfg.vision)
        self.text = TextTower(cfg.text)
        self.visual_proj = nn.Linear(cfg.vision.width, cfg.embed_dim, bias=cfg.proj_bias)
        self.text_proj = nn.Linear(cfg.text.width, cfg.embed_dim, bias=cfg.proj_bias)
        nn.init.normal_(self.visual_proj.weight, std=cfg.vision.width ** -0.5)
        nn.init.normal_(self.text_proj.weight, std=cfg.text.width ** -0.5)
        self.init_logit_scale(cfg.init_logit_scale)

    def encode_image(self, pixels: Tensor, normalize: bool = True) -> Tensor:
        """(B, 3, H, W) -> (B, E)."""
        x = self.visual_proj(self.visual(pixels, pooled_only=True).pooled)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, ids: Tensor, normalize: bool = True, attention_mask: Tensor | None = None) -> Tensor:
        """(B, L) token ids -> (B, E); uses only the CLS/EOT feature (never the corner tokens)."""
        x = self.text_proj(self.text(ids, attention_mask, pooled_only=True).pooled)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text_readouts(self, ids: Tensor, normalize: bool = True,
                             attention_mask: Tensor | None = None) -> Tensor:
        """(B, L) -> (B, 1+K, E): the CLS/EOT feature followed by the K corner features."""
        out: TextOutput = self.text(ids, attention_mask, pooled_only=True)
        feats = out.pooled[:, None] if out.readouts is None else torch.cat([out.pooled[:, None], out.readouts], 1)
        x = self.text_proj(feats)                                      # (B, 1+K, E)
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, pixels: Tensor, ids: Tensor) -> CLIPOutput:
        return CLIPOutput(self.encode_image(pixels), self.encode_text(ids), self.scale())
