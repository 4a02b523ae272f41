"""Alignment Dimension Conflict (ADC; Hummer, docs/methods.md): how much fine-tuning a reward model on
one dimension costs the others.

Protocol: from a base reward model theta_0, fine-tune one copy theta_k per dimension k on that dimension's
pairs; measure every copy's held-out accuracy on every dimension j. The deviation matrix is
D[k, j] = Acc_j(theta_k) - Acc_j(theta_0). Only drops count (min(D, 0)), off the diagonal:

- reading "all_pairs" (default; our reading of the paper's "second moment of the negative deviations"):
  ADC = 1/(n(n-1)) * sum_k sum_{j != k} min(D[k, j], 0)^2
- reading "negative_pairs": the same sum divided by the number of off-diagonal entries that are negative
  (the second moment over the drops only; 0 when nothing dropped);
- reading "rms": sqrt of "all_pairs" (in accuracy units).

Lower is better. `measure_conflict` runs the protocol with the caller's fine-tune and accuracy functions;
`write_conflict_report` writes the tables (JSON, markdown) and the deviation heatmap (PNG).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

ADC_READINGS = ("all_pairs", "negative_pairs", "rms")

__all__ = ["ADC_READINGS", "ConflictResult", "adc", "deviation_matrix", "measure_conflict", "accuracy_table",
           "plot_deviation_heatmap", "write_conflict_report"]


def deviation_matrix(base_acc: dict, tuned_acc: dict, dimensions: Sequence[str]) -> np.ndarray:
    """D[k, j] = Acc_j(theta_k) - Acc_j(theta_0).

    Args:
        base_acc: dimension -> accuracy of the base model.
        tuned_acc: k -> (dimension j -> accuracy of the copy fine-tuned on k).
        dimensions: the order of rows and columns.
    Returns:
        (n, n) float64.
    """
    n = len(dimensions)
    D = np.zeros((n, n))
    for a, k in enumerate(dimensions):
        for b, j in enumerate(dimensions):
            D[a, b] = tuned_acc[k][j] - base_acc[j]
    return D


def adc(deviations: np.ndarray, reading: str = "all_pairs") -> float:
    """The ADC of a deviation matrix (see the module docstring for the readings).

    Args:
        deviations: (n, n) D[k, j], n >= 2.
        reading: "all_pairs" | "negative_pairs" | "rms".
    Returns:
        ADC (>= 0).
    """
    if reading not in ADC_READINGS:
        raise ValueError(f"ADC reading must be one of {', '.join(ADC_READINGS)}, got {reading!r}")
    D = np.asarray(deviations, dtype=np.float64)
    n = D.shape[0]
    if D.shape != (n, n) or n < 2:
        raise ValueError(f"ADC needs a square deviation matrix over >= 2 dimensions, got shape {D.shape}")
    off = ~np.eye(n, dtype=bool)
    neg = np.minimum(D[off], 0.0)
    total = float((neg ** 2).sum())
    if reading == "negative_pairs":
        count = int((neg < 0).sum())
        return total / count if count else 0.0
    value = total / (n * (n - 1))
    return math.sqrt(value) if reading == "rms" else value


@dataclass
class ConflictResult:
    """The ADC protocol's numbers."""
    dimensions: list
    base_acc: dict                   # dimension -> Acc(theta_0)
    tuned_acc: dict                  # k -> dimension -> Acc(theta_k)
    deviations: np.ndarray           # (n, n)
    adc: float
    reading: str = "all_pairs"

    def to_dict(self) -> dict:
        return {"dimensions": list(self.dimensions), "base_acc": self.base_acc, "tuned_acc": self.tuned_acc,
                "deviations": self.deviations.round(6).tolist(), "adc": self.adc, "reading": self.reading}


def measure_conflict(base_model, dimensions: Sequence[str], finetune: Callable, accuracy: Callable,
                     reading: str = "all_pairs") -> ConflictResult:
    """Run the ADC protocol.

    Args:
        base_model: theta_0 (anything the two callables take).
        dimensions: the n dimensions.
        finetune: `finetune(base_model, k) -> theta_k`, a copy fine-tuned on dimension k (must not change
            `base_model`).
        accuracy: `accuracy(model) -> {dimension: held-out pairwise accuracy}`.
        reading: the ADC reading.
    Returns:
        A ConflictResult.
    """
    dims = list(dimensions)
    base = accuracy(base_model)
    tuned = {k: accuracy(finetune(base_model, k)) for k in dims}
    D = deviation_matrix(base, tuned, dims)
    return ConflictResult(dims, {d: base[d] for d in dims}, {k: {j: tuned[k][j] for j in dims} for k in dims}, D,
                          adc(D, reading), reading)


def accuracy_table(result: ConflictResult) -> str:
    """Markdown: one row per model (base, then each fine-tuned copy), one column per dimension's accuracy."""
    dims = result.dimensions
    lines = ["| model | " + " | ".join(dims) + " |", "|---|" + "---|" * len(dims),
             "| base | " + " | ".join(f"{result.base_acc[d]:.3f}" for d in dims) + " |"]
    for k in dims:
        lines.append(f"| tuned on {k} | " + " | ".join(f"{result.tuned_acc[k][d]:.3f}" for d in dims) + " |")
    return "\n".join(lines)


def plot_deviation_heatmap(result: ConflictResult, path: str | Path, title: str = "") -> Path:
    """The deviation matrix as a PNG heatmap (rows: fine-tuned on k; columns: accuracy on j; red = drop)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    D, dims = result.deviations, result.dimensions
    lim = max(float(np.abs(D).max()), 1e-3)
    fig, ax = plt.subplots(figsize=(1.1 * len(dims) + 2, 1.0 * len(dims) + 1.5))
    im = ax.imshow(D, cmap="RdBu", vmin=-lim, vmax=lim)
    ax.set_xticks(range(len(dims)), dims, rotation=45, ha="right")
    ax.set_yticks(range(len(dims)), [f"tuned on {d}" for d in dims])
    for a in range(len(dims)):
        for b in range(len(dims)):
            ax.text(b, a, f"{D[a, b]:+.2f}", ha="center", va="center", fontsize=8)
    ax.set_xlabel("accuracy on dimension")
    ax.set_title(title or f"Acc(theta_k) - Acc(theta_0); ADC={result.adc:.4f} ({result.reading})")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")   # long row labels stay inside the image
    plt.close(fig)
    return path


def write_conflict_report(result: ConflictResult, out_dir: str | Path, name: str = "conflict") -> dict:
    """Write `<name>.json`, `<name>.md` (accuracy table + ADC) and `<name>.png` under `out_dir`.

    Returns:
        {"json": path, "md": path, "png": path}.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{name}.json", "md": out / f"{name}.md", "png": out / f"{name}.png"}
    paths["json"].write_text(json.dumps(result.to_dict(), indent=1) + "\n", encoding="utf-8")
    paths["md"].write_text(f"{accuracy_table(result)}\n\nADC ({result.reading}) = {result.adc:.5f}\n",
                           encoding="utf-8")
    plot_deviation_heatmap(result, paths["png"])
    return {k: str(v) for k, v in paths.items()}
