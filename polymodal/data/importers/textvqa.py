"""`textvqa`: TextVQA 0.5.1 in its released layout, as VQA records (ten human answers per question).

Layout (as facebookresearch/mmf's TextVQA builder and the public loaders of `TextVQA_0.5.1_<split>.json` read it):
- `TextVQA_0.5.1_train.json`, `TextVQA_0.5.1_val.json`, `TextVQA_0.5.1_test.json`: a JSON object with
  `dataset_type` (the split), `dataset_name` and a `data` list of `{"question", "image_id", "question_id",
  "answers" (ten strings; absent for test), "image_classes", "flickr_original_url", ...}`;
- images: `train_images/<image_id>.jpg` (train and val share it) and `test_images/<image_id>.jpg`.

Splits: train, val, test (the files present; all by default). Records: `{"image", "question", "answers", "question_id",
"image_id", "split", "question_type"}`; TextVQA has no question types, so `question_type` is the question's first
word ("what", "who" ...), the grouping video-QA papers use. Test questions have `"answers": []`.

Options: `image_root` (the folder holding the images, searched first).
"""
from __future__ import annotations

from pathlib import Path

from .common import Imported, LayoutError, media_finder, media_roots, read_json_file
from .options import check_options
from .videofiles import annotation_files, split_files

FILES = {"train": "TextVQA_0.5.1_train.json", "val": "TextVQA_0.5.1_val.json", "test": "TextVQA_0.5.1_test.json"}
IMAGE_FOLDERS = {"train": "train_images", "val": "train_images", "test": "test_images"}
OPTIONS = ("image_root",)


def first_word(question: str) -> str:
    """The lower-cased first word of a question (its type where a layout has none)."""
    words = str(question).lower().split()
    return words[0].strip("?,.!") if words else ""


def read(src, split: str | None = None, **options) -> Imported:
    """VQA records of the TextVQA files found (see the module docstring)."""
    check_options("textvqa", options, OPTIONS)
    files = annotation_files(src, list(FILES.values()))
    splits = split_files(src, files, FILES, "TextVQA", split)
    records, missing = [], []
    for name in splits:
        path = files[FILES[name]]
        data = read_json_file(path)
        if not isinstance(data, dict) or not isinstance(data.get("data"), list):
            raise LayoutError(f"{path}: not a TextVQA file (expected an object with a `data` list)")
        roots = [Path(options["image_root"])] if options.get("image_root") else media_roots(src, path)
        find = media_finder(roots, [IMAGE_FOLDERS[name], "images", ""])
        for k, q in enumerate(data["data"]):
            if not isinstance(q, dict) or not {"question", "image_id", "question_id"} <= set(q):
                raise LayoutError(f"{path}: data[{k}] needs question, image_id and question_id")
            image = find(f"{q['image_id']}.jpg")
            if image is None:
                missing.append(f"{IMAGE_FOLDERS[name]}/{q['image_id']}.jpg")
                continue
            records.append({"image": image, "question": q["question"], "answers": list(q.get("answers") or []),
                            "question_id": q["question_id"], "image_id": q["image_id"], "split": name,
                            "question_type": first_word(q["question"])})
    notes = []
    if missing:
        if not records:
            raise LayoutError(f"{src}: none of the {len(missing)} images was found (first: {missing[0]}); give "
                              f"-o image_root=FOLDER")
        notes.append(f"{len(missing)} question(s) whose image was not found were left out (first: {missing[0]})")
    return Imported(records, "vqa", notes=notes)
