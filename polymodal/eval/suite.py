"""Evaluation of a model on manifests: retrieval, long-text retrieval and zero-shot classification.

These functions are the glue between a model (`encode_image`, `encode_text`, `tokenizer`,
`image_transform`) and the pure metrics in `retrieval.py` / `zeroshot.py`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from .retrieval import embed_and_score
from .zeroshot import accuracy, build_classifier, load_templates


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


@torch.no_grad()
def encode_images(model, paths: list[str], batch_size: int = 128, progress: bool = False) -> Tensor:
    """L2-normalised image embeddings (N, E) of image files, `batch_size` at a time."""
    from ..data.images import load_image
    device = next(model.parameters()).device
    out = []
    starts = range(0, len(paths), batch_size)
    for s in _progress(starts, len(starts), "images", progress):
        pixels = torch.stack([model.image_transform(load_image(p)) for p in paths[s:s + batch_size]])
        out.append(model.encode_image(pixels.to(device)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


@torch.no_grad()
def encode_texts(model, texts: list[str], batch_size: int = 256, progress: bool = False) -> Tensor:
    """L2-normalised text embeddings (N, E), using only the CLS/EOT feature."""
    device = next(model.parameters()).device
    pad = model.config.text.pad_token_id
    from ..methods.clip import trim_padding
    out = []
    starts = range(0, len(texts), batch_size)
    for s in _progress(starts, len(starts), "texts", progress):
        ids = trim_padding(model.tokenizer(texts[s:s + batch_size]), pad)
        out.append(model.encode_text(ids.to(device)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


def _read(manifest) -> list[dict]:
    from ..data.manifests import read_manifest
    return read_manifest(manifest).records


def retrieval_eval(model, manifest, caption_key: str = "caption", limit: int = 0, batch_size: int = 128,
                   progress: bool = False, return_embeddings: bool = False) -> dict:
    """Image-text retrieval on a manifest: every caption of `caption_key`; a record's list under the plural
    key (`captions` for `caption`, `captions_zh` for `caption_zh`) is used instead when present.

    Args:
        model: a dual encoder with tokenizer and image_transform attached.
        manifest: path of a JSONL/CSV manifest.
        caption_key: "caption", "long_caption", "caption_zh", ...
        limit: evaluate the first `limit` records only (0 = all).
    Returns:
        The metrics of `retrieval_metrics` (percent), plus `num_images`, `num_texts`.
    """
    records = _read(manifest)
    if limit:
        records = records[:limit]
    plural = caption_key.replace("caption", "captions", 1) if caption_key.startswith("caption") else None
    texts, text_to_image = [], []
    for i, r in enumerate(records):
        caps = r.get(plural) or r.get(caption_key)
        if caps is None:
            raise KeyError(f"{manifest}: record on line {r.get('_line', i + 1)} has no {caption_key!r}")
        for c in ([caps] if isinstance(caps, str) else caps):
            texts.append(c)
            text_to_image.append(i)
    img = encode_images(model, [r["image"] for r in records], batch_size, progress)
    txt = encode_texts(model, texts, batch_size, progress)
    metrics = embed_and_score(img, txt, torch.tensor(text_to_image))
    metrics.update(num_images=len(records), num_texts=len(texts))
    if return_embeddings:
        return metrics, img, txt, text_to_image
    return metrics


def load_classes(path) -> dict:
    """A classes file: JSON with "classes" (and optionally "classes_zh"), or one class name per line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"classes file {path} does not exist")
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if "classes" not in data:
            raise KeyError(f"{path}: expected a 'classes' list")
        return data
    return {"classes": [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]}


def zeroshot_eval_manifest(model, manifest, classes_file, lang: str = "en", limit: int = 0,
                           batch_size: int = 128, progress: bool = False, image_embeds: Tensor | None = None) -> dict:
    """Zero-shot classification of a manifest's `label` with class names and prompt templates of `lang`."""
    records = _read(manifest)
    if limit:
        records = records[:limit]
    classes = load_classes(classes_file)
    names = classes["classes"] if lang == "en" else classes.get(f"classes_{lang}")
    if names is None:
        raise KeyError(f"{classes_file}: no 'classes_{lang}' list for language {lang!r}")
    targets = torch.tensor([int(r["label"]) for r in records])
    img = image_embeds if image_embeds is not None else encode_images(
        model, [r["image"] for r in records], batch_size, progress)
    classifier = build_classifier(model, names, load_templates(lang))            # (C, E)
    logits = img.to(classifier.device, classifier.dtype) @ classifier.T          # (N, C)
    result = accuracy(logits, targets)
    result["num_classes"] = len(names)
    return result


def run_suite(model, retrieval: str | None = None, longtext: str | None = None, zeroshot: str | None = None,
              classes: str | None = None, langs: tuple[str, ...] = ("en",), limit: int = 0,
              progress: bool = False) -> dict:
    """Every evaluation that has data, as one flat dict of numbers.

    Args:
        retrieval: manifest for short-caption retrieval (and zero-shot when `zeroshot` is None).
        longtext: manifest with `long_caption` (e.g. ShapesWorld's hard set) for long-text retrieval.
        zeroshot: manifest with `label` for zero-shot classification.
        classes: classes file for zero-shot.
        langs: caption/prompt languages; "zh" uses `caption_zh`, `long_caption_zh`, `classes_zh`.
    Returns:
        Keys like `retrieval/text_to_image_R@1`, `longtext/image_to_text_R@1`, `zeroshot/top1`,
        with a `_zh` suffix on the prefix for Chinese.
    """
    out: dict = {}
    was_training = model.training
    model.eval()
    try:
        for lang in langs:
            sfx = "" if lang == "en" else f"_{lang}"
            key = "caption" if lang == "en" else f"caption_{lang}"
            img = None
            if retrieval:
                m, img, _, _ = retrieval_eval(model, retrieval, key, limit, progress=progress, return_embeddings=True)
                out.update({f"retrieval{sfx}/{k}": v for k, v in m.items()})
            if longtext:
                lkey = "long_caption" if lang == "en" else f"long_caption_{lang}"
                m = retrieval_eval(model, longtext, lkey, limit, progress=progress)
                out.update({f"longtext{sfx}/{k}": v for k, v in m.items()})
            zs = zeroshot or retrieval
            if zs and classes:
                reuse = img if zs == retrieval else None
                m = zeroshot_eval_manifest(model, zs, classes, lang, limit, progress=progress, image_embeds=reuse)
                out.update({f"zeroshot{sfx}/{k}": v for k, v in m.items()})
    finally:
        model.train(was_training)
    return out
