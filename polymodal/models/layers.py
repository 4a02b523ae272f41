"""Transformer building blocks shared by every tower.

Attention uses `F.scaled_dot_product_attention` with a fused qkv projection (one matmul instead of
three). Blocks are pre-LN by default (CLIP, ViT); `norm_first=False` gives post-LN blocks so BERT-style
text towers load exactly.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def quick_gelu(x: Tensor) -> Tensor:
    """The sigmoid approximation of GELU used by the OpenAI CLIP weights."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": quick_gelu,
    "relu": F.relu,
}


def activation(name: str):
    """Return the activation function called `name` (a clear error for unknown names)."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}") from None


class Attention(nn.Module):
    """Multi-head attention with a fused qkv projection.

    Args:
        dim: model width D.
        heads: number of heads; D must divide evenly.
        bias: whether the projections have biases.
    """

    def __init__(self, dim: int, heads: int, bias: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.out = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False,
                context: Tensor | None = None, context_mask: Tensor | None = None,
                query_at: Tensor | None = None) -> Tensor:
        """Self-attention over `x`, or cross-attention to `context` when it is given.

        Args:
            x: (B, L, D) queries (and keys/values for self-attention).
            attn_mask: bool (True = may attend) or additive float mask broadcastable to (B, H, L, S).
            is_causal: use a causal mask (only when attn_mask is None).
            context: (B, S, D) keys/values for cross-attention (then the qkv weights split into q | kv).
            context_mask: (B, S) bool, True = real token, for cross-attention.
            query_at: (B, Q) positions; self-attention then computes only these Q query rows
                (keys/values still come from all of `x`), e.g. a last block whose only use is a
                pooled token. The masks keep their meaning for those rows.
        Returns:
            (B, L, D), or (B, Q, D) with `query_at`.
        """
        B, L, D = x.shape
        H = self.heads
        if query_at is not None and context is None:
            Q = query_at.shape[1]
            w_q, w_kv = self.qkv.weight.split([D, 2 * D])
            b_q, b_kv = self.qkv.bias.split([D, 2 * D]) if self.qkv.bias is not None else (None, None)
            q = F.linear(_rows(x, query_at), w_q, b_q).view(B, Q, H, D // H).transpose(1, 2)  # (B, H, Q, Dh)
            k, v = F.linear(x, w_kv, b_kv).view(B, L, 2, H, D // H).permute(2, 0, 3, 1, 4)      # (B, H, L, Dh)
            if attn_mask is not None and attn_mask.shape[-2] != 1:
                # A per-query mask: keep the rows of the chosen queries.
                m = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
                m = m.expand(B, m.shape[1], L, m.shape[-1])                                   # (B, h, L, L)
                attn_mask = torch.gather(m, 2, query_at[:, None, :, None].expand(-1, m.shape[1], -1, m.shape[-1]))
            elif attn_mask is None and is_causal:
                keys = torch.arange(L, device=x.device)
                attn_mask = (keys[None, None, :] <= query_at[:, :, None])[:, None]       # (B, 1, Q, L)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)            # (B, H, Q, Dh)
            return self.out(y.transpose(1, 2).reshape(B, Q, D))
        if context is None:
            q, k, v = self.qkv(x).view(B, L, 3, H, D // H).permute(2, 0, 3, 1, 4)  # 3 x (B, H, L, Dh)
        else:
            w_q, w_kv = self.qkv.weight.split([D, 2 * D])
            b_q, b_kv = self.qkv.bias.split([D, 2 * D]) if self.qkv.bias is not None else (None, None)
            S = context.shape[1]
            q = F.linear(x, w_q, b_q).view(B, L, H, D // H).transpose(1, 2)              # (B, H, L, Dh)
            k, v = F.linear(context, w_kv, b_kv).view(B, S, 2, H, D // H).permute(2, 0, 3, 1, 4)
            if context_mask is not None:
                attn_mask = context_mask[:, None, None, :]                                 # (B, 1, 1, S)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           is_causal=is_causal and attn_mask is None)     # (B, H, L, Dh)
        return self.out(y.transpose(1, 2).reshape(B, L, D))


class MLP(nn.Module):
    """Two-layer feed-forward network: fc1 -> act -> fc2."""

    def __init__(self, dim: int, hidden: int, act: str = "gelu"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = activation(act)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Transformer block, pre-LN (`norm_first=True`) or post-LN (BERT).

    With `cross_attention=True` a cross-attention sub-layer (to a `context`) follows self-attention,
    as in captioning decoders.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, act: str = "gelu",
                 norm_first: bool = True, eps: float = 1e-5, cross_attention: bool = False):
        super().__init__()
        self.norm_first = norm_first
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads)
        self.cross = Attention(dim, heads) if cross_attention else None
        self.norm_cross = nn.LayerNorm(dim, eps=eps) if cross_attention else None
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio), act)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False,
                context: Tensor | None = None, context_mask: Tensor | None = None,
                query_at: Tensor | None = None) -> Tensor:
        """x: (B, L, D) -> (B, L, D); with `query_at` (B, Q) only those rows: (B, Q, D)."""
        if self.norm_first:
            h = self.attn(self.norm1(x), attn_mask, is_causal, query_at=query_at)
            x = (x if query_at is None else _rows(x, query_at)) + h
            if self.cross is not None:
                x = x + self.cross(self.norm_cross(x), context=context, context_mask=context_mask)
            return x + self.mlp(self.norm2(x))
        h = self.attn(x, attn_mask, is_causal, query_at=query_at)
        x = self.norm1((x if query_at is None else _rows(x, query_at)) + h)
        if self.cross is not None:
            x = self.norm_cross(x + self.cross(x, context=context, context_mask=context_mask))
        return self.norm2(x + self.mlp(x))


def _rows(x: Tensor, at: Tensor) -> Tensor:
    """x (B, L, D), at (B, Q) -> (B, Q, D): the rows of x at positions `at`."""
    return torch.gather(x, 1, at[..., None].expand(-1, -1, x.shape[-1]))


class Transformer(nn.Module):
    """A stack of `Block`s sharing one mask."""

    def __init__(self, dim: int, layers: int, heads: int, mlp_ratio: float = 4.0, act: str = "gelu",
                 norm_first: bool = True, eps: float = 1e-5, cross_attention: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(dim, heads, mlp_ratio, act, norm_first, eps, cross_attention) for _ in range(layers))
        self.grad_checkpointing = False

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False,
                context: Tensor | None = None, context_mask: Tensor | None = None,
                query_at: Tensor | None = None) -> Tensor:
        """x: (B, L, D) -> (B, L, D). With `query_at` (B, Q) the last block computes only those
        rows -> (B, Q, D): for callers that need nothing but pooled/read-out tokens."""
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            rows = query_at if i == last else None
            if self.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, attn_mask, is_causal, context, context_mask, rows,
                                                      use_reentrant=False)
            else:
                x = block(x, attn_mask, is_causal, context, context_mask, rows)
        return x


def init_transformer_(module: nn.Module, width: int, layers: int) -> None:
    """CLIP-style initialisation: small normal weights, projections scaled by depth."""
    proj_std = (width ** -0.5) * ((2 * layers) ** -0.5)
    attn_std = width ** -0.5
    fc_std = (2 * width) ** -0.5
    for m in module.modules():
        if isinstance(m, Attention):
            nn.init.normal_(m.qkv.weight, std=attn_std)
            nn.init.normal_(m.out.weight, std=proj_std)
        elif isinstance(m, MLP):
            nn.init.normal_(m.fc1.weight, std=fc_std)
            nn.init.normal_(m.fc2.weight, std=proj_std)
    for m in module.modules():
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


def interpolate_positions(pos: Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int],
                          num_prefix: int = 1) -> Tensor:
    """Resize a learned 2-D position table (bicubic), keeping `num_prefix` leading rows (CLS) as they are.

    Args:
        pos: (num_prefix + gh*gw, D) table.
        old_grid: (gh, gw) the table was trained for.
        new_grid: (nh, nw) wanted.
    Returns:
        (num_prefix + nh*nw, D)
    """
    if tuple(old_grid) == tuple(new_grid):
        return pos
    prefix, grid = pos[:num_prefix], pos[num_prefix:]
    D = grid.shape[-1]
    grid = grid.reshape(1, old_grid[0], old_grid[1], D).permute(0, 3, 1, 2)           # (1, D, gh, gw)
    grid = F.interpolate(grid.float(), size=tuple(new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(-1, D).to(pos.dtype)                        # (nh*nw, D)
    return torch.cat([prefix, grid], dim=0)


def grid_size(num_positions: int) -> int:
    """Side of a square patch grid with `num_positions` cells (error when not square)."""
    side = int(round(math.sqrt(num_positions)))
    if side * side != num_positions:
        raise ValueError(f"{num_positions} positions do not form a square grid")
    return side
