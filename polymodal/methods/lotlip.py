"""LoTLIP (arXiv 2410.05249): long-text language-image pre-training with corner tokens.

The text tower (`polymodal.models.text.TextTower` with `num_readout_tokens = K`) inserts K corner
tokens; `CLIP.encode_text_readouts` returns the CLS/EOT feature followed by the K corner features.

Objective for a batch of B images, their short captions and M sub-captions of each long caption
(`batch["long_input_ids"]`, (B, M, L)), every term a symmetric InfoNCE (`clip_loss`, the loss
config's gather mode) of the images against one (B, E) set of text features:

* L_short: the short caption's CLS/EOT feature (never its corners);
* L_{m,r}: sub-caption m, read-out r, for r over all K+1 read-outs (`long_features="all"`, as the
  authors' code) or the CLS/EOT feature only (`long_features="cls"`).

With n = M*(K+1) (or M) long terms,

* `normalize="count"` (the authors' released ClipLoss):
  loss = (w_clip * L_short + w_long * sum_{m,r} L_{m,r}) / (1 + n),
  i.e. with unit weights the plain mean over all 1 + n text features;
* `normalize="mean"`: loss = w_clip * L_short + w_long * mean_{m,r} L_{m,r}.

M = 0 (no `long_input_ids`, or M = 0 columns) gives plain CLIP: loss = w_clip * L_short.
K = 0 with M > 0 is "short + long captions without corners". At inference only the CLS/EOT
feature is used (`CLIP.encode_text`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..losses.contrastive import LossConfig, build_contrastive_loss
from ..models.base import ConfigDict
from .base import Method
from .clip import trim_padding

LONG_FEATURES = ("all", "cls")
NORMALIZE = ("count", "mean")


@dataclass
class LoTLIPConfig(ConfigDict):
    num_corners: int = 2            # K corner tokens (sets text.num_readout_tokens); 0 = none
    w_clip: float = 1.0             # weight of the short caption's InfoNCE
    w_long: float = 1.0             # weight of each long-text read-out's InfoNCE
    long_features: str = "all"      # "all": CLS + K corners of every sub-caption (authors) | "cls"
    normalize: str = "count"        # "count": weighted sum / (1 + n) (authors) | "mean" (see module doc)

    def __post_init__(self):
        if int(self.num_corners) != self.num_corners or self.num_corners < 0:
            raise ValueError(f"lotlip.num_corners must be an integer >= 0, got {self.num_corners!r}")
        if self.long_features not in LONG_FEATURES:
            raise ValueError(f"lotlip.long_features must be one of {LONG_FEATURES}, got {self.long_features!r}")
        if self.normalize not in NORMALIZE:
            raise ValueError(f"lotlip.normalize must be one of {NORMALIZE}, got {self.normalize!r}")


def combine_losses(short: Tensor, long: list[Tensor], w_clip: float, w_long: float, normalize: str) -> Tensor:
    """The LoTLIP total from the short-caption loss and the n long-text losses (see the module doc).

    Args:
        short: scalar InfoNCE of the short captions.
        long: n scalar InfoNCE losses, one per (sub-caption, read-out); may be empty.
        w_clip, w_long: the weights.
        normalize: "count" (divide the weighted sum by 1 + n) or "mean" (average the long terms).
    Returns:
        Scalar loss.
    """
    if not long:
        return w_clip * short
    total_long = torch.stack(long).sum()
    if normalize == "count":
        return (w_clip * short + w_long * total_long) / (1 + len(long))
    return w_clip * short + w_long * total_long / len(long)


class LoTLIPTask(nn.Module):
    """A dual encoder with corner tokens and the LoTLIP objective.

    `forward(batch) -> {"loss", "short", "long", "logit_scale"}`; "short" and "long" (the mean of the
    long-text terms, 0 when there are none) are detached, for logging.

    Args:
        model: a `CLIP` whose text tower has `num_readout_tokens == cfg.num_corners`.
        cfg: `LoTLIPConfig` (or a dict of its fields).
        loss_cfg: gather mode; only `kind="infonce"` is supported.
    """

    def __init__(self, model: nn.Module, cfg: LoTLIPConfig | dict | None = None, loss_cfg: LossConfig | None = None):
        super().__init__()
        cfg = LoTLIPConfig(**cfg) if isinstance(cfg, dict) else (cfg or LoTLIPConfig())
        have = getattr(model.config.text, "num_readout_tokens", 0)
        if have != cfg.num_corners:
            raise ValueError(f"lotlip.num_corners={cfg.num_corners} but the model's text tower has "
                             f"num_readout_tokens={have}; set them equal (a recipe sets the tower from "
                             f"lotlip.num_corners unless model.path loads a saved model)")
        self.model, self.cfg = model, cfg
        self.loss = build_contrastive_loss(loss_cfg, kinds=("infonce",), who="LoTLIP, which uses InfoNCE")

    def contrastive(self, image: Tensor, text: Tensor) -> Tensor:
        """Symmetric InfoNCE of (B, E) image and text features in the configured gather mode."""
        return self.loss(image, text, self.model.scale())

    def long_features(self, long_ids: Tensor) -> Tensor:
        """(B, M, L) sub-caption ids -> (B, M, R, E) normalised read-out features (R = K+1 or 1)."""
        B, M, _ = long_ids.shape
        ids = trim_padding(long_ids, self.model.config.text.pad_token_id).reshape(B * M, -1)
        feats = self.model.encode_text_readouts(ids)                   # (B*M, 1+K, E)
        if self.cfg.long_features == "cls":
            feats = feats[:, :1]
        return feats.reshape(B, M, feats.shape[1], feats.shape[2])

    # The Trainer's feature-cache accumulation (`optim.accum_steps` > 1) may call the two stages separately.
    supports_feature_cache = True

    def forward(self, batch: dict, stage: str = "all") -> dict:
        """The LoTLIP losses of a batch, or one of the two stages of the feature-cache accumulation: "features" ->
        {"image": (B, E), "short": (B, E)[, "long": (B, M, R, E)]}; "loss" -> the losses of such features."""
        if stage == "loss":
            return self._losses(batch["image"], batch["short"], batch.get("long"))
        pad = self.model.config.text.pad_token_id
        image = self.model.encode_image(batch["pixels"])                        # (B, E)
        short_txt = self.model.encode_text(trim_padding(batch["input_ids"], pad))  # (B, E): CLS/EOT only
        long_ids = batch.get("long_input_ids")
        feats = None
        if long_ids is not None and long_ids.ndim == 3 and long_ids.shape[1] > 0:
            feats = self.long_features(long_ids)                                 # (B, M, R, E)
        if stage == "features":
            return {"image": image, "short": short_txt, **({"long": feats} if feats is not None else {})}
        return self._losses(image, short_txt, feats)

    def _losses(self, image: Tensor, short_txt: Tensor, feats: Tensor | None) -> dict:
        """image (B, E), short captions (B, E), sub-captions (B, M, R, E) or None -> the losses."""
        short = self.contrastive(image, short_txt)
        long_losses: list[Tensor] = []
        if feats is not None:
            for m in range(feats.shape[1]):
                for r in range(feats.shape[2]):
                    long_losses.append(self.contrastive(image, feats[:, m, r]))
        c = self.cfg
        loss = combine_losses(short, long_losses, c.w_clip, c.w_long, c.normalize)
        long_mean = torch.stack(long_losses).mean().detach() if long_losses else short.new_zeros(())
        return {"loss": loss, "short": short.detach(), "long": long_mean,
                "logit_scale": self.model.scale().detach()}


class LoTLIPMethod(Method):
    """`method: lotlip`: corner tokens on the text tower (from `lotlip.num_corners`) and the LoTLIP loss."""

    config_cls = LoTLIPConfig

    def model_overrides(self) -> dict:
        return {"text.num_readout_tokens": self.cfg.num_corners}

    def build_task(self, model: nn.Module) -> nn.Module:
        return LoTLIPTask(model, self.cfg, self.run.loss)


__all__ = ["LoTLIPConfig", "LoTLIPMethod", "LoTLIPTask", "combine_losses"]
