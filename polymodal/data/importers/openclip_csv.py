"""`csv`: image-caption tables as OpenCLIP trains from them (`--train-data pairs.csv --dataset-type csv`).

Layout (as mlfoundations/open_clip `src/open_clip_train/data.py` (`CsvDataset`) and its arguments in
`src/open_clip_train/params.py` read it): a table with a header row, one row per (image, caption) pair; the
image column is `filepath` and the caption column `title` unless `--csv-img-key` / `--csv-caption-key` say
otherwise, and the separator is a tab unless `--csv-separator` says otherwise (for `.csv` files too). The
same table form, `image,caption`, is what LAION-AI/CLIP_benchmark `clip_benchmark/datasets/flickr.py` reads
for Flickr30k / Flickr8k (`flickr30k_test_karpathy.txt`: comma-separated, captions not quoted).

Rows naming the same image become ONE record with all its captions (a note says how many rows became how many
images): a table with one row per caption read as one image per row would make every caption its own image,
and retrieval would count the image's other captions as wrong answers. A row with more fields than the header
(a separator inside an unquoted caption, as in CLIP_benchmark's Flickr files) has its extra fields joined back
into the caption when the caption is the last column (a note counts them); otherwise it is an error.

Image paths are taken relative to `image_root` (default: the table's folder, then the folder above, and the
image folders `images/`, `flickr30k-images/`, `flickr30k_images/`, `Images/` in them); absolute paths as given.

`--split`: tables have none (an error when given).
Options: `image_key` (default `filepath`), `caption_key` (default `title`), `sep` (default a tab; the names
`tab`, `comma`, `semicolon`, `pipe` say the others on the command line: `-o sep=comma`), `image_root`.
"""
from __future__ import annotations

import csv
from pathlib import Path

from .common import Imported, LayoutError, find_file, media_finder, require_split
from .options import reject_unknown

IMAGE_FOLDERS = ["images", "flickr30k-images", "flickr30k_images", "Images"]
SEPARATORS = {"tab": "\t", "\\t": "\t", "comma": ",", "semicolon": ";", "pipe": "|"}


def _separator(sep) -> str:
    if sep is None:
        return "\t"
    sep = SEPARATORS.get(str(sep), str(sep))
    if len(sep) != 1:
        raise ValueError(f"-o sep={sep!r}: give one character, or tab, comma, semicolon or pipe")
    return sep


def read(src, split: str | None = None, image_key: str = "filepath", caption_key: str = "title", sep=None,
         image_root=None, **options) -> Imported:
    """Records `{"image", "captions"}` of an image-caption table, captions grouped per image (see the module
    docstring)."""
    reject_unknown(read, options)
    path = find_file(Path(src), ["*.csv", "*.tsv"], "image-caption table (.csv / .tsv)")
    require_split(split, set(), path)
    delimiter = _separator(sep)
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = csv.reader(f, delimiter=delimiter)
        header = next(rows, None)
        if header is None:
            raise LayoutError(f"{path}: empty table")
        header = [h.strip() for h in header]
        for key, option in ((image_key, "image_key"), (caption_key, "caption_key")):
            if key not in header:
                hint = ""
                if len(header) == 1 and delimiter == "\t" and "," in header[0]:
                    hint = "; the header has no tab: a comma-separated table needs -o sep=comma"
                raise LayoutError(f"{path}: no column {key!r} in the header {header}{hint}; name the columns with "
                                  f"-o image_key=COLUMN -o caption_key=COLUMN")
        i_img, i_cap = header.index(image_key), header.index(caption_key)
        roots = [Path(image_root)] if image_root is not None else [path.parent, path.parent.parent]
        find = media_finder(roots, [] if image_root is not None else IMAGE_FOLDERS)
        groups: dict[str, dict] = {}
        missing, n_rows, joined, empty = [], 0, 0, 0
        for row in rows:
            if not row or all(not c.strip() for c in row):
                continue
            n_rows += 1
            line = rows.line_num
            if len(row) > len(header) and i_cap == len(header) - 1:
                row = row[:i_cap] + [delimiter.join(row[i_cap:])]
                joined += 1
            if len(row) != len(header):
                raise LayoutError(f"{path} line {line}: {len(row)} fields where the header has {len(header)} "
                                  f"(separator {delimiter!r}; give -o sep=... if the table uses another)")
            name, caption = row[i_img].strip(), row[i_cap].strip()
            if not name or not caption:
                empty += 1
                continue
            if name not in groups:
                groups[name] = {"image": find(name), "captions": []}
            groups[name]["captions"].append(caption)
    records, notes = [], []
    for name, g in groups.items():
        if g["image"] is None:
            missing.append(name)
        else:
            records.append(g)
    if n_rows > len(groups):
        notes.append(f"{path.name}: {n_rows} rows name {len(groups)} images; rows of the same image are grouped "
                     f"into one record with all its captions ({n_rows - empty} captions)")
    if joined:
        notes.append(f"{path.name}: {joined} row(s) had more fields than the header; the extra fields were joined "
                     f"into the {caption_key!r} column (a {delimiter!r} inside an unquoted caption)")
    if empty:
        notes.append(f"{path.name}: {empty} row(s) with an empty image or caption were left out")
    if missing:
        if not records:
            raise LayoutError(f"{path}: none of the images was found (first: {missing[0]}, looked under "
                              f"{roots[0]}); give -o image_root=DIR")
        notes.append(f"{len(missing)} image(s) named in {path.name} were not found and were left out "
                     f"(first: {missing[0]})")
    return Imported(records, "image", notes=notes)
