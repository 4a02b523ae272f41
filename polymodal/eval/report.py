"""Writing metric dicts to disk."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from ..fileio import atomic_open


def tidy_float(v: float) -> float:
    """`v` at 12 significant digits: 7.000000000000001 (a sum's last-bit noise) is written as 7.0."""
    return float(f"{v:.12g}")


def _jsonable(obj: Any) -> Any:
    """Turn tensors, numpy values and non-finite floats into plain JSON values.

    NaN and +-inf become ``null`` (strict JSON has no NaN); metrics use NaN for
    "undefined", e.g. the AP of a class without positives.
    """
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "tolist") and callable(obj.tolist):  # torch.Tensor, numpy array or scalar
        return _jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, float):
        return tidy_float(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically.

    The text goes to a temporary file in the target folder first and is moved into
    place with ``os.replace``, so a reader never sees a half-written file.
    Parent folders are created.

    Args:
        path: destination file.
        obj: dicts/lists of numbers and strings; tensors, numpy values and
            ``pathlib.Path`` are converted, NaN and infinities are written as ``null``.

    Returns:
        The destination path.
    """
    path = Path(path)
    text = json.dumps(_jsonable(obj), indent=2, allow_nan=False, ensure_ascii=False) + "\n"
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path
