"""`create_model`: a model from a named config, a config dict or a config dataclass; `WrappedConfig`, the config
of a model that wraps another."""
from __future__ import annotations

import copy
import json
from dataclasses import asdict
from importlib import resources

from ..config import ConfigError, from_dict, set_dotted
from .base import ConfigDict, attach_processors  # noqa: F401 (attach_processors: re-exported for the converters)
from .families import build_model, family_class


def list_configs() -> list[str]:
    """Names of the bundled model configs (`polymodal/models/configs/*.json`)."""
    root = resources.files(__package__) / "configs"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".json"))


def named_config(name: str) -> dict:
    """The dict of bundled config `name` (error listing the names when unknown)."""
    path = resources.files(__package__) / "configs" / f"{name}.json"
    if not path.is_file():
        raise ConfigError(f"unknown model config {name!r}; bundled configs: {', '.join(list_configs())}")
    return json.loads(path.read_text())


def build_config(spec: str | dict, overrides: dict | None = None, where: str = "model"):
    """Turn a name or dict (+ dotted overrides like {"text.context_length": 128}) into a config dataclass.

    The dict's `model_type` (default "clip") picks the family (`models.families`); its keys are checked
    strictly against the family's `config_class` (an unknown key or a wrong type names `where` and the key).
    """
    data = copy.deepcopy(named_config(spec) if isinstance(spec, str) else spec)
    data.pop("polymodal_version", None)
    for key, value in (overrides or {}).items():
        for dotted, leaf in _leaves(key, value):     # {"vision": {"width": 64}} = {"vision.width": 64}
            set_dotted(data, dotted, leaf)
    return from_dict(family_class(data.get("model_type", "clip"), where).config_class, data, where)


def _leaves(key: str, value):
    """(dotted key, value) of every leaf under `key`: a nested override changes the keys it names, never the
    whole section around them (`model.overrides.vision.width=64` on the command line arrives nested)."""
    if isinstance(value, dict) and value:
        for k, v in value.items():
            yield from _leaves(f"{key}.{k}", v)
    else:
        yield key, value


def create_model(spec, overrides: dict | None = None, tokenizer=None, image_transform=None):
    """Build a randomly initialised model.

    Args:
        spec: a bundled config name (`tiny`, `small`, `vit-b-32`, ...), a config dict or a config dataclass.
        overrides: dotted-key overrides, e.g. {"text.num_readout_tokens": 2}.
        tokenizer: a `polymodal.data.text.Tokenizer`; when given, the text vocabulary size and the
            special token ids are taken from it.
        image_transform: preprocessing; default: an `ImageTransform` at the config's image size.
    Returns:
        The model, with `.tokenizer` and `.image_transform` attached (without a `tokenizer`, configs with
        OpenAI's 49408-id vocabulary get the bundled CLIP BPE tokenizer; the others none).
    """
    if not isinstance(spec, (str, dict)):
        cfg = copy.deepcopy(spec)
        if overrides:
            cfg = build_config(cfg.to_dict(), overrides)
    else:
        cfg = build_config(spec, overrides)
    if tokenizer is not None:
        sync_text_config(cfg, tokenizer)
    elif getattr(cfg, "text", None) is not None:     # OpenAI-shaped towers come with the bundled CLIP tokenizer
        from ..data.text import bundled_tokenizer
        text = cfg.text
        tokenizer = bundled_tokenizer(text.vocab_size, text.eot_token_id, getattr(text, "pool", "eot"),
                                      getattr(text, "context_length", 77))
    model = build_model(cfg)
    model.attach_processors(tokenizer, image_transform)
    return model


def sync_text_config(cfg, tokenizer) -> None:
    """Make the text tower(s) of `cfg` agree with `tokenizer` (vocabulary size and special ids)."""
    text = cfg.text
    text.vocab_size = tokenizer.vocab_size
    text.pad_token_id = tokenizer.pad_id
    text.eot_token_id = tokenizer.eos_id
    if hasattr(cfg, "bos_token_id"):        # captioning models start generation here
        cfg.bos_token_id = tokenizer.bos_id
    if getattr(tokenizer, "style", "clip") == "bert":
        text.pool = "cls"
    elif text.pool == "cls":
        text.pool = "eot"


class WrappedConfig(ConfigDict):
    """Mixin for the config dataclass of a model that wraps another (a head on an encoder): its `base` field holds
    the wrapped model's config dict, built into that family's dataclass once (`base_config`), and its towers read
    through, so code that reads `model.config.vision.image_size` or `model.config.text.pad_token_id` works
    unchanged. `to_dict` writes the built base back."""

    def __post_init__(self):
        self._base = None   # the built base config dataclass (not a field: never serialised twice)

    def base_config(self):
        """The wrapped model's config dataclass, built once from `base` (errors name `<model_type>.base`)."""
        if self._base is None:
            self._base = build_config(self.base, where=f"{self.model_type}.base")
        return self._base

    vision = property(lambda self: self.base_config().vision)
    text = property(lambda self: self.base_config().text)
    embed_dim = property(lambda self: self.base_config().embed_dim)

    def to_dict(self) -> dict:
        data = asdict(self)
        if self._base is not None:
            data["base"] = self._base.to_dict()
        return data
