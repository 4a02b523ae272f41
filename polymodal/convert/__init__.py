"""Converters from other codebases' checkpoint layouts into polymodal models.

Each module has `detect(path) -> bool` and `load(path, **kwargs) -> model`; `polymodal.hub.load_model`
tries them in the order of `CONVERTERS`.
"""
CONVERTERS = ("hf_clip", "openclip", "lotlip", "m2encoder")
