"""SHE-Net (`method: shenet`): the caption's syntax hierarchy guides frame and patch attention and the similarity.

The model is an `SHENetModel` (`polymodal.models.hierarchy`): a `VideoCLIP` over a CLIP (temporal kind mean or
transformer), built as `video_clip` builds it, whose config carries the hierarchy (SHE-Net adds no parameters),
so the saved model scores retrieval with it wherever it is loaded. Captions are parsed once per data set
(`polymodal.data.syntax`, a cache beside the manifest); batches carry node token positions.

Evaluation: `video_retrieval` scores with the model's hierarchical similarity; `shenet_retrieval`
(`polymodal.eval.hierarchy_retrieval`) gives the same numbers plus attention-hit rates on the
MovingShapes ground truth (`action_frames`, `boxes`): the share of verb attention on the action frames and of
noun attention on the actor's patches, each beside the share uniform attention would give.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..data.manifests import all_captions
from ..distributed import all_gather_padded, all_gather_with_grad, all_reduce_max, rank, world_size
from ..losses.contrastive import block_infonce, check_block_gather
from ..models.base import ConfigDict
from ..models.hierarchy import (HierarchyConfig, SHENetConfig, SHENetModel, SHENetSettings, TextFeatures,
                                VideoFeatures, encode_text_features, encode_video_features, hierarchical_infonce,
                                hierarchical_similarity)
from .clip import trim_padding
from .video_clip import VideoCLIPMethod

EVAL_TASK = "shenet_retrieval"


@dataclass
class SHENetSection(SHENetSettings, ConfigDict):
    """The recipe's `shenet:` section: the model's own settings (`SHENetSettings`), its temporal module and where
    the parses are cached."""
    temporal: dict = field(default_factory=dict)   # TemporalConfig keys (kind mean | transformer)
    parse_cache: str = ""           # parse cache file; "" = `<train manifest stem>.syntax.json` beside it

    def __post_init__(self):
        from ..config import from_dict
        from_dict(SHENetConfig, {"temporal": dict(self.temporal), **self.settings()}, "shenet")  # the model's checks


# ---------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------
class NodeCollate:
    """`ImageTextCollate` plus the caption nodes (`polymodal.data.syntax.batch_nodes` keys).

    Args:
        tokenizer, context_length: as for `ImageTextCollate`; node positions use the same row layout.
        parses: caption -> parse (from a `ParseCache`); captions missing from it are parsed by `parser`.
        parser: callable `list[str] -> list[parse]` for misses (default a lazy `SpacyParser`).
        shift: read-out positions the text tower inserts after CLS (`syntax.readout_shift`).
        max_nodes, max_tokens: per-kind node limit and per-node token limit.
    """

    def __init__(self, tokenizer, context_length: int | None, parses: dict, parser=None, shift: int = 0,
                 max_nodes: int = 4, max_tokens: int = 8):
        from ..data.datasets import ImageTextCollate
        self.base = ImageTextCollate(tokenizer, context_length)
        self.tokenizer, self.context_length, self.parses = tokenizer, context_length, parses
        self.parser, self.shift, self.max_nodes, self.max_tokens = parser, shift, max_nodes, max_tokens

    def __call__(self, samples: list) -> dict:
        from ..data.syntax import SpacyParser, batch_nodes
        batch = self.base(samples)
        if "captions" not in batch:
            return batch
        missing = list(dict.fromkeys(c for c in batch["captions"] if c not in self.parses))
        if missing:
            self.parser = self.parser or SpacyParser()
            self.parses.update(zip(missing, self.parser(missing)))
        parses = [self.parses[c] for c in batch["captions"]]
        L = batch["input_ids"].shape[1]
        batch.update(batch_nodes(self.tokenizer, batch["captions"], parses, L, self.shift,
                                 {k: self.max_nodes for k in ("verb", "noun", "adj")}, self.max_tokens))
        return batch


# ---------------------------------------------------------------------------------------------------
# Task
# ---------------------------------------------------------------------------------------------------
NODE_KEYS = ("verb_tokens", "verb_mask", "noun_tokens", "noun_mask", "noun_head", "adj_tokens", "adj_mask",
             "adj_head")


def gather_features(text: TextFeatures, video: VideoFeatures) -> tuple[TextFeatures, VideoFeatures]:
    """Every rank's text and video features, in rank order.

    Float features are gathered with gradient (each rank's features get the gradient of every rank's loss);
    masks and head indices as constants. Node counts differ between batches, so each kind is padded to the
    largest count of any rank (padded nodes are invalid, which the similarity ignores).
    """
    sizes = {k: all_reduce_max(v.shape[1], v.device) for k, v in text.nodes.items()}   # one collective a kind
    t = TextFeatures(all_gather_with_grad(text.sentence),
                     {k: all_gather_padded(v, 1, 0.0, size=sizes[k]) for k, v in text.nodes.items()},
                     {k: all_gather_padded(v, 1, False, size=sizes[k]) for k, v in text.node_valid.items()},
                     {k: all_gather_padded(v, 1, -1, with_grad=False, size=sizes[k]) for k, v in text.heads.items()})
    v = VideoFeatures(all_gather_with_grad(video.video), all_gather_with_grad(video.frames),
                      all_gather_with_grad(video.patches),
                      all_gather_padded(video.valid, 1, False, size=video.valid.shape[1]))   # T is the same everywhere
    return t, v


def shenet_loss(text: TextFeatures, video: VideoFeatures, cfg: HierarchyConfig, scale: Tensor,
                gather: str = "global_with_grad") -> tuple[Tensor, dict]:
    """Symmetric InfoNCE on SHE-Net's hierarchical similarity, over the global batch under DDP.

    With `gather="global_with_grad"` and several ranks, rank r scores its B texts against every rank's
    videos and every rank's texts against its B videos (the two (B, W*B) blocks its rows and columns need,
    not the whole (W*B, W*B) matrix); averaged over ranks (as DDP averages gradients) the loss and its
    gradients equal the single-process loss on the concatenated batch. `"local"` (or one process) uses
    the local (B, B) matrix.

    Args:
        text, video: this rank's B texts and B videos (matching pairs row by row).
        cfg: the hierarchy's weights and temperature.
        scale: the exp'ed logit scale.
        gather: "local" | "global_with_grad".
    Returns:
        (loss, per-level mean score of the matched pairs, detached).
    """
    B = len(text)
    if gather == "local" or world_size() == 1:
        s = hierarchical_similarity(text, video, cfg)
        loss, offset = hierarchical_infonce(s.total, scale), 0
    else:
        all_text, all_video = gather_features(text, video)
        s = hierarchical_similarity(text, all_video, cfg)                       # (B, W*B) own texts
        cols = hierarchical_similarity(all_text, video, cfg).total              # (W*B, B) own videos
        offset = rank() * B
        loss = block_infonce(scale * s.total, scale * cols, offset)
    rows = torch.arange(B, device=s.total.device)
    levels = {name: getattr(s, name)[rows, rows + offset].mean().detach()
              for name in ("sentence", "verb", "noun", "adj") if getattr(s, name) is not None}
    return loss, levels


class SHENetTask(nn.Module):
    """Symmetric InfoNCE on the (B, B) hierarchical similarity of a batch.

    Args:
        model: a `VideoCLIP` over a CLIP.
        cfg: the hierarchy's weights and temperature.
    Batch keys: `frames` (B, T, 3, H, W), `frame_valid` (B, T), `input_ids` (B, L) and the node keys.
    """

    def __init__(self, model: nn.Module, cfg: HierarchyConfig, gather: str = "global_with_grad"):
        super().__init__()
        self.model, self.cfg, self.gather = model, cfg, gather

    def forward(self, batch: dict) -> dict:
        video = encode_video_features(self.model, batch["frames"], batch.get("frame_valid"))
        ids = trim_padding(batch["input_ids"], self.model.config.text.pad_token_id)
        text = encode_text_features(self.model, ids, {k: batch[k] for k in NODE_KEYS})
        scale = self.model.scale()
        loss, levels = shenet_loss(text, video, self.cfg, scale, self.gather)
        out = {"loss": loss, "contrastive": loss.detach(), "logit_scale": scale.detach()}
        out.update({f"pos_{name}": v for name, v in levels.items()})   # matched-pair score per level
        return out


# ---------------------------------------------------------------------------------------------------
# Method
# ---------------------------------------------------------------------------------------------------
class SHENetMethod(VideoCLIPMethod):
    """`method: shenet`."""

    config_cls = SHENetSection
    media = "video"

    def __init__(self, run: Any, cfg: Any = None):
        super().__init__(run, cfg if cfg is not None else SHENetSection())

    def validate(self) -> None:
        d = self.run.data
        if list(getattr(d, "langs", ["en"])) != ["en"]:
            raise ValueError(f"data.langs: SHE-Net trains on English captions only (spaCy parses), got {d.langs}")
        if getattr(d, "shards", None):
            raise ValueError("data.shards: SHE-Net trains from a video manifest (data.train), not shards")
        if self.run.loss.kind != "infonce":
            raise ValueError(f"loss.kind: SHE-Net's loss is InfoNCE on the hierarchical similarity, not "
                             f"{self.run.loss.kind!r}")
        check_block_gather(self.run.loss.gather, "SHE-Net supports")

    def build_model(self, tokenizer) -> nn.Module:
        """The video model (as `video_clip` builds it) as an `SHENetModel` with the recipe's hierarchy; a saved
        SHE-Net model continues with the recipe's settings (it has no parameters of its own)."""
        from ..models.video import VideoCLIP
        model = super(VideoCLIPMethod, self).build_model(tokenizer)
        if not isinstance(model, VideoCLIP):
            model = VideoCLIP.from_image_model(model, dict(self.cfg.temporal)).train()
        return SHENetModel.from_video_model(model, **self.cfg.settings())

    def build_dataset(self, model: nn.Module, rank: int, world_size: int):
        from ..data.syntax import ParseCache, cache_path
        dataset, per_epoch = super().build_dataset(model, rank, world_size)
        path = self.cfg.parse_cache or cache_path(self.run.data.train)
        cache = ParseCache(path)
        cache.update(all_captions(dataset.manifest.records, self.run.data.caption_key))
        model.parses.update(cache.parses)
        return dataset, per_epoch

    def collate(self, model: nn.Module):
        from ..data.syntax import readout_shift
        tok = model.tokenizer
        return NodeCollate(tok, getattr(tok, "context_length", None), model.parses,
                           shift=readout_shift(model.config.text), max_nodes=self.cfg.max_nodes,
                           max_tokens=self.cfg.max_node_tokens)

    def build_task(self, model: nn.Module) -> nn.Module:
        return SHENetTask(model, self.cfg.hierarchy(), self.run.loss.gather)


__all__ = ["SHENetSection", "SHENetMethod", "SHENetTask", "NodeCollate", "EVAL_TASK", "shenet_loss", "gather_features"]
