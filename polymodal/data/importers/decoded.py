"""Images a layout ships inside other files (base64 in a TSV, members of a tar), written out as image files.

Our manifests point at image files, so readers of such layouts write each image once into an image folder
(a reader option, `image_dir`) and point the records there. File names come from the data (image ids, tar
keys), so only plain names are accepted: a name with a path separator or other odd characters is an error,
never a path outside the folder. What the bytes are is told from their first bytes (JPEG, PNG, WebP, GIF,
BMP); anything else is not written.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from .common import LayoutError

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")


def image_suffix(data: bytes) -> str | None:
    """The file suffix of encoded image bytes ("jpg", "png", "webp", "gif", "bmp"), or None when not an image."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:2] == b"BM":
        return "bmp"
    return None


def default_image_dir(src) -> Path:
    """Where decoded images go unless the `image_dir` option says: `images_decoded/` in the source folder (the
    annotation file's folder when a file was given)."""
    src = Path(src)
    return (src if src.is_dir() else src.parent) / "images_decoded"


def write_image(folder: Path, name: str, data: bytes, where: str) -> Path | None:
    """Write `data` as `folder/name.<suffix>` (suffix from the bytes) and return the path; None when the bytes
    are not an image. Rewrites an existing file only when its bytes differ, through a temporary file.

    Raises:
        LayoutError: `name` is not a plain file name (naming `where`, the file and line it came from).
    """
    if not SAFE_NAME.match(name) or ".." in name:
        raise LayoutError(f"{where}: image name {name!r} is not a plain file name (letters, digits, '.', '_', '-')")
    suffix = image_suffix(data)
    if suffix is None:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.{suffix}"
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return path
    tmp = folder / f".{name}.{suffix}.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


__all__ = ["image_suffix", "default_image_dir", "write_image"]
