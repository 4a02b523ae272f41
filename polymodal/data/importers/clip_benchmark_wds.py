"""`clip-benchmark-wds`: CLIP_benchmark's webdataset export (the `clip_benchmark_export_wds` / `wds/...` datasets).

Layout (as LAION-AI/CLIP_benchmark `clip_benchmark/webdataset_builder.py` writes it and
`clip_benchmark/datasets/builder.py` (`build_wds_dataset`) reads it): a dataset folder with `{split}/nshards.txt`
(the number of shards) and `{split}/0.tar`, `1.tar`, ...; `classnames.txt` and
`zeroshot_classification_templates.txt` (one a line, templates with `{c}`); `dataset_type.txt` (`retrieval`,
`multilabel`, or absent for classification). Each sample in a tar is members sharing a key (`s0000000.webp`,
`s0000000.cls`): the image (`webp`, `png`, `jpg` or `jpeg`) and its label, `.cls` (the class index as text),
`.npy` (multilabel: a 0/1 vector) or `.txt` (retrieval: the captions, one a line).

The images are written out of the tars into an image folder (`image_dir/<split>/<key>.<suffix>`). Classification
records are `{"image", "label"}` (multilabel `{"image", "labels"}`) with a classes file holding `classes` and
`templates` (written with `{}`); retrieval records are `{"image", "captions"}`.

`--split`: a split folder with `nshards.txt` (default: every one found, kept in each record's `split`).
Options: `image_dir`: where the images are written (default `images_decoded/` in the dataset folder).
"""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

from .common import Imported, LayoutError, require_split
from .decoded import default_image_dir, write_image
from .options import reject_unknown

IMAGE_MEMBERS = ("webp", "png", "jpg", "jpeg")


def _lines(path: Path) -> list[str] | None:
    if not path.is_file():
        return None
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _samples(tar_path: Path):
    """(key, {extension: bytes}) of each sample of a webdataset tar, in tar order (key = name up to its first '.')."""
    current, members = None, {}
    with tarfile.open(tar_path, "r") as tar:
        for info in tar:
            if not info.isfile():
                continue
            base = info.name.rsplit("/", 1)[-1]
            key, dot, ext = base.partition(".")
            if not dot:
                continue
            if key != current and members:
                yield current, members
                members = {}
            current = key
            members[ext.lower()] = tar.extractfile(info).read()
    if members:
        yield current, members


def _multilabel(data: bytes, where: str) -> list[int]:
    import numpy as np
    try:
        vec = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as e:
        raise LayoutError(f"{where}: the .npy label is not a plain array ({e})") from None
    return [int(i) for i in np.flatnonzero(vec.reshape(-1))]


def read(src, split: str | None = None, image_dir=None, **options) -> Imported:
    """Records and classes of a CLIP_benchmark webdataset folder (see the module docstring)."""
    reject_unknown(read, options)
    root = Path(src)
    if not root.is_dir():
        raise FileNotFoundError(f"{src} does not exist (give the folder holding {{split}}/nshards.txt)")
    splits = sorted(p.parent.name for p in root.glob("*/nshards.txt"))
    if not splits:
        raise FileNotFoundError(f"{root}: no CLIP_benchmark webdataset split (looked for <split>/nshards.txt)")
    require_split(split, set(splits), root)
    kind = (_lines(root / "dataset_type.txt") or ["classification"])[0].lower()
    classnames = _lines(root / "classnames.txt")
    templates = _lines(root / "zeroshot_classification_templates.txt")
    image_dir = Path(image_dir) if image_dir is not None else default_image_dir(root)
    records, notes = [], [f"images written into {image_dir}"]
    for s in splits:
        if split is not None and s != split:
            continue
        try:
            nshards = int((root / s / "nshards.txt").read_text().strip())
        except ValueError:
            raise LayoutError(f"{root / s / 'nshards.txt'}: not a number of shards") from None
        no_label = 0
        for shard in range(nshards):
            tar_path = root / s / f"{shard}.tar"
            if not tar_path.is_file():
                raise FileNotFoundError(f"{tar_path} is missing ({s}/nshards.txt says {nshards} shards)")
            for key, members in _samples(tar_path):
                where = f"{tar_path}: sample {key!r}"
                ext = next((e for e in IMAGE_MEMBERS if e in members), None)
                path = write_image(image_dir / s, key, members[ext], where) if ext else None
                if path is None:
                    raise LayoutError(f"{where} has no readable image ({', '.join(IMAGE_MEMBERS)})")
                rec = {"image": str(path.resolve()), "split": s}
                if kind == "retrieval" and "txt" in members:
                    rec["captions"] = [c for c in members["txt"].decode("utf-8").splitlines() if c.strip()]
                elif kind == "multilabel" and "npy" in members:
                    rec["labels"] = _multilabel(members["npy"], where)
                elif kind not in ("retrieval", "multilabel") and "cls" in members:
                    try:
                        rec["label"] = int(members["cls"].decode("utf-8").strip())
                    except (UnicodeDecodeError, ValueError):
                        raise LayoutError(f"{where}: the .cls member is not a class index") from None
                else:
                    no_label += 1
                    continue
                records.append(rec)
        if no_label:
            notes.append(f"{s}: {no_label} sample(s) have no {'.txt' if kind == 'retrieval' else '.cls/.npy'} "
                         f"member and were left out")
    if kind == "retrieval":
        return Imported(records, "image", notes=notes)
    if classnames is None:
        raise LayoutError(f"{root}: classnames.txt is missing (a {kind} set needs its class names)")
    classes = {"classes": classnames}
    if templates:
        classes["templates"] = [t.replace("{c}", "{}") for t in templates]
    bad = [r for r in records if not all(0 <= i < len(classnames) for i in r.get("labels", [r.get("label", 0)]))]
    if bad:
        raise LayoutError(f"{root}: a label of {bad[0]['image']} is outside the {len(classnames)} classes of "
                          f"classnames.txt")
    return Imported(records, "classification", classes=classes, notes=notes)
