"""Text tower: causal (CLIP) or bidirectional (BERT-like), with optional read-out (corner) tokens.

Read-out tokens (LoTLIP's corner tokens) are learnable embeddings the tower inserts itself, so a
tokenizer for a tower with K of them produces at most `context_length - K` tokens and truncation can
never drop them:

* bidirectional: `[CLS][C0]..[CK-1] text [SEP] pad`. CLS and each corner see themselves and the
  non-pad text, not each other; text tokens see CLS and the text, never the corners.
* causal: `[SOT] text [C0]..[CK-1] [EOT] pad`. Causal attention, and in addition (our choice, see
  docs/methods.md) corners do not see each other and EOT does not see the corners, so the EOT
  feature depends on the text alone (its position index shifts by K); corners are pure read-outs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .layers import Transformer, init_transformer_


@dataclass
class TextConfig:
    vocab_size: int = 49408
    context_length: int = 77      # tokens incl. start/end and read-out tokens
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0
    act: str = "gelu"             # "quick_gelu" for the OpenAI CLIP weights
    causal: bool = True           # False = bidirectional (BERT-like towers)
    norm_first: bool = True       # pre-LN blocks; False = post-LN (BERT)
    embed_norm: bool = False      # LayerNorm on the embeddings (BERT)
    final_norm: bool = True       # LayerNorm after the last block (CLIP's ln_final)
    norm_eps: float = 1e-5
    pool: str = "eot"             # "eot" (first eot_token_id) | "argmax" (largest id) | "cls" (position 0)
    pooler: str = "none"          # "none" | "dense_tanh" (BERT pooler, shared by CLS and corners)
    eot_token_id: int = 49407
    pad_token_id: int = 0
    num_readout_tokens: int = 0   # LoTLIP corner tokens; 0 switches them off


@dataclass
class TextOutput:
    """pooled: (B, W) CLS/EOT state; readouts: (B, K, W) corner states or None;
    tokens: (B, L', W) all states (L' = L + K); mask: (B, L') True = real (non-pad) position."""
    pooled: Tensor
    readouts: Tensor | None
    tokens: Tensor
    mask: Tensor


class TextTower(nn.Module):
    """Transformer over token ids with learned positions."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        if cfg.pool not in ("eot", "argmax", "cls"):
            raise ValueError(f"text.pool must be 'eot', 'argmax' or 'cls', got {cfg.pool!r}")
        if cfg.pooler not in ("none", "dense_tanh"):
            raise ValueError(f"text.pooler must be 'none' or 'dense_tanh', got {cfg.pooler!r}")
        self.config = cfg
        W, K = cfg.width, cfg.num_readout_tokens
        self.token_embed = nn.Embedding(cfg.vocab_size, W)
        self.pos = nn.Parameter(torch.empty(cfg.context_length, W))
        self.readout = nn.Parameter(torch.randn(K, W) * 0.02) if K > 0 else None
        self.embed_norm = nn.LayerNorm(W, eps=cfg.norm_eps) if cfg.embed_norm else nn.Identity()
        self.transformer = Transformer(W, cfg.layers, cfg.heads, cfg.mlp_ratio, cfg.act,
                                       norm_first=cfg.norm_first, eps=cfg.norm_eps)
        self.norm = nn.LayerNorm(W, eps=cfg.norm_eps) if cfg.final_norm else nn.Identity()
        self.pooler = nn.Sequential(nn.Linear(W, W), nn.Tanh()) if cfg.pooler == "dense_tanh" else nn.Identity()
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.01)
        init_transformer_(self.transformer, W, cfg.layers)

    @property
    def max_tokens(self) -> int:
        """Tokens a tokenizer may produce for this tower (context length minus read-out tokens)."""
        return self.config.context_length - self.config.num_readout_tokens

    def _pool_index(self, ids: Tensor) -> Tensor:
        """(B,) position of the pooled token in `ids`."""
        if self.config.pool == "cls":
            return torch.zeros(len(ids), dtype=torch.long, device=ids.device)
        if self.config.pool == "argmax":
            return ids.argmax(dim=-1)
        is_eot = ids == self.config.eot_token_id
        first = is_eot.int().argmax(dim=-1)
        # No EOT (a truncated sequence from a foreign tokenizer): fall back to the last position.
        return torch.where(is_eot.any(dim=-1), first, torch.full_like(first, ids.shape[1] - 1))

    def no_weight_decay(self) -> set[str]:
        """Parameters AdamW leaves undecayed: position embeddings, the token-embedding table, readout tokens."""
        return {"pos", "token_embed.weight"} | ({"readout"} if self.readout is not None else set())

    def forward(self, ids: Tensor, attention_mask: Tensor | None = None, pooled_only: bool = False) -> TextOutput:
        """Encode token ids.

        Args:
            ids: (B, L) token ids, L <= context_length - num_readout_tokens.
            attention_mask: (B, L) True/1 = real token. Default: causal towers need none (pads come
                after EOT and are never seen); bidirectional towers use `ids != pad_token_id`.
            pooled_only: the caller needs only `pooled` and `readouts`, so work that cannot change
                them is skipped: a causal tower stops at the last pooled position of the batch, and
                the last block computes only the pooled and read-out rows. `tokens` (B, 1+K, W) then
                holds just those states (pooled first, before the pooler) and `mask` is all True.
        Returns:
            TextOutput (see its docstring).
        """
        cfg, K = self.config, self.config.num_readout_tokens
        B, L = ids.shape
        if L > self.max_tokens:
            raise ValueError(f"text input has {L} tokens but this tower takes at most {self.max_tokens} "
                             f"(context_length {cfg.context_length} - {K} read-out tokens)")
        if attention_mask is None:
            real = torch.ones_like(ids, dtype=torch.bool) if cfg.causal else ids != cfg.pad_token_id
        else:
            real = attention_mask.bool()
        pool_at = self._pool_index(ids)                                    # (B,)
        x = self.token_embed(ids)                                          # (B, L, W)
        mask = None
        if K == 0:
            readout_at = None
            if not cfg.causal:
                mask = real[:, None, None, :]                              # (B, 1, 1, L) keys
        elif cfg.causal:
            x, real, readout_at, pool_at, mask = self._insert_causal(x, real, pool_at)
        else:
            x, real, readout_at, mask = self._insert_bidirectional(x, real)
            pool_at = torch.zeros_like(pool_at)
        if pooled_only and cfg.causal:
            # Positions after the last pooled one (usually padding to the context length) cannot
            # reach the pooled or read-out states through causal attention: skip their compute.
            n = int(pool_at.max()) + 1
            if n < x.shape[1]:
                x = x[:, :n]
                mask = None if mask is None else mask[..., :n, :n]
        Lp = x.shape[1]
        x = self.embed_norm(x + self.pos[:Lp])                             # (B, L', W)
        if pooled_only:
            query_at = pool_at[:, None] if readout_at is None else torch.cat([pool_at[:, None], readout_at], 1)
            x = self.transformer(x, attn_mask=mask, is_causal=cfg.causal and mask is None, query_at=query_at)
            x = self.norm(x)                                               # (B, 1+K, W)
            readouts = None if readout_at is None else self.pooler(x[:, 1:])
            return TextOutput(pooled=self.pooler(x[:, 0]), readouts=readouts, tokens=x,
                              mask=torch.ones(x.shape[:2], dtype=torch.bool, device=x.device))
        x = self.transformer(x, attn_mask=mask, is_causal=cfg.causal and mask is None)
        x = self.norm(x)                                                   # (B, L', W)
        batch = torch.arange(B, device=ids.device)
        pooled = self.pooler(x[batch, pool_at])                            # (B, W)
        readouts = None
        if readout_at is not None:
            readouts = self.pooler(torch.gather(x, 1, readout_at[..., None].expand(-1, -1, x.shape[-1])))  # (B, K, W)
        return TextOutput(pooled=pooled, readouts=readouts, tokens=x, mask=real)

    def _insert_bidirectional(self, x: Tensor, real: Tensor):
        """`[CLS] text` -> `[CLS][C0..CK-1] text` and the read-out attention mask."""
        B, L, W = x.shape
        K = self.config.num_readout_tokens
        x = torch.cat([x[:, :1], self.readout.expand(B, K, W), x[:, 1:]], dim=1)      # (B, 1+K+L-1, W)
        real = torch.cat([real[:, :1], real.new_ones(B, K), real[:, 1:]], dim=1)       # (B, L+K)
        Lp = L + K
        is_corner = torch.zeros(Lp, dtype=torch.bool, device=x.device)
        is_corner[1:1 + K] = True
        is_readout = is_corner.clone()
        is_readout[0] = True                                                           # CLS reads out too
        eye = torch.eye(Lp, dtype=torch.bool, device=x.device)
        # Keys anyone may see: real, non-corner tokens (CLS and text). Read-outs (CLS, corners) do
        # not see each other; text sees CLS and text; everyone sees itself.
        key_ok = real & ~is_corner                                                      # (B, L')
        allowed = key_ok[:, None, :].expand(B, Lp, Lp).clone()                          # (B, Lq, Lk)
        allowed &= ~(is_readout[:, None] & is_readout[None, :] & ~eye)
        allowed |= eye
        readout_at = torch.arange(1, 1 + K, device=x.device).expand(B, K)
        return x, real, readout_at, allowed[:, None]

    def _insert_causal(self, x: Tensor, real: Tensor, eot_at: Tensor):
        """`[SOT] text [EOT] pad` -> `[SOT] text [C0..CK-1] [EOT] pad` and its mask."""
        B, L, W = x.shape
        K = self.config.num_readout_tokens
        Lp = L + K
        j = torch.arange(Lp, device=x.device)[None, :].expand(B, Lp)                  # (B, L')
        e = eot_at[:, None]
        # Source row in cat([x, corners]): text before EOT, then the K corners, then EOT and the rest.
        src = torch.where(j < e, j, torch.where(j < e + K, L + (j - e), j - K))
        both = torch.cat([x, self.readout.expand(B, K, W)], dim=1)                     # (B, L+K, W)
        x = torch.gather(both, 1, src[..., None].expand(-1, -1, W))
        real_both = torch.cat([real, real.new_ones(B, K)], dim=1)
        real = torch.gather(real_both, 1, src)
        is_corner = (j >= e) & (j < e + K)                                            # (B, L')
        causal = torch.ones(Lp, Lp, dtype=torch.bool, device=x.device).tril()
        # Nobody but the corner itself sees a corner (corners don't see each other, EOT doesn't see them).
        allowed = causal[None] & ~is_corner[:, None, :]
        allowed |= torch.eye(Lp, dtype=torch.bool, device=x.device)[None]
        readout_at = e + torch.arange(K, device=x.device)[None, :]                      # (B, K)
        return x, real, readout_at, eot_at + K, allowed[:, None]
