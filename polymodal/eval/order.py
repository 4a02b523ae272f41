"""Order-pair accuracy: does a text score its own video above the same video played in another order?

Order-sensitive pairs (MovingShapes' `pair_id`: the same frames reversed, the opposite caption, "moves left" /
"moves right") test whether a video model sees frame order. For every text whose video has exactly one
partner, the text is right when its own video outscores the partner.

Tie rule (the one rule of every benchmark): a text whose two scores differ by at most `tie_tolerance` counts
as half right, the expected score of a coin flip between the two videos. An order-blind model (mean pooling
over the same set of frames) then scores 50%, the claim's reference point, whether its two scores tie
exactly or differ in the last bits; counting ties as wrong would put such a model at 0% and make any model
that breaks ties look order-aware. The tolerance absorbs float summation order: the mean of the same frames
in another order differs by about 1e-7 in a cosine, so scores are expected on a cosine scale (|s| <= 1).
"""
from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
from torch import Tensor

TIE_TOLERANCE = 1e-5     # |own - partner| at or below this is a tie (cosine scale)


def partners(pair_ids: Sequence[Hashable | None]) -> Tensor:
    """The partner of each video: the other member of its pair.

    Args:
        pair_ids: (V,) pair id of each video; None for a video outside any pair.
    Returns:
        (V,) long: the partner's index, or -1 for a video without a pair or whose pair id is shared by
        one or more than two videos (such groups are left out).
    """
    groups: dict = {}
    for v, pid in enumerate(pair_ids):
        if pid is not None:
            groups.setdefault(pid, []).append(v)
    out = torch.full((len(pair_ids),), -1, dtype=torch.long)
    for members in groups.values():
        if len(members) == 2:
            a, b = members
            out[a], out[b] = b, a
    return out


def order_pair_accuracy(scores: Tensor, owner: Tensor | Sequence[int], pair_ids: Sequence[Hashable | None],
                        tie_tolerance: float = TIE_TOLERANCE) -> dict:
    """Share of the texts of order-sensitive pairs that score their own video above its partner.

    Args:
        scores: (T, V) text-video scores on a cosine scale (higher = better match).
        owner: (T,) the video index of each text (a video may own several texts).
        pair_ids: (V,) pair id of each video, None outside pairs; only ids held by exactly two videos count.
        tie_tolerance: |own - partner| at or below it is a tie, counted as half right (see the module).
    Returns:
        {"pair_accuracy": % right (ties half; NaN when no text has a partner), "pair_ties": % of those texts
        whose scores tie, "pairs": pairs with at least one text, "texts": texts judged}.
    """
    T, V = scores.shape
    owner = torch.as_tensor(owner, dtype=torch.long)
    if owner.shape != (T,):
        raise ValueError(f"order_pair_accuracy: owner has shape {tuple(owner.shape)}, scores {T} texts; give one "
                         "video index per text")
    if len(pair_ids) != V:
        raise ValueError(f"order_pair_accuracy: {len(pair_ids)} pair ids for {V} videos; give one per video")
    partner = partners(pair_ids)[owner]                     # (T,) partner of each text's video, -1 none
    judged = (partner >= 0).nonzero().squeeze(1)            # (J,) texts with a partner
    if len(judged) == 0:
        return {"pair_accuracy": float("nan"), "pair_ties": float("nan"), "pairs": 0, "texts": 0}
    s = scores.float()
    diff = s[judged, owner[judged]] - s[judged, partner[judged]]            # (J,) own - partner
    tie = diff.abs() <= tie_tolerance
    right = (diff > tie_tolerance).double() + 0.5 * tie.double()
    pairs = {frozenset((int(a), int(b))) for a, b in zip(owner[judged], partner[judged])}
    return {"pair_accuracy": 100.0 * float(right.mean()), "pair_ties": 100.0 * float(tie.double().mean()),
            "pairs": len(pairs), "texts": len(judged)}
