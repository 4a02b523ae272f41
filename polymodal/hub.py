"""Saving and loading models: our own directories, named configs, and other codebases' checkpoints.

`load_model` never touches the network: a path that does not exist and is not a bundled config name
is an error that says so.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from .models.base import CONFIG_FILE, PREPROCESSOR_FILE, WEIGHTS_FILE, save_pretrained  # noqa: F401 (public)
from .models.factory import attach_processors, build_config, create_model, list_configs


class CheckpointError(ValueError):
    """A checkpoint does not fit the model: lists the missing and unexpected keys or shape mismatches."""


def load_state_strict(model: torch.nn.Module, state: dict, source: str) -> None:
    """Load `state` into `model`; any missing/unexpected key or shape mismatch raises CheckpointError."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        lines = [f"{source} does not match the model:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {', '.join(missing[:20])}" + (" ..." if len(missing) > 20 else ""))
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected[:20])}" + (" ..." if len(unexpected) > 20 else ""))
        if shapes:
            lines.append("  shape mismatches: " + "; ".join(shapes[:10]))
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(state, strict=True)


def read_state_dict(path) -> dict:
    """Read weights from .safetensors, or from a pickle (.bin/.pt/.pth) with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):  # training checkpoints often nest the weights
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def strip_prefixes(state: dict, prefixes: tuple[str, ...] = WRAPPER_PREFIXES) -> dict:
    """Remove wrapper prefixes (DDP's `module.`, torch.compile's `_orig_mod.`, nested) from every key."""
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for p in prefixes:
                if key.startswith(p):
                    key, changed = key[len(p):], True
        out[key] = value
    return out


def is_polymodal_dir(path: Path) -> bool:
    cfg = path / CONFIG_FILE
    return path.is_dir() and cfg.is_file() and "polymodal_version" in json.loads(cfg.read_text())


def load_pretrained(directory) -> torch.nn.Module:
    """Load a directory written by `save_pretrained`."""
    directory = Path(directory)
    config = json.loads((directory / CONFIG_FILE).read_text())
    cfg = build_config(config, where=str(directory / CONFIG_FILE))
    from .models.factory import _families
    model = _families()[cfg.model_type][1](cfg)
    load_state_strict(model, read_state_dict(directory / WEIGHTS_FILE), str(directory / WEIGHTS_FILE))
    tokenizer = None
    if any((directory / f).exists() for f in ("tokenizer.json", "vocab.json", "vocab.txt")):
        from .data.text import Tokenizer
        tokenizer = Tokenizer.from_dir(directory)
    transform = None
    if (directory / PREPROCESSOR_FILE).is_file():
        from .data.images import ImageTransform
        transform = ImageTransform.from_dict(json.loads((directory / PREPROCESSOR_FILE).read_text()))
    attach_processors(model, tokenizer, transform)
    return model.eval()


def load_model(path_or_name, **kwargs) -> torch.nn.Module:
    """Load a model from anything users have on disk, or build a named config.

    Args:
        path_or_name: our saved directory; an HF transformers CLIP directory; an OpenCLIP checkpoint
            (.safetensors/.bin/.pt, with its model-config JSON beside it or given as `config=`);
            a LoTLIP or M2-Encoder checkpoint; or a bundled config name (random init).
        **kwargs: passed to the converter (e.g. `config=` for OpenCLIP).
    Returns:
        A model in eval mode with `.tokenizer` and `.image_transform` attached where known.
    Raises:
        FileNotFoundError: the path does not exist and is not a config name (no network is tried).
    """
    path = Path(str(path_or_name))
    if not path.exists():
        if isinstance(path_or_name, str) and path_or_name in list_configs():
            return create_model(path_or_name, **kwargs)
        raise FileNotFoundError(
            f"{path_or_name!r} is neither an existing path nor a bundled config "
            f"({', '.join(list_configs())}); polymodal never downloads weights: give a local path")
    if is_polymodal_dir(path):
        return load_pretrained(path)
    from .convert import CONVERTERS
    for name in CONVERTERS:
        try:
            module = importlib.import_module(f".convert.{name}", __package__)
        except ModuleNotFoundError as e:
            if e.name and e.name.endswith(name):
                continue
            raise
        if module.detect(path):
            return module.load(path, **kwargs).eval()
    raise ValueError(f"{path}: not a polymodal directory, an HF CLIP directory, an OpenCLIP, LoTLIP or "
                     f"M2-Encoder checkpoint (looked for config.json / *.safetensors / *.bin / *.pt)")
