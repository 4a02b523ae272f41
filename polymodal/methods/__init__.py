"""Methods: the table from a recipe's `method:` name to the class that implements it.

Each value is "module:Class" (imported only when that method is used, so one family's dependencies stay
its own) or the class itself. Adding a method = one module with a `methods.base.Method` subclass plus one
row here; `polymodal.train` knows no method by name. See docs/architecture.md, "How to add a method".
"""
from __future__ import annotations

import importlib

DEFAULT_METHOD = "clip"          # a recipe without `method:`

METHODS: dict[str, object] = {
    "clip": "polymodal.methods.clip:CLIPMethod",
    "m2": "polymodal.methods.clip:CLIPMethod",
    "lotlip": "polymodal.methods.lotlip:LoTLIPMethod",
    "sycoca": "polymodal.methods.sycoca:SyCoCaMethod",
    "text_as_image": "polymodal.methods.text_as_image:TextAsImageMethod",
    "video_clip": "polymodal.methods.video_clip:VideoCLIPMethod",
    "shenet": "polymodal.methods.shenet:SHENetMethod",
    "m2raap": "polymodal.methods.m2raap:M2RAAPMethod",
    "scene": "polymodal.methods.scene:SceneMethod",
    "snps3": "polymodal.methods.snps3:SNPS3Method",
    "reward": "polymodal.methods.reward:RewardMethod",
    "asd": "polymodal.methods.asd:ASDMethod",
    "classify": "polymodal.methods.classify:ClassifyMethod",
    "vqa": "polymodal.methods.vqa:VQAMethod",
}


def get_method(name: str):
    """The `Method` subclass registered under `name` in `METHODS`.

    Raises:
        KeyError: an unknown name (the message lists the known ones).
    """
    if name not in METHODS:
        raise KeyError(f"method {name!r} is not one of {', '.join(METHODS)}")
    entry = METHODS[name]
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        entry = getattr(importlib.import_module(module), attr)
    return entry
