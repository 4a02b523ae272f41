"""`vqav2`: VQA v2 (and v1) in the official layout, as VQA records (ten human answers per question).

Layout (as GT-Vision-Lab/VQA's `PythonHelperTools/vqaTools/vqa.py` and `vqaDemo.py` read it):
- questions: `Questions/v2_OpenEnded_mscoco_<subtype>_questions.json` (`<subtype>`: train2014, val2014, test2015,
  test-dev2015), a JSON object whose `questions` list holds `{"image_id", "question", "question_id"}` and whose
  `data_subtype` names the subtype;
- annotations (train and val only): `Annotations/v2_mscoco_<subtype>_annotations.json`, whose `annotations` list
  holds `{"question_id", "image_id", "question_type", "answer_type", "multiple_choice_answer", "answers": [{"answer",
  "answer_confidence", "answer_id"} x 10]}`;
- images: COCO's `<folder>/COCO_<folder>_<image_id as 12 digits>.jpg`, `<folder>` = the subtype (test-dev2015's
  images are test2015's), under the root, `Images/` or `images/`.

The files are found anywhere under the root folder (or beside a questions file given directly). Splits: the subtypes
present (every one by default, kept in `split`). Records: `{"image", "question", "answers" (the ten answer strings),
"answer" (multiple_choice_answer), "question_type", "answer_type", "question_id", "image_id", "split"}`; questions of
a subtype without annotations (the test sets) have no answers and are written with `"answers": []` (the note says
so; the `vqa` task needs answers).

Options: `image_root` (a folder holding the image folders, searched first).
"""
from __future__ import annotations

from pathlib import Path

from .common import Imported, LayoutError, media_finder, media_roots, read_json_file, require_split
from .options import check_options

OPTIONS = ("image_root",)
IMAGE_FOLDERS = ["", "Images", "images", "coco"]


def _subtype(path: Path, data: dict, suffix: str) -> str:
    """The subtype of a questions / annotations file: its `data_subtype`, else read from the file name."""
    sub = data.get("data_subtype")
    if isinstance(sub, str) and sub:
        return sub
    return path.name[: -len(suffix)].split("_")[-1]


def _files(src: Path, pattern: str) -> list[Path]:
    if src.is_file():
        here = [p for p in sorted(src.parent.glob(pattern))]
        up = [p for p in sorted(src.parent.parent.rglob(pattern))]
        return list(dict.fromkeys(here + up))
    return sorted(src.rglob(pattern))


def read(src, split: str | None = None, **options) -> Imported:
    """VQA records of every question file found (see the module docstring)."""
    check_options("vqav2", options, OPTIONS)
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist (give the VQA root folder or a *_questions.json file)")
    qfiles = [src] if src.is_file() else _files(src, "*_questions.json")
    if not qfiles:
        raise FileNotFoundError(f"{src}: no *_questions.json found (e.g. v2_OpenEnded_mscoco_val2014_questions.json)")
    questions = {}
    for path in qfiles:
        data = read_json_file(path)
        if not isinstance(data, dict) or not isinstance(data.get("questions"), list):
            raise LayoutError(f"{path}: not a VQA questions file (expected an object with a `questions` list)")
        questions[_subtype(path, data, "_questions.json")] = (path, data["questions"])
    require_split(split, set(questions), src)
    annotations = {}
    for path in _files(src if src.is_dir() else qfiles[0], "*_annotations.json"):
        data = read_json_file(path)
        if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
            raise LayoutError(f"{path}: not a VQA annotations file (expected an object with an `annotations` list)")
        annotations[_subtype(path, data, "_annotations.json")] = (path, data["annotations"])
    roots = [Path(options["image_root"])] if options.get("image_root") else media_roots(src, qfiles[0])
    if options.get("image_root") and not roots[0].is_dir():
        raise FileNotFoundError(f"image_root {roots[0]} is not a folder")
    find = media_finder(roots, IMAGE_FOLDERS)
    records, missing, unanswered, unmatched = [], [], [], 0
    for sub in sorted(s for s in questions if split in (None, s)):
        qpath, rows = questions[sub]
        anns = {}
        if sub in annotations:
            apath, arows = annotations[sub]
            for k, a in enumerate(arows):
                if not isinstance(a, dict) or "question_id" not in a or not isinstance(a.get("answers"), list):
                    raise LayoutError(f"{apath}: annotations[{k}] needs `question_id` and an `answers` list")
                anns[a["question_id"]] = a
        else:
            unanswered.append(sub)
        folder = "test2015" if sub.startswith("test") else sub
        for k, q in enumerate(rows):
            if not isinstance(q, dict) or not {"image_id", "question", "question_id"} <= set(q):
                raise LayoutError(f"{qpath}: questions[{k}] needs image_id, question and question_id")
            name = f"COCO_{folder}_{int(q['image_id']):012d}.jpg"
            image = find(f"{folder}/{name}") or find(name)
            if image is None:
                missing.append(f"{folder}/{name}")
                continue
            if sub in annotations and q["question_id"] not in anns:
                unmatched += 1
                continue
            a = anns.get(q["question_id"], {})
            rec = {"image": image, "question": q["question"],
                   "answers": [x["answer"] if isinstance(x, dict) else str(x) for x in a.get("answers", [])],
                   "question_id": q["question_id"], "image_id": q["image_id"], "split": sub}
            if a:
                rec.update(answer=a.get("multiple_choice_answer", ""), question_type=a.get("question_type", ""),
                           answer_type=a.get("answer_type", ""))
            records.append(rec)
    notes = []
    if unanswered:
        notes.append(f"no annotations for {', '.join(unanswered)}: its questions are written without answers")
    if unmatched:
        notes.append(f"{unmatched} question(s) without an annotation in their subtype's file were left out")
    if missing:
        if not records:
            raise LayoutError(f"{src}: none of the {len(missing)} images was found (first: {missing[0]}); put COCO's "
                              f"image folders under the root (or Images/) or give -o image_root=FOLDER")
        notes.append(f"{len(missing)} question(s) whose image was not found were left out (first: {missing[0]})")
    return Imported(records, "vqa", notes=notes)
