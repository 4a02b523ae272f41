"""Sampling over alignment dimensions: uniform, natural mixing, and Hummer's hybrid sampling; and order-partner
units (a video and its time-reversed partner always in one batch: `PartnerPairs`).

Hybrid sampling (our reconstruction of HummerRM's "adaptively balanced" sampling, docs/methods.md, Hummer) mixes
a uniform distribution over the K dimensions with adaptive weights that favour the dimensions the model is
currently worst at:

    w = (1 - alpha) * 1/K + alpha * softmax(-beta * valAcc)

`valAcc` is the latest held-out pairwise accuracy per dimension (before the first measurement every dimension
counts as equal, so w is uniform). alpha = 0 is uniform sampling; alpha = 1 is purely adaptive.

Draws are a pure function of (seed, key, current weights): `draw(epoch, index)` keys on a dataset position, and
the stream API (`next()`) keys on a counter kept in the state. The state (mode, weights' inputs, counter) is
small and JSON-ready, so a checkpointed run resumes with exactly the same draws.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

SAMPLING_MODES = ("mix", "uniform", "hybrid")

__all__ = ["DimensionSampler", "SAMPLING_MODES", "hybrid_weights", "partner_units", "PartnerPairs", "flatten_collate"]


def hybrid_weights(val_acc: Sequence[float], alpha: float, beta: float) -> np.ndarray:
    """(1 - alpha) / K + alpha * softmax(-beta * val_acc).

    Args:
        val_acc: (K,) held-out accuracy per dimension, in [0, 1].
        alpha: share of the adaptive part, in [0, 1].
        beta: sharpness; larger = more weight on the worst dimension.
    Returns:
        (K,) float64 weights summing to 1.
    """
    acc = np.asarray(val_acc, dtype=np.float64)
    z = -beta * acc
    z = np.exp(z - z.max())                       # stable softmax
    return (1.0 - alpha) / len(acc) + alpha * z / z.sum()


class DimensionSampler:
    """Which dimension (and which of its pairs) each training sample comes from.

    Args:
        dimensions: the K dimension names, in a fixed order.
        sizes: (K,) number of training pairs of each dimension (all > 0).
        mode: "mix" (weights proportional to sizes: plain mixing of all pairs), "uniform" (1/K each) or
            "hybrid" (see the module docstring).
        alpha: hybrid's adaptive share, in [0, 1].
        beta: hybrid's softmax sharpness, >= 0.
        seed: the draws' seed.
    """

    def __init__(self, dimensions: Sequence[str], sizes: Sequence[int], mode: str = "hybrid", alpha: float = 0.5,
                 beta: float = 10.0, seed: int = 0):
        if mode not in SAMPLING_MODES:
            raise ValueError(f"sampling mode must be one of {', '.join(SAMPLING_MODES)}, got {mode!r}")
        if len(dimensions) != len(sizes) or not dimensions:
            raise ValueError(f"{len(dimensions)} dimensions but {len(sizes)} sizes; give one size per dimension")
        if any(int(s) <= 0 for s in sizes):
            raise ValueError(f"every dimension needs at least one pair; sizes are {dict(zip(dimensions, sizes))}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"hybrid alpha must be in [0, 1], got {alpha}")
        if beta < 0:
            raise ValueError(f"hybrid beta must be >= 0, got {beta}")
        self.dimensions = list(dimensions)
        self.sizes = [int(s) for s in sizes]
        self.mode, self.alpha, self.beta, self.seed = mode, float(alpha), float(beta), int(seed)
        self.val_acc: list[float] | None = None   # latest measurement; None = not measured yet
        self.updates = 0                          # measurements so far
        self.drawn = 0                            # stream draws so far (the `next()` counter)
        self._cdf: list[float] | None = None      # cached cumulative weights (reset when they change)

    # ---- weights -----------------------------------------------------------------------------------------
    def weights(self) -> np.ndarray:
        """(K,) the current sampling distribution over dimensions."""
        K = len(self.dimensions)
        if self.mode == "mix":
            s = np.asarray(self.sizes, dtype=np.float64)
            return s / s.sum()
        if self.mode == "uniform" or self.val_acc is None:
            return np.full(K, 1.0 / K)
        return hybrid_weights(self.val_acc, self.alpha, self.beta)

    def update(self, val_acc) -> np.ndarray:
        """Record the latest held-out accuracy per dimension (a dict by name or a sequence in order).

        Returns:
            The new weights.
        """
        if isinstance(val_acc, dict):
            missing = [d for d in self.dimensions if d not in val_acc]
            if missing:
                raise ValueError(f"val accuracy has no value for dimension(s) {missing}")
            val_acc = [val_acc[d] for d in self.dimensions]
        acc = [float(a) for a in val_acc]
        if len(acc) != len(self.dimensions):
            raise ValueError(f"{len(acc)} accuracies for {len(self.dimensions)} dimensions")
        self.val_acc = acc
        self.updates += 1
        self._cdf = None
        return self.weights()

    # ---- draws -------------------------------------------------------------------------------------------
    def draw(self, epoch: int, index: int) -> tuple[int, int]:
        """(dimension index, pair index within it) for dataset position `index` of `epoch`.

        The same (seed, epoch, index, weights) always give the same answer, on any process.
        """
        return self._draw(_uniforms(self.seed, 1, int(epoch), int(index)))

    def next(self) -> tuple[int, int]:
        """The next draw of the stream (advances the counter kept in the state)."""
        out = self._draw(_uniforms(self.seed, 2, self.drawn))
        self.drawn += 1
        return out

    def _draw(self, uv: tuple[float, float]) -> tuple[int, int]:
        if self._cdf is None:
            self._cdf = np.cumsum(self.weights()).tolist()
        u, v = uv
        u *= self._cdf[-1]
        k = next((i for i, c in enumerate(self._cdf) if u < c), len(self._cdf) - 1)
        return k, min(int(v * self.sizes[k]), self.sizes[k] - 1)

    # ---- state -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything the draws depend on (JSON-ready)."""
        return {"dimensions": list(self.dimensions), "sizes": list(self.sizes), "mode": self.mode,
                "alpha": self.alpha, "beta": self.beta, "seed": self.seed, "val_acc": self.val_acc,
                "updates": self.updates, "drawn": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        """Restore a state; refuses one from other data (dimensions or sizes changed)."""
        for key in ("dimensions", "sizes"):
            if list(state[key]) != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]!r} but this sampler has "
                                 f"{getattr(self, key)!r}; the training data changed, exact resume is impossible")
        self.mode, self.alpha, self.beta = state["mode"], float(state["alpha"]), float(state["beta"])
        self.seed = int(state["seed"])
        self.val_acc = None if state["val_acc"] is None else [float(a) for a in state["val_acc"]]
        self.updates, self.drawn = int(state["updates"]), int(state["drawn"])
        self._cdf = None


_MASK = (1 << 64) - 1


def _mix64(x: int) -> int:
    """SplitMix64's finaliser: a well-mixed 64-bit hash of x."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def _uniforms(*key: int) -> tuple[float, float]:
    """Two uniforms in [0, 1) that are a pure function of the integer key (counter-based, fast, no state)."""
    h = 0
    for k in key:
        h = _mix64(h ^ (k & _MASK))
    h2 = _mix64(h)
    return (h >> 11) / 9007199254740992.0, (h2 >> 11) / 9007199254740992.0


# ---------------------------------------------------------------------------------------------------------------------
# Order partners: a video and its time-reversed partner in one batch
# ---------------------------------------------------------------------------------------------------------------------
def partner_units(records: Sequence[dict], key: str = "pair_id") -> list[tuple[int, int]]:
    """Records grouped into units of two: each order pair (the two records sharing `key`) is one unit, and the
    records without a partner are paired in manifest order (the last one, if alone, with itself).

    Args:
        records: the manifest records.
        key: the field two partners share (MovingShapes' `pair_id`); None / missing = no partner. A value held by
            one or by more than two records counts as no partner.
    Returns:
        [(i, j)] record indices, every record in exactly one unit (i == j only for a lone last single).
    """
    groups: dict = {}
    for i, r in enumerate(records):
        if r.get(key) is not None:
            groups.setdefault(r[key], []).append(i)
    pair_of = {m[0]: m[1] for m in groups.values() if len(m) == 2}
    paired = set(pair_of) | set(pair_of.values())
    units = [(a, b) for a, b in pair_of.items()]
    singles = [i for i in range(len(records)) if i not in paired]
    units += [(singles[k], singles[k + 1] if k + 1 < len(singles) else singles[k]) for k in range(0, len(singles), 2)]
    return sorted(units)


class PartnerPairs:
    """A map-style dataset whose items are units of two samples: a video and its order partner (`partner_units`).

    The loader shuffles units, so a batch of U units holds 2U videos and every order pair in it is whole: the
    contrastive loss then always has the time-reversed video (and its opposite caption) as an in-batch negative.
    Pass the collate through `flatten_collate`. `data.batch_size` counts units (2 videos each) under this wrapper.

    Args:
        dataset: a map-style dataset of samples with a `manifest` (e.g. `ManifestDataset`).
        key: the partner field of the records.
    """

    def __init__(self, dataset, key: str = "pair_id"):
        self.dataset = dataset
        self.manifest = getattr(dataset, "manifest", None)
        self.units = partner_units(self.manifest.records if self.manifest is not None else [], key)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.units)

    def __getitem__(self, k: int) -> list:
        i, j = self.units[k]
        return [self.dataset[i], self.dataset[j]]


def flatten_collate(collate):
    """A collate over lists of samples (`PartnerPairs` items) that hands `collate` the samples one by one."""
    def run(items: list) -> dict:
        return collate([s for item in items for s in (item if isinstance(item, list) else [item])])
    return run
