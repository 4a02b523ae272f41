"""Feature batches with one row per text or video, as a model's `similarity` takes them.

Retrieval encodes texts and videos batch by batch, keeps the features on the CPU, concatenates them and scores
blocks of rows (`polymodal.eval.video_retrieval`). Plain (N, E) embeddings are tensors; a model whose
similarity needs more (token features and their mask, frame features and their validity) returns a `Rows`
dataclass, which slices, concatenates and moves like one tensor.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclasses.dataclass
class Rows:
    """Base of dataclasses whose tensor fields share their first dimension (rows).

    Subclasses name in `PAD` the fields whose second dimension differs between batches (tokens per caption)
    and the value that pads them when batches are concatenated. A field may be None (absent in every row).
    """
    PAD: ClassVar[dict] = {}

    def _tensors(self):
        return [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)]

    def __len__(self) -> int:
        return next(len(v) for _, v in self._tensors() if v is not None)

    def __getitem__(self, index) -> "Rows":
        """Rows `index` (a slice or an index tensor) of every field."""
        return type(self)(**{k: None if v is None else v[index] for k, v in self._tensors()})

    def cpu(self) -> "Rows":
        """Every field on the CPU, floating point ones as float32 (the precision retrieval scores in)."""
        return type(self)(**{k: None if v is None else (v.float() if v.is_floating_point() else v).cpu()
                             for k, v in self._tensors()})

    @classmethod
    def cat(cls, parts: list["Rows"]) -> "Rows":
        """The rows of `parts` in order; `PAD` fields are padded on dim 1 to the longest part."""
        out = {}
        for f in dataclasses.fields(cls):
            values = [getattr(p, f.name) for p in parts]
            if values[0] is None:
                out[f.name] = None
                continue
            if f.name in cls.PAD:
                width = max(v.shape[1] for v in values)
                values = [F.pad(v, (0, 0) * (v.dim() - 2) + (0, width - v.shape[1]), value=cls.PAD[f.name])
                          for v in values]
            out[f.name] = torch.cat(values)
        return cls(**out)


def concat(parts: list):
    """Concatenate feature batches: tensors with `torch.cat`, `Rows` (and anything with `cat`) with their own."""
    if isinstance(parts[0], Tensor):
        return torch.cat(parts)
    return type(parts[0]).cat(parts)


def to_cpu(features):
    """Features on the CPU in float32 (tensors) or as their own `cpu()` says."""
    return features.float().cpu() if isinstance(features, Tensor) else features.cpu()


__all__ = ["Rows", "concat", "to_cpu"]
