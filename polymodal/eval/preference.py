"""Pairwise preference accuracy of a reward model: overall, per dimension and per RewardBench-style subset.

A pair counts as right when r(prompt, chosen) > r(prompt, rejected) (a tie is wrong, as in RewardBench).
The data is any layout `polymodal.data.preference.read_preferences` reads: a JSONL of prompt/chosen/rejected
with optional `dimension` and `subset` columns (a local RewardBench-style file), or a folder of
`<dimension>/<split>.jsonl` files.
"""
from __future__ import annotations

from collections import defaultdict

import torch

__all__ = ["preference_eval_task", "preference_accuracy", "pairwise_accuracy"]


def pairwise_accuracy(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> float:
    """Share of pairs with r_chosen > r_rejected (a tie counts as wrong, as in RewardBench)."""
    if len(r_chosen) == 0:
        return float("nan")
    return float((r_chosen > r_rejected).float().mean())


def preference_accuracy(r_chosen: torch.Tensor, r_rejected: torch.Tensor, dimensions: list[str],
                        subsets: list[str]) -> dict:
    """Accuracy numbers from the rewards of N pairs.

    Args:
        r_chosen, r_rejected: (N,) rewards.
        dimensions: (N,) the pairs' dimension names.
        subsets: (N,) the pairs' subset names ("" = none).
    Returns:
        `accuracy` (all pairs), `accuracy_<dimension>` for each dimension, `subset_<name>` for each named subset
        plus `subset_mean` (their unweighted mean, RewardBench's way of averaging categories) when any subset is
        named, `worst_dimension_accuracy`, `reward_gap` (mean r_w - r_l) and `pairs`.
    """
    right = (r_chosen > r_rejected).float()                                 # (N,)
    out = {"accuracy": float(right.mean()), "pairs": int(len(right)),
           "reward_gap": float((r_chosen - r_rejected).mean())}
    groups: dict[str, list[int]] = defaultdict(list)
    for i, d in enumerate(dimensions):
        groups[d].append(i)
    per_dim = {d: float(right[idx].mean()) for d, idx in sorted(groups.items())}
    out.update({f"accuracy_{d}": v for d, v in per_dim.items()})
    out["worst_dimension_accuracy"] = min(per_dim.values())
    subs: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(subsets):
        if s:
            subs[s].append(i)
    if subs:
        per_sub = {s: float(right[idx].mean()) for s, idx in sorted(subs.items())}
        out.update({f"subset_{s}": v for s, v in per_sub.items()})
        out["subset_mean"] = sum(per_sub.values()) / len(per_sub)
    return out


def preference_eval_task(model, manifest, limit: int = 0, progress: bool = False, lang: str = "en", cache=None,
                         on_bad_record: str = "error", keys: dict | None = None, split: str = "test",
                         batch_size: int = 64, overlong: str = "cut") -> dict:
    """The `preference` evaluation: pairwise accuracy of a reward model on a preference file.

    Args:
        model: a reward model (`polymodal.models.reward`), or the path of a saved one.
        manifest: the preference JSONL file or a folder of `<dimension>/<split>.jsonl`.
        limit: first N pairs (0 = all).
        progress: show a progress bar.
        lang: accepted for the shared option set; only "en" is meaningful (the texts are read as they are).
        cache: unused (the shared option set; reward models encode no images).
        on_bad_record: "error" | "skip".
        keys: field mapping for other layouts (see `read_preferences`).
        split: the file read inside each dimension folder.
        batch_size: texts per forward.
        overlong: a pair with a text longer than the model's `max_length` tokens is "cut" from the left (the
            response's end is kept) or "drop"ped from the score, as TRL's RewardTrainer drops it.
    Returns:
        See `preference_accuracy`, plus `num_overlong` (pairs with a text over max_length) and, with
        overlong=drop, `num_dropped`.
    """
    if overlong not in ("cut", "drop"):
        raise ValueError(f"preference: overlong must be 'cut' or 'drop', got {overlong!r}")
    from ..data.preference import read_preferences
    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        from ..hub import load_model
        model = load_model(model)
    if not hasattr(model, "score_pairs"):
        raise ValueError(f"preference: the model is a {type(model).__name__}, not a reward model "
                         f"(polymodal.models.reward); train one with `method: reward`")
    pairs = read_preferences(manifest, keys=keys, on_bad_record=on_bad_record, split=split, limit=limit).pairs
    over = _overlong(model, pairs)
    if overlong == "drop":
        pairs = [p for p, o in zip(pairs, over) if not o]
        if not pairs:
            raise ValueError(f"preference: every pair of {manifest} is longer than the model's max_length "
                             f"({model.max_length} tokens); nothing is left with overlong=drop")
    was = model.training
    model.eval()
    try:
        chunks_c, chunks_r = [], []
        steps = range(0, len(pairs), 4 * batch_size)
        if progress:
            from tqdm.auto import tqdm
            steps = tqdm(steps, desc="preference", unit="chunk")
        for i in steps:
            c, r = model.score_pairs(pairs[i:i + 4 * batch_size], batch_size)
            chunks_c.append(c)
            chunks_r.append(r)
    finally:
        model.train(was)
    out = preference_accuracy(torch.cat(chunks_c), torch.cat(chunks_r), [p.dimension for p in pairs],
                              [p.subset for p in pairs])
    out["num_overlong"] = sum(over)
    if overlong == "drop":
        out["num_dropped"] = sum(over)
    return out


def _overlong(model, pairs) -> list[bool]:
    """Whether the chosen or rejected text of each pair is longer than the model's `max_length` tokens."""
    if not hasattr(model, "token_lengths"):
        return [False] * len(pairs)
    limit = model.max_length
    n_c = model.token_lengths([model.format(p.prompt, p.chosen) for p in pairs])
    n_r = model.token_lengths([model.format(p.prompt, p.rejected) for p in pairs])
    return [a > limit or b > limit for a, b in zip(n_c, n_r)]
