"""Caption metrics: corpus BLEU-1..4 and CIDEr-D, following the coco-caption definitions.

Tokenisation (simplified; coco-caption runs the Stanford PTB tokenizer): lowercase, replace
every Unicode punctuation character (category ``P*``: ``. , ! ? ' " - ( ) ;`` ...) by a space,
split on whitespace. So ``"A man's T-shirt."`` -> ``a man s t shirt``, where PTB gives
``a man 's t-shirt``; scores on real captions are close to, not identical with, coco-caption's.
For Chinese, segment first (e.g. jieba) and pass a ``tokenizer`` or space-joined text.

BLEU (corpus level, as coco-caption's ``Bleu(4)`` with ``option="closest"``):
``p_n = sum_i clipped matches_i / sum_i candidate n-grams_i``, a candidate n-gram count clipped
by its maximum count in any one reference of that image; ``BLEU-N = BP * (p_1 ... p_N)^(1/N)``;
``BP = exp(1 - R / C)`` when ``C < R``, else 1, with C the total candidate length and R the
sum over images of the reference length closest to the candidate's (ties: the shorter).
Where coco-caption adds 1e-15 / 1e-9 to numerator / denominator, we do not: an order with no
match (or no n-gram at all) gives exactly 0, where coco-caption reports a small positive number.

CIDEr-D (coco-caption's ``CiderD``, ``df="corpus"``): for n = 1..4, n-gram vectors
``g = tf * (log(#images) - log(max(1, df)))`` with df the number of images whose REFERENCES
contain the n-gram; per reference ``sim_n = sum min(g_c, g_r) * g_r / (|g_c| |g_r|)`` (0 if a
norm is 0), times ``exp(-(l_c - l_r)^2 / (2 * 6^2))`` with l the number of bigrams
(``max(words - 1, 0)``, as coco-caption counts it); the image score is
``10 * mean_n mean_refs sim_n`` and CIDEr-D is the mean over images. Reported raw, like
coco-caption (e.g. 1.23; papers often print it x100). A corpus of one image has
log(1) = 0 weights and scores 0.
"""

from __future__ import annotations

import math
import sys
import unicodedata
from collections import Counter
from collections.abc import Callable, Hashable, Mapping, Sequence

import torch

Tokens = list[str]


def tokenize(text: str) -> Tokens:
    """Lowercase, punctuation characters to spaces, whitespace split (see the module docstring)."""
    return "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text.lower()).split()


def _ngrams(tokens: Sequence[str], max_n: int) -> Counter:
    """Counts of all n-grams, n = 1..max_n, as tuples."""
    return Counter(tuple(tokens[i:i + n]) for n in range(1, max_n + 1) for i in range(len(tokens) - n + 1))


def bleu(candidates: Sequence[Tokens], references: Sequence[Sequence[Tokens]], max_n: int = 4) -> list[float]:
    """Corpus-level BLEU-1..max_n (values in [0, 1]).

    Args:
        candidates: one token list per image.
        references: for each image, a non-empty list of reference token lists.
        max_n: highest n-gram order.

    Returns:
        ``[BLEU-1, ..., BLEU-max_n]``.
    """
    matches, totals = [0] * max_n, [0] * max_n
    cand_len = ref_len = 0
    for cand, refs in zip(candidates, references, strict=True):
        counts = _ngrams(cand, max_n)
        max_ref: Counter = Counter()
        for ref in refs:
            max_ref |= _ngrams(ref, max_n)                      # element-wise max over references
        for gram, c in counts.items():
            matches[len(gram) - 1] += min(c, max_ref[gram])
        for n in range(1, max_n + 1):
            totals[n - 1] += max(len(cand) - n + 1, 0)
        cand_len += len(cand)
        ref_len += min((abs(len(r) - len(cand)), len(r)) for r in refs)[1]
    if cand_len == 0:
        return [0.0] * max_n
    bp = math.exp(1 - ref_len / cand_len) if cand_len < ref_len else 1.0
    scores, log_sum = [], 0.0
    for n in range(max_n):
        if matches[n] == 0:                                     # p_n = 0 -> BLEU-n.. are 0
            scores.extend([0.0] * (max_n - n))
            break
        log_sum += math.log(matches[n] / totals[n])
        scores.append(bp * math.exp(log_sum / (n + 1)))
    return scores


def cider_d(candidates: Sequence[Tokens], references: Sequence[Sequence[Tokens]], max_n: int = 4,
            sigma: float = 6.0) -> tuple[float, list[float]]:
    """CIDEr-D with document frequencies from the references of this corpus.

    Args:
        candidates: one token list per image.
        references: for each image, a non-empty list of reference token lists.
        max_n: highest n-gram order.
        sigma: width of the Gaussian length penalty.

    Returns:
        ``(corpus score, per-image scores)``, raw scale (x10 included, not x100).
    """
    ref_counts = [[_ngrams(r, max_n) for r in refs] for refs in references]
    df: Counter = Counter()
    for refs in ref_counts:
        df.update(set().union(*refs))                           # each image counts once per n-gram
    log_images = math.log(len(references))

    def vectorise(counts: Counter, num_tokens: int):
        vec = [dict() for _ in range(max_n)]
        for gram, tf in counts.items():
            vec[len(gram) - 1][gram] = tf * (log_images - math.log(max(1.0, df[gram])))
        norms = [math.sqrt(sum(v * v for v in d.values())) for d in vec]
        return vec, norms, max(num_tokens - 1, 0)

    per_image = []
    for cand, refs, counts in zip(candidates, references, ref_counts, strict=True):
        vc, nc, lc = vectorise(_ngrams(cand, max_n), len(cand))
        total = 0.0
        for ref, rc in zip(refs, counts):
            vr, nr, lr = vectorise(rc, len(ref))
            penalty = math.exp(-((lc - lr) ** 2) / (2 * sigma ** 2))
            for n in range(max_n):
                dot = sum(min(g, vr[n].get(gram, 0.0)) * vr[n].get(gram, 0.0) for gram, g in vc[n].items())
                if nc[n] != 0 and nr[n] != 0:
                    dot /= nc[n] * nr[n]
                total += dot * penalty
        per_image.append(10.0 * total / (max_n * len(refs)))
    return sum(per_image) / len(per_image), per_image


def caption_metrics(candidates: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]],
                    tokenizer: Callable[[str], Tokens] = tokenize) -> dict[str, float]:
    """BLEU-1..4 and CIDEr-D of one generated caption per image.

    Args:
        candidates: image id -> generated caption.
        references: image id -> non-empty list of reference captions; same ids as ``candidates``.
        tokenizer: text -> tokens; defaults to :func:`tokenize`.

    Returns:
        ``{"BLEU-1": .., "BLEU-2": .., "BLEU-3": .., "BLEU-4": .., "CIDEr-D": ..}``, BLEU in [0, 1]
        and CIDEr-D on coco-caption's raw scale.

    Raises:
        ValueError: ids differ between the two dicts, or an entry is not text / is empty.
    """
    missing, extra = set(references) - set(candidates), set(candidates) - set(references)
    if missing or extra:
        raise ValueError(f"candidates and references must have the same image ids: {len(missing)} id(s) "
                         f"without a candidate (e.g. {sorted(map(str, missing))[:3]}), {len(extra)} "
                         f"without references (e.g. {sorted(map(str, extra))[:3]})")
    if not references:
        raise ValueError("caption_metrics needs at least one image")
    ids = list(references)
    for i in ids:
        if not isinstance(candidates[i], str):
            raise ValueError(f"candidate for image {i!r} must be one string, got {type(candidates[i]).__name__}")
        refs = references[i]
        if isinstance(refs, str) or not refs or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"references for image {i!r} must be a non-empty list of strings, got {refs!r}")
    cands = [tokenizer(candidates[i]) for i in ids]
    refs = [[tokenizer(r) for r in references[i]] for i in ids]
    out = {f"BLEU-{n}": v for n, v in enumerate(bleu(cands, refs, 4), start=1)}
    out["CIDEr-D"] = cider_d(cands, refs)[0]
    return out


# ---- generation over files and the captioning eval task --------------------------------------
def caption_images(model, paths: list[str], method: str = "beam", max_len: int | None = None,
                   num_beams: int = 4, length_penalty: float = 0.0, top_p: float = 0.9,
                   temperature: float = 1.0, batch_size: int = 16, seed: int = 0, progress: bool = True,
                   precision: str = "fp32", use_cache: bool = True):
    """Caption image files with `model` (a CoCa with `.tokenizer` and `.image_transform`).

    `precision="bf16"` decodes under bf16 autocast; check it first with
    `polymodal.precision.check_precision` (the `caption` command and `captioning_eval_manifest` do).
    `use_cache=False` decodes without the KV cache (same captions, slower).

    Yields:
        {"image": path, "caption": text} per image, in input order.
    """
    from ..data.images import load_image
    from ..precision import autocast
    if model.tokenizer is None:
        raise ValueError("caption: the model has no tokenizer (save it with one, or attach model.tokenizer)")
    if model.tokenizer.bos_id != model.bos_id or model.tokenizer.eos_id != model.eos_id:
        raise ValueError(f"caption: tokenizer start/end ids ({model.tokenizer.bos_id}, {model.tokenizer.eos_id}) "
                         f"differ from the model config's bos_token_id/text.eot_token_id "
                         f"({model.bos_id}, {model.eos_id})")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    from tqdm import tqdm
    bar = tqdm(total=len(paths), desc="caption", unit="img", disable=not progress, file=sys.stderr)
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        pixels = torch.stack([model.image_transform(load_image(p)) for p in chunk]).to(device)
        with autocast(precision, device):
            ids = model.generate(pixels, method=method, max_len=max_len, num_beams=num_beams,
                                 length_penalty=length_penalty, top_p=top_p, temperature=temperature,
                                 generator=generator, use_cache=use_cache)
        for path, row in zip(chunk, ids.cpu()):
            yield {"image": str(path), "caption": model.tokenizer.decode(row)}
        bar.update(len(chunk))
    bar.close()


def captioning_eval_manifest(model, manifest, limit: int = 0, method: str = "beam", num_beams: int = 3,
                             max_len: int | None = None, length_penalty: float = 0.0, batch_size: int = 32,
                             progress: bool = True, num_examples: int = 5, on_bad_record: str = "error",
                             precision: str = "fp32", precision_force: bool = False) -> dict:
    """Caption the images of a manifest and score them against the references.

    Records naming the same image file are merged: all their captions are that image's references.

    Args:
        model: a CoCa with `.tokenizer` and `.image_transform`.
        manifest: JSONL/CSV manifest with `image` and `caption`/`captions`.
        limit: evaluate the first `limit` distinct images only (0 = all).
        method, num_beams, max_len, length_penalty: decoding (see `CoCa.generate`).
        num_examples: how many (image, caption, references) triples to include in the result.
        on_bad_record: "error" stops at a malformed manifest record; "skip" skips and counts it.
        precision: "fp32" or "bf16" (autocast); bf16 is refused on a CPU without native bf16
            unless `precision_force` (see `polymodal.precision.check_precision`).
    Returns:
        {"BLEU-1".."BLEU-4", "CIDEr-D", "num_images", "method", "examples": [...]}.
    """
    from ..data.manifests import read_manifest
    from ..precision import check_precision
    check_precision(precision, next(model.parameters()).device, precision_force, where=f"captioning eval of {manifest}",
                    key="precision", force_key="precision_force=true")
    references: dict[str, list[str]] = {}
    for record in read_manifest(manifest, on_bad_record=on_bad_record):
        caps = record.get("captions") or [record["caption"]]
        references.setdefault(record["image"], []).extend([caps] if isinstance(caps, str) else caps)
    paths = list(references)[: limit or None]
    references = {p: references[p] for p in paths}
    model.eval()
    candidates = {r["image"]: r["caption"] for r in caption_images(
        model, paths, method=method, max_len=max_len, num_beams=num_beams, length_penalty=length_penalty,
        batch_size=batch_size, progress=progress, precision=precision)}
    metrics = caption_metrics(candidates, references)
    metrics.update(num_images=len(paths), method=method,
                   examples=[{"image": p, "caption": candidates[p], "references": references[p]}
                             for p in paths[:num_examples]])
    return metrics
