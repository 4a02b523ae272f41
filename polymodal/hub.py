"""Saving and loading models: our own directories, named configs, and other codebases' checkpoints.

A path that does not exist and is neither a bundled config name nor a hub id (`ORG/NAME`) is an error that says
so; hub ids resolve through huggingface_hub's cache (`resolve_hub_id`), downloading only when the user is online
and has not set `HF_HUB_OFFLINE`.
"""
from __future__ import annotations

import copy
import importlib
import json
import re
from pathlib import Path

import torch

from .convert.common import (WRAPPER_PREFIXES, CheckpointError, load_state_strict, read_json,  # noqa: F401
                             read_weights, strip_prefixes)
from .models.base import CONFIG_FILE, PREPROCESSOR_FILE, WEIGHTS_FILE, save_pretrained  # noqa: F401 (public)
from .models.factory import build_config, create_model, list_configs


def is_polymodal_dir(path: Path) -> bool:
    """A folder written by `save_pretrained` (its config.json names `polymodal_version`)."""
    cfg = path / CONFIG_FILE
    if not (path.is_dir() and cfg.is_file()):
        return False
    try:
        config = json.loads(cfg.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return (path / WEIGHTS_FILE).is_file()      # ours, broken: load_pretrained names the file
    return isinstance(config, dict) and "polymodal_version" in config


# Folders saved before M2-RAAP and scene models were families of their own: a side file -> the function that
# turns the loaded video model plus the folder's side files into the family's model.
LEGACY_SIDE_FILES = {
    "scene_config.json": "polymodal.models.scene:from_legacy_folder",
    "m2raap.json": "polymodal.models.video_heads:from_legacy_folder",
}
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt")


def load_pretrained(directory) -> torch.nn.Module:
    """Load a directory written by `save_pretrained`: the one loader of every model family.

    The config is read strictly (`models.families`: the family's `config_class`; an unknown key or a wrong
    type names the file and the key), the weights through the strict loader (every key and shape must match),
    and the processors by one rule: the tokenizer from the folder's tokenizer files, the image transform from
    `preprocessor_config.json` (else the family's default).

    Args:
        directory: the folder.
    Returns:
        The model in eval mode, exactly as it was saved (wrapping families with their heads and settings).
    Raises:
        CheckpointError / ConfigError: a file that cannot be read or does not fit, naming it.
    """
    from .models.families import build_model
    directory = Path(directory)
    path = directory / CONFIG_FILE
    config = read_json(path)
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object (a model config), got {type(config).__name__}")
    cfg = build_config(config, where=str(path))
    check_size(cfg, directory / WEIGHTS_FILE, str(path))       # before anything is allocated
    model = build_model(cfg)
    load_state_strict(model, read_weights(directory / WEIGHTS_FILE), str(directory / WEIGHTS_FILE))
    tokenizer = None
    if any((directory / f).exists() for f in TOKENIZER_FILES):
        from .data.text import Tokenizer
        tokenizer = Tokenizer.from_dir(directory)
    transform = None
    if (directory / PREPROCESSOR_FILE).is_file():
        from .data.images import ImageTransform
        path = directory / PREPROCESSOR_FILE
        try:
            transform = ImageTransform.from_dict(read_json(path), where=str(path))
        except (ValueError, TypeError, KeyError) as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"{path}: not a usable preprocessing config ({e}); fix it or delete the file to "
                                  f"use the model's default image transform") from None
    model.attach_processors(tokenizer, transform)
    for side, loader in LEGACY_SIDE_FILES.items():
        if (directory / side).is_file():
            module, _, name = loader.partition(":")
            model = getattr(importlib.import_module(module), name)(directory, model)
    return model.eval()


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_hub_id(name: str) -> Path | None:
    """The local snapshot folder of a Hugging Face hub id (`ORG/NAME`), or None when `name` is no hub id.

    The user's cache (`HF_HUB_CACHE`, or `HF_HOME/hub`, or huggingface_hub's default) comes first; a download
    happens only when the cache lacks it and `HF_HUB_OFFLINE` is not set (the `polymodal` command sets it unless
    the user did: downloads are opt-in).

    Raises:
        FileNotFoundError: a hub id that is not cached while offline, naming the id, the cache and the fix.
    """
    import os
    if not HUB_ID.match(name) or name.startswith((".", "/")):
        return None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    cache = os.environ.get("HF_HUB_CACHE") or (os.path.join(os.environ["HF_HOME"], "hub") if os.environ.get("HF_HOME")
                                               else None)
    try:
        return Path(snapshot_download(name, cache_dir=cache, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        from huggingface_hub.constants import HF_HUB_CACHE
        raise FileNotFoundError(f"{name!r} is not in the Hugging Face cache ({cache or HF_HUB_CACHE}) and "
                                f"HF_HUB_OFFLINE is set: download it once where you are online "
                                f"(`huggingface-cli download {name}`), run with HF_HUB_OFFLINE=0, or give a local "
                                f"path") from None
    return Path(snapshot_download(name, cache_dir=cache))


def check_size(cfg, weights: Path, where: str) -> None:
    """Refuse a config whose model does not fit its weights file, before anything is allocated.

    The model is built on the meta device (shapes only, no memory) and its keys and shapes are compared with the
    safetensors header's; a tampered or mistaken size (say `text.width: 10000000`) is then an error naming the
    config and the tensors, not an allocation of many gigabytes. Families that cannot be built on the meta device
    skip the check (the strict weight loading still compares every key and shape).

    Raises:
        FileNotFoundError: no weights file; CheckpointError: an unreadable header, or keys / shapes that differ.
    """
    from safetensors import SafetensorError, safe_open

    from .convert.common import check_state_match
    from .models.families import build_model
    if not weights.is_file():
        raise FileNotFoundError(f"weights file {weights} does not exist")
    try:
        with safe_open(str(weights), framework="pt") as f:
            stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({e}); is it truncated? Save the model "
                              f"again") from None
    try:
        with torch.device("meta"):
            own = {k: tuple(v.shape) for k, v in build_model(copy.deepcopy(cfg)).state_dict().items()}
    except Exception:  # noqa: BLE001 - a family the meta device cannot build: the strict load checks shapes
        return
    check_state_match(own, stored, f"{weights} (for the model {where} describes; a changed size such as a width "
                                   f"or a layer count? restore the config.json saved with the weights)")


def named_model(name: str, overrides: dict | None = None, tokenizer=None, image_transform=None) -> torch.nn.Module:
    """A bundled config, randomly initialised, with the bundled tokenizer that fits its vocabulary.

    Configs with OpenAI's CLIP vocabulary (`vit-b-32`, `vit-b-16`: 49408 ids) get the CLIP BPE tokenizer
    shipped with polymodal; the others (`tiny`, `small`, ...) are sized for a tokenizer trained per run and
    get a `MissingTokenizer`, whose use raises a one-line error naming the config and the fix.

    Args:
        name: a bundled config name (see `list_configs`).
        overrides, tokenizer, image_transform: as for `create_model`; a given tokenizer wins.
    Returns:
        The model (eval mode) with `.tokenizer` and `.image_transform` attached.
    """
    from .data.text import MissingTokenizer
    model = create_model(name, overrides, tokenizer=tokenizer, image_transform=image_transform)  # bundled BPE fits
    if model.tokenizer is None:
        vocab = getattr(getattr(model.config, "text", None), "vocab_size", "?")
        model.tokenizer = MissingTokenizer(
            f"model config {name!r} has no bundled tokenizer (its {vocab}-id text vocabulary is trained per run); "
            f"train one with polymodal.data.text.train_tokenizer(texts, vocab_size={vocab}) and pass it as "
            f"pm.create_model({name!r}, tokenizer=tok), or load a trained model directory (it saves its tokenizer)")
    return model.eval()


def load_model(path_or_name, **kwargs) -> torch.nn.Module:
    """Load a model from anything users have on disk, or build a named config.

    Args:
        path_or_name: our saved directory; an HF transformers CLIP directory; an OpenCLIP checkpoint
            (.safetensors/.bin/.pt, with its model-config JSON beside it or given as `config=`);
            a LoTLIP or M2-Encoder checkpoint; or a bundled config name (random init, see `named_model`).
        **kwargs: passed to the converter (e.g. `config=` for OpenCLIP).
    Returns:
        A model in eval mode with `.tokenizer` and `.image_transform` attached where known (OpenAI-shaped
        configs and checkpoints without tokenizer files get the bundled CLIP BPE tokenizer).
    Raises:
        FileNotFoundError: the path does not exist and is not a config name (no network is tried).
    """
    path = Path(str(path_or_name))
    if not path.exists():
        if isinstance(path_or_name, str) and path_or_name in list_configs():
            return named_model(path_or_name, **kwargs)
        snapshot = resolve_hub_id(str(path_or_name))
        if snapshot is None:
            raise FileNotFoundError(
                f"{path_or_name!r} is neither an existing path, a bundled config ({', '.join(list_configs())}) nor "
                f"a hub id (ORG/NAME); polymodal never downloads weights by a path: give a local path")
        path = snapshot
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
