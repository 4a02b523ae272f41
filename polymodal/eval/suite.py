"""Evaluation of a model on manifests: retrieval, long-text retrieval and zero-shot classification.

These functions are the glue between a model (encoded through `polymodal.encode`) and the pure metrics in
`retrieval.py` / `zeroshot.py`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from ..encode import count_truncated, encode_image_files, encode_texts, group_by_media, read_records, text_queries
from .retrieval import embed_and_score
from .zeroshot import accuracy, build_classifier, load_templates


class FeatureCache:
    """Image embeddings of the manifests one evaluation reads, so tasks on the same manifest encode once.

    Keys are (manifest path, limit, on_bad_record); values as `encode_manifest_images` returns them.
    """

    def __init__(self):
        self._store: dict[tuple, tuple[Tensor, list[dict], int]] = {}

    def images(self, model, manifest, limit: int, on_bad_record: str, batch_size: int, progress: bool
               ) -> tuple[Tensor, list[dict], int]:
        key = (str(manifest), limit, on_bad_record)
        if key not in self._store:
            self._store[key] = encode_manifest_images(model, manifest, limit, on_bad_record, batch_size, progress)
        return self._store[key]


def encode_manifest_images(model, manifest, limit: int = 0, on_bad_record: str = "error", batch_size: int = 128,
                           progress: bool = False) -> tuple[Tensor, list[dict], int]:
    """(N, E) embeddings of a manifest's images, the N records they belong to, and how many were skipped.

    Under `on_bad_record="skip"` records whose image cannot be decoded are left out (said in a warning and
    counted: the tasks report it as `num_skipped`); under "error" the first one stops with the manifest file,
    line and image named.
    """
    from ..data.manifests import ManifestError
    records = read_records(manifest, limit, on_bad_record, required=("image",))   # each task checks its own keys
    img, kept = encode_image_files(model, [r["image"] for r in records], batch_size, progress,
                                   skip_unreadable=on_bad_record == "skip")        # ImageError names the file
    if len(kept) < len(records):
        if not kept:
            raise ManifestError(f"{manifest}: no readable image to evaluate")
        import warnings
        warnings.warn(f"{manifest}: skipped {len(records) - len(kept)} record(s) whose image cannot be read")
    skipped = len(records) - len(kept)
    if skipped:
        records = [records[i] for i in kept]
    return img, records, skipped


def retrieval_eval(model, manifest, caption_key: str = "caption", limit: int = 0, batch_size: int = 128,
                   progress: bool = False, return_embeddings: bool = False, cache: FeatureCache | None = None,
                   on_bad_record: str = "error") -> dict:
    """Image-text retrieval on a manifest: every caption of `caption_key`; a record's list under the plural
    key (`captions` for `caption`, `captions_zh` for `caption_zh`) is used instead when present.

    Args:
        model: a dual encoder with tokenizer and image_transform attached.
        manifest: path of a JSONL/CSV manifest.
        caption_key: "caption", "long_caption", "caption_zh", ...
        limit: evaluate the first `limit` records only (0 = all).
        cache: a `FeatureCache` shared with other tasks of the same evaluation.
        on_bad_record: "error" | "skip" (records with a bad image or line are left out).
    Returns:
        The metrics of `retrieval_metrics` (percent), plus `num_images`, `num_texts` and `num_skipped` (records
        left out under on_bad_record=skip, when there were any).
    """
    if cache is not None:
        img, records, skipped = cache.images(model, manifest, limit, on_bad_record, batch_size, progress)
    else:
        img, records, skipped = encode_manifest_images(model, manifest, limit, on_bad_record, batch_size, progress)
    records, rows = group_by_media(records, "image", manifest)               # an image named twice is one item
    if len(rows) < len(img):
        img = img[rows]
    texts, text_to_image = text_queries(records, caption_key, manifest)
    txt = encode_texts(model, texts, batch_size, progress)
    metrics = embed_and_score(img, txt, text_to_image)
    metrics.update(num_images=len(records), num_texts=len(texts))
    truncated = count_truncated(model.tokenizer, texts)
    if truncated:
        metrics["num_truncated_texts"] = truncated                          # cut to the text context length
    if skipped:
        metrics["num_skipped"] = skipped
    if return_embeddings:
        return metrics, img, txt, text_to_image
    return metrics


def longtext_eval(model, manifest, lang: str = "en", limit: int = 0, batch_size: int = 128, progress: bool = False,
                  cache: FeatureCache | None = None, on_bad_record: str = "error") -> dict:
    """Retrieval with the long captions (`long_caption`, or `long_caption_<lang>`) of a manifest."""
    key = "long_caption" if lang == "en" else f"long_caption_{lang}"
    return retrieval_eval(model, manifest, key, limit, batch_size, progress, cache=cache, on_bad_record=on_bad_record)


def load_classes(path) -> dict:
    """A classes file: JSON with "classes" (and optionally "classes_zh"), or one class name per line; a list of
    names (inline `--classes cat,dog`) gives {"classes": names}."""
    if isinstance(path, (list, tuple)):
        return {"classes": [str(n) for n in path]}
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"classes file {path} does not exist")
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, dict) or "classes" not in data:
            raise KeyError(f"{path}: expected a 'classes' list")
        return data
    return {"classes": [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]}


def zeroshot_eval_manifest(model, manifest, classes_file, lang: str = "en", limit: int = 0,
                           batch_size: int = 128, progress: bool = False, image_embeds: Tensor | None = None,
                           cache: FeatureCache | None = None, on_bad_record: str = "error") -> dict:
    """Zero-shot classification of a manifest's `label` with class names and prompt templates of `lang`.

    Args:
        manifest: a manifest whose records have `label` (a class index or a class name), or an image
            folder (one subfolder per class; see `polymodal.data.folders`).
        classes_file: a classes file or a list of names (inline classes). For an image folder a classes
            file that does not exist means "the folder's own classes"; one that exists fixes names and order.
        lang: prompt templates and class names ("zh" reads `classes_zh`).
    Returns:
        {"top1", "top5", "num_classes"}.
    Raises:
        LabelError: a record without `label`, or whose label is not a class (naming the line, label, file).
    """
    from ..data.labels import label_indices
    folder = Path(manifest).is_dir()
    if folder and not isinstance(classes_file, (list, tuple)) and not Path(classes_file).is_file():
        from ..data.folders import read_image_folder
        classes_file = read_image_folder(manifest)[1]            # the folder's own class names
    classes = load_classes(classes_file)
    names = classes["classes"] if lang == "en" else classes.get(f"classes_{lang}")
    if names is None:
        raise KeyError(f"{classes_file}: no 'classes_{lang}' list for language {lang!r}")
    skipped = 0
    if image_embeds is not None:
        records = read_records(manifest, limit, on_bad_record)
        img = image_embeds
    elif cache is not None:
        img, records, skipped = cache.images(model, manifest, limit, on_bad_record, batch_size, progress)
    else:
        img, records, skipped = encode_manifest_images(model, manifest, limit, on_bad_record, batch_size, progress)
    where = "the inline class list" if isinstance(classes_file, (list, tuple)) else str(classes_file)
    if folder:        # folder records carry their class name: index it in the classes used here
        records = [{**r, "label": r.get("class", r["label"])} for r in records]
    targets = torch.tensor(label_indices(records, classes["classes"], "label", str(manifest), source=where))
    templates = classes.get("templates" if lang == "en" else f"templates_{lang}") or load_templates(lang)
    classifier = build_classifier(model, names, templates)                        # (C, E)
    logits = img.to(classifier.device, classifier.dtype) @ classifier.T          # (N, C)
    result = accuracy(logits, targets)
    result["num_classes"] = len(names)
    if skipped:
        result["num_skipped"] = skipped
    return result
