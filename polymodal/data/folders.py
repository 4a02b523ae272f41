"""Image folders as data sources: one subfolder per class, as many users keep labelled images.

```
pets/
  cat/      001.jpg 002.png ...
  dog/      ...
  red_car/  ...
```

`read_image_folder(root)` gives manifest records (``image``, ``caption``, ``label``, ``class``) and the class
names, so the same folder serves zero-shot evaluation (labels = folder) and training (a caption per image
from a template, "a photo of a red car."). `read_manifest(folder)` reads a folder this way too, so anything
that takes a manifest path also takes an image folder. `write_folder_manifest` writes the records as a
JSONL manifest + classes.json, for recipes that want files.

Class names are the subfolder names with ``_`` read as a space (``red_car`` -> "red car"); classes are
sorted by folder name unless a class list is given, whose order then fixes the indices.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DEFAULT_CAPTION = "a photo of a {}."


def folder_class_name(folder: str) -> str:
    """The class name of a subfolder: underscores read as spaces (``red_car`` -> ``red car``)."""
    return " ".join(folder.replace("_", " ").split())


def _class_folders(root: Path, extensions: Sequence[str]) -> dict[str, list[Path]]:
    """{subfolder name: its image files (recursively, sorted)} for the non-hidden subfolders holding images."""
    exts = {e.lower() for e in extensions}
    out = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(f for f in sub.rglob("*") if f.is_file() and f.suffix.lower() in exts
                       and not any(part.startswith(".") for part in f.relative_to(sub).parts))
        if files:
            out[sub.name] = files
    return out


def is_image_folder(path, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> bool:
    """True for a directory with at least one subfolder that holds image files."""
    path = Path(path)
    return path.is_dir() and bool(_class_folders(path, extensions))


def read_image_folder(root, caption_template: str = DEFAULT_CAPTION, classes=None,
                      extensions: Sequence[str] = IMAGE_EXTENSIONS) -> tuple[list[dict], list[str]]:
    """Records and class names of an image folder (one subfolder per class).

    Args:
        root: the folder.
        caption_template: the caption of each image, with ``{}`` for the class name (for training and
            retrieval; zero-shot evaluation uses its own prompts).
        classes: optional class list (names, or a classes file for `polymodal.data.labels.class_names`) that
            fixes the order of the indices; every subfolder must be one of them (classes without a folder
            are allowed: they get no images).
        extensions: file endings counted as images (case-insensitive).
    Returns:
        (records, class names). Records are ``{"image": absolute path, "caption": ..., "label": index,
        "class": name, "_line": n}`` (n counts images from 1, for messages), sorted by class then file.
    Raises:
        FileNotFoundError: `root` is not a directory.
        ManifestError: no subfolder holds images, or a subfolder is not in `classes` (naming both).
    """
    from .manifests import ManifestError
    root = Path(root).absolute()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    if caption_template.count("{}") != 1:
        raise ValueError(f"caption_template {caption_template!r} needs exactly one '{{}}' for the class name")
    folders = _class_folders(root, extensions)
    if not folders:
        raise ManifestError(f"{root}: no subfolder holds images ({', '.join(extensions)}); an image folder has one "
                            f"subfolder per class (e.g. {root}/cat/001.jpg), or give a manifest file")
    found = {folder_class_name(f): f for f in folders}
    if len(found) < len(folders):
        raise ManifestError(f"{root}: two subfolders give the same class name once '_' is read as a space; "
                            f"rename one")
    if classes is None:
        names = sorted(found)
    else:
        from .labels import class_names
        names, source = class_names(classes)
        unknown = sorted(set(found) - set(names))
        if unknown:
            raise ManifestError(f"{root}/{found[unknown[0]]}: class {unknown[0]!r} is not in {source}; add it "
                                f"there or move the folder out")
    records = []
    for label, name in enumerate(names):
        for f in folders.get(found.get(name, ""), []):
            records.append({"image": str(f), "caption": caption_template.format(name), "label": label,
                            "class": name, "_line": len(records) + 1})
    return records, names


def write_folder_manifest(root, out_dir, caption_template: str = DEFAULT_CAPTION, classes=None,
                          name: str = "train.jsonl") -> tuple[Path, Path]:
    """Write an image folder as a manifest plus classes.json (for recipes that take files).

    Args:
        root: the image folder.
        out_dir: where to write `name` and classes.json (created if needed).
        caption_template, classes: as for `read_image_folder`.
        name: the manifest's file name.
    Returns:
        (manifest path, classes.json path).
    """
    from ..fileio import atomic_open
    from .manifests import write_manifest
    records, names = read_image_folder(root, caption_template, classes)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = out_dir / name
    write_manifest(records, manifest)
    classes_file = out_dir / "classes.json"
    with atomic_open(classes_file, "w", encoding="utf-8") as f:
        f.write(json.dumps({"classes": names}, indent=1, ensure_ascii=False) + "\n")
    return manifest, classes_file


__all__ = ["IMAGE_EXTENSIONS", "DEFAULT_CAPTION", "folder_class_name", "is_image_folder", "read_image_folder",
           "write_folder_manifest"]
