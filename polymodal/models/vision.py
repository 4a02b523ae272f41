"""ViT image tower."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
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
        self.config = cfg
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

    def patchify(self, pixels: Tensor) -> tuple[Tensor, int, int]:
        """The patch embedding (B, 3, H, W) -> ((B, gh*gw, W), gh, gw), row-major patches.

        Same result as `self.patch_embed(pixels).flatten(2).transpose(1, 2)` (a stride = kernel
        convolution; rows/columns beyond a whole patch are dropped likewise), computed as one matmul
        over the unfolded patches: its weight gradient is a single matmul too, which on CPU is
        several times faster than the convolution backward.
        """
        P, conv = self.config.patch_size, self.patch_embed
        B, C, H, W = pixels.shape
        gh, gw = H // P, W // P
        patches = (pixels[:, :, :gh * P, :gw * P].reshape(B, C, gh, P, gw, P)
                   .permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, C * P * P))            # (B, P, 3*p*p)
        x = F.linear(patches, conv.weight.reshape(conv.out_channels, -1), conv.bias)     # (B, P, W)
        return x, gh, gw

    def no_weight_decay(self) -> set[str]:
        """Parameters AdamW leaves undecayed: the class token and the position embeddings (the patch conv decays)."""
        return {"cls", "pos"}

    def embed(self, pixels: Tensor) -> Tensor:
        """Patch + position embeddings with the CLS token first: (B, 3, H, W) -> (B, 1+P, W)."""
        x, gh, gw = self.patchify(pixels)                             # (B, P, W)
        side = grid_size(self.pos.shape[0] - 1)
        pos = interpolate_positions(self.pos, (side, side), (gh, gw))  # (1+P, W)
        cls = (self.cls + pos[0]).expand(len(x), 1, -1)               # (B, 1, W)
        return torch.cat([cls, x + pos[1:]], dim=1)

    def forward(self, pixels: Tensor, keep: Tensor | None = None, pooled_only: bool = False) -> VisionOutput:
        """Encode images.

        Args:
            pixels: (B, 3, H, W) normalised images; H, W multiples of the patch size.
            keep: optional (B, K) indices of patches to keep (masked modelling); when None and
                training with patch_dropout > 0, a random subset is kept.
            pooled_only: the caller needs only `pooled`; with CLS pooling the last block then
                computes the CLS row alone and `tokens` is empty (B, 0, W).
        Returns:
            VisionOutput with pooled (B, W) and tokens (B, K or P, W).
        """
        x = self.embed(pixels)                                        # (B, 1+P, W)
        P = x.shape[1] - 1
        if keep is None and self.training and self.config.patch_dropout > 0:
            n_keep = max(1, int(P * (1 - self.config.patch_dropout)))
            keep = torch.rand(len(x), P, device=x.device).argsort(dim=1)[:, :n_keep]
        if keep is not None:
            patches = torch.gather(x[:, 1:], 1, keep[..., None].expand(-1, -1, x.shape[-1]))  # (B, K, W)
            x = torch.cat([x[:, :1], patches], dim=1)
        x = self.norm_pre(x)
        if pooled_only and self.config.pool == "cls":
            cls_at = torch.zeros(len(x), 1, dtype=torch.long, device=x.device)
            x = self.norm(self.transformer(x, query_at=cls_at))      # (B, 1, W)
            return VisionOutput(pooled=x[:, 0], tokens=x[:, 1:])
        x = self.transformer(x)                                       # (B, 1+K, W)
        x = self.norm(x)
        pooled = x[:, 0] if self.config.pool == "cls" else x[:, 1:].mean(dim=1)
        return VisionOutput(pooled=pooled, tokens=x[:, 1:])
