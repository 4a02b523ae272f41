"""Fairness of a multimodal LLM's concept answers: Skew, MinSkew@C, MaxSkew@C (CMSC / ASD, arXiv 2408.06569).

For a concept c and a protected attribute A with values V (a counterfactual set gives every value the
same scenes):

    m(v)        = mean over images x with A(x) = v of P(c | x)       (the model's option probability)
    p_obs(v | c) = m(v) / sum_v' m(v')
    Skew(c, v)  = ln(p_obs(v | c) / p_desired(v)),   p_desired = 1 / |V| (uniform)

Per attribute: MaxSkew@C = mean over concepts of max_v Skew(c, v), MinSkew@C = mean over concepts of
min_v Skew(c, v) (our choice: the mean over concepts; the worst concept is reported too). The overall
numbers are the means over attributes. 0 is fair; MaxSkew <= ln|V|, MinSkew can go to -inf.

A sample's Skew (for the ASD loss and resampler): the signed Skew(answer concept, value) of the attribute
with the largest |Skew| (the paper's "maximum |Skew| over its attributes"; keeping the sign is our reading,
since the resampler treats Skew > 0 and Skew <= 0 differently).
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Sequence

import torch

SkewTable = dict  # {(attribute, concept): {value: skew}}


def skew(p_observed: float, p_desired: float) -> float:
    """ln(p_observed / p_desired); -inf when p_observed is 0."""
    if p_desired <= 0:
        raise ValueError(f"skew: p_desired must be > 0, got {p_desired}")
    return math.log(p_observed / p_desired) if p_observed > 0 else float("-inf")


def skew_table(rows: Iterable[dict], attribute_values: dict[str, Sequence[str]]) -> SkewTable:
    """Skew of every (attribute, concept, value) from per-image concept probabilities.

    Args:
        rows: one per (image, concept question): {"attributes": {attr: value}, "probs": {concept: P(c|x)}}.
        attribute_values: attribute -> all its values (p_desired = 1/len). A pair with a value never seen
            is left out (no balanced comparison is possible).
    Returns:
        {(attribute, concept): {value: skew}}.
    """
    sums: dict = defaultdict(float)
    counts: dict = defaultdict(int)
    for row in rows:
        for attr, value in row["attributes"].items():
            if attr not in attribute_values:
                continue
            for concept, p in row["probs"].items():
                sums[(attr, concept, value)] += float(p)
                counts[(attr, concept, value)] += 1
    table: SkewTable = {}
    pairs = {(a, c) for a, c, _ in sums}
    for attr, concept in sorted(pairs):
        values = list(attribute_values[attr])
        if any(counts[(attr, concept, v)] == 0 for v in values):
            continue
        means = {v: sums[(attr, concept, v)] / counts[(attr, concept, v)] for v in values}
        total = sum(means.values())
        if total <= 0:
            continue
        table[(attr, concept)] = {v: skew(means[v] / total, 1.0 / len(values)) for v in values}
    return table


def min_max_skew(table: SkewTable) -> dict[str, float]:
    """MinSkew@C / MaxSkew@C per attribute and overall (see the module docstring).

    Returns:
        {"min_skew", "max_skew", "worst_min_skew", "worst_max_skew", "min_skew/<attr>", "max_skew/<attr>"}.
    """
    by_attr: dict = defaultdict(list)
    for (attr, _), skews in table.items():
        by_attr[attr].append((min(skews.values()), max(skews.values())))
    if not by_attr:
        raise ValueError("min_max_skew: the skew table is empty (no attribute value was seen with every concept)")
    out: dict[str, float] = {}
    for attr, pairs in sorted(by_attr.items()):
        out[f"min_skew/{attr}"] = sum(p[0] for p in pairs) / len(pairs)
        out[f"max_skew/{attr}"] = sum(p[1] for p in pairs) / len(pairs)
    attrs = sorted(by_attr)
    out["min_skew"] = sum(out[f"min_skew/{a}"] for a in attrs) / len(attrs)
    out["max_skew"] = sum(out[f"max_skew/{a}"] for a in attrs) / len(attrs)
    out["worst_min_skew"] = min(p[0] for pairs in by_attr.values() for p in pairs)
    out["worst_max_skew"] = max(p[1] for pairs in by_attr.values() for p in pairs)
    return out


def sample_skew(table: SkewTable, concept: str, attributes: dict[str, str]) -> float:
    """Signed Skew(concept, value) of the sample's attribute with the largest |Skew| (0.0 when none is known)."""
    best = 0.0
    for attr, value in attributes.items():
        s = table.get((attr, concept), {}).get(value)
        if s is not None and math.isfinite(s) and abs(s) > abs(best):
            best = s
        elif s is not None and not math.isfinite(s):
            return s
    return best


# ---- reading the model ---------------------------------------------------------------------------
def read_records(manifest, limit: int = 0) -> list[dict]:
    """The jsonl records of a counterfactual manifest (image paths made absolute)."""
    path = Path(manifest)
    if not path.is_file():
        raise FileNotFoundError(f"fairness: manifest {path} does not exist")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {n}: not JSON ({e}); regenerate the manifest") from None
        for key in ("image", "prompt", "options", "kind"):
            if key not in rec:
                raise ValueError(f"{path} line {n}: missing key {key!r}; write it with `polymodal data counterfactual`")
        rec["image"] = str((path.parent / rec["image"]).resolve())
        out.append(rec)
        if limit and len(out) >= limit:
            break
    return out


@torch.no_grad()
def option_probabilities(model, records: Sequence[dict], batch_size: int = 64, progress: bool = False,
                         images: dict | None = None) -> torch.Tensor:
    """`model.answer_probabilities` of every record: (R, K) (records must share the option count K).

    Args:
        model: an MLLM (`answer_probabilities`, `image_transform`).
        records: with "image" (absolute path), "prompt" and "options".
        images: an optional {path: pixel tensor} cache, filled as images are read.
    """
    from PIL import Image
    images = {} if images is None else images
    device = next(model.parameters()).device
    out = []
    it = range(0, len(records), batch_size)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="fairness", unit="batch")
    for start in it:
        chunk = records[start:start + batch_size]
        for r in chunk:
            if r["image"] not in images:
                with Image.open(r["image"]) as im:
                    images[r["image"]] = model.image_transform(im.convert("RGB"))
        pixels = torch.stack([images[r["image"]] for r in chunk]).to(device)
        out.append(model.answer_probabilities(pixels, [r["prompt"] for r in chunk],
                                              [r["options"] for r in chunk]).cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


def attribute_values_of(records: Sequence[dict]) -> dict[str, list[str]]:
    """Every attribute's values seen in `records` (sorted)."""
    values: dict = defaultdict(set)
    for r in records:
        for a, v in r.get("attributes", {}).items():
            values[a].add(v)
    return {a: sorted(v) for a, v in values.items()}


def concept_rows(records: Sequence[dict], probs: torch.Tensor) -> list[dict]:
    """`skew_table` rows from concept records and their option probabilities."""
    return [{"attributes": r["attributes"], "probs": dict(zip(r["options"], p.tolist()))}
            for r, p in zip(records, probs)]


def fairness_eval(model, records: Sequence[dict], batch_size: int = 64, progress: bool = False) -> dict:
    """MinSkew/MaxSkew on the concept records and accuracy on the task records (argmax option = answer)."""
    concept = [r for r in records if r["kind"] == "concept"]
    task = [r for r in records if r["kind"] == "task" and r.get("answer") is not None]
    cache: dict = {}
    out: dict = {}
    if concept:
        probs = option_probabilities(model, concept, batch_size, progress, cache)
        out.update(min_max_skew(skew_table(concept_rows(concept, probs), attribute_values_of(concept))))
    if task:
        probs = option_probabilities(model, task, batch_size, progress, cache)
        hits = defaultdict(list)
        for r, p in zip(task, probs):
            hits[r["question"]].append(r["options"][int(p.argmax())] == r["answer"])
        for q, h in sorted(hits.items()):
            out[f"task_accuracy/{q}"] = sum(h) / len(h)
        out["task_accuracy"] = sum(sum(h) for h in hits.values()) / sum(len(h) for h in hits.values())
    out["n_concept"], out["n_task"] = float(len(concept)), float(len(task))
    return out


def fairness_task(model, manifest, limit: int = 0, progress: bool = False, lang: str = "en", cache=None,
                  on_bad_record: str = "error", batch_size: int = 64) -> dict:
    """The `fairness` eval task: `fairness_eval` on a counterfactual manifest (`polymodal data counterfactual`).

    Args:
        model: an MLLM with `answer_probabilities`.
        manifest: a balanced counterfactual manifest (eval.jsonl).
        limit: first N records (0 = all). lang, cache, on_bad_record: accepted like every task (English only;
            the feature cache does not apply; records are never skipped).
        batch_size: questions per forward pass.
    Returns:
        {"min_skew", "max_skew", "worst_*", per-attribute skews, "task_accuracy", "task_accuracy/<q>", counts}.
    """
    if not hasattr(model, "answer_probabilities"):
        raise ValueError(f"fairness: the model is a {type(model).__name__}, not a multimodal LLM (model_type 'mllm')")
    if lang != "en":
        raise ValueError("fairness: only lang=en is supported")
    return fairness_eval(model, read_records(manifest, limit), batch_size, progress)
