"""Features kept on disk chunk by chunk, so that a long evaluation stopped half-way continues where it stopped.

`polymodal benchmark` encodes whole public test sets (5,000 COCO images, 1,000 MSR-VTT videos, 50,000 ImageNet
images); a run killed after an hour should not encode those again. Inside `caching(folder)` the encoders of
`polymodal.encode` and `polymodal.eval.video_retrieval` split their inputs into chunks and keep each finished
chunk's features in `folder` (one safetensors file per chunk, named by a hash of the chunk's inputs and the
encoding options, written atomically); a rerun loads the chunks it finds and encodes only the rest. Outside
`caching` nothing is chunked or written: every other caller encodes in one pass as before.

The folder must belong to one model (the caller keys it by the model's files): the chunk names hash the inputs,
not the weights. Files hold tensors and JSON only (no pickle); a file that cannot be read is encoded again.
"""
from __future__ import annotations

import contextvars
import dataclasses
import hashlib
import importlib
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import Tensor

# Inputs per chunk: big enough that a chunk's own costs (a file, decode workers starting) vanish beside encoding.
CHUNK = {"images": 1024, "texts": 4096, "videos": 256}


@dataclasses.dataclass
class FeatureCache:
    """Where chunks are kept, and how many items a chunk holds per input kind (`CHUNK` by default)."""
    folder: Path
    chunk: dict = dataclasses.field(default_factory=lambda: dict(CHUNK))
    loaded: int = 0           # chunks read from the folder (for the progress line and tests)
    written: int = 0          # chunks encoded and written


_ACTIVE: contextvars.ContextVar[FeatureCache | None] = contextvars.ContextVar("polymodal_feature_cache", default=None)


def model_key(model: str | os.PathLike) -> str:
    """A saved model's identity for a chunk folder: its path and each file's size and modification time (a model
    saved again is another model).

    Args:
        model: a model folder or file (or a hub id / config name, keyed by its name).
    Returns:
        16 hex digits.
    """
    path = Path(model)
    stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(path.glob("*")) if f.is_file()] \
        if path.is_dir() else ([(path.name, path.stat().st_size, path.stat().st_mtime_ns)] if path.exists() else [])
    who = str(path.resolve()) if path.exists() else str(model)
    return hashlib.sha256(json.dumps([who, stats]).encode()).hexdigest()[:16]


@contextmanager
def caching(folder: str | os.PathLike, chunk: dict | None = None) -> Iterator[FeatureCache]:
    """Keep the features encoded inside this block in `folder`, chunk by chunk.

    Args:
        folder: one model's chunk folder (created when the first chunk is written).
        chunk: items per chunk by kind ("images", "texts", "videos"); missing kinds use `CHUNK`.
    Yields:
        The `FeatureCache` (its `loaded` / `written` counts say what the block did).
    """
    cache = FeatureCache(Path(folder), {**CHUNK, **(chunk or {})})
    token = _ACTIVE.set(cache)
    try:
        yield cache
    finally:
        _ACTIVE.reset(token)


def chunked(kind: str, count: int, keys: Callable[[], list[str]], options: dict,
            compute: Callable[[int, int], dict]) -> list[dict]:
    """`compute(start, stop)` over `count` inputs, in chunks kept on disk when a `caching` block is active.

    Args:
        kind: the input kind ("images", "texts", "videos"): the chunk size and the sub-folder.
        count: how many inputs.
        keys: () -> one string per input naming it (a file path, a text); with `options`, they name a chunk. Called
            only inside `caching` (nothing is named otherwise).
        options: everything else the features depend on (frames, strategy, skip policy, the function).
        compute: (start, stop) -> a dict of parts: tensors, `Rows`, lists of `VideoClip`s or JSON values.
    Returns:
        The chunks' parts in order; one covering every input when no cache is active.
    """
    cache = _ACTIVE.get()
    if cache is None:
        return [compute(0, count)]
    names = keys()
    size = max(1, int(cache.chunk.get(kind, CHUNK.get(kind, 1024))))
    out, before = [], cache.loaded
    for start in range(0, max(count, 1), size):
        stop = min(start + size, count)
        name = hashlib.sha256(json.dumps([kind, options, names[start:stop]], sort_keys=True,
                                         default=str).encode()).hexdigest()[:24]
        path = cache.folder / kind / f"{name}.safetensors"
        parts = _load(path) if path.is_file() else None
        if parts is None:
            parts = compute(start, stop)
            _save(path, parts)
            cache.written += 1
        else:
            cache.loaded += 1
        out.append(parts)
    if cache.loaded > before:
        print(f"[features] {kind}: {cache.loaded - before} of {len(out)} chunk(s) read from {cache.folder}",
              file=sys.stderr, flush=True)
    return out


# ---- files: tensors + JSON metadata, no pickle ---------------------------------------------------------------
def _save(path: Path, parts: dict) -> None:
    from safetensors.torch import save_file

    from .data.video import VideoClip
    from .models.features import Rows
    tensors, meta = {}, {}
    for name, v in parts.items():
        if isinstance(v, Tensor):
            tensors[name] = v.detach().cpu().contiguous().clone()
            meta[name] = {"t": "tensor"}
        elif isinstance(v, Rows):
            fields = {f.name: getattr(v, f.name) for f in dataclasses.fields(v)}
            for f, t in fields.items():
                if t is not None:
                    tensors[f"{name}.{f}"] = t.detach().cpu().contiguous().clone()
            meta[name] = {"t": "rows", "cls": f"{type(v).__module__}:{type(v).__qualname__}",
                          "none": [f for f, t in fields.items() if t is None]}
        elif isinstance(v, list) and v and all(isinstance(c, VideoClip) for c in v):
            for k, c in enumerate(v):      # the raw frames are dropped before clips are kept (times, validity)
                tensors[f"{name}.{k}.times"] = c.times.contiguous().clone()
                tensors[f"{name}.{k}.valid"] = c.valid.contiguous().clone()
            meta[name] = {"t": "clips", "duration": [c.duration for c in v], "source": [c.source for c in v],
                          "frames": [list(c.frames.shape) for c in v]}
        else:
            meta[name] = {"t": "json", "v": v}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata={"parts": json.dumps(meta)})
    os.replace(tmp, path)                            # a chunk is there whole or not at all


def _load(path: Path) -> dict | None:
    """The parts saved in `path`, or None when it cannot be read back (it is then encoded again)."""
    from safetensors import safe_open

    from .data.video import VideoClip
    from .models.features import Rows
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["parts"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        parts = {}
        for name, m in meta.items():
            if m["t"] == "tensor":
                parts[name] = tensors[name]
            elif m["t"] == "rows":
                module, _, qualname = m["cls"].partition(":")
                if not module.startswith("polymodal."):          # only our own feature classes are built
                    return None
                cls = getattr(importlib.import_module(module), qualname)
                if not (isinstance(cls, type) and issubclass(cls, Rows)):
                    return None
                parts[name] = cls(**{f.name: None if f.name in m["none"] else tensors[f"{name}.{f.name}"]
                                     for f in dataclasses.fields(cls)})
            elif m["t"] == "clips":
                parts[name] = [VideoClip(torch.zeros(shape, dtype=torch.uint8), tensors[f"{name}.{k}.times"],
                                         tensors[f"{name}.{k}.valid"], duration, source)
                               for k, (shape, duration, source) in enumerate(zip(m["frames"], m["duration"],
                                                                                 m["source"]))]
            else:
                parts[name] = m["v"]
        return parts
    except Exception:       # a damaged or foreign file: encode the chunk again rather than trust it
        return None


__all__ = ["CHUNK", "FeatureCache", "model_key", "caching", "chunked"]
