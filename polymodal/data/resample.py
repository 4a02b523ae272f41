"""The ASD epoch resampler (arXiv 2408.06569): each epoch, from every sample's current Skew,

* Skew > 0 (an over-represented concept/attribute pairing): drop the sample with probability
  Skew / (Skew + tau1);
* Skew <= 0: keep it and add |Skew| to its accumulator; each time the accumulator reaches tau2 one
  extra copy joins this epoch and tau2 is taken off the accumulator (our reading of "passes": >=, and
  the remainder carries over, so a sample with a steady Skew of -s gets s / tau2 copies per epoch on average).
  At most `max_copies` copies of one sample join an epoch (ours): a pairing the model never chooses has Skew
  -inf, and without a cap one such sample would flood the epoch. Copies over the cap are dropped (the
  accumulator keeps only its remainder below tau2), so a capped sample does not bank copies for later epochs.

Draws are seeded by (seed, epoch), so an epoch's list is a pure function of the seed, the epoch, the
accumulators and the skews. The state (accumulators, the last epoch drawn, its list and skews) is a plain
dict for checkpoints: a run resumed inside an epoch reuses that epoch's list instead of redrawing it with a
model that has moved on.
"""
from __future__ import annotations

import numpy as np


class EpochResampler:
    """Args:
        n: samples in the base data.
        tau1: drop temperature (Skew > 0).
        tau2: accumulator threshold for a copy (Skew <= 0).
        seed: draw seed.
        max_copies: most extra copies of one sample per epoch (None: no cap, the paper's rule; then every
            skew must be finite).
    """

    def __init__(self, n: int, tau1: float = 1.0, tau2: float = 1.0, seed: int = 0, max_copies: int | None = None):
        if n < 0 or tau1 <= 0 or tau2 <= 0:
            raise ValueError(f"EpochResampler: need n >= 0 and tau1, tau2 > 0; got n={n}, tau1={tau1}, tau2={tau2}")
        if max_copies is not None and max_copies < 0:
            raise ValueError(f"EpochResampler: max_copies must be >= 0 or None, got {max_copies}")
        self.n, self.tau1, self.tau2, self.seed = int(n), float(tau1), float(tau2), int(seed)
        self.max_copies = None if max_copies is None else int(max_copies)
        self.acc = np.zeros(self.n)
        self.epoch = -1                                  # the epoch whose list is stored (-1: none yet)
        self.indices = np.arange(self.n)
        self.skews = np.zeros(self.n)

    def draw(self, skews, epoch: int) -> np.ndarray:
        """Draw epoch `epoch`'s multiset of base indices from the samples' skews (updates the accumulators).

        Args:
            skews: (n,) per-sample Skew.
            epoch: the epoch number (seeds the draw).
        Returns:
            int64 indices: the kept samples in base order, then the copies.
        """
        s = np.asarray(skews, dtype=np.float64)
        if s.shape != (self.n,):
            raise ValueError(f"EpochResampler.draw: {s.shape} skews for {self.n} samples")
        if np.isnan(s).any() or np.isposinf(s).any() or (self.max_copies is None and np.isneginf(s).any()):
            raise ValueError("EpochResampler.draw: a skew is NaN or +inf, or -inf without max_copies; floor the "
                             "skews (losses.fairness.bound_skews) or set max_copies")
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, int(epoch), 7])
        u = rng.random(self.n)
        pos = s > 0
        sp = np.maximum(s, 0.0)
        drop = pos & (u < sp / (sp + self.tau1))
        neg = ~pos
        gain = -s[neg]
        if self.max_copies is not None:                  # never more than the cap's worth (this also takes -inf)
            gain = np.minimum(gain, (self.max_copies + 1) * self.tau2)
        self.acc[neg] += gain
        copies = np.zeros(self.n, dtype=np.int64)
        copies[neg] = np.floor(self.acc[neg] / self.tau2 + 1e-12).astype(np.int64)
        self.acc -= copies * self.tau2                   # the remainder (< tau2) carries over
        if self.max_copies is not None:                  # copies over the cap are dropped, not banked
            copies = np.minimum(copies, self.max_copies)
        kept = np.flatnonzero(~drop)
        self.indices = np.concatenate([kept, np.repeat(np.arange(self.n), copies)]).astype(np.int64)
        self.skews, self.epoch = s.copy(), int(epoch)
        return self.indices

    def epoch_order(self, length: int) -> np.ndarray:
        """The stored list fitted to `length` items (a fixed-length loader): shuffled, then cut, or
        extended by draws with replacement from itself (our choice; the proportions stay the list's)."""
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, self.epoch, 8])
        order = rng.permutation(self.indices)
        if len(order) == 0:
            raise ValueError("EpochResampler: every sample was dropped this epoch; raise tau1")
        if len(order) >= length:
            return order[:length]
        return np.concatenate([order, rng.choice(self.indices, length - len(order))])

    def state_dict(self) -> dict:
        return {"n": self.n, "tau1": self.tau1, "tau2": self.tau2, "seed": self.seed, "max_copies": self.max_copies,
                "epoch": self.epoch, "acc": self.acc.tolist(), "indices": self.indices.tolist(),
                "skews": self.skews.tolist()}

    def load_state_dict(self, state: dict) -> None:
        if int(state["n"]) != self.n:
            raise ValueError(f"EpochResampler: the checkpoint holds {state['n']} samples, the data {self.n}; "
                             f"resume with the same training manifest")
        self.tau1, self.tau2, self.seed = float(state["tau1"]), float(state["tau2"]), int(state["seed"])
        if "max_copies" in state:                        # checkpoints from before the cap have none
            self.max_copies = None if state["max_copies"] is None else int(state["max_copies"])
        self.epoch = int(state["epoch"])
        self.acc = np.asarray(state["acc"], dtype=np.float64)
        self.indices = np.asarray(state["indices"], dtype=np.int64)
        self.skews = np.asarray(state["skews"], dtype=np.float64)
