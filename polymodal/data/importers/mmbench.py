"""`mmbench`: MMBench's TSV (multiple-choice questions with base64 images), as question / answer records.

Layout (as open-compass/VLMEvalKit's image MCQ dataset reads `MMBench_DEV_EN.tsv` and its siblings): a tab-separated
file with a header row and the columns `index`, `question`, `hint`, `A`, `B`, `C`, `D` (empty or "nan" where a
question has fewer options), `answer` (the correct letter; absent in the test files), `category`, `l2-category`,
`split`, `source`, `comment` and `image`: the image as base64, or (for a repeated image) the `index` of the row that
holds it.

CircularEval copies: the released dev/test TSVs hold every question once more per extra option, its options
circularly shifted and its `answer` letter moved with them; a copy's `index` is the question's index plus k x 10^6
(k = 1 .. N-1) and its `image` column names the question's row (as open-compass/VLMEvalKit's `mcq_circular_eval`
and OpenCompass' `eval_mmbench.py` group them: index mod 10^6). Each record says which question it is a pass of
(`circular_of`, the index mod 10^6, and `circular_pass`, k); the `mcq` eval task scores a question as right only when
every pass is (it makes the passes itself when a TSV holds only the questions). Scored as a `vqa` task instead, every
copy counts as a question of its own.

Images are decoded and written once each as `<image_dir>/<index>.<format>` (option `image_dir`; default
`<tsv stem>_images/` beside the TSV). Records: `{"image", "question" (the hint, when there is one, then the
question), "options" (the option texts in letter order), "letters", "answer" (the correct option's text),
"answer_letter", "answers": [answer], "question_type" (category), "l2_category", "index", "circular_of",
"circular_pass", "split"}`.

Options: `image_dir`; `tsv` (the file's name, when the folder holds several TSVs: MMBench_DEV_EN.tsv and
MMBench_DEV_CN.tsv often sit side by side).
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
OPTIONS = ("image_dir", "tsv")
CIRCULAR = 1_000_000           # a circular copy's index: the question's index + k x CIRCULAR


def _blank(value) -> bool:
    return value is None or str(value).strip() in ("", "nan", "NaN", "None")


def _circular(index, num_options: int, path: Path, line: int, seen: dict) -> dict:
    """`circular_of` / `circular_pass` of a row (index mod / div 10^6); a second row with the same pass of the same
    question, or a pass beyond the question's options, is a LayoutError naming the line."""
    try:
        value = int(str(index).strip())
    except ValueError:                                       # not an MMBench number: a question of its own
        return {"circular_of": str(index), "circular_pass": 0}
    of, k = value % CIRCULAR, value // CIRCULAR
    if k >= max(num_options, 1):
        raise LayoutError(f"{path} line {line}: index {value} is circular pass {k} of question {of}, but the row has "
                          f"only {num_options} options")
    passes = seen.setdefault(k, set())
    if of in passes:
        raise LayoutError(f"{path} line {line}: index {value} repeats pass {k} of question {of} (duplicate rows)")
    passes.add(of)
    return {"circular_of": of, "circular_pass": k}


def read(src, split: str | None = None, **options) -> Imported:
    """MMBench records of one TSV file (see the module docstring)."""
    check_options("mmbench", options, OPTIONS)
    from PIL import Image
    path = Path(src)
    if path.is_dir():
        if options.get("tsv"):
            path = path / options["tsv"]
        else:
            found = sorted(path.glob("MMBench*.tsv")) or sorted(path.glob("*.tsv"))
            if not found:
                raise FileNotFoundError(f"{path}: no MMBench .tsv file in the folder")
            if len(found) > 1:
                raise LayoutError(f"{path}: {len(found)} TSV files ({', '.join(f.name for f in found)}); name one with "
                                  f"-o tsv=NAME (or give the file itself)")
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
    records, written, seen = [], {}, {}
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
        rec.update(_circular(r["index"], len(letters), path, n, seen))
        letter = (r.get("answer") or "").strip()
        if letter:
            if letter not in letters:
                raise LayoutError(f"{path} line {n}: answer {letter!r} is not one of its options {', '.join(letters)}")
            rec.update(answer=texts[letters.index(letter)], answer_letter=letter,
                       answers=[texts[letters.index(letter)]])
        records.append(rec)
    notes = [f"{len(written)} image(s) written to {out_dir}"]
    copies = sum(r["circular_pass"] > 0 for r in records)
    if copies:
        notes.append(f"{len(records) - copies} question(s) and {copies} circular cop(ies) of them: score with --task "
                     f"mcq (CircularEval); the vqa task would count every copy as a question")
    orphans = sorted({r["circular_of"] for r in records if r["circular_pass"] > 0} - set(seen.get(0, ())))
    if orphans:
        notes.append(f"{len(orphans)} circular cop(ies) without their question's row (first: index {orphans[0]}); "
                     f"the mcq task scores their passes as given")
    if not any("answer" in r for r in records):
        notes.append("no `answer` column values (a test file): records are written without answers")
    return Imported(records, "mcq", notes=notes)
