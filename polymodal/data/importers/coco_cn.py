"""`coco-cn`: COCO-CN, Chinese sentences and tags for MS-COCO images (the `coco-cn-version1805v1.1` release).

Layout (as li-xirong/coco-cn documents and ships it: `README.md`, the sentence file `data/coco-cn_ext.icap2020.txt`
in the same line form, and the retrieval code `code/image-retrieval`, which keys sentences `imageid#n`): a
folder with `coco-cn_train.txt`, `coco-cn_val.txt`, `coco-cn_test.txt` (one COCO image id a line, e.g.
`COCO_val2014_000000217153`), `imageid.human-written-caption.txt` (one sentence a line, `imageid#n<TAB>sentence`),
`imageid.manually-translated-caption.txt` (Chinese translations of COCO's English sentences, test images only,
same form) and `imageid.human-written-tags.txt` (`imageid tag tag ...`). The images are MS-COCO's: the id's
prefix names the folder (`train2014/`, `val2014/`), under the dataset folder, the folder above it, or
`image_root`.

The retrieval protocol Chinese-CLIP reports (1,000 test images, 1,053 human-written sentences) uses the
human-written sentences; that is the default.

`--split`: train, val or test (default: every split, kept in each record's `split`).
Options: `captions`: `human-written` (default), `manually-translated` or `all` (both lists, human-written first);
`image_root`: the COCO folder holding `train2014/` and `val2014/`.
"""
from __future__ import annotations

import re
from pathlib import Path

from .common import Imported, LayoutError, media_finder, require_split
from .options import reject_unknown

SPLITS = ("train", "val", "test")
CAPTION_FILES = {"human-written": "imageid.human-written-caption.txt",
                 "manually-translated": "imageid.manually-translated-caption.txt"}
TAGS_FILE = "imageid.human-written-tags.txt"
COCO_ID = re.compile(r"^COCO_(train|val)(\d{4})_\d+$")


def _release_folder(src: Path) -> Path:
    if src.is_file():
        src = src.parent
    if not src.is_dir():
        raise FileNotFoundError(f"{src} does not exist (give the COCO-CN folder holding coco-cn_train.txt ...)")
    if (src / "coco-cn_test.txt").is_file():
        return src
    found = sorted(src.rglob("coco-cn_test.txt"))
    if not found:
        raise FileNotFoundError(f"{src}: no COCO-CN release found (looked for coco-cn_test.txt in the folder and "
                                f"below)")
    return found[0].parent


def _sentences(path: Path) -> dict[str, list[str]]:
    """{image id: sentences in file order} of an `imageid#n<TAB>sentence` file."""
    out: dict[str, list[str]] = {}
    with open(path, encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            key, sep, text = line.rstrip("\r\n").partition("\t")
            if not sep:
                key, _, text = line.strip().partition(" ")
            image_id = key.split("#", 1)[0].strip()
            if not image_id or not text.strip():
                raise LayoutError(f"{path} line {line_no}: expected 'imageid#n<TAB>sentence'")
            out.setdefault(image_id, []).append(text.strip())
    return out


def read(src, split: str | None = None, captions: str = "human-written", image_root=None, **options) -> Imported:
    """Records `{"image", "captions_zh", "split"}` (+ `tags_zh` when the tags file is there) of COCO-CN."""
    reject_unknown(read, options)
    if captions not in (*CAPTION_FILES, "all"):
        raise ValueError(f"-o captions={captions!r}: one of {', '.join([*CAPTION_FILES, 'all'])}")
    root = _release_folder(Path(src))
    splits = [s for s in SPLITS if (root / f"coco-cn_{s}.txt").is_file()]
    require_split(split, set(splits), root)
    kinds = list(CAPTION_FILES) if captions == "all" else [captions]
    sentences: dict[str, list[str]] = {}
    for kind in kinds:
        path = root / CAPTION_FILES[kind]
        if not path.is_file():
            raise FileNotFoundError(f"{root}: {CAPTION_FILES[kind]} is missing (needed for -o captions={captions})")
        for image_id, texts in _sentences(path).items():
            sentences.setdefault(image_id, []).extend(texts)
    tags: dict[str, list[str]] = {}
    if (root / TAGS_FILE).is_file():
        for line in (root / TAGS_FILE).read_text(encoding="utf-8-sig").splitlines():
            parts = line.split()
            if parts:
                tags[parts[0]] = parts[1:]
    bases = [Path(image_root)] if image_root is not None else [root, root.parent, root.parent.parent]
    find = media_finder(bases, [])
    records, missing, no_text, notes = [], [], 0, []
    for s in splits:
        if split is not None and s != split:
            continue
        for image_id in (root / f"coco-cn_{s}.txt").read_text(encoding="utf-8-sig").split():
            m = COCO_ID.match(image_id)
            if m is None:
                raise LayoutError(f"{root / f'coco-cn_{s}.txt'}: {image_id!r} is not a COCO image id "
                                  f"(COCO_val2014_000000217153)")
            if image_id not in sentences:
                no_text += 1
                continue
            image = find(f"{m.group(1)}{m.group(2)}/{image_id}.jpg") or find(f"{image_id}.jpg")
            if image is None:
                missing.append(image_id)
                continue
            rec = {"image": image, "captions_zh": sentences[image_id], "split": s}
            if image_id in tags:
                rec["tags_zh"] = tags[image_id]
            records.append(rec)
    if no_text:
        notes.append(f"{no_text} image(s) have no {captions} sentence and were left out")
    if missing:
        if not records:
            raise LayoutError(f"{root}: none of the COCO images was found (first: {missing[0]}); give "
                              f"-o image_root=DIR, the folder holding train2014/ and val2014/")
        notes.append(f"{len(missing)} COCO image(s) were not found and were left out (first: {missing[0]})")
    return Imported(records, "image", notes=notes)
