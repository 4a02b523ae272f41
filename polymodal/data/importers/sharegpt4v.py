"""`sharegpt4v`: ShareGPT4V captions (`share-captioner_coco_lcs_sam_1246k_1107.json`, `sharegpt4v_*.json`).

Layout (as beichenzbc/Long-CLIP `train/sharegpt4v.py` reads it): one JSON list, one entry an image,
`{"id": ..., "image": "coco/train2017/000000000009.jpg", "conversations": [{"from": "human", "value": ...},
{"from": "gpt", "value": "<the detailed caption>"}]}`; `image` is relative to the data folder the JSON sits in
(`sharegpt4v/data/`, holding `coco/`, `sam/`, `llava/`, ...). Long-CLIP's test protocol takes the first 1,000
entries as the test set and trains on the rest.

Records are `{"image", "caption", "long_caption", "split"}`: `long_caption` is the first `gpt` answer with its
new lines as spaces (as Long-CLIP reads it) and `caption` its first sentence (Long-CLIP's short caption).

`--split`: test (the first `first_n` entries) or train (the rest); default both, kept in each record's `split`.
Options: `first_n` (default 1000), `image_root` (default: the JSON's folder).
"""
from __future__ import annotations

from pathlib import Path

from .common import Imported, LayoutError, find_file, media_finder, read_json_file, require_split
from .longtext import first_sentence, squash
from .options import reject_unknown

JSON_NAMES = ["share-captioner_coco_lcs_sam_1246k_1107.json", "sharegpt4v_*.json", "share-captioner*.json"]


def read(src, split: str | None = None, first_n: int = 1000, image_root=None, **options) -> Imported:
    """Records `{"image", "caption", "long_caption", "split"}` of a ShareGPT4V JSON (see the module docstring)."""
    reject_unknown(read, options)
    if not isinstance(first_n, int) or isinstance(first_n, bool) or first_n < 0:
        raise ValueError(f"-o first_n={first_n!r}: give the number of test entries (Long-CLIP: 1000)")
    path = find_file(Path(src), JSON_NAMES, "ShareGPT4V caption JSON")
    require_split(split, {"test", "train"}, path)
    data = read_json_file(path)
    if not isinstance(data, list):
        raise LayoutError(f"{path}: not a ShareGPT4V file (expected a JSON list of {{image, conversations}})")
    find = media_finder([Path(image_root)] if image_root is not None else [path.parent], [])
    records, missing, no_answer = [], [], 0
    for k, e in enumerate(data):
        s = "test" if k < first_n else "train"
        if split is not None and s != split:
            continue
        if not isinstance(e, dict) or not isinstance(e.get("image"), str) \
                or not isinstance(e.get("conversations"), list):
            raise LayoutError(f"{path}: entry [{k}] has no 'image' / 'conversations'")
        answer = next((t.get("value") for t in e["conversations"] if isinstance(t, dict) and t.get("from") == "gpt"),
                      None)
        if not isinstance(answer, str) or not answer.strip():
            no_answer += 1
            continue
        image = find(e["image"])
        if image is None:
            missing.append(e["image"])
            continue
        long = squash(answer)
        records.append({"image": image, "caption": first_sentence(long), "long_caption": long, "split": s})
    notes = [f"entries [0, {first_n}) are the test split, the rest train (Long-CLIP's protocol)"]
    if no_answer:
        notes.append(f"{no_answer} entries have no 'gpt' caption and were left out")
    if missing:
        if not records:
            raise LayoutError(f"{path}: none of the images was found (first: {missing[0]}); put the image folders "
                              f"(coco/, sam/, llava/ ...) beside the JSON or give -o image_root=DIR")
        notes.append(f"{len(missing)} image(s) were not found and were left out (first: {missing[0]})")
    return Imported(records, "image", notes=notes)
