"""`iiw`: ImageInWords (IIW) descriptions (IIW-400, DCI_Test, DOCCI_Test, ... `data.jsonl`).

Layout (as google/imageinwords `datasets/README.md`, `datasets/IIW-400/README.md` and the released
`datasets/*/data.jsonl` files lay it out): one JSON object a line; `IIW` is the human-authored detailed
description (`IIW-P5B` a model's; DOCCI_Test also has `DOCCI`, DOCCI's own), and the image is named by
`image/key` (IIW-400: a DOCCI image id, LocNar_Eval / CM_3600: an Open Images / XM3600 id; the file `<key>.jpg`)
or by `image` (DCI_Test: a file name in DCI's `photos/`; DOCCI_Test: a DOCCI id, the file `<id>.jpg`). The
images are not in the release: they are found under `image_root` (default: the folder of `data.jsonl` and the
folder above), or in its `images/`, `images_aar/` or `photos/`.

Records are `{"image", "caption", "long_caption"}`: `long_caption` is the description (whitespace squashed);
IIW has no short caption, so `caption` is its first sentence (the release rates "First few line(s) as tldr",
the opening as a summary; a note says so).

`--split`: the files have none (an error when given).
Options: `description` (default `IIW`; `IIW-P5B` for the model descriptions), `image_root`.
"""
from __future__ import annotations

from pathlib import Path

from .common import find_file, Imported, jsonl_objects, LayoutError, media_finder, require_split
from .longtext import first_sentence, squash
from .options import reject_unknown

IMAGE_FOLDERS = ["images", "images_aar", "photos"]


def read(src, split: str | None = None, description: str = "IIW", image_root=None, **options) -> Imported:
    """Records `{"image", "caption", "long_caption"}` of an IIW data.jsonl (see the module docstring)."""
    reject_unknown(read, options)
    path = find_file(Path(src), ["data.jsonl", "*.jsonl"], "IIW data.jsonl")
    require_split(split, set(), path)
    roots = [Path(image_root)] if image_root is not None else [path.parent, path.parent.parent]
    find = media_finder(roots, IMAGE_FOLDERS)
    records, missing, no_text = [], [], 0
    for line_no, obj in jsonl_objects(path):
        name = obj.get("image") if isinstance(obj.get("image"), str) else obj.get("image/key")
        if not isinstance(name, str) or not name.strip():
            raise LayoutError(f"{path} line {line_no}: no 'image' or 'image/key'")
        if not Path(name).suffix:                             # an image id: the file is <id>.jpg
            name += ".jpg"
        text = obj.get(description)
        if not isinstance(text, str) or not text.strip():
            no_text += 1
            continue
        image = find(name)
        if image is None:
            missing.append(name)
            continue
        long = squash(text)
        records.append({"image": image, "caption": first_sentence(long), "long_caption": long})
    notes = [f"'{description}' has no short caption: 'caption' is the first sentence of each description"]
    if no_text:
        notes.append(f"{no_text} line(s) have no {description!r} description and were left out")
    if missing:
        if not records:
            raise LayoutError(f"{path}: none of the images was found (first: {missing[0]}); the release has no "
                              f"images: give -o image_root=DIR (DOCCI's images or DCI's photos/)")
        notes.append(f"{len(missing)} image(s) were not found and were left out (first: {missing[0]})")
    return Imported(records, "image", notes=notes)
