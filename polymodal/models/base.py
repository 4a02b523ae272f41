"""What every polymodal model shares, written once: its config dict, the learnable logit scale, the
attached processors (tokenizer, image transform) and `save_pretrained`.

A saved model is a folder: `config.json` (the config dict plus `polymodal_version`), `model.safetensors`,
the tokenizer files and `preprocessor_config.json`. Loading lives in `polymodal.hub`, which imports the
models; models never import the hub.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PREPROCESSOR_FILE = "preprocessor_config.json"
DEFAULT_LOGIT_SCALE = math.log(1 / 0.07)


class ConfigDict:
    """Mixin for config dataclasses: `to_dict()` gives the JSON-ready nested dict written to config.json."""

    def to_dict(self) -> dict:
        return asdict(self)


class WrapsEncoder:
    """Mixin for an `nn.Module` that puts a head on a wrapped image-text model `self.base` (a classifier, an
    adapter, a VQA head): the processors and the contrastive embeddings are the wrapped model's, so every
    image-text eval task runs on the wrapper as on that model."""

    tokenizer = property(lambda self: self.base.tokenizer)
    image_transform = property(lambda self: self.base.image_transform)

    def attach_processors(self, tokenizer=None, image_transform=None) -> None:
        """Attach the processors to the wrapped model."""
        self.base.attach_processors(tokenizer, image_transform)

    def encode_image(self, pixels: Tensor, normalize: bool = True) -> Tensor:
        """The wrapped model's (B, E) image embedding."""
        return self.base.encode_image(pixels, normalize=normalize)

    def encode_text(self, ids: Tensor, normalize: bool = True, attention_mask: Tensor | None = None) -> Tensor:
        """The wrapped model's (N, E) text embedding."""
        return self.base.encode_text(ids, normalize=normalize, attention_mask=attention_mask)


class PolymodalModel(nn.Module):
    """Base of the dual encoders and captioners.

    Subclasses set `self.config` (a dataclass with `to_dict()`) and call `init_logit_scale(value)` when they
    have a contrastive head. `tokenizer` and `image_transform` are attached by `create_model` / `load_model`
    (see `attach_processors`) and are kept off the state dict.
    """

    config = None

    def __init__(self):
        super().__init__()
        self.tokenizer = None
        self.image_transform = None

    def init_logit_scale(self, value: float = DEFAULT_LOGIT_SCALE) -> None:
        """Create the learnable log-temperature (CLIP's ln(1/0.07) by default)."""
        self.logit_scale = nn.Parameter(torch.tensor(float(value)))

    def scale(self) -> Tensor:
        """exp(logit_scale) clamped at `config.max_logit_scale` (a scalar tensor with gradient)."""
        return self.logit_scale.exp().clamp(max=self.config.max_logit_scale)

    def attach_processors(self, tokenizer=None, image_transform=None) -> None:
        """Attach a tokenizer bound to the text tower's token budget and an image transform.

        Args:
            tokenizer: a `polymodal.data.text.Tokenizer` or None; its `context_length` is set to the
                tower's context minus its read-out (corner) tokens.
            image_transform: preprocessing; default an `ImageTransform` at the config's image size.
        """
        attach_processors(self, tokenizer, image_transform)

    def save_pretrained(self, directory) -> None:
        """Write config.json, model.safetensors, the tokenizer and the preprocessing config."""
        save_pretrained(self, directory)


def attach_processors(model, tokenizer=None, image_transform=None) -> None:
    """`PolymodalModel.attach_processors` for any model with a `config.vision` / `config.text`."""
    if image_transform is None:
        from ..data.images import ImageTransform
        image_transform = ImageTransform(model.config.vision.image_size)
    model.image_transform = image_transform
    if tokenizer is not None:
        budget = model.config.text.context_length - getattr(model.config.text, "num_readout_tokens", 0)
        tokenizer.context_length = budget
    model.tokenizer = tokenizer


def save_pretrained(model, directory) -> None:
    """Write `model` as config.json + model.safetensors (+ tokenizer files + preprocessor_config.json).

    Any module with a `config` (`to_dict()`) works; `tokenizer` and `image_transform` are saved when present.

    The files are written into a temporary folder beside `directory` and swapped in (see `replace_dir`), so
    an interrupted save never leaves a half-written model behind.
    """
    from ..version import __version__
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        config = {"polymodal_version": __version__, **model.config.to_dict()}
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False))
        save_file(_weights_to_save(model), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if getattr(model, "tokenizer", None) is not None:
            model.tokenizer.save(tmp)
        if getattr(model, "image_transform", None) is not None:
            (tmp / PREPROCESSOR_FILE).write_text(json.dumps(model.image_transform.to_dict(), indent=2))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, directory)


def _weights_to_save(model) -> dict:
    """The state dict as contiguous tensors; tied weights (one storage under two names, e.g. GPT-2's embedding
    and LM head) are copied, because safetensors refuses shared storage."""
    state, seen = {}, set()
    for key, value in model.state_dict().items():
        tensor = value.detach()
        ptr = tensor.untyped_storage().data_ptr()
        state[key] = (tensor.clone() if ptr in seen else tensor).contiguous()
        seen.add(ptr)
    return state


def replace_dir(tmp: Path, directory: Path) -> None:
    """Move the finished folder `tmp` to `directory`, replacing an older one only once `tmp` is complete.

    On Linux the two folders are exchanged atomically (renameat2 with RENAME_EXCHANGE), so `directory`
    exists at every moment; elsewhere the old folder is renamed aside just before the new one is renamed in.
    The old folder is deleted last.
    """
    from ..fileio import usual_permissions
    tmp, directory = Path(tmp), Path(directory)
    usual_permissions(tmp)                       # mkdtemp makes folders owner-only; users expect their umask
    if not directory.exists():
        os.replace(tmp, directory)
        return
    if _exchange(tmp, directory):             # atomic swap: `directory` always exists
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
    os.replace(directory, old / "x")
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths with Linux's renameat2(RENAME_EXCHANGE); False where unavailable."""
    try:
        import ctypes
        import ctypes.util
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    ok = renameat2(AT_FDCWD, os.fsencode(str(a)), AT_FDCWD, os.fsencode(str(b)), RENAME_EXCHANGE) == 0
    return ok
