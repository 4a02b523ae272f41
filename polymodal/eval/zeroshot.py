"""Zero-shot classification: prompt-ensemble classifiers from a text tower, top-k accuracy.

The model only needs the public interface of docs/architecture.md:
``model.tokenizer(list[str]) -> LongTensor (B, L)``, ``model.encode_text(ids) -> (B, E)`` and
``model.encode_image(pixels) -> (B, E)``, both L2-normalised.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

TEMPLATE_DIR = Path(__file__).parent / "templates"


def load_templates(lang_or_path: str | os.PathLike) -> list[str]:
    """Prompt templates: a language code of a bundled set (``"en"``, ``"zh"``) or a JSON file.

    The file holds a JSON list of strings, each with exactly one ``{}`` where the class
    name goes (``"a photo of a {}."``).

    Raises:
        FileNotFoundError: the path does not exist and is not a bundled language.
        ValueError: the file is not a list of such strings (names the file and entry).
    """
    bundled = TEMPLATE_DIR / f"{lang_or_path}.json"
    path = bundled if isinstance(lang_or_path, str) and "/" not in lang_or_path and bundled.is_file() \
        else Path(lang_or_path)
    if not path.is_file():
        langs = sorted(p.stem for p in TEMPLATE_DIR.glob("*.json"))
        raise FileNotFoundError(f"templates {str(lang_or_path)!r}: no such file and not a bundled language {langs}")
    try:
        templates = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(templates, list) or not templates:
        raise ValueError(f"{path}: expected a non-empty JSON list of template strings")
    for i, t in enumerate(templates):
        if not isinstance(t, str) or t.count("{}") != 1:
            raise ValueError(f"{path}: entry {i} ({t!r}) must be a string with exactly one '{{}}'")
        try:
            t.format("x")
        except (IndexError, KeyError, ValueError) as e:
            raise ValueError(f"{path}: entry {i} ({t!r}) is not a valid format string: "
                             "write literal braces as '{{' and '}}'") from e
    return templates


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


@contextlib.contextmanager
def _eval_mode(model) -> Iterator[None]:
    """Switch off dropout etc. for the evaluation and restore the caller's mode afterwards."""
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if was_training:
            model.train()


def build_classifier(model, classnames: Sequence[str], templates: Sequence[str] | str,
                     batch_size: int = 256) -> Tensor:
    """Class embeddings from a prompt ensemble.

    For class c: ``e_c = normalize(mean_t normalize(encode_text(tokenizer(t.format(c)))))``.
    Prompts of all classes are encoded ``batch_size`` at a time.

    Args:
        model: anything with ``tokenizer``, ``encode_text`` (see the module docstring).
        classnames: C class names.
        templates: prompt templates with one ``{}``, or a name/path for :func:`load_templates`.
        batch_size: prompts per ``encode_text`` call.

    Returns:
        (C, E) float32 tensor of unit rows, on the model's device.
    """
    if isinstance(templates, (str, os.PathLike)):
        templates = load_templates(templates)
    if not classnames:
        raise ValueError("build_classifier needs at least one class name")
    if not templates:
        raise ValueError("build_classifier needs at least one template")
    device = _device(model)
    prompts = [t.format(c) for c in classnames for t in templates]       # class-major
    owner = torch.arange(len(classnames), device=device).repeat_interleave(len(templates))
    sums = None
    with _eval_mode(model):
        for start in range(0, len(prompts), batch_size):
            ids = model.tokenizer(prompts[start:start + batch_size]).to(device)
            emb = F.normalize(model.encode_text(ids).float(), dim=-1)    # (b, E)
            if sums is None:
                sums = torch.zeros(len(classnames), emb.shape[-1], device=device)
            sums.index_add_(0, owner[start:start + len(emb)], emb)
    # The mean over templates has the direction of the sum; normalising makes them equal.
    return F.normalize(sums, dim=-1)                                     # (C, E)


def accuracy(logits: Tensor, targets: Tensor | Sequence[int], ks: Sequence[int] = (1, 5),
             ties: str = "pessimistic") -> dict[str, float]:
    """Top-k accuracy in percent.

    A sample is correct at k when ``rank <= min(k, C)``, with
    ``rank = 1 + #{classes scoring strictly higher than the target}`` plus, with
    ``ties="pessimistic"`` (default, as in retrieval), the other classes scoring exactly
    the same. Counting instead of ``topk`` makes ties deterministic.

    Args:
        logits: (N, C) scores.
        targets: (N,) class indices in [0, C).
        ks: which top-k to report; a k of C or more is left out (it would read 100); top-1 always.
        ties: ``"pessimistic"`` or ``"optimistic"``.

    Returns:
        ``{"top1": %, "top5": %}`` (one key per k below C, and top1).
    """
    logits = torch.as_tensor(logits)
    targets = torch.as_tensor(targets, device=logits.device)
    if logits.dim() != 2 or targets.dim() != 1 or len(logits) != len(targets):
        raise ValueError(f"logits must be (N, C) and targets (N,), got {tuple(logits.shape)} and {tuple(targets.shape)}")
    if len(targets) == 0:
        raise ValueError("accuracy needs at least one sample")
    if ties not in ("pessimistic", "optimistic"):
        raise ValueError(f"ties must be 'pessimistic' or 'optimistic', got {ties!r}")
    num_classes = logits.shape[1]
    targets = targets.long()
    if int(targets.min()) < 0 or int(targets.max()) >= num_classes:
        raise ValueError(f"targets must be class indices in [0, {num_classes}), got range "
                         f"[{int(targets.min())}, {int(targets.max())}]")
    if not torch.isfinite(logits).all():
        raise ValueError("logits contain NaN or inf")
    correct = logits.gather(1, targets[:, None])                          # (N, 1)
    rank = (logits >= correct).sum(1) if ties == "pessimistic" else 1 + (logits > correct).sum(1)
    # A top-k with k >= C is 100 by construction: it is not reported (a 4-class task has no "top5").
    return {f"top{k}": 100.0 * float((rank <= int(k)).double().mean()) for k in ks if int(k) == 1 or int(k) < num_classes}


def zeroshot_eval(model, images_or_embeds: Tensor, targets: Tensor | Sequence[int], classnames: Sequence[str],
                  templates: Sequence[str] | str = "en", batch_size: int = 256,
                  ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Zero-shot top-k accuracy of ``model`` on labelled images.

    Args:
        model: see the module docstring.
        images_or_embeds: pixels (N, 3, H, W), encoded ``batch_size`` at a time with
            ``model.encode_image``, or precomputed image embeddings (N, E).
        targets: (N,) class indices into ``classnames``.
        classnames: C class names, inserted into every template.
        templates: template strings, or a bundled language / JSON path for :func:`load_templates`.
        batch_size: images (and prompts) per forward call.
        ks: which top-k to report.

    Returns:
        ``{"top1": %, "top5": %}``, as :func:`accuracy`.
    """
    x = torch.as_tensor(images_or_embeds)
    if x.dim() not in (2, 4):
        raise ValueError(f"images_or_embeds must be pixels (N, 3, H, W) or embeddings (N, E), got {tuple(x.shape)}")
    if len(x) == 0:
        raise ValueError("zeroshot_eval needs at least one image")
    classifier = build_classifier(model, classnames, templates, batch_size)  # (C, E)
    device = classifier.device
    with _eval_mode(model):
        if x.dim() == 4:
            embeds = torch.cat([model.encode_image(x[i:i + batch_size].to(device)).float()
                                for i in range(0, len(x), batch_size)])
        else:
            embeds = x.to(device).float()
        if embeds.shape[-1] != classifier.shape[-1]:
            raise ValueError(f"image embeddings have width {embeds.shape[-1]} but text embeddings {classifier.shape[-1]}")
        logits = F.normalize(embeds, dim=-1) @ classifier.T                   # (N, C)
    return accuracy(logits, targets, ks)
