"""Image-text retrieval metrics (Recall@K, median and mean rank), computed in bounded memory.

Conventions (record them beside any reported number):

* ``similarity`` is (N_images, N_texts); ``text_to_image[j]`` is the image of text j.
  An image may own any number (>= 1) of texts.
* Image -> text: the rank of an image is the rank of its best-placed own text among all
  texts; the image is a hit at k when that rank is <= k (i.e. ANY of its texts is in its
  top k). Text -> image: the rank of the text's single correct image among all images.
* Ranks are 1-based and come from counting, never from sorting:
  ``rank = 1 + #{negatives scoring strictly higher}`` plus, with ``ties="pessimistic"``
  (the default), ``+ #{negatives scoring exactly equal}``. Pessimistic ties mean that a
  collapsed model (all scores equal) gets rank N, not rank 1, and that low-precision
  (bf16/fp16) scores cannot inflate recall; ``ties="optimistic"`` gives the other bound.
  Other own texts of the same image are never negatives.
* Recalls are in percent. ``mean_recall`` is the mean of all recalls of both directions
  (the six of the default ``ks``; M2-Encoder calls it MR). The median rank of an even
  number of ranks is the mean of the two middle ones (as ``numpy.median``).

Memory: rows are scored ``chunk_size`` at a time, so besides the inputs at most about
``chunk_size * max(N_images, N_texts)`` scores (plus one boolean comparison of that size)
exist at once. :func:`embed_and_score` never forms the full N_images x N_texts matrix, which keeps
100k x 100k evaluations feasible (on a GPU, in minutes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

TIES = ("pessimistic", "optimistic")


def _as_text_to_image(text_to_image: Tensor | Sequence[int], num_images: int, num_texts: int,
                      device: torch.device) -> Tensor:
    """Validate ``text_to_image`` and return it as a LongTensor on ``device``."""
    t2i = torch.as_tensor(text_to_image)
    if t2i.dim() != 1:
        raise ValueError(f"text_to_image must be 1-D (one image index per text), got shape {tuple(t2i.shape)}")
    if t2i.is_floating_point() or t2i.is_complex() or t2i.dtype == torch.bool:
        raise ValueError(f"text_to_image must hold integer image indices, got dtype {t2i.dtype}")
    if len(t2i) != num_texts:
        raise ValueError(f"text_to_image has {len(t2i)} entries but there are {num_texts} texts "
                         f"(similarity is (N_images, N_texts) = ({num_images}, {num_texts}))")
    t2i = t2i.long()
    if len(t2i) and (int(t2i.min()) < 0 or int(t2i.max()) >= num_images):
        bad = int(torch.nonzero((t2i < 0) | (t2i >= num_images))[0])
        raise ValueError(f"text_to_image[{bad}] = {int(t2i[bad])} is not an image index in [0, {num_images})")
    counts = torch.bincount(t2i, minlength=num_images)
    if (counts == 0).any():
        missing = torch.nonzero(counts == 0).flatten()
        raise ValueError(f"{len(missing)} image(s) have no text in text_to_image (first: "
                         f"{missing[:5].tolist()}); every image needs at least one text, so drop "
                         "caption-less images before scoring")
    return t2i.to(device)


def _check_args(ks: Sequence[int], chunk_size: int, ties: str) -> tuple[int, ...]:
    ks = tuple(dict.fromkeys(int(k) for k in ks))
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
    return ks


def _check_finite(values: Tensor, what: str, start: int = 0) -> None:
    if not torch.isfinite(values).all():
        row = start + int(torch.nonzero(~torch.isfinite(values))[0, 0])
        raise ValueError(f"{what} contains NaN or inf (first in row {row})")


def _median(values: Tensor) -> float:
    v = values.double().sort().values
    n = len(v)
    return float(v[n // 2]) if n % 2 else float((v[n // 2 - 1] + v[n // 2]) / 2)


def _streaming_metrics(image_rows: Callable[[int, int], Tensor], text_rows: Callable[[int, int], Tensor],
                       num_images: int, num_texts: int, t2i: Tensor, ks: tuple[int, ...],
                       chunk_size: int, ties: str, check_finite: bool) -> dict[str, float]:
    """Core of both entry points.

    Args:
        image_rows: ``(i0, i1) -> (i1 - i0, N_texts)`` scores of images i0..i1-1 against all texts.
        text_rows: ``(j0, j1) -> (j1 - j0, N_images)`` scores of texts j0..j1-1 against all images.
        t2i: validated (N_texts,) LongTensor on the device the rows come back on.
        check_finite: reject NaN/inf scores (checked on the image rows, which cover every score).
    """
    pessimistic = ties == "pessimistic"
    device = t2i.device

    # Image -> text: rank of the best-scoring own text. Texts sorted by image make the own
    # texts of an image chunk one contiguous slice, so no (chunk, N_texts) mask is needed.
    order = torch.argsort(t2i, stable=True)
    starts = torch.zeros(num_images + 1, dtype=torch.long, device=device)
    starts[1:] = torch.bincount(t2i, minlength=num_images).cumsum(0)
    i2t_ranks = torch.empty(num_images, dtype=torch.long, device=device)
    for i0 in range(0, num_images, chunk_size):
        i1 = min(i0 + chunk_size, num_images)
        scores = image_rows(i0, i1)                                            # (c, N_t)
        if check_finite:
            _check_finite(scores, "similarity", i0)
        own_txt = order[int(starts[i0]):int(starts[i1])]                       # (m,) own texts of the chunk
        own_row = t2i[own_txt] - i0                                            # (m,) their row in the chunk
        own_scores = scores[own_row, own_txt]                                  # (m,)
        best = torch.full((i1 - i0,), float("-inf"), dtype=scores.dtype, device=device)
        best = best.scatter_reduce(0, own_row, own_scores, reduce="amax")      # (c,)
        if pessimistic:
            # Texts scoring >= best, minus the own texts among them (those equal to best).
            at_least = (scores >= best[:, None]).sum(dim=1)
            own_at_best = torch.zeros_like(at_least).scatter_add_(0, own_row, (own_scores >= best[own_row]).long())
            i2t_ranks[i0:i1] = 1 + at_least - own_at_best
        else:
            # Own texts never beat their own maximum, so "> best" only counts negatives.
            i2t_ranks[i0:i1] = 1 + (scores > best[:, None]).sum(dim=1)
        del scores

    # Text -> image: rank of the single correct image.
    t2i_ranks = torch.empty(num_texts, dtype=torch.long, device=device)
    for j0 in range(0, num_texts, chunk_size):
        j1 = min(j0 + chunk_size, num_texts)
        scores = text_rows(j0, j1)                                             # (c, N_i)
        correct = scores[torch.arange(j1 - j0, device=device), t2i[j0:j1]][:, None]  # (c, 1)
        # ">=" also counts the correct image itself, which is exactly the "1 +".
        t2i_ranks[j0:j1] = (scores >= correct).sum(dim=1) if pessimistic else 1 + (scores > correct).sum(dim=1)
        del scores

    i2t_ranks, t2i_ranks = i2t_ranks.cpu(), t2i_ranks.cpu()
    out: dict[str, float] = {}
    for k in ks:
        out[f"image_to_text_R@{k}"] = 100.0 * float((i2t_ranks <= k).double().mean())
    for k in ks:
        out[f"text_to_image_R@{k}"] = 100.0 * float((t2i_ranks <= k).double().mean())
    recalls = list(out.values())
    out["text_to_image_median_rank"] = _median(t2i_ranks)
    out["text_to_image_mean_rank"] = float(t2i_ranks.double().mean())
    out["mean_recall"] = sum(recalls) / len(recalls)
    return out


def embed_and_score(image_embeds: Tensor, text_embeds: Tensor, text_to_image: Tensor | Sequence[int],
                    chunk_size: int = 4096, *, ks: Sequence[int] = (1, 5, 10),
                    ties: str = "pessimistic") -> dict[str, float]:
    """Retrieval metrics from embeddings, without ever holding the full similarity matrix.

    Similarity is the plain dot product ``image_embeds @ text_embeds.T`` (pass L2-normalised
    embeddings, as ``model.encode_image`` / ``encode_text`` return, for cosine similarity),
    computed in float32 (or float64 if given) ``chunk_size`` rows at a time, once per direction.

    Args:
        image_embeds: (N_images, E) tensor.
        text_embeds: (N_texts, E) tensor on the same device.
        text_to_image: (N_texts,) image index of every text.
        chunk_size: rows scored at once; memory ~ ``chunk_size * max(N_images, N_texts)`` floats.
        ks: the K of Recall@K.
        ties: ``"pessimistic"`` or ``"optimistic"`` (see the module docstring).

    Returns:
        The same dict as :func:`retrieval_metrics`.
    """
    ks = _check_args(ks, chunk_size, ties)
    img, txt = torch.as_tensor(image_embeds), torch.as_tensor(text_embeds)
    if img.dim() != 2 or txt.dim() != 2 or img.shape[1] != txt.shape[1]:
        raise ValueError("image_embeds and text_embeds must be (N_images, E) and (N_texts, E) with the same E, "
                         f"got {tuple(img.shape)} and {tuple(txt.shape)}")
    if len(img) == 0 or len(txt) == 0:
        raise ValueError(f"need at least one image and one text, got {len(img)} images and {len(txt)} texts")
    if img.device != txt.device:
        raise ValueError(f"image_embeds is on {img.device} but text_embeds is on {txt.device}")
    dtype = torch.float64 if torch.float64 in (img.dtype, txt.dtype) else torch.float32
    img, txt = img.to(dtype), txt.to(dtype)
    t2i = _as_text_to_image(text_to_image, len(img), len(txt), img.device)
    _check_finite(img, "image_embeds")
    _check_finite(txt, "text_embeds")
    with torch.no_grad():
        return _streaming_metrics(lambda i0, i1: img[i0:i1] @ txt.T, lambda j0, j1: txt[j0:j1] @ img.T,
                                  len(img), len(txt), t2i, ks, int(chunk_size), ties, check_finite=False)


def retrieval_metrics(similarity: Tensor | None, text_to_image: Tensor | Sequence[int],
                      ks: Sequence[int] = (1, 5, 10), chunk_size: int = 4096, *,
                      image_embeds: Tensor | None = None, text_embeds: Tensor | None = None,
                      ties: str = "pessimistic") -> dict[str, float]:
    """Recall@K in both directions plus text->image median/mean rank.

    Give either a precomputed ``similarity`` or (with ``similarity=None``) ``image_embeds``
    and ``text_embeds``, which are passed to :func:`embed_and_score`.

    Args:
        similarity: (N_images, N_texts) scores, higher = more similar; or None.
        text_to_image: (N_texts,) index of the image each text belongs to; every image
            needs at least one text (uneven counts are fine).
        ks: the K of Recall@K.
        chunk_size: rows compared at once (bounds the temporary memory).
        image_embeds: (N_images, E), only with ``similarity=None``.
        text_embeds: (N_texts, E), only with ``similarity=None``.
        ties: ``"pessimistic"`` (default: equal-scoring negatives rank ahead) or ``"optimistic"``.

    Returns:
        ``{"image_to_text_R@k": %, ..., "text_to_image_R@k": %, ..., "text_to_image_median_rank",
        "text_to_image_mean_rank", "mean_recall": %}`` as Python floats; ranks are 1-based.

    Raises:
        ValueError: on a bad shape, a bad index, an image without texts, or NaN/inf scores.
    """
    if similarity is None:
        if image_embeds is None or text_embeds is None:
            raise ValueError("retrieval_metrics needs a similarity matrix or both image_embeds and text_embeds")
        return embed_and_score(image_embeds, text_embeds, text_to_image, chunk_size, ks=ks, ties=ties)
    if image_embeds is not None or text_embeds is not None:
        raise ValueError("give either similarity or image_embeds/text_embeds, not both")
    ks = _check_args(ks, chunk_size, ties)
    sim = torch.as_tensor(similarity)
    if sim.dim() != 2:
        raise ValueError(f"similarity must be 2-D (N_images, N_texts), got shape {tuple(sim.shape)}")
    if sim.shape[0] == 0 or sim.shape[1] == 0:
        raise ValueError(f"similarity must have at least one image and one text, got shape {tuple(sim.shape)}")
    if not sim.is_floating_point():
        raise ValueError(f"similarity must be a floating-point tensor, got dtype {sim.dtype}")
    num_images, num_texts = sim.shape
    t2i = _as_text_to_image(text_to_image, num_images, num_texts, sim.device)
    with torch.no_grad():
        return _streaming_metrics(lambda i0, i1: sim[i0:i1], lambda j0, j1: sim[:, j0:j1].T,
                                  num_images, num_texts, t2i, ks, int(chunk_size), ties, check_finite=True)
