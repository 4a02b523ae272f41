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

The folder reader itself lives in `polymodal.data.manifests` (which `read_manifest(folder)` uses) and is
re-exported here; this module adds the writer.

Subfolders that are not classes are refused, in one line naming the command that fits: WordNet ids
(``n01440764/``: `polymodal data import imagenet`), split or media folders (``train/``, ``val/``, ``images/``,
``photos/``, ``train2014/`` ...: Urban-1k's ``image/`` + ``caption/`` -> `urban1k`, DCI's ``photos/`` -> `dci`,
COCO / Flickr image folders -> `karpathy`), or a single subfolder (one class). A class list given to the reader
says the folders are classes and turns the check off.

Class names are the subfolder names with ``_`` read as a space (``red_car`` -> "red car"); classes are
sorted by folder name unless a class list is given, whose order then fixes the indices.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..fileio import atomic_open
from .manifests import (
    DEFAULT_CAPTION,
    IMAGE_EXTENSIONS,
    folder_class_name,
    is_image_folder,
    read_image_folder,
    write_manifest,
)


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
