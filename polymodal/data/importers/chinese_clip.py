"""`chinese-clip`: Chinese-CLIP's retrieval layout (MUGE, Flickr30k-CN, COCO-CN as Chinese-CLIP ships them).

Layout (as OFA-Sys/Chinese-CLIP `README_En.md` ("Prepare the dataset") describes it and
`cn_clip/preprocess/build_lmdb_dataset.py` / `cn_clip/eval/data.py` read it): a dataset folder with, per split
(`train`, `valid`, `test`), `{split}_imgs.tsv`, one image a line as `image_id<TAB>base64 of the image file`,
and `{split}_texts.jsonl`, one text a line as `{"text_id": 8428, "text": "...", "image_ids": [1076345, 517602]}`
(the images the text matches; an empty list in a test set released without its pairs).

The images are decoded into an image folder (`image_dir/<split>/<image_id>.<jpg|png|...>`). Records are per
image: `captions_zh`, the texts that match it, and `text_ids`, the same texts' ids in the same order. A text
that matches several images appears in each of their records; `text_ids` is what tells evaluation that those
entries are one text with several correct images (group by text id before ranking images for a text). Images
no text matches and texts with no image are left out (notes say how many).

`--split`: train, valid or test (default: every split with both files, kept in each record's `split`).
Options: `image_dir`: where the decoded images are written (default `images_decoded/` in the dataset folder).
"""
from __future__ import annotations

import base64
import binascii
from pathlib import Path

from .common import Imported, jsonl_objects, LayoutError, require_split
from .decoded import default_image_dir, write_image
from .options import reject_unknown

SPLITS = ("train", "valid", "test")


def _texts(path: Path) -> list[dict]:
    texts = []
    for line_no, obj in jsonl_objects(path):
        if not isinstance(obj.get("text"), str) or not isinstance(obj.get("image_ids"), list) or "text_id" not in obj:
            raise LayoutError(f"{path} line {line_no}: expected {{\"text_id\", \"text\", \"image_ids\": [...]}}")
        texts.append(obj)
    return texts


def _decode(b64: str) -> bytes:
    """Standard or URL-safe base64 (Chinese-CLIP's readers accept both)."""
    return base64.b64decode(b64.strip().translate(str.maketrans("-_", "+/")), validate=True)


def _read_split(root: Path, split: str, image_dir: Path, notes: list) -> list[dict]:
    texts = _texts(root / f"{split}_texts.jsonl")
    wanted = {str(i) for t in texts for i in t["image_ids"]}
    paths: dict[str, str] = {}
    tsv = root / f"{split}_imgs.tsv"
    bad = unmatched = 0
    with open(tsv, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            image_id, sep, b64 = line.rstrip("\r\n").partition("\t")
            if not sep:
                raise LayoutError(f"{tsv} line {line_no}: expected 'image_id<TAB>base64'")
            if image_id not in wanted:
                unmatched += 1
                continue
            try:
                data = _decode(b64)
            except (binascii.Error, ValueError):
                data = b""
            path = write_image(image_dir / split, image_id, data, f"{tsv} line {line_no}")
            if path is None:
                bad += 1
                continue
            paths[image_id] = str(path.resolve())
    records: dict[str, dict] = {}
    no_image = unknown = 0
    for t in texts:
        ids = [str(i) for i in t["image_ids"]]
        if not ids:
            no_image += 1
        for i in ids:
            if i not in paths:
                unknown += 1
                continue
            rec = records.setdefault(i, {"image": paths[i], "captions_zh": [], "text_ids": [], "split": split,
                                         "image_id": i})
            rec["captions_zh"].append(t["text"].strip())
            rec["text_ids"].append(t["text_id"])
    several = sum(1 for t in texts if len(t["image_ids"]) > 1)
    if several:
        notes.append(f"{split}: {several} of {len(texts)} texts match several images; each such text is in every "
                     f"one of its images' records, told apart by 'text_ids'")
    if no_image:
        notes.append(f"{split}: {no_image} text(s) list no image (a test set without its pairs) and were left out")
    if bad:
        notes.append(f"{split}: {bad} image(s) in {tsv.name} are not decodable base64 image files; left out")
    if unknown:
        notes.append(f"{split}: {unknown} text-image link(s) name an image not in {tsv.name}; left out")
    if unmatched:
        notes.append(f"{split}: {unmatched} image(s) in {tsv.name} match no text and were left out")
    return list(records.values())


def read(src, split: str | None = None, image_dir=None, **options) -> Imported:
    """Per-image records `{"image", "captions_zh", "text_ids", "split", "image_id"}` (see the module docstring)."""
    reject_unknown(read, options)
    root = Path(src)
    if root.is_file():
        root = root.parent
    if not root.is_dir():
        raise FileNotFoundError(f"{src} does not exist (give the dataset folder holding {{split}}_imgs.tsv and "
                                f"{{split}}_texts.jsonl)")
    found = [s for s in SPLITS if (root / f"{s}_imgs.tsv").is_file() and (root / f"{s}_texts.jsonl").is_file()]
    if not found:
        raise FileNotFoundError(f"{root}: no Chinese-CLIP split found (looked for train/valid/test_imgs.tsv with "
                                f"the matching _texts.jsonl)")
    require_split(split, set(found), root)
    image_dir = Path(image_dir) if image_dir is not None else default_image_dir(root)
    records, notes = [], [f"images decoded into {image_dir}"]
    for s in found:
        if split is None or s == split:
            records += _read_split(root, s, image_dir, notes)
    return Imported(records, "image", notes=notes)
