"""Transformer building blocks shared by every tower.

Attention uses `F.scaled_dot_product_attention` with a fused qkv projection (one matmul instead of
three). Blocks are pre-LN by default (CLIP, ViT); `norm_first=False` gives post-LN blocks so BERT-style
text towers load exactly.

Incremental decoding: `Transformer.step` runs ONE new position of causal sequences whose earlier
keys/values sit in a `KVCache` per layer, and cross-attention reads keys/values projected once per
context (`Transformer.context_kv`). It computes what `forward(..., is_causal=True)` computes at that
position (up to float rounding: the matmuls have other shapes).
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


class KVCache:
    """Self-attention keys and values of one layer for `num_slots` sequences, up to `max_len` positions.

    Storage is allocated at the first write, in the dtype of the keys (so autocast works) and kept
    as (num_slots, H, max_len, Dh) tensors; slot s holds the sequence decoded in slot s.

    Args:
        num_slots: sequences decoded at once (e.g. images x beams).
        max_len: most positions a sequence may reach.
    """

    def __init__(self, num_slots: int, max_len: int):
        self.num_slots, self.max_len = num_slots, max_len
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def write(self, slots: Tensor | None, pos: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store position `pos` of `slots` and return their keys/values at positions 0..pos.

        Args:
            slots: (N,) slot indices; None = every slot, in order (no gather: views of the storage).
            pos: position of the new token (all slots are at the same position).
            k, v: (N, H, 1, Dh) key and value of the new token.
        Returns:
            (keys, values), each (N, H, pos + 1, Dh).
        """
        if pos >= self.max_len:
            raise ValueError(f"KVCache: position {pos} is past the cache length {self.max_len}")
        if self.k is None:
            shape = (self.num_slots, k.shape[1], self.max_len, k.shape[3])
            self.k = torch.zeros(shape, dtype=k.dtype, device=k.device)
            self.v = torch.zeros(shape, dtype=v.dtype, device=v.device)
        if slots is None:
            self.k[:, :, pos] = k[:, :, 0]
            self.v[:, :, pos] = v[:, :, 0]
            return self.k[:, :, :pos + 1], self.v[:, :, :pos + 1]
        self.k[slots, :, pos] = k[:, :, 0]
        self.v[slots, :, pos] = v[:, :, 0]
        return self.k[slots, :, :pos + 1], self.v[slots, :, :pos + 1]

    def reorder(self, src: Tensor, length: int) -> None:
        """Slot s continues the sequence of slot src[s] (beam search); only positions < `length` move."""
        if self.k is not None:
            self.k[:, :, :length] = self.k[src, :, :length]
            self.v[:, :, :length] = self.v[src, :, :length]


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

    def step(self, x: Tensor, cache: KVCache, slots: Tensor | None, pos: int) -> Tensor:
        """Causal self-attention for one new token per sequence, with earlier keys/values from `cache`.

        Args:
            x: (N, 1, D) the new tokens (at position `pos`) of the sequences in cache `slots` (N,)
                (None: every slot, in order).
        Returns:
            (N, 1, D), what `forward(..., is_causal=True)` gives at row `pos`.
        """
        N, _, D = x.shape
        H = self.heads
        q, k, v = self.qkv(x).view(N, 1, 3, H, D // H).permute(2, 0, 3, 1, 4)   # 3 x (N, H, 1, Dh)
        keys, values = cache.write(slots, pos, k, v)                             # (N, H, pos+1, Dh)
        y = F.scaled_dot_product_attention(q, keys, values)                      # every cached key is visible
        return self.out(y.transpose(1, 2).reshape(N, 1, D))

    def context_kv(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """Cross-attention keys and values of a context, to reuse over decoding steps: (B, S, D) -> 2 x (B, H, S, Dh)."""
        B, S, D = context.shape
        H = self.heads
        _, w_kv = self.qkv.weight.split([D, 2 * D])
        b_kv = self.qkv.bias.split([D, 2 * D])[1] if self.qkv.bias is not None else None
        k, v = F.linear(context, w_kv, b_kv).view(B, S, 2, H, D // H).permute(2, 0, 3, 1, 4)
        return k, v

    def attend(self, x: Tensor, k: Tensor, v: Tensor, context_mask: Tensor | None = None) -> Tensor:
        """Cross-attention of `x` (N, L, D) to precomputed keys/values (N, H, S, Dh) (from `context_kv`)."""
        N, L, D = x.shape
        H = self.heads
        w_q = self.qkv.weight[:D]
        b_q = self.qkv.bias[:D] if self.qkv.bias is not None else None
        q = F.linear(x, w_q, b_q).view(N, L, H, D // H).transpose(1, 2)             # (N, H, L, Dh)
        mask = None if context_mask is None else context_mask[:, None, None, :]     # (N, 1, 1, S)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(N, L, D))


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

    def step(self, x: Tensor, cache: KVCache, slots: Tensor | None, pos: int,
             cross_kv: tuple[Tensor, Tensor] | None = None, context_mask: Tensor | None = None) -> Tensor:
        """One new position of causal sequences (see `Attention.step`): x (N, 1, D) -> (N, 1, D).

        Args:
            cross_kv: (k, v), each (N, H, S, Dh): this block's cross-attention keys/values of each
                sequence's context (from `context_kv`), needed when the block cross-attends.
            context_mask: (N, S) bool, True = real context token.
        """
        if self.cross is not None and cross_kv is None:
            raise ValueError("Block.step: this block cross-attends; pass cross_kv from context_kv()")
        if self.norm_first:
            x = x + self.attn.step(self.norm1(x), cache, slots, pos)
            if self.cross is not None:
                x = x + self.cross.attend(self.norm_cross(x), *cross_kv, context_mask)
            return x + self.mlp(self.norm2(x))
        x = self.norm1(x + self.attn.step(x, cache, slots, pos))
        if self.cross is not None:
            x = self.norm_cross(x + self.cross.attend(x, *cross_kv, context_mask))
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

    def new_caches(self, num_slots: int, max_len: int) -> list[KVCache]:
        """One empty `KVCache` per block for incremental decoding of `num_slots` sequences."""
        return [KVCache(num_slots, max_len) for _ in self.blocks]

    def context_kv(self, context: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Every block's cross-attention keys/values of `context` (B, S, D): computed once, reused every step."""
        if any(b.cross is None for b in self.blocks):
            raise ValueError("Transformer.context_kv: the blocks have no cross-attention")
        return [b.cross.context_kv(context) for b in self.blocks]

    def step(self, x: Tensor, caches: list[KVCache], slots: Tensor | None, pos: int,
             cross_kv: list[tuple[Tensor, Tensor]] | None = None, context_mask: Tensor | None = None) -> Tensor:
        """Causal incremental forward of one position: x (N, 1, D) at `pos` -> (N, 1, D).

        Args:
            caches: from `new_caches`; slot `slots[n]` holds the earlier positions of sequence n.
            slots: (N,) cache slots of the sequences in `x`; None = all slots, in order.
            pos: position of the new token.
            cross_kv: per block (k, v), each (N, H, S, Dh), already gathered for these sequences.
            context_mask: (N, S) bool for cross-attention.
        """
        for i, block in enumerate(self.blocks):
            x = block.step(x, caches[i], slots, pos, None if cross_kv is None else cross_kv[i], context_mask)
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
