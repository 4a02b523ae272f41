"""`mmbench`: MMBench's TSV (multiple-choice questions with base64 images), as question / answer records.

Layout (as open-compass/VLMEvalKit's image MCQ dataset reads `MMBench_DEV_EN.tsv` and its siblings): a tab-separated
file with a header row and the columns `index`, `question`, `hint`, `A`, `B`, `C`, `D` (empty or "nan" where a
question has fewer options), `answer` (the correct letter; absent in the test files), `category`, `l2-category`,
`split`, `source`, `comment` and `image`: the image as base64, or (for a repeated image) the `index` of the row that
holds it.

Images are decoded and written once each as `<image_dir>/<index>.<format>` (option `image_dir`; default
`<tsv stem>_images/` beside the TSV). Records: `{"image", "question" (the hint, when there is one, then the
question), "options" (the option texts in letter order), "letters", "answer" (the correct option's text),
"answer_letter", "answers": [answer], "question_type" (category), "l2_category", "index", "split"}`. MMBench's own
protocol (CircularEval over shifted options, answer extraction from free text) is not implemented: scored as a
`vqa` task, a classifier over answers gets plain accuracy.

Options: `image_dir`.
"""
from __future__ import annotations

import base64
import binascii
import csv
import io
import sys
from pathlib import Path

from .common import Imported, LayoutError, require_split
from .options import check_options

LETTERS = ("A", "B", "C", "D", "E", "F", "G", "H", "I")
OPTIONS = ("image_dir",)


def _blank(value) -> bool:
    return value is None or str(value).strip() in ("", "nan", "NaN", "None")


def read(src, split: str | None = None, **options) -> Imported:
    """MMBench records of one TSV file (see the module docstring)."""
    check_options("mmbench", options, OPTIONS)
    from PIL import Image
    path = Path(src)
    if path.is_dir():
        found = sorted(path.glob("MMBench*.tsv")) or sorted(path.glob("*.tsv"))
        if not found:
            raise FileNotFoundError(f"{path}: no MMBench .tsv file in the folder")
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (give the MMBench .tsv file)")
    csv.field_size_limit(sys.maxsize)
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    need = {"index", "question", "image", "A", "B"}
    if not rows or not need <= set(rows[0]):
        raise LayoutError(f"{path}: not an MMBench TSV (needs the columns {', '.join(sorted(need))}; header: "
                          f"{', '.join(rows[0]) if rows else 'empty file'})")
    require_split(split, {r.get("split") or "all" for r in rows} | ({"all"} if split == "all" else set()), path)
    by_index = {str(r["index"]): r["image"] for r in rows}
    out_dir = Path(options.get("image_dir") or path.parent / f"{path.stem}_images")
    out_dir.mkdir(parents=True, exist_ok=True)
    records, written = [], {}
    for n, r in enumerate(rows, start=2):                                     # line 1 is the header
        if split not in (None, r.get("split") or "all"):
            continue
        data = r["image"]
        if len(data) <= 64 and data in by_index:                             # a reference to another row's image
            key, data = data, by_index[data]
        else:
            key = str(r["index"])
        if key not in written:
            try:
                raw = base64.b64decode(data, validate=True)
                with Image.open(io.BytesIO(raw)) as im:
                    fmt = (im.format or "png").lower()
                    im.load()
            except (binascii.Error, ValueError, OSError) as e:
                raise LayoutError(f"{path} line {n}: the image column is neither base64 image data nor the index of "
                                  f"another row ({type(e).__name__})") from None
            target = out_dir / f"{key}.{'jpg' if fmt == 'jpeg' else fmt}"
            target.write_bytes(raw)
            written[key] = str(target.resolve())
        letters = [c for c in LETTERS if not _blank(r.get(c))]
        texts = [str(r[c]) for c in letters]
        question = str(r["question"]) if _blank(r.get("hint")) else f"{r['hint']}\n{r['question']}"
        rec = {"image": written[key], "question": question, "options": texts, "letters": letters,
               "question_type": r.get("category") or "", "l2_category": r.get("l2-category") or "",
               "index": r["index"], "split": r.get("split") or "all"}
        letter = (r.get("answer") or "").strip()
        if letter:
            if letter not in letters:
                raise LayoutError(f"{path} line {n}: answer {letter!r} is not one of its options {', '.join(letters)}")
            rec.update(answer=texts[letters.index(letter)], answer_letter=letter,
                       answers=[texts[letters.index(letter)]])
        records.append(rec)
    notes = [f"{len(written)} image(s) written to {out_dir}"]
    if not any("answer" in r for r in records):
        notes.append("no `answer` column values (a test file): records are written without answers")
    return Imported(records, "mcq", notes=notes)
