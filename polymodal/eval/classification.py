"""Classification accuracy: the metrics clip_benchmark reports, and the `classification` task for a model with a
trained head (`polymodal.models.classifier.ImageClassifier`, from `method: classify`)."""
from __future__ import annotations

import torch
from torch import Tensor


def classification_metrics(logits: Tensor, y: Tensor, num_classes: int) -> dict:
    """top1, top5 (only with more than 5 classes) and mean per-class recall (balanced accuracy).

    Args:
        logits: (N, C) scores.
        y: (N,) class indices.
        num_classes: C.
    """
    pred = logits.argmax(dim=1)
    out = {"top1": float((pred == y).double().mean())}
    if num_classes > 5:
        out["top5"] = float((logits.topk(5, dim=1).indices == y[:, None]).any(dim=1).double().mean())
    recalls = [float((pred[y == c] == c).double().mean()) for c in range(num_classes) if (y == c).any()]
    out["mean_per_class_recall"] = sum(recalls) / len(recalls)
    return out


def classification_task(model, manifest, limit: int = 0, progress: bool = False, lang: str = "en", cache=None,
                        on_bad_record: str = "error", batch_size: int = 128) -> dict:
    """The `classification` evaluation: a classifier's own head on a manifest's `label`s (names or indices of
    the model's class names), or on an image folder.

    Args:
        model: an `ImageClassifier` (anything with `classify(pixels)` and `class_names`).
        manifest: records with `image` and `label`, or an image folder (one subfolder per class).
        limit, progress, lang, cache, on_bad_record, batch_size: as every task (lang and cache are unused).
    Returns:
        top1, top5 (more than 5 classes), mean_per_class_recall, num_classes, chance (1 / num_classes) and
        num_skipped (unreadable images left out under on_bad_record=skip).
    """
    from ..data.labels import label_indices
    from .suite import encode_manifest_images
    names = list(model.class_names)
    with torch.no_grad():
        logits, records, skipped = encode_manifest_images(_HeadScores(model), manifest, limit, on_bad_record,
                                                          batch_size, progress)            # (N, C)
    records = [{**r, "label": r.get("class", r["label"])} if "class" in r else r for r in records]
    y = torch.tensor(label_indices(records, names, "label", str(manifest), source="the model's class names"))
    out = classification_metrics(logits, y, len(names))
    out.update(num_classes=len(names), chance=1.0 / len(names))
    if skipped:
        out["num_skipped"] = skipped
    return out


class _HeadScores:
    """A classifier seen by the image encoding loop: its `encode_image` gives the head's (B, C) logits."""

    def __init__(self, model):
        self.model, self.image_transform = model, model.image_transform

    def parameters(self):
        return self.model.parameters()

    def encode_image(self, pixels: Tensor) -> Tensor:
        return self.model.classify(pixels)


__all__ = ["classification_metrics", "classification_task"]
