"""Text-guided masked image modelling (SyCoCa's TG-MIM head) and the mask selection rules.

* `MaskedImageDecoder`: encoder tokens of the visible patches are scattered back onto the patch
  grid, mask tokens fill the masked cells, learned positions are added, and a few blocks with
  bidirectional self-attention and cross-attention to the text tokens predict each patch's pixels.
* Targets: `patchify` the (normalised) input image; with `norm_pix` each patch is standardised by
  its own mean and variance (MAE's normalised-pixel target). The loss (`masked_mse`) is the mean
  squared error over masked patches only.
* Masks: `patch_relevance` scores patches against the text (softmax over patches, no gradient);
  `select_mask` masks `round(ratio * P)` patches, of which `round(attentive_ratio * n)` are the
  most (or least) relevant and the rest uniformly random among the others.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .layers import Transformer, init_transformer_

MASK_DIRECTIONS = ("most", "least")


def patchify(pixels: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) -> (B, P, p*p*C), patches in row-major grid order (the ViT's token order),
    each flattened as (row, column, channel)."""
    B, C, H, W = pixels.shape
    p = patch_size
    if H % p or W % p:
        raise ValueError(f"patchify: image {H}x{W} is not a multiple of the patch size {p}")
    x = pixels.reshape(B, C, H // p, p, W // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), p * p * C)


def mim_target(pixels: Tensor, patch_size: int, norm_pix: bool = True, eps: float = 1e-6) -> Tensor:
    """Reconstruction target (B, P, p*p*C): patch pixels, standardised per patch when `norm_pix`
    ((x - mean) / sqrt(var + eps) with the unbiased variance over the patch's values, as in MAE)."""
    target = patchify(pixels, patch_size).float()
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + eps).sqrt()
    return target


def masked_mse(pred: Tensor, target: Tensor, mask: Tensor, reduction: str = "mean") -> Tensor:
    """Mean squared error over masked patches only.

    Args:
        pred, target: (B, P, D).
        mask: (B, P) bool, True = masked (counted).
        reduction: "mean" (over all masked patches of the batch) or "none" ((B,) per image).
    Returns:
        Scalar, or (B,) with "none".
    """
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)       # (B, P)
    m = mask.float()
    if reduction == "none":
        return (per_patch * m).sum(1) / m.sum(1).clamp(min=1)
    return (per_patch * m).sum() / m.sum().clamp(min=1)


@torch.no_grad()
def patch_relevance(text_embed: Tensor, patch_embeds: Tensor, scale: Tensor | float = 1.0) -> Tensor:
    """Softmax over patches of scale * <text, patch> (no gradient).

    Args:
        text_embed: (B, E) text CLS/EOT feature in the shared space (normally L2-normalised).
        patch_embeds: (B, P, E) patch features in the same space.
        scale: temperature-like multiplier (e.g. the contrastive logit scale).
    Returns:
        (B, P) relevance, each row summing to 1.
    """
    logits = torch.einsum("be,bpe->bp", text_embed.float(), patch_embeds.float()) * scale
    return logits.softmax(dim=-1)


def select_mask(num_patches: int, ratio: float, relevance: Tensor | None = None, attentive_ratio: float = 1.0,
                direction: str = "most", batch_size: int | None = None,
                generator: torch.Generator | None = None, device=None) -> Tensor:
    """Choose the patches to mask.

    n = round(ratio * P) patches are masked per image. With `relevance`, n_att = round(attentive_ratio * n)
    of them are the most (direction "most") or least ("least") relevant patches, and the remaining
    n - n_att are drawn uniformly among the other patches. Without relevance all n are random.

    Args:
        num_patches: P.
        ratio: masked fraction rho in [0, 1).
        relevance: (B, P) scores, or None for random masking.
        attentive_ratio: share of the masked set chosen by relevance.
        direction: "most" | "least".
        batch_size: B when relevance is None.
        generator: random generator for the random part.
    Returns:
        (B, P) bool, True = masked; every row has exactly n True.
    """
    if not 0 <= ratio < 1:
        raise ValueError(f"select_mask: mask ratio must be in [0, 1), got {ratio}")
    if not 0 <= attentive_ratio <= 1:
        raise ValueError(f"select_mask: attentive_ratio must be in [0, 1], got {attentive_ratio}")
    if direction not in MASK_DIRECTIONS:
        raise ValueError(f"select_mask: direction must be one of {MASK_DIRECTIONS}, got {direction!r}")
    P = num_patches
    if relevance is not None:
        B, device = relevance.shape[0], relevance.device
        if relevance.shape[1] != P:
            raise ValueError(f"select_mask: relevance has {relevance.shape[1]} patches, expected {P}")
    elif batch_size is None:
        raise ValueError("select_mask: give relevance or batch_size")
    else:
        B = batch_size
    n = int(round(ratio * P))
    n_att = int(round(attentive_ratio * n)) if relevance is not None else 0
    mask = torch.zeros(B, P, dtype=torch.bool, device=device)
    if n_att:
        order = relevance.float().argsort(dim=1, descending=(direction == "most"))   # (B, P)
        mask.scatter_(1, order[:, :n_att], True)
    n_rand = n - n_att
    if n_rand:
        # Random keys; patches already masked get +inf so they sort last and are never re-drawn.
        keys = torch.rand(B, P, generator=generator, device=generator.device if generator else device).to(device)
        keys = keys.masked_fill(mask, float("inf"))
        mask.scatter_(1, keys.argsort(dim=1)[:, :n_rand], True)
    return mask


def visible_indices(mask: Tensor) -> Tensor:
    """(B, P) bool mask with the same count per row -> (B, P - n) ascending indices of unmasked patches."""
    counts = (~mask).sum(dim=1)
    if (counts != counts[0]).any():
        raise ValueError("visible_indices: every row must mask the same number of patches")
    return (~mask).nonzero()[:, 1].view(mask.shape[0], int(counts[0]))


class MaskedImageDecoder(nn.Module):
    """TG-MIM image decoder: visible tokens + mask tokens (with positions), cross-attending to text.

    Args:
        encoder_width: width of the image encoder tokens.
        text_width: width of the text tokens attended to.
        width, layers, heads: decoder size.
        num_patches: P of the patch grid (fixed: positions are learned for this grid).
        patch_dim: values predicted per patch (p*p*3).
    """

    def __init__(self, encoder_width: int, text_width: int, width: int, layers: int, heads: int,
                 num_patches: int, patch_dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.embed = nn.Linear(encoder_width, width)
        self.text_embed = nn.Linear(text_width, width)
        self.mask_token = nn.Parameter(torch.zeros(width))
        self.pos = nn.Parameter(torch.randn(num_patches, width) * 0.02)
        self.blocks = Transformer(width, layers, heads, mlp_ratio, cross_attention=True)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, patch_dim)
        nn.init.normal_(self.mask_token, std=0.02)
        init_transformer_(self.blocks, width, layers)

    def no_weight_decay(self) -> set[str]:
        """Parameters AdamW leaves undecayed: mask token and position embeddings (the `embed` Linears decay)."""
        return {"mask_token", "pos"}

    def forward(self, visible: Tensor, keep: Tensor, text_tokens: Tensor, text_mask: Tensor | None = None) -> Tensor:
        """Predict every patch.

        Args:
            visible: (B, K, We) encoder tokens of the visible patches.
            keep: (B, K) their patch indices.
            text_tokens: (B, L, Wt) text states attended to.
            text_mask: (B, L) bool, True = real text token.
        Returns:
            (B, P, patch_dim) predictions (the loss reads only the masked ones).
        """
        B, K = keep.shape
        P, D = self.pos.shape
        x = self.mask_token.to(visible.dtype).expand(B, P, D).clone()               # (B, P, D)
        x.scatter_(1, keep[..., None].expand(-1, -1, D), self.embed(visible))       # visible cells
        x = x + self.pos
        ctx = self.text_embed(text_tokens)                                          # (B, L, D)
        x = self.blocks(x, context=ctx, context_mask=text_mask)
        return self.head(self.norm(x))
