"""Temporal modules: turn per-frame features into one video feature.

Three kinds, chosen by `TemporalConfig.kind`:

* "mean": masked mean of the frame embeddings (the zero-shot baseline: an image-text model applied
  frame by frame).
* "transformer": a small transformer over the T frame embeddings with learned time embeddings,
  residual to the frame embeddings, then the masked mean (CLIP4Clip's "seqTransf" idea). Its output
  projection is zero-initialised, so at init it *is* mean pooling.
* "stan": a side branch over the last `stan_layers` blocks of a ViT image tower (STAN, the temporal
  module M2-RAAP builds on; see docs/methods.md, M2-RAAP). Each branch layer attends across frames
  per patch (zero-initialised output, added residually) and then runs a spatial block initialised
  as a copy of the matching image block. It works on token states, so it needs the tower's
  per-layer hidden states (`vision_hidden_states`).

Frame validity masks are (B, T) bool, True = a real frame; padded frames never contribute to a
video feature and are never attended to.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import ConfigError
from .layers import Attention, Block, Transformer, grid_size, init_transformer_, interpolate_positions
from .vision import VisionTower

KINDS = ("mean", "transformer", "stan")


@dataclass
class TemporalConfig:
    kind: str = "mean"            # "mean" | "transformer" | "stan"
    layers: int = 4               # transformer: blocks over the T frame embeddings (CLIP4Clip uses 4)
    heads: int = 0                # 0 = auto: E // 64 (at least 1) for "transformer", the ViT's heads for "stan"
    mlp_ratio: float = 4.0        # transformer: FFN hidden / E
    max_frames: int = 64          # size of the learned time-embedding table (longest clip)
    time_init: float = 0.02       # transformer: std of the time embedding at init (larger = frame order louder at the start)
    dropout: float = 0.0          # on the time-embedded transformer input / the STAN temporal-attention output
    stan_layers: int = 4          # stan: the last N blocks of the ViT get a branch layer (N < the tower's depth)
    stan_pos: bool = True         # stan: the first branch layer re-adds the tower's CLS + position embeddings
    drop_path: float = 0.1        # stan: stochastic depth, linspace(0, drop_path) over the branch layers

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"temporal.kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        for key in ("layers", "max_frames", "stan_layers"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"temporal.{key} must be an integer >= 1, got {value!r}")
        if not isinstance(self.heads, int) or isinstance(self.heads, bool) or self.heads < 0:
            raise ConfigError(f"temporal.heads must be an integer >= 0 (0 = auto), got {self.heads!r}")
        if not self.mlp_ratio > 0:
            raise ConfigError(f"temporal.mlp_ratio must be > 0, got {self.mlp_ratio!r}")
        if not self.time_init >= 0:
            raise ConfigError(f"temporal.time_init must be >= 0, got {self.time_init!r}")
        for key in ("dropout", "drop_path"):
            value = getattr(self, key)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"temporal.{key} must be in [0, 1), got {value!r}")


def masked_mean(x: Tensor, valid: Tensor | None = None) -> Tensor:
    """Mean over dim 1 of the rows that are valid.

    Args:
        x: (B, T, E) frame features.
        valid: (B, T) bool, True = real frame; None = all frames.
    Returns:
        (B, E). A video with no valid frame gives zeros (not NaN).
    """
    if valid is None:
        return x.mean(dim=1)
    w = valid.to(x.dtype)[..., None]                                  # (B, T, 1)
    return (x * w).sum(dim=1) / w.sum(dim=1).clamp(min=1.0)


def check_frames(T: int, max_frames: int) -> None:
    """A clip longer than the time-embedding table is an error that says which key to raise."""
    if T > max_frames:
        raise ValueError(f"the clip has {T} frames but the time embedding has {max_frames} positions; "
                         f"sample fewer frames or raise temporal.max_frames")


def _attention_mask(valid: Tensor | None) -> Tensor | None:
    """(B, T) valid -> (B, 1, 1, T) key mask for SDPA. A row without any valid frame attends to all
    frames (its output is masked away later) so that softmax never sees an all-masked row (NaN)."""
    if valid is None:
        return None
    valid = valid.bool()
    valid = valid | ~valid.any(dim=1, keepdim=True)
    return valid[:, None, None, :]


class MeanPool(nn.Module):
    """(B, T, E) frame embeddings (+ optional (B, T) valid mask) -> (B, E) masked mean."""

    def forward(self, x: Tensor, valid: Tensor | None = None) -> Tensor:
        return masked_mean(x, valid)


class TemporalTransformer(nn.Module):
    """Transformer over frame embeddings, residual to them, then the masked mean.

    out_t = x_t + proj(norm(Transformer(x + time)_t)), video = masked mean of out_t.
    `proj` is zero-initialised (weight and bias): at init the residual branch adds exactly 0, so the
    module equals mean pooling and fine-tuning starts from the zero-shot baseline; the gradient
    reaches `proj` at once (its input is not zero) and the transformer right after.

    Args:
        dim: embedding size E of the frame features.
        cfg: the temporal config (layers, heads, mlp_ratio, max_frames, dropout).
    """

    def __init__(self, dim: int, cfg: TemporalConfig):
        super().__init__()
        heads = cfg.heads or max(1, dim // 64)
        if dim % heads:
            raise ConfigError(f"temporal.heads={heads} does not divide the embedding size {dim}")
        self.max_frames = cfg.max_frames
        self.time = nn.Parameter(torch.randn(cfg.max_frames, dim) * cfg.time_init)   # (max_frames, E)
        self.drop = nn.Dropout(cfg.dropout)
        self.transformer = Transformer(dim, cfg.layers, heads, cfg.mlp_ratio)
        init_transformer_(self.transformer, dim, cfg.layers)
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameters AdamW leaves undecayed: the time (frame-position) embeddings."""
        return {"time"}

    def forward(self, x: Tensor, valid: Tensor | None = None) -> Tensor:
        """x: (B, T, E), valid: (B, T) bool or None -> (B, E)."""
        T = x.shape[1]
        check_frames(T, self.max_frames)
        h = self.drop(x + self.time[:T])                              # (B, T, E)
        h = self.transformer(h, attn_mask=_attention_mask(valid))     # (B, T, E)
        out = x + self.proj(self.norm(h))                             # (B, T, E)
        return masked_mean(out, valid)


# ---------------------------------------------------------------- STAN

def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth: zero whole rows (dim 0) of a residual with probability p, rescale the rest."""
    if p == 0.0 or not training:
        return x
    keep = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), device=x.device, dtype=x.dtype) >= p
    return x * keep / (1 - p)


def sample_keep(n: int, num_patches: int, patch_dropout: float, device) -> Tensor:
    """Random patch indices to keep, as VisionTower samples them for patch dropout: (n, K)."""
    n_keep = max(1, int(num_patches * (1 - patch_dropout)))
    return torch.rand(n, num_patches, device=device).argsort(dim=1)[:, :n_keep]


def tower_embeddings(tower: VisionTower, pixels: Tensor, keep: Tensor | None = None) -> Tensor:
    """The tower's token embeddings (before `norm_pre`) with `keep` applied: (N, 3, H, W) -> (N, 1+K, W)."""
    x = tower.embed(pixels)                                           # (N, 1+P, W)
    if keep is not None:
        patches = torch.gather(x[:, 1:], 1, keep[..., None].expand(-1, -1, x.shape[-1]))  # (N, K, W)
        x = torch.cat([x[:, :1], patches], dim=1)
    return x


def vision_hidden_states(tower: VisionTower, pixels: Tensor, keep: Tensor | None = None) -> list[Tensor]:
    """Run a VisionTower's blocks and return every layer's token states.

    Re-implements `VisionTower.forward` from the tower's own submodules (embed, norm_pre, blocks),
    without the final norm and without random patch dropout: pass `keep` to drop patches.

    Args:
        tower: the image tower.
        pixels: (N, 3, H, W) normalised images.
        keep: optional (N, K) indices of the patches to keep.
    Returns:
        [h_0, ..., h_L]: L + 1 tensors (N, 1+K, W); h_0 is the block input (after `norm_pre`),
        h_l the output of block l.
    """
    x = tower.norm_pre(tower_embeddings(tower, pixels, keep))       # (N, 1+K, W)
    states = [x]
    ckpt = tower.transformer.grad_checkpointing and tower.training
    for block in tower.transformer.blocks:
        if ckpt:
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
        else:
            x = block(x)                                              # (N, 1+K, W)
        states.append(x)
    return states


class TemporalAttention(nn.Module):
    """Pre-LN self-attention across frames, per token position; zero-initialised output projection.

    Args:
        dim: token width D; heads: attention heads; dropout: on the attention output.
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads)
        self.drop = nn.Dropout(dropout)
        # Zero output projection: the branch layer starts as its spatial block alone.
        nn.init.zeros_(self.attn.out.weight)
        nn.init.zeros_(self.attn.out.bias)

    def forward(self, x: Tensor, T: int, valid: Tensor | None = None) -> Tensor:
        """x: (B*T, L, D) tokens of T frames per video -> (B*T, L, D) the residual update (not added)."""
        BT, L, D = x.shape
        B = BT // T
        h = self.norm(x).view(B, T, L, D).transpose(1, 2).reshape(B * L, T, D)   # (B*L, T, D)
        mask = _attention_mask(valid)                                             # (B, 1, 1, T)
        if mask is not None:
            mask = mask.repeat_interleave(L, dim=0)                               # (B*L, 1, 1, T)
        h = self.drop(self.attn(h, attn_mask=mask))                               # (B*L, T, D)
        return h.view(B, L, T, D).transpose(1, 2).reshape(BT, L, D)               # (B*T, L, D)


def spatial_block(block: Block, x: Tensor, p: float, training: bool) -> Tensor:
    """A pre-LN `Block` (no cross-attention) forward with stochastic depth on both residuals.
    `Block.forward` has no drop-path argument, so this is written from its submodules."""
    x = x + drop_path(block.attn(block.norm1(x)), p, training)
    return x + drop_path(block.mlp(block.norm2(x)), p, training)


class STANBranch(nn.Module):
    """STAN temporal side branch over the last `cfg.stan_layers` blocks of a ViT.

    With the tower's hidden states h_0..h_L and start = L - n (n = stan_layers):
        z_in  = h_start + time_t (+ the tower's CLS/position embeddings when stan_pos)
        z_1   = S_0(z_in + T_0(z_in))
        z_i+1 = S_i(u + T_i(u)),  u = z_i + h_start+i      (i = 1 .. n-1)
    T_i: temporal attention per patch across frames (zero-initialised output), S_i: a spatial block
    initialised as a deep copy of tower block start+i, both with drop path linspace(0, drop_path).
    The caller forms the frame feature from h_L + z_n (tower CLS + branch CLS) -> tower norm ->
    projection. The time embedding starts at zero (as in STAN/TimeSformer), so with stan_pos off
    and one branch layer the branch at init reproduces the image model: z_1 = h_L, and
    norm(2 h_L) = norm(h_L) up to the LayerNorm eps.

    Args:
        tower: the image tower whose blocks are copied (it is not stored here).
        cfg: the temporal config.
    """

    def __init__(self, tower: VisionTower, cfg: TemporalConfig):
        super().__init__()
        L, D = tower.config.layers, tower.config.width
        if cfg.stan_layers >= L:
            # The branch reads an intermediate layer's output, as STAN does (the last 4 of 12 ViT-B blocks). Over
            # every block it would start at the embeddings, which already hold the CLS/position embeddings that
            # its first layer re-adds (twice), and copy the whole tower.
            fix = f"use temporal.stan_layers <= {L - 1}" if L > 1 else "use temporal.kind=transformer (or mean)"
            raise ConfigError(f"temporal.stan_layers={cfg.stan_layers} must be below the image tower's {L} layers (the "
                              f"branch starts after at least one image block; at layer 0 it would add the position "
                              f"embeddings twice); {fix}")
        heads = cfg.heads or tower.config.heads
        if D % heads:
            raise ConfigError(f"temporal.heads={heads} does not divide the vision width {D}")
        self.start = L - cfg.stan_layers
        self.max_frames = cfg.max_frames
        self.use_pos = cfg.stan_pos
        self.time = nn.Parameter(torch.zeros(cfg.max_frames, D))                 # (max_frames, D)
        self.temporal = nn.ModuleList(TemporalAttention(D, heads, cfg.dropout, tower.config.norm_eps)
                                      for _ in range(cfg.stan_layers))
        self.spatial = nn.ModuleList(copy.deepcopy(tower.transformer.blocks[self.start + i])
                                     for i in range(cfg.stan_layers))
        n = cfg.stan_layers   # linspace(0, drop_path) in plain floats (works on the meta device too)
        self.drop_path = [cfg.drop_path * i / max(1, n - 1) for i in range(n)]

    def position_embeddings(self, tower: VisionTower, gh: int, gw: int, keep: Tensor | None) -> Tensor:
        """The tower's CLS + position embeddings for a (gh, gw) grid, rows of `keep`: (1 or N, 1+K, D)."""
        side = grid_size(tower.pos.shape[0] - 1)
        pos = interpolate_positions(tower.pos, (side, side), (gh, gw))             # (1+P, D)
        cls = (tower.cls + pos[0])[None, None]                                     # (1, 1, D)
        patches = pos[1:][None]                                                    # (1, P, D)
        if keep is not None:
            patches = patches.expand(len(keep), -1, -1)
            patches = torch.gather(patches, 1, keep[..., None].expand(-1, -1, pos.shape[-1]))  # (N, K, D)
            cls = cls.expand(len(keep), -1, -1)
        return torch.cat([cls, patches], dim=1)

    def no_weight_decay(self) -> set[str]:
        """Parameters AdamW leaves undecayed: the time (frame-position) embeddings."""
        return {"time"}

    def forward(self, states: list[Tensor], T: int, valid: Tensor | None = None,
                pos: Tensor | None = None) -> Tensor:
        """Run the branch.

        Args:
            states: the tower's hidden states [h_0, ..., h_L], each (B*T, 1+K, D), frames of a video
                consecutive (as `frames.flatten(0, 1)` gives them).
            T: frames per video.
            valid: (B, T) bool or None.
            pos: (1 or B*T, 1+K, D) CLS + position embeddings to re-add (`position_embeddings`), or None.
        Returns:
            (B*T, 1+K, D) the branch output z_n (add h_L before the final norm).
        """
        check_frames(T, self.max_frames)
        BT, L1, D = states[-1].shape
        time = self.time[:T].repeat(BT // T, 1)[:, None]                          # (B*T, 1, D)
        z = states[self.start] + time                                             # (B*T, 1+K, D)
        if self.use_pos and pos is not None:
            z = z + pos
        for i, (temporal, spatial) in enumerate(zip(self.temporal, self.spatial)):
            if i > 0:
                z = z + states[self.start + i]                                    # (B*T, 1+K, D)
            p = self.drop_path[i]
            z = z + drop_path(temporal(z, T, valid), p, self.training)
            z = spatial_block(spatial, z, p, self.training)                       # (B*T, 1+K, D)
        return z


def build_temporal(cfg: TemporalConfig, embed_dim: int, tower: VisionTower | None = None) -> nn.Module:
    """The temporal module for `cfg.kind`: MeanPool, TemporalTransformer(embed_dim) or STANBranch(tower).

    Raises:
        ConfigError: kind "stan" without a ViT tower.
    """
    if cfg.kind == "mean":
        return MeanPool()
    if cfg.kind == "transformer":
        return TemporalTransformer(embed_dim, cfg)
    if not isinstance(tower, VisionTower):
        raise ConfigError("temporal.kind='stan' needs a ViT image tower (a CLIP model's `visual`); this model "
                         "has none (e.g. M2-Encoder); use temporal.kind=transformer or mean instead")
    return STANBranch(tower, cfg)
