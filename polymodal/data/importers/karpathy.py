"""`karpathy`: the Karpathy splits of COCO / Flickr30k / Flickr8k (`dataset_coco.json`, `dataset_flickr30k.json`).

Layout (as the caption_datasets.zip ships it and captioning/retrieval code reads it, e.g. the COCO loaders that join
`filepath` and `filename` under the COCO image root): one JSON object with `images`, a list of
`{"filepath": "val2014" (COCO only), "filename": "...jpg", "split": "train|restval|val|test",
"sentences": [{"raw": "...", "tokens": [...]}, ...], ...}`. The root folder holds the JSON (anywhere below it)
and the images: COCO under `train2014/` and `val2014/` (`filepath`), Flickr under `flickr30k-images/`,
`Flicker8k_Dataset/`, `Flickr8k_Dataset/`, `images/` or the root itself.

`--split`: train, restval, val or test (default: every split, kept in each record's `split`); the retrieval
protocols use test (5,000 COCO images with 25,010 captions; 1,000 Flickr30k images with 5,000).
"""
from __future__ import annotations

from pathlib import Path

from .common import Imported, LayoutError, find_file, media_finder, media_roots, read_json_file, require_split

JSON_NAMES = ["dataset_coco.json", "dataset_flickr30k.json", "dataset_flickr8k.json", "dataset_*.json"]
IMAGE_FOLDERS = ["flickr30k-images", "flickr30k_images", "Flicker8k_Dataset", "Flickr8k_Dataset", "images", "Images"]


def read(src, split: str | None = None) -> Imported:
    """Records `{"image", "captions", "split"}` of a Karpathy split file and its images (see the module docstring)."""
    path = find_file(Path(src), JSON_NAMES, "Karpathy split file (dataset_<name>.json)")
    data = read_json_file(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise LayoutError(f"{path}: not a Karpathy split file (expected an object with an 'images' list)")
    roots = media_roots(src, path)
    find = media_finder(roots, IMAGE_FOLDERS)
    require_split(split, {str(im.get("split")) for im in data["images"]}, path)
    records, missing = [], []
    for k, im in enumerate(data["images"]):
        if not isinstance(im, dict) or "filename" not in im or not isinstance(im.get("sentences"), list):
            raise LayoutError(f"{path}: images[{k}] has no 'filename' / 'sentences' list")
        if split is not None and im.get("split") != split:
            continue
        name = str(Path(im.get("filepath") or "") / im["filename"])
        image = find(name) or find(im["filename"])
        if image is None:
            missing.append(name)
            continue
        captions = [s["raw"].strip() for s in im["sentences"] if isinstance(s, dict) and isinstance(s.get("raw"), str)]
        if captions:
            records.append({"image": image, "captions": captions, "split": im.get("split")})
    notes = []
    if missing:
        if len(missing) == len(records) + len(missing):
            raise LayoutError(f"{path}: none of the images was found under {roots[0]} (first: {missing[0]}); put "
                              f"the image folders ({', '.join(['train2014', 'val2014'] + IMAGE_FOLDERS[:2])}) there")
        notes.append(f"{len(missing)} image(s) listed in {path.name} are not under {roots[0]} and were left out "
                     f"(first: {missing[0]})")
    return Imported(records, "image", notes=notes)
