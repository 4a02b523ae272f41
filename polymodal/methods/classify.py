"""Image classification on any loadable encoder (`method: classify`; issue #34 item 1, the fine-tuning half).

The model is an `ImageClassifier` (`polymodal.models.classifier`): the encoder of `model.path` (any model with
`encode_image` that `load_model` reads: a saved polymodal run, an HF CLIP folder, an OpenCLIP checkpoint ...)
or of `model.name`, plus a linear head over `classify.classes` (default `classes.json` beside `data.train`;
an image folder's own subfolders). `classify.freeze: true` trains the head alone (a linear probe trained by
SGD, with the recipe's optimiser, resume and report); `false` fine-tunes the whole encoder with it.

Records carry an `image` and a `label` (a class name or index); the captions are read only because the
shared data pipeline tokenizes them. Loss: cross-entropy with `classify.label_smoothing`. The saved
`out_dir/model` is the classifier (`model_type: classifier`); the `classification` eval task scores its head.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..config import ConfigError
from ..models.base import ConfigDict
from .base import Method, image_text_dataset

EVAL_TASK = "classification"


@dataclass
class ClassifySection(ConfigDict):
    """The recipe's `classify:` section."""
    classes: str = ""                 # classes.json (its `classes` list) or a text file of names; "" = beside data.train
    freeze: bool = True               # train the head alone (the encoder stays as loaded)
    normalize: bool = True            # the head reads the L2-normalised image embedding
    label_smoothing: float = 0.0      # cross-entropy label smoothing

    def __post_init__(self):
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"classify.label_smoothing must be in [0, 1), got {self.label_smoothing}")


class ClassifyTask(nn.Module):
    """Cross-entropy of the classifier's logits against `batch["labels"]` (B,), plus the batch accuracy."""

    def __init__(self, model: nn.Module, label_smoothing: float = 0.0):
        super().__init__()
        self.model, self.label_smoothing = model, label_smoothing

    def forward(self, batch: dict) -> dict:
        logits = self.model.classify(batch["pixels"])                                  # (B, C)
        y = batch["labels"]                                                            # (B,)
        loss = nn.functional.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)
        return {"loss": loss, "batch_top1": (logits.argmax(dim=1) == y).float().mean().detach()}


class ClassifyMethod(Method):
    """`method: classify`."""

    config_cls = ClassifySection
    media = "image"

    def __init__(self, run: Any, cfg: Any = None):
        super().__init__(run, cfg if cfg is not None else ClassifySection())
        self._names = None

    def classes_path(self) -> str:
        if self.cfg.classes:
            return self.cfg.classes
        if not self.run.data.train:
            raise ValueError("classify.classes is empty and data.train is not set: give classify.classes")
        train = Path(self.run.data.train)
        return str(train / "classes.json" if train.is_dir() else train.parent / "classes.json")

    def class_names(self) -> list[str]:
        """The head's classes: the classes file's, or an image folder's own subfolders when it has none."""
        if self._names is None:
            path, train = self.classes_path(), Path(self.run.data.train or ".")
            if not Path(path).is_file() and not self.cfg.classes and train.is_dir():
                from ..data.folders import read_image_folder
                self._names = list(read_image_folder(train)[1])
            else:
                from ..data.labels import class_names
                self._names = list(class_names(path)[0])
        return self._names

    def paths(self) -> list[str]:
        train = Path(self.run.data.train or ".")
        return [self.classes_path()] if self.cfg.classes or not train.is_dir() else []

    def build_model(self, tokenizer) -> nn.Module:
        from ..models.classifier import ImageClassifier
        base = super().build_model(tokenizer)
        if isinstance(base, ImageClassifier):                  # continue training a saved classifier
            if base.class_names != self.class_names():
                raise ValueError(f"model.path {self.run.model.path} classifies {base.class_names[:5]}..., not the "
                                 f"classes of {self.classes_path()}; start from its encoder instead")
            model = base
        elif not hasattr(base, "encode_image"):
            raise ValueError(f"model.path {self.run.model.path}: a {type(base).__name__} has no image encoder "
                             f"(encode_image); classify needs an image-text or image model")
        else:
            model = ImageClassifier(base, self.class_names(), self.cfg.normalize)
        model.base.requires_grad_(not self.cfg.freeze)
        return model.train()

    def build_dataset(self, model: nn.Module, rank: int, world_size: int):
        return image_text_dataset(self.run, model, rank, world_size, media="image", class_names=self.class_names(),
                                  multi_hot=False, extra_keys=("label",))

    def build_task(self, model: nn.Module) -> nn.Module:
        return ClassifyTask(model, self.cfg.label_smoothing)


__all__ = ["ClassifySection", "ClassifyTask", "ClassifyMethod", "EVAL_TASK"]
