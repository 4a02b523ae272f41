"""MovingShapes QA: questions about what moves, which way, and what happens first, on a MovingShapes world.

Reads a world written by `polymodal data moving-shapes` (its `train/val/test.jsonl`: each record's `action`,
`subject`, `color_to` and `compound` are the truth of its video, time reversal and mismatched captions included) and
writes a video QA manifest per split beside nothing else (the videos stay where they are):

| question_type | example                                  | answer                      | asked of                |
|---------------|------------------------------------------|-----------------------------|-------------------------|
| what          | what moves? / what changes?              | blue hexagon (start colour) | every non-static video  |
| moves         | does anything move?                      | yes / no                    | every video             |
| direction     | which direction does the hexagon move?   | left / right / up / down    | single motions          |
| action        | what does the hexagon do?                | moves left, grows, turns red, moves left then right, stays still | every video |
| first         | what happens first?                      | moves left (first half)     | compound actions        |
| last          | what happens last?                       | moves right (second half)   | compound actions        |

"first" / "last" and "direction" need frame order: a single frame or an order-free pool of frames cannot answer them
(a compound video's halves swapped give the opposite answer with the same frames). Ten answers per question, made
like ShapesWorld QA's (`shapes_qa.annotate`: surface forms and `answer_noise` wrong answers of the same type).

Records: `{"video", "question", "answers", "answer", "question_type", "answer_type", "question_id", "video_id",
"split"}`; video paths are written relative to the output manifest. CLI: `polymodal data moving-qa --world DIR --out
DIR`. Deterministic: a pure function of the world's records and `seed`.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from .moving_shapes import ACTIONS, COMPOUNDS, SPLITS, STATIC, action_class
from .shapes import COLOR_NAMES, SHAPES
from .shapes_qa import annotate

MOTIONS = {"move_left": "left", "move_right": "right", "move_up": "up", "move_down": "down"}
QUESTION_TYPES = ("what", "moves", "direction", "action", "first", "last")
ANSWER_TYPES = {"moves": "yes/no"}


def action_space() -> list[str]:
    """Every answer of "what does X do?"."""
    names = [action_class(a, c) for a in ACTIONS if a != "change_color" for c in [None]]
    names += [action_class("change_color", c) for c in COLOR_NAMES]
    names += [action_class(c) for c in COMPOUNDS] + [action_class(STATIC)]
    return names


def spaces() -> dict[str, list[str]]:
    """Question type -> its answers (what noisy annotators pick from)."""
    halves = [action_class(a) for a in ("move_left", "move_right", "move_up", "move_down", "grow", "shrink",
                                        "appear", "disappear")]
    return {"what": [f"{c} {s}" for c in COLOR_NAMES for s in SHAPES], "moves": ["yes", "no"],
            "direction": list(MOTIONS.values()), "action": action_space(), "first": halves, "last": halves}


def video_questions(record: dict) -> list[tuple[str, str, str]]:
    """(question type, question, true answer) of one MovingShapes record."""
    action, subject = record["action"], record["subject"]
    shape = subject["shape"]
    name = action_class(action, record.get("color_to"))
    moving = action in MOTIONS or (action in COMPOUNDS and COMPOUNDS[action][0] in MOTIONS)
    out = []
    if action != STATIC:
        out.append(("what", "what moves?" if moving else "what changes?", f"{subject['color']} {shape}"))
    out.append(("moves", "does anything move?", "yes" if moving else "no"))
    if action in MOTIONS:
        out.append(("direction", f"which direction does the {shape} move?", MOTIONS[action]))
    out.append(("action", f"what does the {shape} do?", name))
    if action in COMPOUNDS:
        first, last = COMPOUNDS[action]
        out.append(("first", "what happens first?", action_class(first)))
        out.append(("last", "what happens last?", action_class(last)))
    return out


def generate_moving_qa(world, out_dir, seed: int = 0, answer_noise: float = 0.1) -> dict[str, Any]:
    """Write `train/val/test.jsonl` of questions about the videos of the MovingShapes world `world`.

    Args:
        world: a folder written by `polymodal data moving-shapes`.
        out_dir: where the QA manifests go.
        seed: seed of the annotators' answers.
        answer_noise: chance that one of the ten annotators answers wrongly.
    Returns:
        {"out_dir", "counts" (questions per split), "manifests", "seconds"}.
    Raises:
        FileNotFoundError: `world` has no split manifest (naming the command that writes one).
        ValueError: a record without the MovingShapes fields (naming the file and line).
    """
    from ...fileio import atomic_open
    if not 0.0 <= answer_noise < 0.7:
        raise ValueError(f"moving-qa: answer_noise must be in [0, 0.7), got {answer_noise}")
    start, world, out = time.perf_counter(), Path(world), Path(out_dir)
    present = [s for s in SPLITS if (world / f"{s}.jsonl").is_file()]
    if not present:
        raise FileNotFoundError(f"{world}: no train/val/test.jsonl (write a world with `polymodal data moving-shapes "
                                f"--out {world}`)")
    out.mkdir(parents=True, exist_ok=True)
    space, counts, manifests = spaces(), {}, {}
    for split in present:
        path = world / f"{split}.jsonl"
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            r = json.loads(line)
            if not {"video", "action", "subject"} <= set(r):
                raise ValueError(f"{path} line {n}: not a MovingShapes record (needs video, action, subject)")
            video = os.path.relpath((path.parent / r["video"]).resolve(), out.resolve())
            stem = Path(r["video"]).stem                       # the video file's name: its id everywhere
            for k, (qtype, question, answer) in enumerate(video_questions(r)):
                rng = np.random.default_rng(np.random.SeedSequence([int(seed), SPLITS.index(split), n, k, 29]))
                rows.append({"video": video, "question": question,
                             "answers": annotate(answer, qtype, rng, answer_noise, space[qtype]), "answer": answer,
                             "question_type": qtype, "answer_type": ANSWER_TYPES.get(qtype, "other"),
                             "question_id": f"{stem}_{k}", "video_id": stem, "split": split})
        target = out / f"{split}.jsonl"
        with atomic_open(target, "w", encoding="utf-8") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
        counts[split], manifests[split] = len(rows), str(target)
    return {"out_dir": str(out), "counts": counts, "manifests": manifests, "seconds": time.perf_counter() - start}


def add_cli_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `polymodal data moving-qa` options to `parser` (returned)."""
    parser.add_argument("--world", required=True, help="a MovingShapes world (polymodal data moving-shapes --out)")
    parser.add_argument("--out", required=True, help="output folder of the QA manifests")
    parser.add_argument("--answer-noise", type=float, default=0.1,
                        help="chance that one of the ten annotators answers wrongly (default 0.1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the annotators' answers (default 0)")
    return parser


def main_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Run the generator from parsed arguments and print a JSON summary (returned)."""
    result = generate_moving_qa(args.world, args.out, args.seed, args.answer_noise)
    print(json.dumps({"out_dir": os.path.abspath(result["out_dir"]), "questions": result["counts"],
                      "seconds": result["seconds"]}, indent=1))
    return result


__all__ = ["QUESTION_TYPES", "video_questions", "spaces", "generate_moving_qa"]
