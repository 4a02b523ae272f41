"""`dci`: Densely Captioned Images (DCI), 7,805 SA-1B photos with a short caption and a long description each.

Layout (as facebookresearch/DCI `dataset/densely_captioned_images/dataset/config.py`, `dense_image.py` and
`impl.py` read it): a folder `densely_captioned_images/` with `photos/` (the images), `annotations/` (one JSON per
image), `complete/` (the same JSONs with generated summaries and negatives added) and `splits.json`
(`{"train": [...], "valid": [...], "test": [...]}`, the annotation file names of each split). An annotation
holds `image` (a file name in `photos/`), `short_caption`, `extra_caption` (the long description the short
caption leaves out) and the per-region `mask_data`.

Records are `{"image", "caption", "long_caption", "split"}`: `caption` is `short_caption` and `long_caption` is
`short_caption` and `extra_caption` on two lines, DCI's own "extended caption" (`get_extended_caption`), the
text long-text retrieval on DCI ranks. Region captions are not read.

`--split`: train, valid or test (default: every split of `splits.json`, kept in each record's `split`; without
`splits.json`, every annotation file, with no split).
Options: none.
"""
from __future__ import annotations

from pathlib import Path

from .common import Imported, LayoutError, read_json_file, require_split
from .options import reject_unknown


def _root(src: Path) -> Path:
    if not src.is_dir():
        raise FileNotFoundError(f"{src} does not exist (give the densely_captioned_images folder)")
    for base in (src, src / "densely_captioned_images", src / "data" / "densely_captioned_images"):
        if (base / "photos").is_dir() and ((base / "annotations").is_dir() or (base / "complete").is_dir()):
            return base
    raise FileNotFoundError(f"{src}: no DCI layout (expected photos/ and annotations/ in densely_captioned_images/)")


def read(src, split: str | None = None, **options) -> Imported:
    """Records `{"image", "caption", "long_caption", "split"}` of DCI (see the module docstring)."""
    reject_unknown(read, options)
    root = _root(Path(src))
    folders = [root / "annotations", root / "complete"]
    notes = []
    if (root / "splits.json").is_file():
        splits = read_json_file(root / "splits.json")
        if not isinstance(splits, dict) or not all(isinstance(v, list) for v in splits.values()):
            raise LayoutError(f"{root / 'splits.json'}: expected {{split: [annotation file names]}}")
        require_split(split, set(splits), root)
        entries = [(s, name) for s, names in splits.items() if split in (None, s) for name in names]
    else:
        require_split(split, set(), root)
        folder = next(f for f in folders if f.is_dir())
        entries = [(None, p.name) for p in sorted(folder.glob("*.json"))]
        notes.append(f"no splits.json: every annotation in {folder.name}/ was read, without a split")
    records, missing = [], []
    for s, name in entries:
        path = next((f / name for f in folders if (f / name).is_file()), None)
        if path is None:
            raise FileNotFoundError(f"{root}: annotation {name} (listed in splits.json) is in neither annotations/ "
                                    f"nor complete/")
        ann = read_json_file(path)
        if not isinstance(ann, dict) or not all(isinstance(ann.get(k), str) for k in
                                                ("image", "short_caption", "extra_caption")):
            raise LayoutError(f"{path}: expected 'image', 'short_caption' and 'extra_caption' strings")
        image = root / "photos" / ann["image"]
        if not image.is_file():
            missing.append(ann["image"])
            continue
        short, extra = ann["short_caption"].strip(), ann["extra_caption"].strip()
        rec = {"image": str(image.resolve()), "caption": short, "long_caption": f"{short}\n{extra}" if extra else short}
        if s is not None:
            rec["split"] = s
        records.append(rec)
    if missing:
        if not records:
            raise LayoutError(f"{root}: none of the images is in photos/ (first: {missing[0]})")
        notes.append(f"{len(missing)} image(s) are not in photos/ and were left out (first: {missing[0]})")
    return Imported(records, "image", notes=notes)
