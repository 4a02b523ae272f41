"""A preference world: prompts and responses whose quality on six alignment dimensions is controlled.

Every response is built from a quality bit per dimension (Hummer's six, docs/methods.md, Hummer):

- accuracy: the factual slot (the capital of an invented country) is right or wrong;
- conciseness: without filler (high) or padded with filler phrases that make it longer (low);
- depth: explanation clauses ("because ...", "for example ...") present (high) or absent (low);
- empathy: an empathic opening (high) or a dismissive one (low);
- specificity: numbers and names (high) or vague words (low);
- tone: polite words (high) or curt ones (low).

A pair of dimension k has chosen = high and rejected = low on k. On the other dimensions:

- **low-conflict** variant: both responses share the same (random) bits, so a pair teaches only its dimension;
- **conflicting** variant: with probability `conflict`, the pair's *rival* dimensions are anti-correlated
  (chosen low, rejected high) -- conciseness <-> depth, empathy <-> specificity, accuracy <-> tone (our
  choice) -- so learning one dimension from its pairs teaches the opposite of its rival.

Held-out pairs (`val.jsonl` for adaptive sampling, `test.jsonl` for evaluation) are clean: only the pair's
dimension differs. The `base/` set is clean too and balanced: the starting reward model of the ADC protocol.
Per-dimension training sizes can be imbalanced (`imbalance`), as real preference data is.

Layout written under `out`:

    base/train.jsonl
    conflicting/train.jsonl, conflicting/<dimension>/train.jsonl   (the second: Hummer-release layout)
    low_conflict/train.jsonl, low_conflict/<dimension>/train.jsonl
    val.jsonl, test.jsonl, summary.json

`polymodal data preferences --out DIR` runs `generate_preferences` (see `add_cli_arguments`).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..preference import HUMMER_DIMENSIONS, write_preferences

DIMENSIONS = HUMMER_DIMENSIONS
RIVALS = {"conciseness": "depth", "depth": "conciseness", "empathy": "specificity", "specificity": "empathy",
          "accuracy": "tone", "tone": "accuracy"}
# RewardBench-style categories for the evaluation's subset column (our grouping).
SUBSETS = {"accuracy": "reasoning", "specificity": "reasoning", "depth": "chat", "conciseness": "chat",
           "empathy": "safety", "tone": "safety"}
DEFAULT_IMBALANCE = {"accuracy": 0.5, "specificity": 0.75}

COUNTRIES = {"zorland": "brix", "melvania": "tosk", "quarvia": "dunmar", "ostrel": "pell", "vintara": "caldo",
             "rubesh": "nimo", "talvos": "gref", "emberly": "sato"}
TOPICS = ["food", "history", "weather", "rivers", "music", "trains"]
EMPATHY_HI = ["i understand.", "sorry for the trouble.", "i get it."]
EMPATHY_LO = ["not my problem.", "you should know.", "i do not care."]
SPECIFIC_NUMBERS = ["42", "1987", "350", "12", "7", "2004"]
SPECIFIC_NAMES = ["anna", "boris", "chen", "dalia", "emil", "farah"]
VAGUE = ["some stuff somewhere.", "various things.", "kind of old."]
DEPTH = ["because of river trade.", "for example the old market.", "so the port grew."]
POLITE = ["thank you, glad to help.", "please ask anytime.", "happy to help, thanks."]
CURT = ["whatever.", "look it up.", "stop asking."]
FILLER = ["basically", "you know", "i mean", "well", "like"]


def _response(q: dict, country: str, rng: np.random.Generator) -> str:
    """The response text of quality bits `q` (dimension -> 0/1)."""
    parts = [str(rng.choice(EMPATHY_HI if q["empathy"] else EMPATHY_LO))]
    city = COUNTRIES[country] if q["accuracy"] else str(rng.choice([c for k, c in COUNTRIES.items() if k != country]))
    parts.append(f"it is {city}.")
    if q["specificity"]:
        parts.append(f"{rng.choice(SPECIFIC_NUMBERS)} districts, founded by {rng.choice(SPECIFIC_NAMES)}.")
    else:
        parts.append(str(rng.choice(VAGUE)))
    if q["depth"]:
        parts.extend(str(s) for s in rng.choice(DEPTH, size=2, replace=False))
    parts.append(str(rng.choice(POLITE if q["tone"] else CURT)))
    if not q["conciseness"]:                       # filler phrases between the parts: longer, not richer
        out = []
        for p in parts:
            out.append(p)
            out.append(str(rng.choice(FILLER)))
        parts = out
    return " ".join(parts)


def _prompt(country: str, rng: np.random.Generator) -> str:
    return f"capital of {country}? and its {rng.choice(TOPICS)}?"


def make_pair(dimension: str, rng: np.random.Generator, variant: str = "low_conflict", conflict: float = 0.8) -> dict:
    """One preference pair of `dimension`.

    Args:
        dimension: the dimension the pair is about (chosen high, rejected low on it).
        rng: the random generator.
        variant: "low_conflict" / "clean" (other bits shared) or "conflicting" (rival anti-correlated with
            probability `conflict`).
        conflict: see `variant`.
    Returns:
        A TRL-style record with `dimension` and `subset`.
    """
    shared = {d: int(rng.random() < 0.5) for d in DIMENSIONS}
    qc, qr = dict(shared), dict(shared)
    qc[dimension], qr[dimension] = 1, 0
    if variant == "conflicting" and rng.random() < conflict:
        rival = RIVALS[dimension]
        qc[rival], qr[rival] = 0, 1
    country = str(rng.choice(list(COUNTRIES)))
    chosen, rejected = _response(qc, country, rng), _response(qr, country, rng)
    return {"prompt": _prompt(country, rng), "chosen": chosen, "rejected": rejected, "dimension": dimension,
            "subset": SUBSETS[dimension]}


def generate_preferences(out: str | Path, n_train: int = 400, n_base: int = 200, n_val: int = 48, n_test: int = 120,
                         conflict: float = 0.8, imbalance: dict | None = None, seed: int = 0) -> dict[str, Any]:
    """Write the preference world under `out` (layout in the module docstring).

    Args:
        out: the output folder.
        n_train: training pairs per dimension in each variant, before `imbalance`.
        n_base: pairs per dimension of the clean `base/` set.
        n_val, n_test: held-out clean pairs per dimension.
        conflict: probability that a conflicting pair anti-correlates its rival dimension.
        imbalance: dimension -> share of `n_train` (default: accuracy 0.5, specificity 0.75, others 1).
        seed: everything follows from it.
    Returns:
        The summary (also written to summary.json): counts per file and dimension, settings, seconds.
    """
    t0 = time.perf_counter()
    if not 0.0 <= conflict <= 1.0:
        raise ValueError(f"conflict must be in [0, 1], got {conflict}")
    shares = dict(DEFAULT_IMBALANCE if imbalance is None else imbalance)
    unknown = [d for d in shares if d not in DIMENSIONS]
    if unknown:
        raise ValueError(f"imbalance names unknown dimension(s) {unknown}; dimensions: {', '.join(DIMENSIONS)}")
    out = Path(out)
    rng = np.random.default_rng(seed)
    counts: dict[str, dict] = {}

    def pairs(variant: str, n_of) -> list[dict]:
        return [make_pair(d, rng, variant, conflict) for d in DIMENSIONS for _ in range(n_of(d))]

    base = pairs("clean", lambda d: n_base)
    write_preferences(base, out / "base" / "train.jsonl")
    counts["base/train.jsonl"] = len(base)
    n_of = lambda d: max(1, int(round(n_train * shares.get(d, 1.0))))
    for variant in ("conflicting", "low_conflict"):
        train = pairs(variant, n_of)
        order = rng.permutation(len(train))
        write_preferences([train[i] for i in order], out / variant / "train.jsonl")
        for d in DIMENSIONS:
            write_preferences([p for p in train if p["dimension"] == d], out / variant / d / "train.jsonl",
                              with_dimension=False)
        counts[f"{variant}/train.jsonl"] = {d: n_of(d) for d in DIMENSIONS}
    for name, n in (("val", n_val), ("test", n_test)):
        held = pairs("clean", lambda d, n=n: n)
        write_preferences(held, out / f"{name}.jsonl")
        counts[f"{name}.jsonl"] = len(held)
    summary = {"out_dir": str(out), "counts": counts, "dimensions": list(DIMENSIONS), "rivals": RIVALS,
               "conflict": conflict, "imbalance": shares, "seed": seed,
               "seconds": round(time.perf_counter() - t0, 3)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return summary


def add_cli_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `polymodal data preferences` options to `parser`.

    Args:
        parser: a (sub)parser.
    Returns:
        The same parser.
    """
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--n-train", type=int, default=400, help="training pairs per dimension and variant (400)")
    parser.add_argument("--n-base", type=int, default=200, help="clean base-set pairs per dimension (200)")
    parser.add_argument("--n-val", type=int, default=48, help="held-out validation pairs per dimension (48)")
    parser.add_argument("--n-test", type=int, default=120, help="held-out test pairs per dimension (120)")
    parser.add_argument("--conflict", type=float, default=0.8,
                        help="probability that a conflicting pair anti-correlates its rival dimension (0.8)")
    parser.add_argument("--balanced", action="store_true", help="equal training pairs per dimension "
                                                                "(default: accuracy x0.5, specificity x0.75)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Run the generator from parsed arguments and print a JSON summary.

    Args:
        args: a namespace from a parser set up with `add_cli_arguments`.
    Returns:
        The summary of `generate_preferences`.
    """
    for name in ("n_train", "n_base", "n_val", "n_test"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    summary = generate_preferences(args.out, n_train=args.n_train, n_base=args.n_base, n_val=args.n_val,
                                   n_test=args.n_test, conflict=args.conflict,
                                   imbalance={} if args.balanced else None, seed=args.seed)
    print(json.dumps({"out_dir": os.path.abspath(summary["out_dir"]), "counts": summary["counts"],
                      "seconds": summary["seconds"]}, indent=1))
    return summary
