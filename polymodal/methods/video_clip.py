"""Video-text contrastive training (`method: video_clip`): any dual encoder wrapped with a temporal module.

The image-text model comes from `model.path` (pretrained weights on disk, any format `load_model` reads, or a
saved video model) or `model.name`; `video_clip.temporal` chooses how frame features become a video feature
(`mean`, `transformer`, `stan`; see `polymodal.models.temporal`). Records carry a `video` (file, GIF or frame
folder) read with `data.num_frames` frames by `data.frame_strategy`. The loss is the recipe's `loss` section,
as for images: the same gather modes and SigLIP.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..losses.contrastive import LossConfig, build_contrastive_loss
from ..models.base import ConfigDict
from .base import Method
from .clip import trim_padding


@dataclass
class VideoCLIPSection(ConfigDict):
    """The recipe's `video_clip:` section."""
    temporal: dict = field(default_factory=dict)   # TemporalConfig keys: kind, layers, heads, stan_layers ...

    def __post_init__(self):
        from ..models.temporal import TemporalConfig
        TemporalConfig(**self.temporal)            # validates the keys and values now, naming temporal.<key>


class VideoContrastiveTask(nn.Module):
    """Video-text InfoNCE / SigLIP: `batch["frames"]` (B, T, 3, H, W), `frame_valid` (B, T), `input_ids` (B, L).

    Args:
        model: a `VideoCLIP` (anything with `encode_video`, `encode_text`, `scale()`).
        loss: the recipe's `loss` section.
    """

    def __init__(self, model: nn.Module, loss: LossConfig | None = None):
        super().__init__()
        self.model = model
        self.loss = build_contrastive_loss(loss)

    def forward(self, batch: dict) -> dict:
        video = self.model.encode_video(batch["frames"], batch.get("frame_valid"))          # (B, E)
        ids = trim_padding(batch["input_ids"], self.model.config.text.pad_token_id)
        text = self.model.encode_text(ids)                                                  # (B, E)
        loss = self.loss(video, text, self.model.scale())
        return {"loss": loss, "contrastive": loss.detach(), "logit_scale": self.model.scale().detach()}


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

    def build_task(self, model: nn.Module) -> nn.Module:
        return VideoContrastiveTask(model, self.run.loss)
