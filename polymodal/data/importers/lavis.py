"""`lavis`: LAVIS / BLIP retrieval annotations of COCO and Flickr30k (`coco_karpathy_train.json`, `test.json` ...).

Layout (as salesforce/LAVIS `lavis/datasets/datasets/retrieval_datasets.py` reads it, with the storage paths of
`lavis/configs/datasets/coco/defaults_ret.yaml`; salesforce/BLIP `data/flickr30k_dataset.py` reads the same files):
one JSON list per split. The train file has one entry per caption,
`{"image": "val2014/COCO_val2014_000000522418.jpg", "caption": "...", "image_id": "coco_522418"}`; the val and
test files have one entry per image, `{"image": "...", "caption": ["...", "...", ...]}`. `image` is relative to
the image root: LAVIS keeps `coco/annotations/coco_karpathy_{train,val,test}.json` beside `coco/images/`
(holding `train2014/`, `val2014/`) and `flickr30k/annotations/{train,val,test}.json` beside `flickr30k/images/`
(holding `flickr30k-images/`). The split is in the file name (`..._train.json`, `train.json`).

Train entries naming the same image (the same `image_id`, else the same `image`) become one record with all
their captions; a note says how many entries became how many images.

`--split`: train, val or test (default: every split file found, kept in each record's `split`).
Options: `image_root`: the folder `image` paths are relative to (default: `images/` beside the annotations
folder, else the dataset root or the annotations' folder).
"""
from __future__ import annotations

import re
from pathlib import Path

from .common import Imported, LayoutError, media_finder, read_json_file, require_split
from .options import reject_unknown

SPLIT_NAME = re.compile(r"(?:^|_)(train|val|test)$")


def _annotation_files(src: Path) -> dict[str, Path]:
    """{split: annotation file} of a LAVIS dataset folder, or of one annotation file given directly."""
    if src.is_file():
        m = SPLIT_NAME.search(src.stem)
        return {m.group(1) if m else src.stem: src}
    if not src.is_dir():
        raise FileNotFoundError(f"{src} does not exist (give the dataset folder, e.g. ~/.cache/lavis/coco, or one "
                                f"of its annotation files)")
    found = {}
    for path in sorted(src.rglob("*.json")):
        m = SPLIT_NAME.search(path.stem)
        if m and m.group(1) not in found:
            found[m.group(1)] = path
    if not found:
        raise FileNotFoundError(f"{src}: no LAVIS retrieval annotations found (looked for *_train.json, "
                                f"*_val.json, *_test.json or train/val/test.json in the folder and below)")
    return found


def _image_roots(src: Path, annotation: Path, image_root) -> list[Path]:
    if image_root is not None:
        return [Path(image_root)]
    folder = annotation.parent
    roots = [folder.parent / "images", folder / "images", folder.parent, folder]
    if src.is_dir():
        roots = [src / "images", src] + roots
    return list(dict.fromkeys(roots))


def _records(entries, path: Path, split: str, find) -> tuple[list, list, int]:
    """(records, missing image names, number of images named) of one annotation file."""
    if not isinstance(entries, list):
        raise LayoutError(f"{path}: not a LAVIS retrieval file (expected a JSON list of {{image, caption}} entries)")
    groups: dict = {}                                     # image key -> record, in first-seen order
    missing = []
    for k, e in enumerate(entries):
        if not isinstance(e, dict) or not isinstance(e.get("image"), str) or "caption" not in e:
            raise LayoutError(f"{path}: entry [{k}] has no 'image' / 'caption'")
        caps = e["caption"] if isinstance(e["caption"], list) else [e["caption"]]
        caps = [c.strip() for c in caps if isinstance(c, str) and c.strip()]
        key = e.get("image_id", e["image"]) if isinstance(e["caption"], str) else ("#", k)
        if key in groups:
            groups[key]["captions"].extend(caps)
            continue
        image = find(e["image"])
        if image is None:
            missing.append(e["image"])
            groups[key] = {"captions": caps, "_missing": True}
            continue
        groups[key] = {"image": image, "captions": caps, "split": split}
    records = [r for r in groups.values() if not r.get("_missing") and r["captions"]]
    return records, missing, len(groups)


def read(src, split: str | None = None, image_root=None, **options) -> Imported:
    """Records `{"image", "captions", "split"}` of LAVIS retrieval annotations (see the module docstring)."""
    reject_unknown(read, options)
    src = Path(src)
    files = _annotation_files(src)
    require_split(split, set(files), src)
    records, notes, missing = [], [], []
    for name, path in files.items():
        if split is not None and name != split:
            continue
        roots = _image_roots(src, path, image_root)
        entries = read_json_file(path)
        recs, miss, n_images = _records(entries, path, name, media_finder(roots, []))
        if len(entries) > n_images:
            notes.append(f"{path.name}: {len(entries)} caption entries grouped into {n_images} images (entries "
                         f"naming the same image_id are one record)")
        missing += miss
        records += recs
    if missing:
        if not records:
            raise LayoutError(f"{src}: none of the images was found (first: {missing[0]}); put the image root "
                              f"(the folder holding val2014/ or flickr30k-images/) at images/ beside the "
                              f"annotations folder, or give -o image_root=DIR")
        notes.append(f"{len(missing)} image(s) listed in the annotations were not found and were left out "
                     f"(first: {missing[0]})")
    return Imported(records, "image", notes=notes)
