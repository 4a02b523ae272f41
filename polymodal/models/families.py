"""The one model table: `model_type` (the key in a saved `config.json`) -> the family's class, as a string.

Like transformers' `CONFIG_MAPPING_NAMES`, the table holds strings and imports a family only when it is
used, so reading it costs nothing and one family's dependencies stay its own. Every family class carries
`config_class` (the dataclass its `config.json` is read into, strictly) and is built from a config by
`from_config(cfg)` (default: `cls(cfg)`). Families that wrap another model (a video model around an
image-text model, the scene heads around a video model, an adapter around a frozen encoder) nest the wrapped
model's config dict in their own and build it through this table too.

A new family is one module in `polymodal/models/` and one row here; `polymodal.hub.load_pretrained` and
`polymodal.models.factory.create_model` then read and build it.
"""
from __future__ import annotations

import importlib

FAMILIES: dict[str, str] = {
    "clip": "polymodal.models.clip:CLIP",
    "m2": "polymodal.models.multiway:M2Encoder",
    "coca": "polymodal.models.coca:CoCa",
    "video_clip": "polymodal.models.video:VideoCLIP",
    "m2raap": "polymodal.models.video_heads:M2RAAPModel",
    "shenet": "polymodal.models.hierarchy:SHENetModel",
    "scene": "polymodal.models.scene:SceneModel",
    "snps3": "polymodal.models.fusion:SNPS3Model",
    "text_reward": "polymodal.models.reward:TextRewardModel",
    "mllm": "polymodal.models.mllm:MLLM",
    "multilabel_adapter": "polymodal.models.multilabel:AdaptedEncoder",
    "classifier": "polymodal.models.classifier:ImageClassifier",
    "vqa": "polymodal.models.vqa:VQAModel",
}

# Families whose models encode images and texts into one space (what the image-text eval tasks need).
IMAGE_TEXT = ("clip", "m2", "coca")


def family_class(model_type, where: str = "config") -> type:
    """The class of `model_type`, imported now.

    Args:
        model_type: a key of `FAMILIES`.
        where: the file or key the type came from, for the error message.
    Raises:
        ConfigError: an unknown type, listing the known ones.
    """
    if model_type not in FAMILIES:
        from ..config import ConfigError
        raise ConfigError(f"{where}: unknown model_type {model_type!r}; known: {', '.join(FAMILIES)}")
    module, _, name = FAMILIES[model_type].partition(":")
    return getattr(importlib.import_module(module), name)


def build_model(cfg):
    """A randomly initialised model of the family named by `cfg.model_type` (its `from_config`)."""
    cls = family_class(cfg.model_type)
    return cls.from_config(cfg) if hasattr(cls, "from_config") else cls(cfg)


__all__ = ["FAMILIES", "IMAGE_TEXT", "family_class", "build_model"]
