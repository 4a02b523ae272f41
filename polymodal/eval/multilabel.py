"""Multi-label recognition metrics: per-class AP / mAP and precision, recall, F1.

* ``average_precision`` equals scikit-learn's ``average_precision_score`` per class
  (no interpolation; samples with equal scores form one threshold, so tie order never
  matters): ``AP = (1/P) * sum over positives of precision at the end of its tie group``.
* Classes with no positive target have no AP: they get NaN in ``AP_per_class`` (``null``
  in JSON via ``polymodal.eval.report.write_json``) and are left out of ``mAP``.
* Precision/recall/F1 in "micro" (pool all decisions) and "macro" (mean over classes)
  form. A per-class value that is 0/0 (precision of a never-predicted class, recall of a
  class without positives, F1 with neither) is undefined and left out of the macro mean,
  as scikit-learn does with ``zero_division=np.nan``. ``f1_macro`` is the mean of per-class
  F1 (scikit-learn); ``f1_macro_hm`` is the harmonic mean of ``precision_macro`` and
  ``recall_macro`` (the "CF1" of many multi-label papers).
* Top-k predictions take the k highest scores per sample; ties go to the lower class index
  (stable sort). Threshold predictions are ``score >= threshold`` (use 0.5 for
  probabilities, 0 for logits).

All values are in percent.

Below the metrics, the glue between a dual encoder and them: label names and targets from a manifest,
prompt (or adapter) scores, ``multilabel_eval_manifest`` (the ``multilabel`` row of ``eval/tasks.py``),
the on-disk cache of sentence embeddings that Text as Image trains on (``cached_text_embeddings``,
keyed by ``model_fingerprint`` and the sentences) and the ``modality_gap`` analysis.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor


def _check(scores: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    scores, targets = torch.as_tensor(scores), torch.as_tensor(targets)
    if scores.dim() != 2 or scores.shape != targets.shape:
        raise ValueError(f"scores and targets must both be (N, C), got {tuple(scores.shape)} and {tuple(targets.shape)}")
    if scores.shape[0] == 0 or scores.shape[1] == 0:
        raise ValueError(f"need at least one sample and one class, got shape {tuple(scores.shape)}")
    if not torch.isfinite(scores.double()).all():
        raise ValueError("scores contain NaN or inf")
    if not ((targets == 0) | (targets == 1)).all():
        raise ValueError("targets must be 0/1 (or False/True)")
    return scores.double().cpu(), targets.double().cpu()


def _nanmean(x: Tensor) -> float:
    x = x[~torch.isnan(x)]
    return float(x.mean()) if len(x) else math.nan


def average_precision(scores: Tensor, targets: Tensor) -> dict:
    """Per-class average precision and their mean, as scikit-learn defines AP.

    Args:
        scores: (N, C) scores, higher = more likely present.
        targets: (N, C) 0/1 ground truth.

    Returns:
        ``{"AP_per_class": [C floats, % or NaN], "mAP": %, "num_classes_with_positives": int}``.

    Raises:
        ValueError: bad shapes, NaN scores, non-binary targets, or no class with a positive.
    """
    scores, targets = _check(scores, targets)
    n = scores.shape[0]
    order = torch.sort(scores, dim=0, descending=True, stable=True)
    s = order.values                                                   # (N, C) descending per class
    t = targets.gather(0, order.indices)                               # (N, C) targets in that order
    tp = t.cumsum(0)                                                   # true positives in the top i+1
    # The last row of each run of equal scores is a threshold; every row uses its run's end.
    is_end = torch.ones_like(s, dtype=torch.bool)
    is_end[:-1] = s[:-1] != s[1:]
    pos = torch.arange(n).unsqueeze(1).expand_as(s)
    end = torch.where(is_end, pos, torch.full_like(pos, n))
    end = end.flip(0).cummin(0).values.flip(0)                         # (N, C) index of the run's end
    precision_at_end = tp.gather(0, end) / (end + 1)                   # (N, C)
    num_pos = t.sum(0)                                                 # (C,)
    ap = (t * precision_at_end).sum(0) / num_pos                       # NaN where num_pos == 0
    ap = 100.0 * ap
    valid = num_pos > 0
    if not valid.any():
        raise ValueError("no class has a positive target, so mAP is undefined")
    return {"AP_per_class": [float(v) for v in ap],
            "mAP": float(ap[valid].mean()),
            "num_classes_with_positives": int(valid.sum())}


def _prf(pred: Tensor, targets: Tensor) -> dict[str, float]:
    """Micro and macro precision/recall/F1 (percent) of 0/1 predictions against 0/1 targets."""
    tp = (pred * targets).sum(0)                                       # (C,)
    n_pred, n_pos = pred.sum(0), targets.sum(0)
    nan = torch.full_like(tp, math.nan)

    def ratio(a, b):
        return torch.where(b > 0, a / b.clamp(min=1), nan)

    p_c, r_c, f_c = ratio(tp, n_pred), ratio(tp, n_pos), ratio(2 * tp, n_pred + n_pos)
    P = float(tp.sum() / n_pred.sum()) if n_pred.sum() > 0 else math.nan
    R = float(tp.sum() / n_pos.sum()) if n_pos.sum() > 0 else math.nan
    F = float(2 * tp.sum() / (n_pred.sum() + n_pos.sum())) if n_pred.sum() + n_pos.sum() > 0 else math.nan
    pm, rm = _nanmean(p_c), _nanmean(r_c)
    hm = 2 * pm * rm / (pm + rm) if pm + rm > 0 else (0.0 if pm == pm and rm == rm else math.nan)
    out = {"precision_micro": P, "recall_micro": R, "f1_micro": F,
           "precision_macro": pm, "recall_macro": rm, "f1_macro": _nanmean(f_c), "f1_macro_hm": hm}
    return {k: 100.0 * v for k, v in out.items()}                      # NaN stays NaN


def f1_at_topk(scores: Tensor, targets: Tensor, k: int = 3) -> dict[str, float]:
    """Precision/recall/F1 when each sample predicts its k highest-scoring classes.

    Args:
        scores: (N, C). targets: (N, C) 0/1. k: labels predicted per sample (capped at C).

    Returns:
        ``precision_micro, recall_micro, f1_micro, precision_macro, recall_macro, f1_macro,
        f1_macro_hm`` in percent (NaN where undefined, see the module docstring).
    """
    scores, targets = _check(scores, targets)
    if int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(int(k), scores.shape[1])
    top = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    pred = torch.zeros_like(scores).scatter_(1, top, 1.0)
    return _prf(pred, targets)


def f1_at_threshold(scores: Tensor, targets: Tensor, threshold: float = 0.5) -> dict[str, float]:
    """Precision/recall/F1 when every class with ``score >= threshold`` is predicted.

    Returns:
        The same keys as :func:`f1_at_topk`.
    """
    scores, targets = _check(scores, targets)
    return _prf((scores >= threshold).double(), targets)


def multilabel_metrics(scores: Tensor, targets: Tensor, k: int = 3, threshold: float = 0.5) -> dict:
    """mAP plus top-k and threshold precision/recall/F1.

    Returns:
        ``{"mAP", "AP_per_class", "num_classes_with_positives", "mAP_chance" (the mean prevalence of the classes
        with a positive: what random scores give), "top{k}_<metric>", ...,
        "threshold{threshold}_<metric>", ...}`` with ``<metric>`` the keys of :func:`f1_at_topk`,
        e.g. ``top3_f1_micro`` and ``threshold0.5_f1_macro``.
    """
    out = dict(average_precision(scores, targets))
    prev = torch.as_tensor(targets).double().mean(0)                  # random scores: AP = prevalence
    out["mAP_chance"] = 100.0 * float(prev[prev > 0].mean()) if bool((prev > 0).any()) else float("nan")
    out.update({f"top{k}_{name}": v for name, v in f1_at_topk(scores, targets, k).items()})
    out.update({f"threshold{threshold:g}_{name}": v for name, v in f1_at_threshold(scores, targets, threshold).items()})
    return out


# ---- label names, targets and scores of a manifest --------------------------------------------------
def _templates(spec: Sequence[str] | str):
    from .zeroshot import load_templates
    if isinstance(spec, str):
        return load_templates(spec)
    spec = list(spec)
    if len(spec) == 1 and "{}" not in spec[0]:
        return load_templates(spec[0])
    return spec


def label_embeddings(model, label_names: Sequence[str], templates: Sequence[str] | str = "en") -> Tensor:
    """(C, E) prompt-ensemble embeddings of the label names (templates averaged), on the CPU."""
    from .zeroshot import build_classifier
    return build_classifier(model, list(label_names), _templates(templates)).float().cpu()


def load_label_names(classes, lang: str = "en") -> tuple[list[str], list[str]]:
    """Label names for multi-label evaluation.

    Args:
        classes: a list of names, a JSON file (the first of the keys ``labels``, ``shapes``,
            ``classes`` that exists, e.g. ShapesWorld's ``shapes``), or a text file with one
            name per line.
        lang: for a JSON file, ``"<key>_<lang>"`` gives the prompt names of other languages.

    Returns:
        ``(names, prompt_names)``: the names that record labels use and the names that go into
        the prompts (the same for English).
    """
    if isinstance(classes, (list, tuple)):
        return list(classes), list(classes)
    path = Path(classes)
    if not path.is_file():
        raise FileNotFoundError(f"classes file {path} does not exist")
    if path.suffix != ".json":
        names = [l.strip() for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]
        if not names:
            raise ValueError(f"{path}: no label names")
        return names, names
    data = json.loads(path.read_text(encoding="utf-8"))
    key = next((k for k in ("labels", "shapes", "classes") if isinstance(data, dict) and k in data), None)
    if key is None:
        raise KeyError(f"{path}: expected a 'labels', 'shapes' or 'classes' list")
    names = list(data[key])
    if lang == "en":
        return names, names
    local = data.get(f"{key}_{lang}")
    if local is None or len(local) != len(names):
        raise KeyError(f"{path}: no '{key}_{lang}' list of {len(names)} names for language {lang!r}")
    return names, list(local)


def multilabel_targets(records: Sequence[dict], label_names: Sequence[str], where: str = "manifest") -> Tensor:
    """(N, C) 0/1 targets from records' ``labels`` (names or integer indices).

    Raises:
        KeyError / ValueError: naming the record's line and the unknown label.
    """
    index = {n: i for i, n in enumerate(label_names)}
    out = torch.zeros(len(records), len(label_names))
    for i, r in enumerate(records):
        line = r.get("_line", i + 1)
        if "labels" not in r:
            raise KeyError(f"{where}: record on line {line} has no 'labels'")
        for lab in r["labels"]:
            if isinstance(lab, int) and not isinstance(lab, bool):
                if not 0 <= lab < len(label_names):
                    raise ValueError(f"{where}: line {line}: label index {lab} is outside [0, {len(label_names)})")
                out[i, lab] = 1.0
            elif lab in index:
                out[i, index[lab]] = 1.0
            else:
                raise ValueError(f"{where}: line {line}: label {lab!r} is not one of the {len(label_names)} "
                                 f"label names ({', '.join(label_names[:10])}{' ...' if len(label_names) > 10 else ''})")
    return out


@torch.no_grad()
def multilabel_scores(model, image_embeds: Tensor, prompt_names: Sequence[str], adapter=None,
                      templates: Sequence[str] | str = "en") -> Tensor:
    """(N, C) scores: cosine to label prompts (zero-shot) or the adapter's logits."""
    image_embeds = F.normalize(torch.as_tensor(image_embeds).float(), dim=-1)
    if adapter is None:
        w = label_embeddings(model, prompt_names, templates)       # (C, E)
        return image_embeds @ w.T
    if adapter.num_labels != len(prompt_names):
        raise ValueError(f"the adapter has {adapter.num_labels} labels but the data has {len(prompt_names)}")
    adapter = adapter.eval()
    dev = adapter.label_embeds.device
    return adapter(image_embeds.to(dev)).float().cpu()


def multilabel_eval_manifest(model, manifest, classes, lang: str = "en", limit: int = 0, adapter=None,
                             templates: Sequence[str] | str | None = None, batch_size: int = 128,
                             progress: bool = False, image_embeds: Tensor | None = None, cache=None,
                             on_bad_record: str = "error") -> dict:
    """Multi-label recognition on a manifest with ``labels`` per record.

    Args:
        model: a dual encoder with tokenizer and image_transform.
        manifest: JSONL/CSV manifest; each record has ``image`` and ``labels`` (names or indices).
        classes: label names: a list, classes.json (``labels``/``shapes``/``classes``) or a text file.
        lang: prompt language (bundled templates and ``<key>_<lang>`` names).
        limit: first ``limit`` records only (0 = all).
        adapter: None = zero-shot prompts; a :class:`MultiLabelAdapter` or a folder saved by
            ``save_adapter`` = adapter logits on the image embeddings.
        templates: prompt templates (default: the bundled set of ``lang``).
        batch_size: images per forward call.
        progress: progress bars.
        image_embeds: precomputed (N, E) image embeddings of the (limited) records.
        cache: a ``polymodal.eval.suite.FeatureCache``: the manifest's images are encoded once per cache.
        on_bad_record: "error" (stop at the first bad record or unreadable image, naming it) | "skip"
            (leave such records out, and records without ``labels``).

    Returns:
        :func:`multilabel_metrics` output (mAP, AP per class, top-3 and threshold F1 in percent) plus
        ``num_images`` and ``num_labels``. Thresholds apply to sigmoid probabilities with an adapter, to
        cosines (threshold 0.5) without one.
    """
    from ..data.manifests import ManifestError
    from ..models.multilabel import load_adapter
    from ..encode import read_records
    from .suite import encode_manifest_images
    names, prompt_names = load_label_names(classes, lang)
    if isinstance(adapter, (str, os.PathLike)):
        adapter = load_adapter(adapter)
    skipped = 0
    if image_embeds is not None:
        records = read_records(manifest, limit, on_bad_record, required=("image", "labels"))
        if len(image_embeds) != len(records):
            raise ValueError(f"{manifest}: {len(image_embeds)} image embeddings for {len(records)} records")
    else:
        was_training = model.training
        model.eval()
        try:
            if cache is not None:
                image_embeds, records, skipped = cache.images(model, manifest, limit, on_bad_record, batch_size,
                                                              progress)
            else:
                image_embeds, records, skipped = encode_manifest_images(model, manifest, limit, on_bad_record,
                                                                        batch_size, progress)
        finally:
            model.train(was_training)
        keep = [i for i, r in enumerate(records) if "labels" in r]
        if len(keep) < len(records):
            if on_bad_record != "skip":
                r = next(r for r in records if "labels" not in r)
                raise ManifestError(f"{manifest}: record on line {r.get('_line', '?')} has no 'labels'; add them "
                                    f"or use on_bad_record=skip to leave such records out")
            if not keep:
                raise ManifestError(f"{manifest}: no record has 'labels'")
            skipped += len(records) - len(keep)
            records, image_embeds = [records[i] for i in keep], image_embeds[keep]
    targets = multilabel_targets(records, names, str(manifest))
    scores = multilabel_scores(model, image_embeds, prompt_names, adapter, templates or lang)
    if adapter is not None:
        scores = torch.sigmoid(scores)
    out = multilabel_metrics(scores, targets)
    out.update(num_images=len(records), num_labels=len(names))
    if skipped:
        out["num_skipped"] = skipped
    return out


def modality_gap(image_embeds: Tensor, text_embeds: Tensor) -> dict[str, float]:
    """How far apart images and their matching texts lie in the joint space.

    Args:
        image_embeds: (N, E); text_embeds: (N, E) with row i describing image i.

    Returns:
        ``centroid_distance`` (||mean image - mean text||, the gap of Liang et al. 2022),
        ``matched_cosine`` (mean cosine of matched pairs), ``mean_pair_cosine`` (mean cosine
        over all image-text pairs), ``matched_minus_mean`` (their difference: the alignment
        margin).
    """
    img = F.normalize(torch.as_tensor(image_embeds).double(), dim=-1)
    txt = F.normalize(torch.as_tensor(text_embeds).double(), dim=-1)
    if img.shape != txt.shape or img.dim() != 2:
        raise ValueError(f"image and text embeddings must both be (N, E), got {tuple(img.shape)} and {tuple(txt.shape)}")
    mi, mt = img.mean(0), txt.mean(0)
    matched = float((img * txt).sum(1).mean())
    mean_pair = float(mi @ mt)                    # mean over all pairs of img_i . txt_j
    return {"centroid_distance": float((mi - mt).norm()), "matched_cosine": matched,
            "mean_pair_cosine": mean_pair, "matched_minus_mean": matched - mean_pair}


# ---- the sentence-embedding cache ------------------------------------------------------------------
def model_fingerprint(model, model_key: str | None = None) -> str:
    """A hash of what decides a text embedding: config, weights and tokenizer.

    Args:
        model: a dual encoder (``config``, ``state_dict``, ``tokenizer``).
        model_key: a caller's name for the weights (e.g. their path) that replaces hashing the
            weights, for very large models; the config and tokenizer are still hashed.

    Returns:
        A hex digest.
    """
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        h.update(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
    if model_key is not None:
        h.update(f"key:{model_key}".encode())
    else:
        for name, t in sorted(model.state_dict().items()):
            t = t.detach().cpu().contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    tok = getattr(model, "tokenizer", None)
    if tok is not None:
        backend = getattr(tok, "backend", None)
        if backend is not None and hasattr(backend, "to_str"):
            h.update(backend.to_str().encode())
        h.update(f"ctx:{getattr(tok, 'context_length', None)}".encode())
    return h.hexdigest()


def cache_key(fingerprint: str, texts: Sequence[str]) -> str:
    """Hash of a model fingerprint and a list of texts (order matters)."""
    h = hashlib.sha256(fingerprint.encode())
    for t in texts:
        h.update(b"\x00" + t.encode("utf-8"))
    return h.hexdigest()[:40]


def cached_text_embeddings(model, texts: Sequence[str], cache_dir: str | os.PathLike | None = None,
                           batch_size: int = 256, progress: bool = False, model_key: str | None = None) -> Tensor:
    """L2-normalised text embeddings (N, E), computed once and cached on disk.

    Args:
        model: the frozen dual encoder.
        texts: N sentences.
        cache_dir: where ``text_embeds_<key>.safetensors`` lives; None = no cache.
        batch_size: sentences per forward call.
        progress: show a progress bar while encoding.
        model_key: see :func:`model_fingerprint`.

    Returns:
        (N, E) float32 tensor on the CPU.
    """
    from ..encode import encode_texts
    texts = list(texts)
    path = None
    if cache_dir is not None:
        key = cache_key(model_fingerprint(model, model_key), texts)
        path = Path(cache_dir) / f"text_embeds_{key}.safetensors"
        if path.is_file():
            from safetensors.torch import load_file
            emb = load_file(str(path))["embeddings"]
            if emb.shape[0] == len(texts):
                return emb
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        emb = encode_texts(model, texts, batch_size, progress).float()
    finally:
        model.train(was_training)
    if path is not None:
        from safetensors.torch import save_file
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file({"embeddings": emb.contiguous()}, str(tmp), metadata={"num_texts": str(len(texts))})
        os.replace(tmp, path)                                  # readers never see a partial file
    return emb
