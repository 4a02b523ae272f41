"""SyCoCa (arXiv 2401.02137): CoCa plus a text-guided masked image modelling (TG-MIM) head.

Loss: L = lambda_itc * ITC + lambda_ic * IC + lambda_mim * TG-MIM.

One step:
1. The full image goes through the encoder once; its pooled embedding gives ITC (with the EOT
   text embedding) and its attentional-pooled tokens are the decoder context for IC.
2. Masks: "attentive" scores each patch of that full pass against the text EOT feature in the
   contrastive space (`CoCa.patch_embeds`, `CoCa.text_embed`, cosine x logit scale, softmax over
   patches, no gradient) and masks `mask_ratio` of the patches, `attentive_ratio` of them by
   relevance (`direction` "most"|"least") and the rest at random; "random" masks at random.
3. The encoder runs again on the visible patches only (`VisionTower(keep=)`); the TG-MIM decoder
   reconstructs the masked patches from them, mask tokens and cross-attention to the text tokens.

CoCa itself is `masking="none"` (or `lambda_mim=0`): no second pass, no MIM decoder is built.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from ..losses.contrastive import LossConfig, build_contrastive_loss
from ..models.base import ConfigDict
from ..models.coca import CoCa, caption_loss, caption_mask
from ..models.mim import (MASK_DIRECTIONS, MaskedImageDecoder, masked_mse, mim_target, patch_relevance,
                          select_mask, visible_indices)
from .base import Method

MASKINGS = ("attentive", "random", "none")


@dataclass
class SyCoCaConfig(ConfigDict):
    lambda_itc: float = 1.0         # image-text contrastive weight
    lambda_ic: float = 2.0          # CoCa's captioning weight
    lambda_mim: float = 1.0         # text-guided masked image modelling weight (0 = CoCa)
    masking: str = "attentive"      # "attentive" | "random" | "none" (= CoCa)
    mask_ratio: float = 0.5         # rho: fraction of patches masked for TG-MIM
    attentive_ratio: float = 0.5    # share of the masked set chosen by text relevance, the rest random
    direction: str = "most"         # mask the "most" or "least" text-relevant patches
    norm_pix_loss: bool = True      # per-patch standardised pixel targets (MAE)
    decoder_layers: int = 2         # TG-MIM image decoder
    decoder_width: int = 256        # TG-MIM decoder width
    decoder_heads: int = 8          # TG-MIM decoder attention heads

    def __post_init__(self):
        if self.masking not in MASKINGS:
            raise ValueError(f"sycoca.masking must be one of {MASKINGS}, got {self.masking!r}")
        if self.direction not in MASK_DIRECTIONS:
            raise ValueError(f"sycoca.direction must be one of {MASK_DIRECTIONS}, got {self.direction!r}")
        if not 0 < self.mask_ratio < 1 and self.masking != "none":
            raise ValueError(f"sycoca.mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if not 0 <= self.attentive_ratio <= 1:
            raise ValueError(f"sycoca.attentive_ratio must be in [0, 1], got {self.attentive_ratio}")

    @property
    def uses_mim(self) -> bool:
        return self.masking != "none" and self.lambda_mim > 0


class SyCoCaTask(nn.Module):
    """A CoCa model and its SyCoCa objective; `forward(batch) -> {"loss", "itc", "ic", "mim"}`.

    Args:
        model: a `CoCa`.
        cfg: the objective's settings (default `SyCoCaConfig()`).
        loss_cfg: how the ITC term gathers features across ranks (the recipe's `loss` section, as for CLIP);
            only the InfoNCE kind.
    """

    def __init__(self, model: CoCa, cfg: SyCoCaConfig | None = None, loss_cfg: LossConfig | None = None):
        super().__init__()
        self.model = model
        self.cfg = cfg = cfg or SyCoCaConfig()
        self.loss_cfg = loss_cfg = loss_cfg or LossConfig()
        self.itc_loss = build_contrastive_loss(loss_cfg, kinds=("infonce",), who="sycoca (CoCa's ITC)")
        v = model.config.vision
        self.mim_head = None
        if cfg.uses_mim:
            if v.patch_dropout > 0:
                raise ValueError("sycoca: vision.patch_dropout must be 0 with masked image modelling "
                                 "(the relevance needs every patch of the full pass)")
            grid = v.image_size // v.patch_size
            self.mim_head = MaskedImageDecoder(v.width, model.config.text.width, cfg.decoder_width,
                                               cfg.decoder_layers, cfg.decoder_heads, grid * grid,
                                               v.patch_size ** 2 * 3)

    def choose_mask(self, patch_tokens: Tensor, text_embed: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """(B, P) bool mask (True = masked) by the configured rule.

        Args:
            patch_tokens: (B, P, Wv) encoder tokens of the full image (read without gradient).
            text_embed: (B, E) normalised text embeddings.
        """
        cfg = self.cfg
        B, P = patch_tokens.shape[:2]
        relevance = None
        if cfg.masking == "attentive" and cfg.attentive_ratio > 0:
            relevance = self.relevance(patch_tokens, text_embed)
        return select_mask(P, cfg.mask_ratio, relevance, cfg.attentive_ratio, cfg.direction, batch_size=B,
                           generator=generator, device=patch_tokens.device)

    @torch.no_grad()
    def relevance(self, patch_tokens: Tensor, text_embed: Tensor) -> Tensor:
        """(B, P) softmax over patches of logit_scale * cos(text EOT feature, patch) (no gradient)."""
        m = self.model
        return patch_relevance(text_embed.detach(), m.patch_embeds(patch_tokens.detach()), m.scale().detach())

    def reconstruct(self, pixels: Tensor, mask: Tensor, text_tokens: Tensor, text_mask: Tensor) -> Tensor:
        """Encode the visible patches and predict all patches: (B, P, p*p*3)."""
        keep = visible_indices(mask)                                        # (B, K)
        visible = self.model.visual(pixels, keep=keep).tokens               # (B, K, Wv)
        return self.mim_head(visible, keep, text_tokens, text_mask)

    def forward(self, batch: dict) -> dict:
        """batch: pixels (B,3,H,W), input_ids (B,L) -> {"loss", "itc", "ic", "mim"} (scalars)."""
        cfg, m = self.cfg, self.model
        pixels, ids = batch["pixels"], batch["input_ids"]
        vis = m.visual(pixels)                                              # pooled (B, Wv), tokens (B, P, Wv)
        txt = m.text(ids)                                                   # tokens (B, L, Wt)
        img_emb, txt_emb = m.image_embed(vis), m.text_embed(txt)            # (B, E)
        itc = self.itc_loss(img_emb, txt_emb, m.scale())
        logits = m.decode(txt.tokens, m.image_context(vis.tokens))          # (B, L, V)
        ic = caption_loss(logits, ids, m.eos_id, m.pad_id)
        if cfg.uses_mim:
            mask = self.choose_mask(vis.tokens, txt_emb)                    # (B, P)
            pred = self.reconstruct(pixels, mask, txt.tokens, caption_mask(ids, m.eos_id, m.pad_id))
            mim = masked_mse(pred, mim_target(pixels, m.config.vision.patch_size, cfg.norm_pix_loss), mask)
        else:
            mim = itc.new_zeros(())
        loss = cfg.lambda_itc * itc + cfg.lambda_ic * ic + cfg.lambda_mim * mim
        return {"loss": loss, "itc": itc.detach(), "ic": ic.detach(), "mim": mim.detach()}


class SyCoCaMethod(Method):
    """`method: sycoca`: a CoCa model (`model.name: coca-*`) trained with ITC + IC + TG-MIM."""

    config_cls = SyCoCaConfig

    def build_task(self, model: nn.Module) -> nn.Module:
        return SyCoCaTask(model, self.cfg, self.run.loss)


# ---- analysis helpers (ablation) -------------------------------------------------------------
@torch.no_grad()
def reconstruction_error(task: SyCoCaTask, batch: dict, captions_ids: Tensor, mask: Tensor | None = None,
                         generator: torch.Generator | None = None) -> Tensor:
    """Masked-patch reconstruction error of each image when the decoder reads `captions_ids`.

    Compare the true captions with shuffled ones under the same mask: by default the mask is chosen
    once from the true captions (`batch["input_ids"]`) with the task's rule, so only the text read by
    the decoder differs between the two calls when the same `mask` (or generator seed) is used.

    Args:
        task: a SyCoCaTask with a TG-MIM head.
        batch: pixels (B,3,H,W) and input_ids (B,L) (the true captions).
        captions_ids: (B, L') captions given to the decoder (true, shuffled, ...).
        mask: (B, P) bool masked patches; default: chosen from the true captions.
        generator: random generator for the random part of the default mask.
    Returns:
        (B,) masked-patch MSE per image (with the task's target normalisation).
    """
    if task.mim_head is None:
        raise ValueError("reconstruction_error: the task has no TG-MIM head (masking='none' or lambda_mim=0)")
    m = task.model
    pixels = batch["pixels"]
    if mask is None:
        vis = m.visual(pixels)
        mask = task.choose_mask(vis.tokens, m.encode_text(batch["input_ids"]), generator=generator)
    txt = m.text(captions_ids)
    pred = task.reconstruct(pixels, mask, txt.tokens, caption_mask(captions_ids, m.eos_id, m.pad_id))
    target = mim_target(pixels, m.config.vision.patch_size, task.cfg.norm_pix_loss)
    return masked_mse(pred, target, mask, reduction="none")


def object_patches(object_boxes: Sequence[Sequence[Sequence[float]]], image_size, patch_size: int) -> Tensor:
    """Which patches overlap the boxes of the objects a caption names.

    Args:
        object_boxes: per image, the boxes [x0, y0, x1, y1] (pixels, x1/y1 exclusive) of the objects its
            caption names (ShapesWorld's "bbox"); an empty list for none.
        image_size: side (or (height, width)) of the pixel frame the boxes are given in.
        patch_size: patch side in that frame.
    Returns:
        (B, P) bool, patches in row-major grid order; a patch overlaps a box when their intersection
        has positive area.
    """
    H, W = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    gh, gw = H // patch_size, W // patch_size
    ys = torch.arange(gh, dtype=torch.float64)[:, None] * patch_size       # patch top edges (gh, 1)
    xs = torch.arange(gw, dtype=torch.float64)[None, :] * patch_size       # patch left edges (1, gw)
    out = torch.zeros(len(object_boxes), gh * gw, dtype=torch.bool)
    for b, boxes in enumerate(object_boxes):
        covered = torch.zeros(gh, gw, dtype=torch.bool)
        for box in boxes:
            x0, y0, x1, y1 = (float(v) for v in box)
            covered |= (xs < x1) & (xs + patch_size > x0) & (ys < y1) & (ys + patch_size > y0)
        out[b] = covered.flatten()
    return out


def mask_hit_rate(mask: Tensor, object_boxes: Sequence[Sequence[Sequence[float]]], image_size,
                  patch_size: int) -> float:
    """Fraction of masked patches that overlap a box of an object the caption names.

    Args:
        mask: (B, P) bool, True = masked, patches in row-major grid order.
        object_boxes, image_size, patch_size: as for `object_patches`.
    Returns:
        hits / masked patches over the whole batch (0.0 when nothing is masked).
    """
    H, W = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    B, P = mask.shape
    if (H // patch_size) * (W // patch_size) != P:
        raise ValueError(f"mask_hit_rate: mask has {P} patches but a {H}x{W} image with patch {patch_size} "
                         f"has {(H // patch_size) * (W // patch_size)}")
    if len(object_boxes) != B:
        raise ValueError(f"mask_hit_rate: {len(object_boxes)} box lists for {B} masks")
    hits = int((object_patches(object_boxes, image_size, patch_size) & mask.cpu()).sum())
    total = int(mask.sum())
    return hits / total if total else 0.0
