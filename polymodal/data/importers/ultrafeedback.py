"""`ultrafeedback`: the raw UltraFeedback set (openbmb/UltraFeedback), binarised into preference pairs.

Layout (OpenBMB/UltraFeedback: the README's "Dataset Format" and `src/data_annotation/`; the Hugging Face set
ships one JSONL per prompt source, `evol_instruct.jsonl`, `false_qa.jsonl`, `flan.jsonl`, `sharegpt.jsonl`,
`truthful_qa.jsonl`, `ultrachat.jsonl`): one object a line, `{"source", "instruction", "models": [4 names],
"completions": [{"model", "principle", "custom_system_prompt", "response", "annotations": {aspect: {"Rating":
"1".."5" or "N/A", "Rationale", ...}}, "fine-grained_score", "overall_score", "critique"}, ...],
"correct_answers", "incorrect_answers"}`, the aspects being `instruction_following`, `honesty`, `truthfulness`
and `helpfulness`.

Binarisation, as the dataset card of HuggingFaceH4/ultrafeedback_binarized describes its current version (the
completion with the highest mean rating is chosen, one of the other three drawn at random is rejected), with the
refinement of Argilla's card (argilla/ultrafeedback-binarized-preferences: draw only among completions rated
strictly lower, so that no pair is a tie):
- a completion's score is, by the `score` option, `mean` (default: the mean of its numeric aspect ratings; "N/A"
  does not count), `overall` (the critique model's `overall_score`, which H4's first version ranked by and
  whose bug Argilla's card reports), or one aspect name (that Rating alone, as TRL's
  `examples/datasets/ultrafeedback.py` reads one aspect); `instruction-following` is read as
  `instruction_following`;
- chosen = the highest score (the first such completion on a tie); rejected = one of those scored strictly lower,
  drawn by a generator seeded with (`seed`, file, line), so a row's pair does not depend on the other rows;
- rows with fewer than two scored completions, or whose scores all tie, are left out and counted in the notes.

Records (the fields of HuggingFaceH4/ultrafeedback_binarized, which `read_preferences(keys=ULTRAFEEDBACK_KEYS)`
reads with the score difference as margin): `{"prompt": instruction, "chosen": [user, assistant messages],
"rejected": [user, assistant messages], "score_chosen", "score_rejected", "subset": source, "split": "train"}`.

The source is a JSONL file or a folder of them (any depth). One split, train (the raw set has no other).
Options: `score` (mean | overall | an aspect; default mean), `seed` (default 0).
"""
from __future__ import annotations

import math
import random
from pathlib import Path

from .common import Imported, LayoutError, jsonl_objects, require_split
from .options import check_options
from .pairs import Dropped, why_unusable

ASPECTS = ("helpfulness", "honesty", "instruction_following", "truthfulness")
SCORES = ("mean", "overall", *ASPECTS)
OPTIONS = ("score", "seed")


def _number(value) -> float | None:
    """A rating as a float; None for "N/A", missing or non-numeric values."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def completion_score(completion: dict, score: str) -> float | None:
    """The score of one completion under the `score` option (None when it has none)."""
    if score == "overall":
        return _number(completion.get("overall_score"))
    annotations = completion.get("annotations") if isinstance(completion.get("annotations"), dict) else {}

    def rating(aspect):
        a = annotations.get(aspect)
        return _number(a.get("Rating")) if isinstance(a, dict) else None
    if score != "mean":
        return rating(score)
    ratings = [r for r in map(rating, ASPECTS) if r is not None]
    return sum(ratings) / len(ratings) if ratings else None


def _files(src: Path) -> list[Path]:
    if src.is_file():
        return [src]
    if not src.is_dir():
        raise FileNotFoundError(f"{src} does not exist (give the UltraFeedback folder or one of its .jsonl files)")
    files = sorted(p for p in src.rglob("*.jsonl") if p.is_file())
    if not files:
        raise FileNotFoundError(f"{src}: no .jsonl file found (UltraFeedback ships one per source, e.g. "
                                f"sharegpt.jsonl)")
    return files


def read(src, split: str | None = None, **options) -> Imported:
    """Binarised UltraFeedback records (see the module docstring)."""
    check_options("ultrafeedback", options, OPTIONS)
    score = str(options.get("score", "mean")).replace("-", "_")
    if score not in SCORES:
        raise LayoutError(f"ultrafeedback: score must be one of {', '.join(SCORES)}, got {options['score']!r}")
    seed = options.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise LayoutError(f"ultrafeedback: seed must be an integer, got {seed!r}")
    src = Path(src)
    require_split(split, {"train"}, src)
    records, dropped = [], Dropped()
    for f in _files(src):
        for n, row in jsonl_objects(f):
            where = f"{f}:{n}"
            instruction, completions = row.get("instruction"), row.get("completions")
            if not isinstance(instruction, str) or not isinstance(completions, list):
                raise LayoutError(f"{where}: not an UltraFeedback row (expected 'instruction' and a 'completions' "
                                  f"list)")
            scored = [(s, c["response"]) for c in completions
                      if isinstance(c, dict) and isinstance(c.get("response"), str) and c["response"].strip()
                      and (s := completion_score(c, score)) is not None]
            if len(scored) < 2:
                dropped.add("fewer than two scored completions", where)
                continue
            best = max(range(len(scored)), key=lambda i: scored[i][0])      # the first of equal maxima
            lower = [i for i, (s, _) in enumerate(scored) if s < scored[best][0]]
            if not lower:
                dropped.add(f"every completion has the same {score} score", where)
                continue
            worse = random.Random(f"{seed}:{f.name}:{n}").choice(lower)
            user = {"role": "user", "content": instruction}
            chosen = [user, {"role": "assistant", "content": scored[best][1]}]
            rejected = [user, {"role": "assistant", "content": scored[worse][1]}]
            reason = why_unusable(chosen[1:], rejected[1:])
            if reason:
                dropped.add(reason, where)
                continue
            record = {"prompt": instruction, "chosen": chosen, "rejected": rejected,
                      "score_chosen": scored[best][0], "score_rejected": scored[worse][0], "split": "train"}
            if isinstance(row.get("source"), str):
                record["subset"] = row["source"]
            records.append(record)
    return Imported(records, "preference", notes=dropped.notes("row(s)"))
