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
    """L2-normalised image embeddings (N, E) of image files, `batch_size` at a time (ImageError names a bad file)."""
    return _encode_image_files(model, paths, batch_size, progress, skip_unreadable=False)[0]


@torch.no_grad()
def _encode_image_files(model, paths: list[str], batch_size: int, progress: bool, skip_unreadable: bool
                        ) -> tuple[Tensor, list[int]]:
    """(embeddings (M, E), indices of the M paths encoded): each file is decoded once; with `skip_unreadable`
    a file that cannot be decoded is left out instead of raising."""
    from ..data.images import load_image
    device = next(model.parameters()).device
    out, kept = [], []
    starts = range(0, len(paths), batch_size)
    for s in _progress(starts, len(starts), "images", progress):
        pixels = []
        for i in range(s, min(s + batch_size, len(paths))):
            try:
                image = load_image(paths[i])
            except Exception:   # decoders raise many types
                if not skip_unreadable:
                    raise
                continue
            pixels.append(model.image_transform(image))
            kept.append(i)
        if pixels:
            out.append(model.encode_image(torch.stack(pixels).to(device)).float().cpu())
    return (torch.cat(out) if out else torch.zeros(0, 0)), kept


@torch.no_grad()
def encode_texts(model, texts: list[str], batch_size: int = 256, progress: bool = False) -> Tensor:
    """L2-normalised text embeddings (N, E), using only the CLS/EOT feature."""
    device = next(model.parameters()).device
    pad = model.config.text.pad_token_id
    from ..data.text import trim_padding
    out = []
    starts = range(0, len(texts), batch_size)
    for s in _progress(starts, len(starts), "texts", progress):
        ids = trim_padding(model.tokenizer(texts[s:s + batch_size]), pad)
        out.append(model.encode_text(ids.to(device)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


class FeatureCache:
    """Image embeddings of the manifests one evaluation reads, so tasks on the same manifest encode once.

    Keys are (manifest path, limit, on_bad_record); values the (N, E) embeddings and the kept records.
    """

    def __init__(self):
        self._store: dict[tuple, tuple[Tensor, list[dict]]] = {}

    def images(self, model, manifest, limit: int, on_bad_record: str, batch_size: int, progress: bool
               ) -> tuple[Tensor, list[dict]]:
        key = (str(manifest), limit, on_bad_record)
        if key not in self._store:
            self._store[key] = encode_manifest_images(model, manifest, limit, on_bad_record, batch_size, progress)
        return self._store[key]


def read_records(manifest, limit: int = 0, on_bad_record: str = "error", required=None, media: str = "image"
                 ) -> list[dict]:
    """The first `limit` records (0 = all) of a manifest, read with the bad-record policy."""
    from ..data.manifests import ManifestError, read_manifest
    if limit < 0:
        raise ValueError(f"limit must be >= 0 (0 = all records), got {limit}")
    records = read_manifest(manifest, on_bad_record=on_bad_record, required=required, media=media).records
    records = records[:limit] if limit else records
    if not records:
        raise ManifestError(f"{manifest}: no records to evaluate")
    return records


def encode_manifest_images(model, manifest, limit: int = 0, on_bad_record: str = "error", batch_size: int = 128,
                           progress: bool = False) -> tuple[Tensor, list[dict]]:
    """(N, E) embeddings of a manifest's images and the N records they belong to.

    Under `on_bad_record="skip"` records whose image cannot be decoded are left out (and said in a warning);
    under "error" the first one stops with the manifest file, line and image named.
    """
    from ..data.manifests import ManifestError
    records = read_records(manifest, limit, on_bad_record)
    img, kept = _encode_image_files(model, [r["image"] for r in records], batch_size, progress,
                                    skip_unreadable=on_bad_record == "skip")       # ImageError names the file
    if len(kept) < len(records):
        if not kept:
            raise ManifestError(f"{manifest}: no readable image to evaluate")
        import warnings
        warnings.warn(f"{manifest}: skipped {len(records) - len(kept)} record(s) whose image cannot be read")
        records = [records[i] for i in kept]
    return img, records


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
        The metrics of `retrieval_metrics` (percent), plus `num_images`, `num_texts`.
    """
    if cache is not None:
        img, records = cache.images(model, manifest, limit, on_bad_record, batch_size, progress)
    else:
        img, records = encode_manifest_images(model, manifest, limit, on_bad_record, batch_size, progress)
    texts, text_to_image = captions_by_record(records, caption_key, manifest)
    txt = encode_texts(model, texts, batch_size, progress)
    metrics = embed_and_score(img, txt, torch.tensor(text_to_image))
    metrics.update(num_images=len(records), num_texts=len(texts))
    if return_embeddings:
        return metrics, img, txt, text_to_image
    return metrics


def captions_by_record(records: list[dict], caption_key: str, manifest) -> tuple[list[str], list[int]]:
    """Every caption of `caption_key` (or its plural list: `captions`, `captions_zh`) and the record it belongs to.

    Raises:
        KeyError: a record without the key, naming the manifest and line.
    """
    plural = caption_key.replace("caption", "captions", 1) if caption_key.startswith("caption") else None
    texts, owner = [], []
    for i, r in enumerate(records):
        caps = r.get(plural) or r.get(caption_key)
        if caps is None:
            raise KeyError(f"{manifest}: record on line {r.get('_line', i + 1)} has no {caption_key!r}")
        for c in ([caps] if isinstance(caps, str) else caps):
            texts.append(c)
            owner.append(i)
    return texts, owner


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
    if image_embeds is not None:
        records = read_records(manifest, limit, on_bad_record)
        img = image_embeds
    elif cache is not None:
        img, records = cache.images(model, manifest, limit, on_bad_record, batch_size, progress)
    else:
        img, records = encode_manifest_images(model, manifest, limit, on_bad_record, batch_size, progress)
    where = "the inline class list" if isinstance(classes_file, (list, tuple)) else str(classes_file)
    if folder:        # folder records carry their class name: index it in the classes used here
        records = [{**r, "label": r.get("class", r["label"])} for r in records]
    targets = torch.tensor(label_indices(records, classes["classes"], "label", str(manifest), source=where))
    classifier = build_classifier(model, names, load_templates(lang))            # (C, E)
    logits = img.to(classifier.device, classifier.dtype) @ classifier.T          # (N, C)
    result = accuracy(logits, targets)
    result["num_classes"] = len(names)
    return result


def run_suite(model, retrieval: str | None = None, longtext: str | None = None, zeroshot: str | None = None,
              classes: str | None = None, langs: tuple[str, ...] = ("en",), limit: int = 0,
              progress: bool = False) -> dict:
    """Every evaluation that has data, as one flat dict of numbers (the `eval` shorthand keys of a recipe).

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
    from .tasks import EvalConfig, evaluate
    cfg = EvalConfig(retrieval=retrieval or "", longtext=longtext or "", zeroshot=zeroshot or "",
                     classes=classes or "", langs=list(langs), limit=limit)
    return evaluate(model, cfg.specs(), progress=progress)
