"""Two-stream video scene recognition (`method: scene`; docs/methods.md, scene, arXiv 2401.04354).

The model is a `polymodal.models.scene.SceneModel` over a `VideoCLIP` (from `model.path`, `model.name`, or a saved
scene model folder to continue training): a temporal stream and a frame-level stream, each scoring the labels by
similarity to their name embeddings, child scores refined with parent scores. Training records carry a `video`,
a caption (any text; the tokenizer and the optional video-text token read it) and `labels` (names or indices of the
label hierarchy `scene.classes`, default ``classes.json`` beside `data.train`).

Loss per batch: the multi-label loss of each stream (`scene.loss`: softmax | asl | bce) plus
`scene.distill_weight` times the self-distillation KL of each stream towards the detached ensemble
(`losses.distill.self_distillation`), when both streams are on.

Evaluation task `scene` (`polymodal.eval.scene.scene_eval_task`) runs on the SceneModel; the video-text tasks run
on it too (through its video model). The saved `out_dir/model` is the SceneModel (one family, `model_type: scene`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..config import ConfigError
from ..losses.distill import DISTILL_KINDS, LOSS_KINDS, multilabel_loss, self_distillation
from ..models.base import ConfigDict
from .base import Method, image_text_dataset

EVAL_TASK = "scene"


@dataclass
class SceneSection(ConfigDict):
    """The recipe's `scene:` section."""
    classes: str = ""               # label hierarchy (classes.json or a label tree); "" = classes.json beside data.train
    model: dict = field(default_factory=dict)   # SceneConfig keys: streams, layers, fusion_layers, refine, use_text ...
                                                # (label_residual defaults to 0.5 here)
    loss: str = "softmax"           # "softmax" (log(1+sum_neg e^z) + log(1+sum_pos e^-z)) | "asl" | "bce"
    gamma_neg: float = 4.0          # asl
    gamma_pos: float = 0.0          # asl
    clip: float = 0.05              # asl
    distill_weight: float = 1.0     # self-distillation weight (0 = off; needs streams: both)
    distill_tau: float = 2.0        # distillation temperature
    distill_kind: str = "softmax"   # "softmax" (over labels) | "bernoulli" (per label)

    def __post_init__(self):
        own = [k for k in ("video", "labels", "model_type") if k in self.model]
        if own:
            raise ConfigError(f"scene.model: {', '.join(own)} are set by the model itself (the video model and "
                              f"scene.classes), not in the recipe")
        self.scene_config()                        # validates the keys now, naming scene.model.<key>
        if self.loss not in LOSS_KINDS:
            raise ConfigError(f"scene.loss must be one of {', '.join(LOSS_KINDS)}, got {self.loss!r}")
        if self.distill_kind not in DISTILL_KINDS:
            raise ConfigError(f"scene.distill_kind must be one of {', '.join(DISTILL_KINDS)}, got "
                              f"{self.distill_kind!r}")
        if self.distill_weight < 0:
            raise ConfigError(f"scene.distill_weight must be >= 0, got {self.distill_weight}")
        if not self.distill_tau > 0:
            raise ConfigError(f"scene.distill_tau must be > 0, got {self.distill_tau}")

    def scene_config(self):
        """The model's `SceneConfig` (`label_residual` defaults to `models.scene.SCENE_LABEL_RESIDUAL` here; a saved
        config without the key is a model from before it, with no residual)."""
        from ..config import from_dict
        from ..models.scene import SCENE_LABEL_RESIDUAL, SceneConfig
        return from_dict(SceneConfig, {"label_residual": SCENE_LABEL_RESIDUAL, **self.model}, "scene.model")


class SceneTask(nn.Module):
    """Multi-label loss of each stream + self-distillation: `batch["frames"]`, `frame_valid`, `multi_labels` (B, C),
    `input_ids` (B, L) (used when the model's `use_text` is on).

    Args:
        model: a SceneModel.
        cfg: the recipe's `scene:` section.
    """

    def __init__(self, model: nn.Module, cfg: SceneSection):
        super().__init__()
        self.model, self.cfg = model, cfg

    def forward(self, batch: dict) -> dict:
        c = self.cfg
        text = batch.get("input_ids") if self.model.config.use_text else None
        out = self.model(batch["frames"], batch.get("frame_valid"), text)
        y = batch["multi_labels"]                                                      # (B, C)
        logs, loss = {}, 0.0
        for name, z in (("temporal", out.temporal), ("frame", out.frame)):
            if z is not None:
                term = multilabel_loss(z, y, c.loss, c.gamma_neg, c.gamma_pos, c.clip)
                loss = loss + term
                logs[f"cls_{name}"] = term.detach()
        streams = out.streams()
        if len(streams) > 1 and c.distill_weight > 0:
            kl, _ = self_distillation(streams, c.distill_tau, c.distill_kind)
            loss = loss + c.distill_weight * kl
            logs["distill"] = kl.detach()
        return {"loss": loss, **logs}


class SceneMethod(Method):
    """`method: scene`."""

    config_cls = SceneSection
    media = "video"

    def __init__(self, run: Any, cfg: Any = None):
        super().__init__(run, cfg if cfg is not None else SceneSection())
        self._hierarchy = None

    def classes_path(self) -> str:
        if self.cfg.classes:
            return self.cfg.classes
        if not self.run.data.train:
            raise ValueError("scene.classes is empty and data.train is not set: give scene.classes (a classes.json "
                             "or label tree file)")
        return str(Path(self.run.data.train).parent / "classes.json")

    def hierarchy(self):
        """The label hierarchy, loaded once."""
        if self._hierarchy is None:
            from ..data.labels import load_hierarchy
            self._hierarchy = load_hierarchy(self.classes_path())
        return self._hierarchy

    def validate(self) -> None:
        sc = self.cfg.scene_config()
        if self.run.data.num_frames > sc.max_frames and sc.has_temporal:
            raise ValueError(f"data.num_frames={self.run.data.num_frames} exceeds scene.model.max_frames="
                             f"{sc.max_frames}; raise scene.model.max_frames")
        if self.cfg.distill_weight > 0 and sc.streams != "both":
            raise ValueError(f"scene.distill_weight={self.cfg.distill_weight} needs both streams, but "
                             f"scene.model.streams={sc.streams!r}; set scene.distill_weight=0")

    def paths(self) -> list[str]:
        return [self.classes_path()] if (self.cfg.classes or self.run.data.train) else []

    def check_world(self, world: dict, path: Path) -> None:
        conf = world.get("config") or {}
        frames, n = conf.get("num_frames"), self.run.data.num_frames
        if (conf.get("compound_fraction") or 0) > 0 and isinstance(frames, int) and n != frames:
            raise ConfigError(f"data.num_frames={n}: the videos ({path}) have {frames} frames and compound order "
                              f"labels, which a subset of the frames breaks; set data.num_frames={frames}")

    def build_model(self, tokenizer) -> nn.Module:
        from ..models.scene import SceneModel
        from ..models.video import VideoCLIP
        base = super().build_model(tokenizer)
        if isinstance(base, SceneModel):                # continue training a scene model
            if base.hierarchy.names != self.hierarchy().names:
                raise ValueError(f"model.path {self.run.model.path} was trained on other labels than "
                                 f"{self.classes_path()}")
            return base
        video = base if isinstance(base, VideoCLIP) else VideoCLIP.from_image_model(base)
        return SceneModel(video, self.hierarchy(), self.cfg.scene_config()).train()

    def build_dataset(self, model: nn.Module, rank: int, world_size: int):
        return image_text_dataset(self.run, model, rank, world_size, media="video",
                                  class_names=self.hierarchy().names)

    def build_task(self, model: nn.Module) -> nn.Module:
        return SceneTask(model, self.cfg)


__all__ = ["SceneSection", "SceneTask", "SceneMethod", "EVAL_TASK"]
