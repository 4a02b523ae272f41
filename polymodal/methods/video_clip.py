"""Video-text contrastive training (`method: video_clip`): any dual encoder wrapped with a temporal module.

The image-text model comes from `model.path` (pretrained weights on disk, any format `load_model` reads, or a
saved video model) or `model.name`; `video_clip.temporal` chooses how frame features become a video feature
(`mean`, `transformer`, `stan`; see `polymodal.models.temporal`). Records carry a `video` (file, GIF or frame
folder) read with `data.num_frames` frames by `data.frame_strategy`. The loss is the recipe's `loss` section,
as for images: the same gather modes and SigLIP.

Two options (our design) aim the objective at frame order, which the plain contrastive loss does not need on
MovingShapes (a batch rarely holds a video and its reversal; docs/results.md, temporal modelling):

* `order_weight` > 0 adds an order loss: each video whose record has an order partner (`pair_id`: the same
  frames reversed, the opposite caption) is scored against its own reversal (frames flipped in time) under its
  caption, and its caption against the partner's caption under the video; a two-way cross-entropy for each,
  at the model's logit scale. Videos without a partner in the training manifest take no part.
* `partner_batches: true` loads units of two videos, a video and its partner (`data.samplers.PartnerPairs`),
  so every order pair in a batch is whole and the contrastive loss itself has the reversal as a negative.
  `data.batch_size` then counts units: a batch holds twice as many videos.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ConfigError
from ..losses.contrastive import LossConfig, build_contrastive_loss
from ..models.base import ConfigDict
from .base import Method
from .clip import trim_padding

REVERSED_KEY = "reversed_caption_of"     # record field: {caption: the partner's parallel caption}


@dataclass
class VideoCLIPSection(ConfigDict):
    """The recipe's `video_clip:` section."""
    temporal: dict = field(default_factory=dict)   # TemporalConfig keys: kind, layers, heads, stan_layers ...
    order_weight: float = 0.0       # weight of the order loss (video vs its reversal, caption vs the partner's); 0 = off
    partner_batches: bool = False   # batches of (video, order partner) units; data.batch_size then counts units

    def __post_init__(self):
        from ..models.temporal import TemporalConfig
        TemporalConfig(**self.temporal)            # validates the keys and values now, naming temporal.<key>
        if not self.order_weight >= 0:
            raise ConfigError(f"video_clip.order_weight: {self.order_weight} must be >= 0")


def order_loss(video: Tensor, reversed_video: Tensor, text: Tensor, reversed_text: Tensor, has: Tensor,
               scale: Tensor) -> tuple[Tensor, Tensor]:
    """The order objective of a batch: each video against its own reversal, each caption against the partner's.

    For video v_i, its reversal r_i, caption t_i and the reversed (opposite) caption u_i:
    text side CE([<t_i, v_i>, <t_i, r_i>]) and video side CE([<t_i, v_i>, <u_i, v_i>]), target the first entry,
    logits times `scale`, averaged over the rows with a partner.

    Args:
        video, reversed_video: (B, E) L2-normalised embeddings of the clips and of the same clips reversed.
        text, reversed_text: (B, E) L2-normalised embeddings of the captions and of the partners' captions.
        has: (B,) bool, rows with a reversed caption (others are left out).
        scale: the exp'ed logit scale.
    Returns:
        (loss: scalar, 0 when no row has a partner; accuracy: share of those rows whose caption scores its video
        above the reversal, detached).
    """
    pos = (text * video).sum(-1)                                                   # (B,)
    neg_video = (text * reversed_video).sum(-1)                                    # (B,) caption vs reversed clip
    neg_text = (reversed_text * video).sum(-1)                                     # (B,) opposite caption vs clip
    if not bool(has.any()):
        zero = (pos * 0).sum()
        return zero, zero.detach()
    zeros = torch.zeros(int(has.sum()), dtype=torch.long, device=pos.device)
    lt = F.cross_entropy(scale * torch.stack([pos, neg_video], 1)[has], zeros)
    lv = F.cross_entropy(scale * torch.stack([pos, neg_text], 1)[has], zeros)
    acc = (pos > neg_video)[has].float().mean()
    return (lt + lv) / 2, acc.detach()


class VideoContrastiveTask(nn.Module):
    """Video-text InfoNCE / SigLIP: `batch["frames"]` (B, T, 3, H, W), `frame_valid` (B, T), `input_ids` (B, L);
    with an order weight also `reversed_input_ids` (B, L) and `has_reversed` (B,) (from `OrderCollate`).

    Args:
        model: a `VideoCLIP` (anything with `encode_video`, `encode_text`, `scale()`).
        loss: the recipe's `loss` section.
        order_weight: weight of `order_loss` (0 = the contrastive loss alone).
    """

    def __init__(self, model: nn.Module, loss: LossConfig | None = None, order_weight: float = 0.0):
        super().__init__()
        self.model = model
        self.loss = build_contrastive_loss(loss)
        self.order_weight = order_weight

    @property
    def supports_feature_cache(self) -> bool:
        """The Trainer's feature-cache accumulation (`optim.accum_steps` > 1) applies without the order loss (whose
        reversed features and partner flags are not cached)."""
        return self.order_weight == 0

    def forward(self, batch: dict, stage: str = "all") -> dict:
        """The losses of a batch, or, without the order loss, one of the two stages of the feature-cache
        accumulation: "features" -> {"video": (B, E), "text": (B, E)}; "loss" -> the losses of such features."""
        if stage == "loss":
            scale = self.model.scale()
            loss = self.loss(batch["video"], batch["text"], scale)
            return {"loss": loss, "contrastive": loss.detach(), "logit_scale": scale.detach()}
        if stage == "features" and self.order_weight > 0:
            raise ValueError("VideoContrastiveTask: the feature stage has no order loss (video_clip.order_weight=0)")
        valid = batch.get("frame_valid")
        if stage == "features":
            video = self.model.encode_video(batch["frames"], valid)                                # (B, E)
            ids = trim_padding(batch["input_ids"], self.model.config.text.pad_token_id)
            return {"video": video, "text": self.model.encode_text(ids)}                          # (B, E) each
        if self.order_weight > 0:
            video, reversed_video = self.model.encode_video_and_reversal(batch["frames"], valid)   # (B, E) x 2
        else:
            video = self.model.encode_video(batch["frames"], valid)                                # (B, E)
        ids = trim_padding(batch["input_ids"], self.model.config.text.pad_token_id)
        text = self.model.encode_text(ids)                                                         # (B, E)
        scale = self.model.scale()
        loss = self.loss(video, text, scale)
        out = {"contrastive": loss.detach(), "logit_scale": scale.detach()}
        if self.order_weight > 0:
            rids = trim_padding(batch["reversed_input_ids"], self.model.config.text.pad_token_id)
            reversed_text = self.model.encode_text(rids)                                           # (B, E)
            order, acc = order_loss(video, reversed_video, text, reversed_text, batch["has_reversed"], scale)
            loss = loss + self.order_weight * order
            out.update(order=order.detach(), order_acc=acc)
        return {"loss": loss, **out}


def add_reversed_captions(records: list[dict], key: str = "pair_id") -> int:
    """Give every record whose order partner is in `records` the field `reversed_caption_of`: each of its captions
    -> the partner's caption at the same place (MovingShapes writes the paraphrases of two partners in parallel).

    Returns:
        The number of records that got the field.
    """
    from ..data.manifests import all_captions
    from ..data.samplers import partner_units
    n = 0
    for i, j in partner_units(records, key):
        a, b = records[i], records[j]
        if i == j or a.get(key) is None or a.get(key) != b.get(key):
            continue
        ca, cb = all_captions([a]), all_captions([b])
        if len(ca) != len(cb):
            continue
        a[REVERSED_KEY], b[REVERSED_KEY] = dict(zip(ca, cb)), dict(zip(cb, ca))
        n += 2
    return n


class OrderCollate:
    """`ImageTextCollate` plus `reversed_input_ids` (B, L) (the partner's caption for the sample's caption; the
    caption itself where there is none) and `has_reversed` (B,) bool.

    Args:
        tokenizer, context_length: as for `ImageTextCollate`.
    """

    def __init__(self, tokenizer, context_length: int | None):
        from ..data.datasets import ImageTextCollate
        self.base = ImageTextCollate(tokenizer, context_length)

    def __call__(self, samples: list) -> dict:
        batch = self.base(samples)
        if "captions" not in batch:
            return batch
        good = [s for s in samples if s is not None and "_bad" not in s]
        rev = [(s.get(REVERSED_KEY) or {}).get(s["caption"]) for s in good]
        batch["has_reversed"] = torch.tensor([r is not None for r in rev])
        texts = [r if r is not None else s["caption"] for r, s in zip(rev, good)]
        batch["reversed_input_ids"] = self.base._tokenize(texts)                    # (B, L) as input_ids
        return batch


class VideoCLIPMethod(Method):
    """`method: video_clip`."""

    config_cls = VideoCLIPSection
    media = "video"

    def build_model(self, tokenizer) -> nn.Module:
        from ..models.video import VideoCLIP
        model = super().build_model(tokenizer)
        if isinstance(model, VideoCLIP):           # a saved video model keeps its own temporal module
            return model
        return VideoCLIP.from_image_model(model, dict(self.cfg.temporal)).train()

    def build_dataset(self, model: nn.Module, rank: int, world_size: int):
        from .base import image_text_dataset
        c = self.cfg
        extra = ("label", "labels", "lang") + ((REVERSED_KEY,) if getattr(c, "order_weight", 0) > 0 else ())
        dataset, per_epoch = image_text_dataset(self.run, model, rank, world_size, media="video", extra_keys=extra)
        if getattr(c, "order_weight", 0) > 0:
            n = add_reversed_captions(dataset.manifest.records)
            if rank == 0:
                print(f"video_clip.order_weight: {n} of {len(dataset.manifest.records)} training videos have an order "
                      f"partner (pair_id) in {self.run.data.train}; the order loss uses those", flush=True)
        if getattr(c, "partner_batches", False):
            from ..data.samplers import PartnerPairs
            dataset = PartnerPairs(dataset)
        return dataset, per_epoch

    def collate(self, model: nn.Module):
        tok = model.tokenizer
        collate = OrderCollate(tok, getattr(tok, "context_length", None)) if getattr(self.cfg, "order_weight", 0) > 0 \
            else super().collate(model)
        if getattr(self.cfg, "partner_batches", False):
            from ..data.samplers import flatten_collate
            collate = flatten_collate(collate)
        return collate

    def build_task(self, model: nn.Module) -> nn.Module:
        return VideoContrastiveTask(model, self.run.loss, self.cfg.order_weight)
