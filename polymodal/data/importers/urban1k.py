"""`urban1k`: Urban-1k, 1,000 urban images with long captions (Long-CLIP's long-text retrieval set).

Layout (as beichenzbc/Long-CLIP `eval/retrieval/Urban1k.py` reads it): a root folder `Urban1k/` with `image/`
and `caption/`; `caption/<n>.txt` is the long caption of `image/<n>.jpg` (its first line is the caption).

Records are `{"image", "caption", "long_caption"}`: `long_caption` is the caption file's first line, as Long-CLIP
evaluates with; the layout has no short caption, so `caption` is its first sentence (a note says so). Records
are ordered by the number in the file name.

`--split`: the set has none (an error when given); it is a test set.
Options: none.
"""
from __future__ import annotations

from pathlib import Path

from .common import Imported, LayoutError, require_split
from .longtext import first_sentence, squash
from .options import reject_unknown


def _root(src: Path) -> Path:
    if not src.is_dir():
        raise FileNotFoundError(f"{src} does not exist (give the Urban1k folder holding image/ and caption/)")
    for base in (src, src / "Urban1k", src / "urban1k"):
        if (base / "caption").is_dir() and (base / "image").is_dir():
            return base
    raise FileNotFoundError(f"{src}: no Urban-1k layout (expected image/ and caption/ folders)")


def _order(path: Path):
    return (0, int(path.stem), "") if path.stem.isdigit() else (1, 0, path.stem)


def read(src, split: str | None = None, **options) -> Imported:
    """Records `{"image", "caption", "long_caption"}` of Urban-1k (see the module docstring)."""
    reject_unknown(read, options)
    root = _root(Path(src))
    require_split(split, set(), root)
    records, missing, empty = [], [], 0
    for cap in sorted(root.glob("caption/*.txt"), key=_order):
        lines = [line for line in cap.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not lines:
            empty += 1
            continue
        image = next((p for p in (root / "image" / f"{cap.stem}{e}" for e in (".jpg", ".jpeg", ".png", ".JPG"))
                      if p.is_file()), None)
        if image is None:
            missing.append(f"image/{cap.stem}.jpg")
            continue
        long = squash(lines[0])
        records.append({"image": str(image.resolve()), "caption": first_sentence(long), "long_caption": long})
    notes = ["the layout has no short captions: 'caption' is the first sentence of each long caption"]
    if empty:
        notes.append(f"{empty} caption file(s) are empty and were left out")
    if missing:
        if not records:
            raise LayoutError(f"{root}: none of the captions has its image in image/ (first: {missing[0]})")
        notes.append(f"{len(missing)} caption(s) have no image and were left out (first: {missing[0]})")
    return Imported(records, "image", notes=notes)
