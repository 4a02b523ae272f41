"""An image encoder with a linear classification head (`method: classify`, the `classification` eval task).

The encoder is any loadable model with `encode_image` (CLIP, M2-Encoder, CoCa ...), kept whole so the saved
classifier still runs every image-text task of its encoder; the head reads its image embedding (L2-normalised
by default, the features a linear probe reads). Saved as one folder: `config.json` (`model_type:
"classifier"`, the encoder's config nested, the class names), `model.safetensors` and the encoder's processors.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from .base import WrapsEncoder
from .factory import WrappedConfig


@dataclass
class ClassifierConfig(WrappedConfig):
    """config.json of an `ImageClassifier`."""
    base: dict = field(default_factory=dict)          # the encoder's config (with its model_type)
    class_names: list = field(default_factory=list)   # the head's C classes, in order
    normalize: bool = True                            # the head reads the L2-normalised image embedding
    model_type: str = "classifier"



class ImageClassifier(WrapsEncoder, nn.Module):
    """`encoder.encode_image` -> linear head over `class_names`.

    Args:
        base: the encoder (anything with `encode_image(pixels, normalize=...)` and a `config`).
        class_names: the C classes.
        normalize: feed the head the L2-normalised embedding.
    """

    config_class = ClassifierConfig

    def __init__(self, base: nn.Module, class_names: list, normalize: bool = True):
        super().__init__()
        if not class_names:
            raise ValueError("ImageClassifier: no class names")
        self.base = base
        self.config = ClassifierConfig(base=base.config.to_dict(), class_names=list(class_names), normalize=normalize)
        self.config._base = base.config
        self.head = nn.Linear(base.config.embed_dim, len(class_names))
        nn.init.zeros_(self.head.weight)     # uniform predictions at the start: the first loss is log(C)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_config(cls, cfg: ClassifierConfig) -> "ImageClassifier":
        """A randomly initialised classifier of a saved config (the weights are loaded after)."""
        from .families import build_model
        return cls(build_model(cfg.base_config()), list(cfg.class_names), cfg.normalize)

    class_names = property(lambda self: list(self.config.class_names))
    def classify(self, pixels: Tensor) -> Tensor:
        """(B, 3, H, W) images -> (B, C) class logits."""
        feats = self.base.encode_image(pixels, normalize=self.config.normalize)          # (B, E)
        return self.head(feats.to(self.head.weight.dtype))

    forward = classify

    def save_pretrained(self, directory) -> None:
        """One folder: config.json (encoder config, class names), model.safetensors, processors."""
        from .base import save_pretrained
        save_pretrained(self, directory)


__all__ = ["ClassifierConfig", "ImageClassifier"]
