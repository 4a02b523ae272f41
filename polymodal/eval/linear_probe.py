"""Linear probe: a logistic-regression classifier on a frozen encoder's features (clip_benchmark's protocol).

Features are the model's image (or video) embeddings, L2-normalised as clip_benchmark's featurizer does. The
classifier is multinomial logistic regression fitted full-batch with L-BFGS from zero weights, so it is
deterministic; its L2 penalty is chosen on the validation split from a log-spaced grid (clip_benchmark searches
the regularisation on a validation split too; the grid and the full-batch solver are our choices, see
docs/methods.md). The chosen penalty is then refitted on train + validation and scored once on test.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from .classification import classification_metrics

DEFAULT_WEIGHT_DECAYS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
VAL_FRACTION = 0.2          # of the training records, when no validation manifest is given


def fit_logistic(x: Tensor, y: Tensor, num_classes: int, weight_decay: float, max_iter: int = 100) -> torch.nn.Linear:
    """Multinomial logistic regression: mean cross-entropy + weight_decay / 2 * ||W||^2 (bias not penalised).

    Args:
        x: (N, D) features.
        y: (N,) class indices.
        num_classes: C.
        weight_decay: the L2 penalty.
        max_iter: L-BFGS iterations (full batch).
    Returns:
        The fitted (D -> C) linear layer.
    """
    x, y = x.double(), y.long()
    head = torch.nn.Linear(x.shape[1], num_classes, dtype=torch.float64)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-6, tolerance_change=1e-9, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(x), y) + 0.5 * weight_decay * head.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return head


def choose_weight_decay(x_train: Tensor, y_train: Tensor, x_val: Tensor, y_val: Tensor, num_classes: int,
                        grid: Sequence[float], max_iter: int = 100) -> tuple[float, dict]:
    """The grid value with the best validation top-1 (ties go to the larger penalty) and every value's score."""
    scores = {}
    for wd in grid:
        head = fit_logistic(x_train, y_train, num_classes, wd, max_iter)
        with torch.no_grad():
            scores[wd] = classification_metrics(head(x_val.double()), y_val, num_classes)["top1"]
    best = max(sorted(scores, reverse=True), key=lambda wd: scores[wd])
    return best, scores


def _features(model, manifest, limit: int, on_bad_record: str, batch_size: int, progress: bool, cache,
              num_frames: int, strategy: str) -> tuple[Tensor, list[dict]]:
    """(N, E) L2-normalised embeddings of a manifest's images or videos and the N records kept."""
    from ..data.manifests import read_manifest
    from ..encode import encode_videos, read_records
    from .suite import encode_manifest_images
    rows = [] if Path(manifest).is_dir() else read_manifest(manifest, on_bad_record="skip", required=(),
                                                            media="none", allow_empty=True).records
    if rows and "video" in rows[0] and "image" not in rows[0]:
        records = read_records(manifest, limit, on_bad_record, media="video")
        emb, records = encode_videos(model, records, num_frames=num_frames, strategy=strategy, progress=progress,
                                     on_bad_record=on_bad_record, where=str(manifest))
    elif cache is not None:
        emb, records, _ = cache.images(model, manifest, limit, on_bad_record, batch_size, progress)
    else:
        emb, records, _ = encode_manifest_images(model, manifest, limit, on_bad_record, batch_size, progress)
    return torch.nn.functional.normalize(emb.float().cpu(), dim=-1), records


def linear_probe_task(model, manifest, val: str = "", test: str = "", classes: str = "", limit: int = 0,
                      progress: bool = False, lang: str = "en", cache=None, on_bad_record: str = "error",
                      weight_decays: Sequence[float] | str = DEFAULT_WEIGHT_DECAYS, max_iter: int = 100,
                      num_frames: int = 8, strategy: str = "uniform", batch_size: int = 128, seed: int = 0) -> dict:
    """The `linear_probe` evaluation: `polymodal eval MODEL --task linear_probe --data TRAIN --val VAL --test TEST`.

    Args:
        model: an image (or video) encoder (`encode_image`, or a video model's clip features).
        manifest: the training records (`label`: a class index or name), or an image folder.
        val: the validation manifest that chooses the penalty ("" = a seeded VAL_FRACTION of the training
            records, per class where a class has at least 2).
        test: the scored manifest ("" = test.jsonl beside the training manifest).
        classes: the classes file (default: classes.json beside the training manifest; an image folder's own).
        limit: first N records of each manifest (0 = all).
        weight_decays: the penalty grid (a list, or comma-separated numbers).
        max_iter: L-BFGS iterations per fit.
        num_frames, strategy: frames per video and how they are chosen (video manifests).
        seed: the held-out validation draw (when `val` is empty).
        lang, progress, cache, on_bad_record, batch_size: as every task.
    Returns:
        top1, top5 (more than 5 classes), mean_per_class_recall on test; val_top1 and weight_decay (the chosen
        penalty); num_train, num_val, num_test, num_classes and chance (1 / num_classes).
    Raises:
        FileNotFoundError: a manifest is missing (naming it and the option).
        ValueError: a grid value is not a positive number, or a split has no records.
    """
    from ..data.labels import label_indices
    from .suite import load_classes
    from .tasks import default_classes
    grid = _grid(weight_decays)
    test = test or str(Path(manifest).parent / "test.jsonl")
    for key, path in (("val", val), ("test", test)):
        if path and not Path(path).exists():
            raise FileNotFoundError(f"linear_probe: {key} manifest {path} does not exist (give -o {key}=FILE)")
    folder = Path(manifest).is_dir()
    if folder and not classes:
        from ..data.folders import read_image_folder
        names = read_image_folder(manifest)[1]
        where = str(manifest)
    else:
        classes = classes or default_classes(manifest)
        names = load_classes(classes)["classes"]
        where = "the inline class list" if isinstance(classes, (list, tuple)) else str(classes)

    def split(path) -> tuple[Tensor, Tensor]:
        x, records = _features(model, path, limit, on_bad_record, batch_size, progress, cache, num_frames,
                                strategy)
        if not len(records):
            raise ValueError(f"linear_probe: {path} has no usable records")
        records = [{**r, "label": r.get("class", r["label"])} if "class" in r else r for r in records]
        return x, torch.tensor(label_indices(records, names, "label", str(path), source=where))

    x_tr, y_tr = split(manifest)
    if val:
        x_va, y_va = split(val)
    else:
        x_tr, y_tr, x_va, y_va = _hold_out(x_tr, y_tr, seed)
    x_te, y_te = split(test)
    C = len(names)
    wd, scores = choose_weight_decay(x_tr, y_tr, x_va, y_va, C, grid, max_iter)
    head = fit_logistic(torch.cat([x_tr, x_va]), torch.cat([y_tr, y_va]), C, wd, max_iter)
    with torch.no_grad():
        out = classification_metrics(head(x_te.double()), y_te, C)
    out.update(val_top1=scores[wd], weight_decay=wd, num_train=len(y_tr), num_val=len(y_va), num_test=len(y_te),
               num_classes=C, chance=1.0 / C)
    return out


def _grid(values) -> list[float]:
    if isinstance(values, str):
        values = [v for v in values.split(",") if v.strip()]
    try:
        grid = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ValueError(f"linear_probe: weight_decays must be numbers (a list or 1e-4,1e-3), got {values!r}") from None
    if not grid or any(not v > 0 for v in grid):
        raise ValueError(f"linear_probe: weight_decays must be positive numbers, got {values!r}")
    return grid


def _hold_out(x: Tensor, y: Tensor, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A seeded VAL_FRACTION of each class (with at least 2 records) as validation; the rest trains."""
    g = torch.Generator().manual_seed(seed)
    val = []
    for c in y.unique().tolist():
        idx = (y == c).nonzero().flatten()
        n = int(len(idx) * VAL_FRACTION)
        if len(idx) >= 2:
            val += idx[torch.randperm(len(idx), generator=g)[:max(1, n)]].tolist()
    mask = torch.zeros(len(y), dtype=torch.bool)
    mask[val] = True
    if mask.all() or not mask.any():
        raise ValueError("linear_probe: too few training records to hold out a validation split; give -o val=FILE")
    return x[~mask], y[~mask], x[mask], y[mask]
