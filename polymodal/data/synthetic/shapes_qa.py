"""ShapesWorld QA: visual questions about ShapesWorld scenes, written as a VQA manifest (issue #34 item 3).

Every image is the ShapesWorld image of the same (seed, split, index) (`polymodal data shapes` with the same seed
and image settings draws the same scene), and gets `questions_per_image` questions of these types:

| question_type | example                                   | answer        | answer_type |
|---------------|-------------------------------------------|---------------|-------------|
| color         | what color is the star?                   | red           | other       |
| shape         | what shape is the object in the center?   | circle        | other       |
| size          | what size is the blue heart?              | small         | other       |
| count         | how many green objects are there?         | 2             | number      |
| exists        | is there a yellow cross?                  | yes / no      | yes/no      |
| where         | where is the purple square?               | top left      | other       |
| which         | what is in the bottom right corner?       | pink triangle | other       |

An object is named by the fewest attributes that single it out ("the star", "the red star", else its place),
never by the attribute asked about, so every question has one true answer.

**Answers, like VQAv2: ten per question.** Each is the true answer in a surface form a person might type
("Red", "red.", "two" for 2, "a pink triangle"), which the VQA answer normalisation (`polymodal.eval.vqa`) maps
back to one string; with probability `answer_noise` (default 0.1) an annotator gives a wrong answer of the same
type instead, so the VQA accuracy's partial credit (min(#matches / 3, 1)) is exercised. `answer` is the true
answer in its normal form.

Records: `{"image", "question", "answers" (10), "answer", "question_type", "answer_type", "question_id",
"image_id", "split"}`. Everything is a pure function of (seed, split, index). CLI:
`polymodal data shapes-qa --out DIR --n-train N --n-test M`.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...fileio import atomic_open
from .shapes import (COLOR_NAMES, NUMBERS_EN, SHAPES, SIZES, SPLIT_IDS, Scene, SceneObject, ShapesConfig, _plural_en,
                     build_scene, render_scene)
from .workers import remove_stale, sample_map

GENERATOR_VERSION = "1.0"
QUESTION_TYPES = ("color", "shape", "size", "count", "exists", "where", "which")
ANSWER_TYPES = {"count": "number", "exists": "yes/no"}          # every other type: "other"
NUM_ANSWERS = 10
# Short place names (answers of "where"); the questions use shapes.POSITIONS_EN's longer phrases.
PLACES = {(0, 0): "top left", (0, 1): "top", (0, 2): "top right", (1, 0): "left", (1, 1): "center",
          (1, 2): "right", (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right"}
PLACE_PHRASES = {(0, 0): "the top left corner", (0, 1): "the top middle", (0, 2): "the top right corner",
                 (1, 0): "the middle left", (1, 1): "the center", (1, 2): "the middle right",
                 (2, 0): "the bottom left corner", (2, 1): "the bottom middle", (2, 2): "the bottom right corner"}
QA_SEED_TAG = 7                     # mixed into the question rng, so questions never share the scene's draws


@dataclass
class ShapesQAConfig:
    """Settings of a ShapesWorld QA world (the scenes' own settings are `ShapesConfig`'s)."""
    questions_per_image: int = 3    # questions asked about each image (distinct types where possible)
    answer_noise: float = 0.1       # chance that one of the ten annotators answers wrongly
    types: tuple = QUESTION_TYPES   # question types drawn from (uniformly)

    def __post_init__(self):
        if not 1 <= self.questions_per_image <= len(QUESTION_TYPES):
            raise ValueError(f"shapes-qa: questions_per_image must be in 1..{len(QUESTION_TYPES)}, "
                             f"got {self.questions_per_image}")
        if not 0.0 <= self.answer_noise < 0.7:
            raise ValueError(f"shapes-qa: answer_noise must be in [0, 0.7) (the true answer stays the majority), "
                             f"got {self.answer_noise}")
        self.types = tuple(self.types)
        bad = [t for t in self.types if t not in QUESTION_TYPES]
        if bad or not self.types:
            raise ValueError(f"shapes-qa: types must be a non-empty subset of {', '.join(QUESTION_TYPES)}, got "
                             f"{list(self.types)}")


def answer_space(qtype: str) -> list[str]:
    """Every answer (normal form) a question of type `qtype` can have."""
    return {"color": list(COLOR_NAMES), "shape": list(SHAPES), "size": list(SIZES),
            "count": [str(n) for n in range(10)], "exists": ["yes", "no"], "where": list(PLACES.values()),
            "which": [f"{c} {s}" for c in COLOR_NAMES for s in SHAPES]}[qtype]


def _unique(objects: list[SceneObject], o: SceneObject, keys: tuple) -> bool:
    return sum(all(getattr(p, k) == getattr(o, k) for k in keys) for p in objects) == 1


def refer(scene: Scene, o: SceneObject, avoid: str) -> str | None:
    """The shortest phrase that singles out `o` without naming attribute `avoid` (None when none does).

    Tried in order: its shape, its colour, colour + shape, size + colour + shape, its place.
    """
    objs = scene.objects
    options = [(("shape",), f"the {o.shape}"), (("color",), f"the {o.color} object"),
               (("color", "shape"), f"the {o.color} {o.shape}"),
               (("size", "color", "shape"), f"the {o.size} {o.color} {o.shape}"),
               (("cell",), f"the object in {PLACE_PHRASES[o.cell]}")]
    for keys, phrase in options:
        if avoid not in keys and _unique(objs, o, keys):
            return phrase
    return None


def ask(scene: Scene, qtype: str, rng: np.random.Generator) -> tuple[str, str] | None:
    """One question of type `qtype` about `scene` and its true answer (normal form); None when the scene has no
    question of that type (e.g. "where" when every object is only named by its place)."""
    objs = scene.objects
    order = [objs[int(i)] for i in rng.permutation(len(objs))]
    if qtype in ("color", "shape", "size", "where"):
        avoid = "cell" if qtype == "where" else qtype
        for o in order:
            ref = refer(scene, o, avoid)
            if ref is None:
                continue
            if qtype == "where":
                return f"where is {ref}?", PLACES[o.cell]
            word = "color" if qtype == "color" else qtype
            return f"what {word} is {ref}?", getattr(o, qtype)
        return None
    if qtype == "which":
        o = order[0]
        return f"what is in {PLACE_PHRASES[o.cell]}?", f"{o.color} {o.shape}"
    if qtype == "count":
        kind = int(rng.integers(3))
        if kind == 0:
            return "how many objects are there?", str(len(objs))
        if kind == 1:
            c = COLOR_NAMES[int(rng.integers(len(COLOR_NAMES)))] if rng.random() < 0.5 else order[0].color
            return f"how many {c} objects are there?", str(sum(o.color == c for o in objs))
        s = SHAPES[int(rng.integers(len(SHAPES)))] if rng.random() < 0.5 else order[0].shape
        return f"how many {_plural_en(s, 2)} are there?", str(sum(o.shape == s for o in objs))
    if qtype == "exists":
        if rng.random() < 0.5:                                   # a present object: yes
            o = order[0]
            return f"is there a {o.color} {o.shape}?", "yes"
        present = {(o.color, o.shape) for o in objs}
        while True:                                              # an absent colour + shape: no
            c, s = COLOR_NAMES[int(rng.integers(len(COLOR_NAMES)))], SHAPES[int(rng.integers(len(SHAPES)))]
            if (c, s) not in present:
                return f"is there a {c} {s}?", "no"
    raise ValueError(f"unknown question type {qtype!r}; known: {', '.join(QUESTION_TYPES)}")


def surface_form(answer: str, qtype: str, rng: np.random.Generator) -> str:
    """`answer` as one annotator might type it: capitalised, with a full stop, a number word or an article."""
    k = int(rng.integers(5))
    if qtype == "count" and k == 1:
        return NUMBERS_EN[int(answer)] if int(answer) < len(NUMBERS_EN) else answer
    if qtype == "which" and k == 2:
        return f"a {answer}"
    if k == 3:
        return answer.capitalize()
    if k == 4:
        return answer + "."
    return answer


def annotate(answer: str, qtype: str, rng: np.random.Generator, noise: float, space: list | None = None) -> list[str]:
    """Ten annotators' answers: the truth in surface forms, each wrong with probability `noise`.

    Args:
        answer: the true answer (normal form).
        qtype: the question type (its surface forms; its answer space unless `space` is given).
        rng: the question's generator.
        noise: chance of a wrong answer per annotator.
        space: the answers a wrong annotator picks from (default `answer_space(qtype)`).
    Returns:
        Ten answer strings.
    """
    space = [a for a in (space if space is not None else answer_space(qtype)) if a != answer]
    out = []
    for _ in range(NUM_ANSWERS):
        given = space[int(rng.integers(len(space)))] if rng.random() < noise else answer
        out.append(surface_form(given, qtype, rng))
    return out


def image_questions(seed: int, split: str, index: int, scene: Scene, cfg: ShapesQAConfig) -> list[dict]:
    """The question records (without `image`) of one image: distinct types, as many as the scene allows."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), SPLIT_IDS[split], int(index), QA_SEED_TAG]))
    types = [cfg.types[int(i)] for i in rng.permutation(len(cfg.types))]
    out = []
    for qtype in types:
        if len(out) == cfg.questions_per_image:
            break
        qa = ask(scene, qtype, rng)
        if qa is None:
            continue
        question, answer = qa
        out.append({"question": question, "answers": annotate(answer, qtype, rng, cfg.answer_noise),
                    "answer": answer, "question_type": qtype, "answer_type": ANSWER_TYPES.get(qtype, "other"),
                    "question_id": f"{split}_{index:06d}_{len(out)}", "image_id": f"{split}_{index:06d}",
                    "split": split})
    return out


_WORKER: dict[str, Any] = {}


def _init_worker(out_dir: str, seed: int, shapes_cfg: dict, qa_cfg: dict) -> None:
    _WORKER.update(out_dir=out_dir, seed=seed, shapes=ShapesConfig(**shapes_cfg), qa=ShapesQAConfig(**qa_cfg))


def _make_one(task: tuple[str, int]) -> list[dict]:
    split, index = task
    cfg: ShapesConfig = _WORKER["shapes"]
    scene = build_scene(_WORKER["seed"], split, index, cfg)
    rel = f"images/{split}_{index:06d}.png"
    render_scene(scene, cfg.image_size, cfg.antialias).save(os.path.join(_WORKER["out_dir"], rel), format="PNG",
                                                            compress_level=cfg.png_compress_level)
    return [{"image": rel, **q} for q in image_questions(_WORKER["seed"], split, index, scene, _WORKER["qa"])]


def generate_shapes_qa(out_dir, n_train: int, n_test: int, n_val: int | None = None, seed: int = 0,
                       cfg: ShapesQAConfig | None = None, shapes_cfg: ShapesConfig | None = None,
                       progress: bool = True, workers: int = 2) -> dict[str, Any]:
    """Write `images/`, `train.jsonl`, `val.jsonl`, `test.jsonl`, `answers.json` and `meta.json` into `out_dir`.

    Args:
        out_dir: output folder (created; images of an earlier, larger generation are removed).
        n_train, n_test: images per split (each gets `cfg.questions_per_image` questions).
        n_val: validation images; None = `n_test`.
        seed: data set seed; every image and question depends only on (seed, split, index).
        cfg: question settings; None = defaults.
        shapes_cfg: scene settings (image size, object counts ...); None = ShapesWorld's defaults.
        progress: show a progress bar per split.
        workers: rendering processes; the output does not depend on it.
    Returns:
        {"out_dir", "counts" (questions per split), "images" (per split), "manifests", "seconds"}.
    """
    cfg, shapes_cfg = cfg or ShapesQAConfig(), shapes_cfg or ShapesConfig()
    n_val = n_test if n_val is None else n_val
    images = {"train": n_train, "val": n_val, "test": n_test}
    for split, n in images.items():
        if n < 0:
            raise ValueError(f"shapes-qa: n_{split} must be >= 0, got {n}")
    from tqdm import tqdm
    start = time.perf_counter()
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records: dict[str, list[dict]] = {}
    with sample_map(workers, sum(images.values()), _init_worker,
                    (str(out), int(seed), asdict(shapes_cfg), asdict(cfg)), max_chunk=64) as run:
        for split, n in images.items():
            bar = tqdm(total=n, desc=f"shapes-qa {split}", unit="img", disable=not progress or n == 0)
            records[split] = []
            for recs in run(_make_one, [(split, i) for i in range(n)]):
                records[split].extend(recs)
                bar.update(1)
            bar.close()
    manifests = {}
    for split, recs in records.items():
        path = out / f"{split}.jsonl"
        with atomic_open(path, "w", encoding="utf-8") as f:
            f.write("".join(json.dumps(r) + "\n" for r in recs))
        manifests[split] = str(path)
    spaces = {t: answer_space(t) for t in cfg.types}
    with atomic_open(out / "answers.json", "w", encoding="utf-8") as f:
        f.write(json.dumps({"question_types": list(cfg.types), "answers": spaces}, indent=1) + "\n")
    meta = {"generator": "polymodal.data.synthetic.shapes_qa", "version": GENERATOR_VERSION, "seed": int(seed),
            "images": images, "questions": {s: len(r) for s, r in records.items()}, "config": asdict(cfg),
            "shapes_config": asdict(shapes_cfg)}
    with atomic_open(out / "meta.json", "w", encoding="utf-8") as f:
        f.write(json.dumps(meta, indent=1) + "\n")
    remove_stale(out / "images", r"(train|val|test)_\d{6}\.png",
                 {Path(r["image"]).name for recs in records.values() for r in recs})
    return {"out_dir": str(out), "counts": meta["questions"], "images": images, "manifests": manifests,
            "seconds": time.perf_counter() - start}


def add_cli_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `polymodal data shapes-qa` options to `parser` (returned)."""
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--n-train", type=int, default=4000, help="training images (default 4000)")
    parser.add_argument("--n-test", type=int, default=500, help="test images (default 500)")
    parser.add_argument("--n-val", type=int, default=None, help="validation images (default: n-test)")
    parser.add_argument("--questions-per-image", type=int, default=3, help="questions per image (default 3)")
    parser.add_argument("--answer-noise", type=float, default=0.1,
                        help="chance that one of the ten annotators answers wrongly (default 0.1)")
    parser.add_argument("--types", default=",".join(QUESTION_TYPES),
                        help=f"comma-separated question types (default all: {','.join(QUESTION_TYPES)})")
    parser.add_argument("--max-objects", type=int, default=6, help="objects per image, at most (default 6)")
    parser.add_argument("--seed", type=int, default=0, help="data set seed (default 0)")
    parser.add_argument("--image-size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--workers", type=int, default=2, help="rendering processes (default 2)")
    return parser


def main_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Run the generator from parsed arguments and print a JSON summary (returned)."""
    cfg = ShapesQAConfig(questions_per_image=args.questions_per_image, answer_noise=args.answer_noise,
                         types=tuple(t for t in args.types.split(",") if t))
    shapes_cfg = ShapesConfig(image_size=args.image_size, max_objects=args.max_objects)
    result = generate_shapes_qa(args.out, args.n_train, args.n_test, args.n_val, args.seed, cfg, shapes_cfg,
                                workers=args.workers)
    print(json.dumps({"out_dir": os.path.abspath(result["out_dir"]), "questions": result["counts"],
                      "images": result["images"], "seconds": result["seconds"]}, indent=1))
    return result


__all__ = ["QUESTION_TYPES", "ShapesQAConfig", "answer_space", "refer", "ask", "annotate", "image_questions",
           "generate_shapes_qa"]
