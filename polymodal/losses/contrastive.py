"""Image-text contrastive losses: symmetric InfoNCE (CLIP) in every gather mode, and SigLIP.

Gather modes (how features of other ranks enter the logits):
- "local": no communication; each rank contrasts its own B pairs.
- "global": all-gather without gradient; this rank's own slice keeps its gradient.
- "global_with_grad": all-gather with gradient (backward sums gradients over ranks).
- "grouped": M2-Encoder grouped aggregation. The W ranks form groups of G contiguous
  ranks (`group_size`, -1 = all); features are gathered with gradient only inside the
  group, so logits are B x (G*B) and the collective can stay inside a machine. With
  G = W this is exactly "global_with_grad".

`local_loss=True` contrasts only this rank's rows against everything gathered: logits are
B x (n*B) with labels `arange(B) + B*index` (n = ranks gathered, index = this rank's
position among them). `local_loss=False` builds the full (n*B) x (n*B) logits on every rank.

Gradient scaling under DDP (parameter gradients averaged over W ranks), with L the plain
loss on the concatenated global batch:
- global_with_grad, either local_loss: mean over ranks of the loss is L and the averaged
  gradient is exactly dL/dtheta (the backward all-reduce SUM supplies the cross-rank terms).
- grouped: the loss and averaged gradient are those of the mean over groups of the plain
  loss on each group's concatenated batch.
- global (no grad): each rank's loss is differentiated only through its own features.
  With local_loss=False the averaged projection gradients are dL/dtheta / W (parameters
  outside the gather, such as the logit scale, get dL/dtheta); with local_loss=True the
  cross-rank negative terms are missing, so there is no simple relation to dL/dtheta.
In a single process every mode is the plain loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.distributed import (
    all_gather_no_grad,
    all_gather_with_grad,
    group_size_from_nodes,
    is_dist,
    make_contiguous_groups,
)

__all__ = ["GATHER_MODES", "BLOCK_GATHER_MODES", "check_block_gather", "LOSS_KINDS", "LossConfig", "build_contrastive_loss",
           "ContrastiveObjective", "clip_loss", "siglip_loss", "block_infonce", "ContrastiveLoss", "SigLipLoss"]

GATHER_MODES = ("local", "global", "global_with_grad", "grouped")
# What losses scored in blocks (`block_infonce`, `matching.mil_nce_blocks`) support: each rank's own batch, or
# the global batch with gradient (the blocks need both sides' features from every rank).
BLOCK_GATHER_MODES = ("local", "global_with_grad")
LOSS_KINDS = ("infonce", "siglip")


def check_block_gather(gather: str, who: str) -> None:
    """Refuse a `loss.gather` a block-scored loss cannot do; `who` starts the message (e.g. "SHE-Net supports").

    Raises:
        ValueError naming `loss.gather`, the supported modes and the value given.
    """
    if gather not in BLOCK_GATHER_MODES:
        raise ValueError(f"loss.gather: {who} {' or '.join(BLOCK_GATHER_MODES)} (the global batch with gradient, "
                         f"or each rank's own), not {gather!r}")


@dataclass
class LossConfig:
    """The recipe's `loss` section: which contrastive loss, and how features are shared across ranks."""
    kind: str = "infonce"          # "infonce" | "siglip"
    gather: str = "global_with_grad"  # "local" | "global" | "global_with_grad" | "grouped"
    local_loss: bool = True        # logits B x (W*B) instead of (W*B) x (W*B)
    group_size: int = -1           # grouped gather: ranks per group (-1 = all ranks)
    aggregate_nodes: int = 0       # grouped gather: >0 sets the group to this many whole machines

    def validate(self, where: str = "loss") -> None:
        """Check every value (before any training step).

        Raises:
            ValueError (a `ConfigError` when raised through a recipe) naming `where.<key>`.
        """
        if self.kind not in LOSS_KINDS:
            raise ValueError(f"{where}.kind: {self.kind!r} is not one of {', '.join(LOSS_KINDS)}")
        if self.gather not in GATHER_MODES:
            raise ValueError(f"{where}.gather: {self.gather!r} is not one of {', '.join(GATHER_MODES)}")
        if self.group_size != -1 and self.group_size < 1:
            raise ValueError(f"{where}.group_size: {self.group_size} must be -1 (all ranks) or a positive number "
                             f"of ranks")
        if self.aggregate_nodes not in (-1, 0) and self.aggregate_nodes < 1:
            raise ValueError(f"{where}.aggregate_nodes: {self.aggregate_nodes} must be 0 (off), -1 (all ranks) or "
                             f"a positive number of machines")

    def resolved_group_size(self) -> int:
        """G for the grouped gather: `aggregate_nodes` whole machines when set, else `group_size`."""
        if self.gather == "grouped" and self.aggregate_nodes != 0:
            return group_size_from_nodes(self.aggregate_nodes)
        return self.group_size


def _check_gather(gather: str, where: str) -> None:
    if gather not in GATHER_MODES:
        raise ValueError(f"{where}: unknown gather mode {gather!r}; expected one of {', '.join(GATHER_MODES)}")


def _check_scalar(value: Tensor, name: str, where: str) -> None:
    if not torch.is_tensor(value) or value.numel() != 1:
        shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
        raise ValueError(f"{where}: {name} must be a scalar tensor, got {shape}")


def _check_features(image_features: Tensor, text_features: Tensor, where: str) -> None:
    if image_features.dim() != 2 or text_features.dim() != 2:
        raise ValueError(
            f"{where}: features must be 2-D (B, D); got image {tuple(image_features.shape)} "
            f"and text {tuple(text_features.shape)}"
        )
    if image_features.shape != text_features.shape:
        raise ValueError(
            f"{where}: image features {tuple(image_features.shape)} and text features "
            f"{tuple(text_features.shape)} must have the same shape (B, D): one caption per image"
        )


def _gather(x: Tensor, gather: str, group_size: int) -> tuple[Tensor, int, int]:
    """Gather `x` (B, D) in the given mode.

    Returns:
        (gathered (n*B, D), n = ranks gathered, index of this rank among them).
    """
    if gather == "grouped":
        # Validates group_size even in a single process (only 1 or -1 make sense there).
        group, index, ranks = make_contiguous_groups(group_size)
        if not is_dist():
            return x, 1, 0
        return all_gather_with_grad(x, group), len(ranks), index
    if gather == "local" or not is_dist():
        return x, 1, 0
    n, index = torch.distributed.get_world_size(), torch.distributed.get_rank()
    if gather == "global":
        return all_gather_no_grad(x), n, index
    return all_gather_with_grad(x), n, index


def block_infonce(rows: Tensor, cols: Tensor, offset: int) -> Tensor:
    """Symmetric InfoNCE of one rank's share of a global batch, from the two blocks of logits it needs.

    For scores no dot product can split (SHE-Net's hierarchy, the Mug head), rank r computes its B texts
    against the W*B gathered videos (`rows`) and the W*B gathered texts against its B videos (`cols`);
    pairs sit at global index `offset + i`. The mean over ranks equals the symmetric InfoNCE of one process
    on the whole (W*B, W*B) logits, and so do the gradients when the features were gathered with gradient.

    Args:
        rows: (B, W*B) logits, local texts x all videos.
        cols: (W*B, B) logits, all texts x local videos.
        offset: global index of this rank's first pair (rank * B).
    Returns:
        Scalar loss.
    """
    labels = offset + torch.arange(len(rows), device=rows.device)
    return (F.cross_entropy(rows, labels) + F.cross_entropy(cols.T, labels)) / 2


def clip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor,
    gather: str = "local",
    local_loss: bool = False,
    group_size: int = -1,
) -> Tensor:
    """Symmetric InfoNCE: (CE(image->text) + CE(text->image)) / 2, in any gather mode.

    Args:
        image_features: (B, D), normally L2-normalised; row i pairs with text row i.
        text_features: (B, D).
        logit_scale: scalar tensor, already exponentiated (e.g. 1/0.07).
        gather: "local" | "global" | "global_with_grad" | "grouped" (see the module docstring).
        local_loss: logits B x (n*B) of this rank's rows against all gathered rows
            instead of the full (n*B) x (n*B) logits.
        group_size: G for gather="grouped" (-1 = all ranks); ignored otherwise.

    Returns:
        Scalar loss (mean over the rows this rank contrasts).
    """
    where = "clip_loss"
    _check_gather(gather, where)
    _check_features(image_features, text_features, where)
    _check_scalar(logit_scale, "logit_scale", where)

    all_image, n, index = _gather(image_features, gather, group_size)  # (n*B, D)
    all_text, _, _ = _gather(text_features, gather, group_size)  # (n*B, D)
    b = image_features.shape[0]
    if local_loss:
        logits_per_image = logit_scale * image_features @ all_text.T  # (B, n*B)
        logits_per_text = logit_scale * text_features @ all_image.T  # (B, n*B)
        labels = torch.arange(b, device=image_features.device) + b * index
    else:
        logits_per_image = logit_scale * all_image @ all_text.T  # (n*B, n*B)
        logits_per_text = logits_per_image.T
        labels = torch.arange(n * b, device=image_features.device)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def siglip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor,
    gather: str = "local",
    group_size: int = -1,
) -> Tensor:
    """Pairwise sigmoid loss (SigLIP), normalised by the number of images on this rank.

    loss = -sum_{i, j} log sigmoid(z_ij * (scale * <img_i, txt_j> + bias)) / B, with
    z_ij = +1 for the matching pair and -1 otherwise.

    With several ranks, the texts of every rank are gathered (with gradient for
    "global_with_grad" and "grouped") and each rank scores its B images against all of
    them: the simple all-gather variant, not the paper's ring exchange of text chunks. The
    mean over ranks of this loss equals the single-process loss on the global batch.

    Args:
        image_features: (B, D), normally L2-normalised.
        text_features: (B, D).
        logit_scale: scalar tensor, already exponentiated.
        logit_bias: scalar tensor.
        gather: "local" | "global" | "global_with_grad" | "grouped".
        group_size: G for gather="grouped" (-1 = all ranks).

    Returns:
        Scalar loss.
    """
    where = "siglip_loss"
    _check_gather(gather, where)
    _check_features(image_features, text_features, where)
    _check_scalar(logit_scale, "logit_scale", where)
    _check_scalar(logit_bias, "logit_bias", where)

    all_text, _, index = _gather(text_features, gather, group_size)  # (n*B, D)
    b = image_features.shape[0]
    logits = logit_scale * image_features @ all_text.T + logit_bias  # (B, n*B)
    signs = -torch.ones_like(logits)
    rows = torch.arange(b, device=logits.device)
    signs[rows, rows + b * index] = 1.0
    return -F.logsigmoid(signs * logits).sum() / b


class ContrastiveObjective(nn.Module):
    """The contrastive loss a `LossConfig` describes, with its wiring in one place.

    `forward(image, text, scale)` takes (B, E) normalised features and the exp'ed logit scale and
    returns the scalar loss: InfoNCE (`clip_loss`) or SigLIP (`siglip_loss`, which owns its learnable
    `logit_bias`, started at -10 so the many negatives do not dominate early on), both in the configured
    gather mode and group size.

    Args:
        cfg: the loss settings (validated here).
    """

    def __init__(self, cfg: LossConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.group_size = cfg.resolved_group_size()
        if cfg.kind == "siglip":
            self.logit_bias = nn.Parameter(torch.tensor(-10.0))

    def forward(self, image: Tensor, text: Tensor, scale: Tensor) -> Tensor:
        c = self.cfg
        if c.kind == "siglip":
            return siglip_loss(image, text, scale, self.logit_bias, gather=c.gather, group_size=self.group_size)
        return clip_loss(image, text, scale, gather=c.gather, local_loss=c.local_loss, group_size=self.group_size)

    def extra_repr(self) -> str:
        return f"kind={self.cfg.kind!r}, gather={self.cfg.gather!r}, group_size={self.group_size}"


def build_contrastive_loss(cfg: LossConfig | None = None, kinds: tuple[str, ...] = LOSS_KINDS,
                           who: str = "this method") -> ContrastiveObjective:
    """The loss module every contrastive task holds.

    Args:
        cfg: the recipe's `loss` section (default `LossConfig()`).
        kinds: the loss kinds the calling method supports (e.g. ("infonce",) for LoTLIP).
        who: the method's name, for the error message.
    Returns:
        A `ContrastiveObjective`.
    Raises:
        ValueError: a bad value, or a kind the method does not support.
    """
    cfg = cfg or LossConfig()
    if cfg.kind not in kinds:
        raise ValueError(f"loss.kind={cfg.kind!r} is not supported by {who}; use one of {', '.join(kinds)}")
    return ContrastiveObjective(cfg)


class ContrastiveLoss(nn.Module):
    """Module form of `clip_loss` with the gather settings fixed at construction.

    Args:
        gather: "local" | "global" | "global_with_grad" | "grouped".
        local_loss: see `clip_loss`.
        group_size: G for gather="grouped" (-1 = all ranks).
    """

    def __init__(self, gather: str = "local", local_loss: bool = False, group_size: int = -1):
        super().__init__()
        _check_gather(gather, "ContrastiveLoss")
        self.gather, self.local_loss, self.group_size = gather, local_loss, group_size

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor) -> Tensor:
        return clip_loss(image_features, text_features, logit_scale, self.gather, self.local_loss, self.group_size)

    def extra_repr(self) -> str:
        return f"gather={self.gather!r}, local_loss={self.local_loss}, group_size={self.group_size}"


class SigLipLoss(nn.Module):
    """Module form of `siglip_loss`.

    Args:
        gather: "local" | "global" | "global_with_grad" | "grouped".
        group_size: G for gather="grouped" (-1 = all ranks).
    """

    def __init__(self, gather: str = "local", group_size: int = -1):
        super().__init__()
        _check_gather(gather, "SigLipLoss")
        self.gather, self.group_size = gather, group_size

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor, logit_bias: Tensor) -> Tensor:
        return siglip_loss(image_features, text_features, logit_scale, logit_bias, self.gather, self.group_size)

    def extra_repr(self) -> str:
        return f"gather={self.gather!r}, group_size={self.group_size}"
