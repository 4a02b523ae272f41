"""`imagenet`: ImageNet-1k as shipped, synset folders (`train/n01440764/*.JPEG`) or a flat val folder + its labels.

Layout (the ILSVRC2012 CLS-LOC release as the Kaggle "ImageNet Object Localization Challenge" ships it and as
folder readers (torchvision's `ImageFolder`, used by mlfoundations/open_clip `src/open_clip_train/data.py`
`get_imagenet`) read it): a split folder (`train/`, `val/`, at the root or under `ILSVRC/Data/CLS-LOC/`) holding
one folder per class named by its WordNet id (`n01440764/`), the class index being the position of the id in
the sorted list; or a flat `val/` of `ILSVRC2012_val_00000001.JPEG` files with `LOC_val_solution.csv` in the root
(`ImageId,PredictionString`, the first word of `PredictionString` the image's WordNet id).
`LOC_synset_mapping.txt` in the root (`n01440764 tench, Tinca tinca`, one class a line), when present, gives
the class order and names for ids the bundled list lacks.

Class names come with the package (`polymodal/data/importers/data/imagenet1k.json`, sources in `SOURCES.md`
there): OpenAI CLIP's English names and 80 templates, and the Chinese names and templates of ImageNet-CN. The
classes file written beside the manifest holds `classes`, `classes_zh`, `wnids`, `templates`, `templates_zh`.

`--split`: train or val (default: every split folder found, kept in each record's `split`). A split folder given
as the source is read alone, its split its name when that is `train` or `val`.
Options: none.
"""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

from ..manifests import IMAGE_EXTENSIONS
from .common import Imported, LayoutError, require_split
from .options import reject_unknown

WNID = re.compile(r"^n\d{8}$")
SPLITS = ("train", "val")
BUNDLED = Path(__file__).parent / "data" / "imagenet1k.json"


def bundled_classes() -> dict:
    """The bundled ImageNet-1k lists: `wnids`, `classes`, `classes_zh`, `templates`, `templates_zh`."""
    return json.loads(BUNDLED.read_text(encoding="utf-8"))


def _images(folder: Path) -> list[Path]:
    exts = {e.lower() for e in IMAGE_EXTENSIONS}
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in exts)


def _split_folders(src: Path) -> dict[str | None, Path]:
    if any(WNID.match(p.name) for p in src.iterdir() if p.is_dir()):
        return {src.name if src.name in SPLITS else None: src}            # the split folder itself
    found = {}
    for base in (src, src / "ILSVRC" / "Data" / "CLS-LOC"):
        for s in SPLITS:
            if s not in found and (base / s).is_dir():
                found[s] = base / s
    if not found:
        raise FileNotFoundError(f"{src}: no ImageNet split folder (looked for train/ and val/ with n########/ class "
                                f"folders, in the root and under ILSVRC/Data/CLS-LOC/)")
    return found


def _root_file(src: Path, name: str) -> Path | None:
    for base in (src, src.parent, src.parent.parent):
        if (base / name).is_file():
            return base / name
    return None


def _class_lists(src: Path, notes: list) -> dict:
    data = bundled_classes()
    mapping = _root_file(src, "LOC_synset_mapping.txt")
    if mapping is None:
        return data
    names = {}
    for line_no, line in enumerate(mapping.read_text(encoding="utf-8").splitlines(), start=1):
        wnid, _, words = line.strip().partition(" ")
        if not line.strip():
            continue
        if not WNID.match(wnid):
            raise LayoutError(f"{mapping} line {line_no}: expected 'n######## names'")
        names[wnid] = words.strip()
    known = dict(zip(data["wnids"], range(len(data["wnids"]))))
    wnids = list(names)
    unknown = [w for w in wnids if w not in known]
    out = {"wnids": wnids, "templates": data["templates"], "templates_zh": data["templates_zh"],
           "classes": [data["classes"][known[w]] if w in known else names[w].split(",")[0].strip() for w in wnids]}
    if not unknown:
        out["classes_zh"] = [data["classes_zh"][known[w]] for w in wnids]
    else:
        notes.append(f"{len(unknown)} class(es) of {mapping.name} are not ImageNet-1k's (first: {unknown[0]}); "
                     f"their names are the first WordNet name, and there are no Chinese names")
    return out


def _val_labels(src: Path) -> tuple[dict[str, str], Path]:
    path = _root_file(src, "LOC_val_solution.csv")
    if path is None:
        raise FileNotFoundError(f"{src}: the val folder holds images, not class folders, and LOC_val_solution.csv "
                                f"(their labels) is not in the root")
    labels = {}
    with open(path, encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            words = (row.get("PredictionString") or "").split()
            if row.get("ImageId") and words:
                labels[row["ImageId"]] = words[0]
    return labels, path


def _record(path: Path, label: int, split: str | None) -> dict:
    rec = {"image": str(path.resolve()), "label": label}
    if split is not None:
        rec["split"] = split
    return rec


def read(src, split: str | None = None, **options) -> Imported:
    """Records `{"image", "label", "split"}` and the classes (see the module docstring)."""
    reject_unknown(read, options)
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"{src} does not exist (give the ImageNet root or a split folder)")
    folders = _split_folders(src)
    require_split(split, {s for s in folders if s is not None}, src)
    notes: list = []
    classes = _class_lists(src, notes)
    index = {w: i for i, w in enumerate(classes["wnids"])}
    records = []
    for name, folder in folders.items():
        if split is not None and name != split:
            continue
        class_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and WNID.match(p.name))
        if class_dirs:
            unknown = [p.name for p in class_dirs if p.name not in index]
            if unknown:
                raise LayoutError(f"{folder}/{unknown[0]}: {len(unknown)} class folder(s) are not ImageNet-1k "
                                  f"classes; put LOC_synset_mapping.txt listing them in the root")
            for d in class_dirs:
                records += [_record(p, index[d.name], name) for p in _images(d)]
            if len(class_dirs) < len(index):
                notes.append(f"{name or folder.name}: {len(class_dirs)} of the {len(index)} classes have a folder; "
                             f"labels index all {len(index)} classes")
            continue
        images = _images(folder)
        if not images:
            raise LayoutError(f"{folder}: neither n########/ class folders nor images")
        labels, solution = _val_labels(src)
        unlabelled = 0
        for p in images:
            wnid = labels.get(p.stem)
            if wnid is None or wnid not in index:
                unlabelled += 1
                continue
            records.append(_record(p, index[wnid], name))
        if unlabelled:
            notes.append(f"{name or folder.name}: {unlabelled} image(s) have no ImageNet-1k label in "
                         f"{solution.name}; left out")
    ordered = {k: classes[k] for k in ("classes", "classes_zh", "wnids", "templates", "templates_zh") if k in classes}
    return Imported(records, "classification", classes=ordered, notes=notes)
