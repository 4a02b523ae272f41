"""`coco-captions`: COCO-style caption files (`captions_val2014.json`, CLIP_benchmark's `coco_test_karpathy.json`).

Layout (as the COCO caption API and torchvision's `CocoCaptions` read it; LAION-AI/CLIP_benchmark
`clip_benchmark/datasets/builder.py` (`mscoco_captions`) keeps `coco_{split}_karpathy.json` beside the `val2014/`
or `train2014/` image folder): one JSON object with `images`, a list of `{"id": 391895, "file_name":
"COCO_val2014_000000391895.jpg", ...}`, and `annotations`, a list of `{"image_id": 391895, "caption": "..."}`.
`file_name` is relative to the image folder: `val2014/`, `train2014/`, `val2017/`, `train2017/` or `images/`
in the root given (or beside / above the file). The split is in the file name (`coco_test_karpathy.json` ->
test, `captions_val2014.json` -> val).

Captions are grouped per image in file order; images without a caption are left out (a note says how many).

`--split`: a split named by a file found (default: every caption file found, kept in each record's `split`).
Options: `image_root`: the folder `file_name` is relative to (default: searched as above).
"""
from __future__ import annotations

import re
from pathlib import Path

from .common import Imported, LayoutError, media_finder, read_json_file, require_split
from .options import reject_unknown

FILE_PATTERNS = ["coco_*_karpathy.json", "captions_*.json"]
IMAGE_FOLDERS = ["val2014", "train2014", "val2017", "train2017", "images"]
SPLIT_WORD = re.compile(r"(?:^|_)(train|val|test|restval)(?:\d{4})?(?:_|$)")


def _split_of(path: Path) -> str:
    m = SPLIT_WORD.search(path.stem)
    return m.group(1) if m else path.stem


def _caption_files(src: Path) -> list[Path]:
    if src.is_file():
        return [src]
    if not src.is_dir():
        raise FileNotFoundError(f"{src} does not exist (give the folder holding the caption JSON and the images, "
                                f"or the caption JSON itself)")
    files = sorted({p for pattern in FILE_PATTERNS for p in src.rglob(pattern)})
    if not files:
        raise FileNotFoundError(f"{src}: no COCO caption file found (looked for {', '.join(FILE_PATTERNS)} in the "
                                f"folder and below)")
    return files


def read(src, split: str | None = None, image_root=None, **options) -> Imported:
    """Records `{"image", "captions", "split"}` of COCO caption files (see the module docstring)."""
    reject_unknown(read, options)
    src = Path(src)
    files = _caption_files(src)
    require_split(split, {_split_of(p) for p in files}, src)
    records, notes, missing = [], [], []
    for path in files:
        name = _split_of(path)
        if split is not None and name != split:
            continue
        data = read_json_file(path)
        if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
                or not isinstance(data.get("annotations"), list):
            raise LayoutError(f"{path}: not a COCO caption file (expected an object with 'images' and "
                              f"'annotations' lists)")
        captions: dict = {}
        for k, a in enumerate(data["annotations"]):
            if not isinstance(a, dict) or "image_id" not in a or not isinstance(a.get("caption"), str):
                raise LayoutError(f"{path}: annotations[{k}] has no 'image_id' / 'caption'")
            if a["caption"].strip():
                captions.setdefault(a["image_id"], []).append(a["caption"].strip())
        roots = [Path(image_root)] if image_root is not None else \
            ([src] if src.is_dir() else []) + [path.parent, path.parent.parent]
        find = media_finder(roots, [] if image_root is not None else IMAGE_FOLDERS)
        uncaptioned = 0
        for k, im in enumerate(data["images"]):
            if not isinstance(im, dict) or "id" not in im or not isinstance(im.get("file_name"), str):
                raise LayoutError(f"{path}: images[{k}] has no 'id' / 'file_name'")
            if im["id"] not in captions:
                uncaptioned += 1
                continue
            image = find(im["file_name"])
            if image is None:
                missing.append(im["file_name"])
                continue
            records.append({"image": image, "captions": captions[im["id"]], "split": name})
        unknown = set(captions) - {im["id"] for im in data["images"]}
        if uncaptioned:
            notes.append(f"{path.name}: {uncaptioned} image(s) have no caption and were left out")
        if unknown:
            notes.append(f"{path.name}: captions of {len(unknown)} image id(s) not in 'images' were left out")
    if missing:
        if not records:
            raise LayoutError(f"{src}: none of the images was found (first: {missing[0]}); put the image folder "
                              f"({', '.join(IMAGE_FOLDERS[:2])}) beside the caption file or give "
                              f"-o image_root=DIR")
        notes.append(f"{len(missing)} image(s) listed were not found and were left out (first: {missing[0]})")
    return Imported(records, "image", notes=notes)
