"""ViT image tower."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .layers import Transformer, grid_size, init_transformer_, interpolate_positions


@dataclass
class VisionConfig:
    image_size: int = 224
    patch_size: int = 32
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    act: str = "gelu"             # "quick_gelu" for the OpenAI CLIP weights
    patch_bias: bool = False      # conv patch embedding with bias (timm ViTs) or without (CLIP)
    ln_pre: bool = True           # LayerNorm after embeddings (CLIP) or not (timm ViT)
    norm_eps: float = 1e-5
    pool: str = "cls"             # "cls" | "mean" (mean of patch tokens)
    patch_dropout: float = 0.0    # fraction of patches dropped at training time (FLIP-style)


@dataclass
class VisionOutput:
    """pooled: (B, W) pooled feature before projection; tokens: (B, P, W) patch tokens after the final norm."""
    pooled: Tensor
    tokens: Tensor


class VisionTower(nn.Module):
    """Vision transformer: conv patches, CLS token, learned positions, pre-LN blocks, final norm."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.pool not in ("cls", "mean"):
            raise ValueError(f"vision.pool must be 'cls' or 'mean', got {cfg.pool!r}")
        W = cfg.width
        self.grid = cfg.image_size // cfg.patch_size
        self.patch_embed = nn.Conv2d(3, W, cfg.patch_size, cfg.patch_size, bias=cfg.patch_bias)
        self.cls = nn.Parameter(torch.randn(W) * W ** -0.5)
        self.pos = nn.Parameter(torch.randn(1 + self.grid ** 2, W) * W ** -0.5)
        self.norm_pre = nn.LayerNorm(W, eps=cfg.norm_eps) if cfg.ln_pre else nn.Identity()
        self.transformer = Transformer(W, cfg.layers, cfg.heads, cfg.mlp_ratio, cfg.act, eps=cfg.norm_eps)
        self.norm = nn.LayerNorm(W, eps=cfg.norm_eps)
        init_transformer_(self.transformer, W, cfg.layers)

    def embed(self, pixels: Tensor) -> Tensor:
        """Patch + position embeddings with the CLS token first: (B, 3, H, W) -> (B, 1+P, W)."""
        x = self.patch_embed(pixels)                                  # (B, W, gh, gw)
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)                              # (B, P, W)
        side = grid_size(self.pos.shape[0] - 1)
        pos = interpolate_positions(self.pos, (side, side), (gh, gw))  # (1+P, W)
        cls = (self.cls + pos[0]).expand(len(x), 1, -1)               # (B, 1, W)
        return torch.cat([cls, x + pos[1:]], dim=1)

    def forward(self, pixels: Tensor, keep: Tensor | None = None) -> VisionOutput:
        """Encode images.

        Args:
            pixels: (B, 3, H, W) normalised images; H, W multiples of the patch size.
            keep: optional (B, K) indices of patches to keep (masked modelling); when None and
                training with patch_dropout > 0, a random subset is kept.
        Returns:
            VisionOutput with pooled (B, W) and tokens (B, K or P, W).
        """
        x = self.embed(pixels)                                        # (B, 1+P, W)
        P = x.shape[1] - 1
        if keep is None and self.training and self.cfg.patch_dropout > 0:
            n_keep = max(1, int(P * (1 - self.cfg.patch_dropout)))
            keep = torch.rand(len(x), P, device=x.device).argsort(dim=1)[:, :n_keep]
        if keep is not None:
            patches = torch.gather(x[:, 1:], 1, keep[..., None].expand(-1, -1, x.shape[-1]))  # (B, K, W)
            x = torch.cat([x[:, :1], patches], dim=1)
        x = self.norm_pre(x)
        x = self.transformer(x)                                       # (B, 1+K, W)
        x = self.norm(x)
        pooled = x[:, 0] if self.cfg.pool == "cls" else x[:, 1:].mean(dim=1)
        return VisionOutput(pooled=pooled, tokens=x[:, 1:])
