"""Converters from other codebases' checkpoint layouts into polymodal models.

Each module has `detect(path) -> bool` and `load(path, **kwargs) -> model`; `polymodal.hub.load_model`
tries them in the order of `CONVERTERS`. The plumbing they share (weights files, key peeking, JSON
configs, tokenizers, rename tables) is in `common`; each converter keeps its rename tables and config maps.
"""
CONVERTERS = ("hf_clip", "hf_reward", "openclip", "lotlip", "m2encoder")
