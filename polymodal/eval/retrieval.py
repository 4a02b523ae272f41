"""Image-text retrieval metrics (Recall@K, median and mean rank), computed in bounded memory.

Conventions (record them beside any reported number):

* ``similarity`` is (N_images, N_texts); ``text_to_image[j]`` is the image of text j, or (for
  layouts where a text has several correct images, MUGE / Chinese-CLIP) the list of its images.
  An image may own any number (>= 1) of texts.
* Image -> text: the rank of an image is the rank of its best-placed own text among all
  texts; the image is a hit at k when that rank is <= k (i.e. ANY of its texts is in its
  top k). Text -> image: the rank of the text's best-placed correct image among all images
  (its single image in the usual case).
* Ranks are 1-based and come from counting, never from sorting:
  ``rank = 1 + #{negatives scoring strictly higher}`` plus, with ``ties="pessimistic"``
  (the default), ``+ #{negatives scoring exactly equal}``. Pessimistic ties mean that a
  collapsed model (all scores equal) gets rank N, not rank 1, and that low-precision
  (bf16/fp16) scores cannot inflate recall; ``ties="optimistic"`` gives the other bound.
  Other own texts of the same image (other correct images of the same text) are never negatives.
* Recalls are in percent. ``mean_recall`` is the mean of all recalls of both directions
  (the six of the default ``ks``; M2-Encoder calls it MR). The median rank of an even
  number of ranks is the mean of the two middle ones (as ``numpy.median``).

One pass, bounded memory: image rows are scored one block at a time and BOTH directions are
counted from the same block (image->text per row; text->image as per-column counts against each
text's correct score, accumulated over the blocks), so the similarity matrix is computed once and
never held whole. The block holds ``max_memory`` bytes of scores (default 1 GiB; or give
``chunk_size`` rows); besides the inputs only O(N_images + N_texts) more is kept, so 100k x 500k
evaluations fit in a few GB. On a CPU the comparisons run a few rows at a time, in cache.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

TIES = ("pessimistic", "optimistic")
DEFAULT_MAX_MEMORY = 1 << 30    # bytes of similarity scores held at once


def _as_text_to_image(text_to_image, num_images: int, num_texts: int, device: torch.device
                      ) -> tuple[Tensor, Tensor]:
    """Validate ``text_to_image`` and return the positive (image, text) pairs, sorted by image, on ``device``.

    ``text_to_image`` is (N_texts,) image indices, or a sequence of N_texts sequences of image indices (every
    correct image of each text)."""
    if isinstance(text_to_image, (list, tuple)) and any(isinstance(t, (list, tuple)) for t in text_to_image):
        if len(text_to_image) != num_texts:
            raise ValueError(f"text_to_image has {len(text_to_image)} entries but there are {num_texts} texts")
        lists = [list(t) if isinstance(t, (list, tuple)) else [t] for t in text_to_image]
        empty = [j for j, t in enumerate(lists) if not t]
        if empty:
            raise ValueError(f"text_to_image[{empty[0]}] lists no image; every text needs at least one")
        img = torch.tensor([i for t in lists for i in t], dtype=torch.long)
        txt = torch.tensor([j for j, t in enumerate(lists) for _ in t], dtype=torch.long)
    else:
        img = torch.as_tensor(text_to_image)
        if img.dim() != 1:
            raise ValueError(f"text_to_image must be 1-D (one image index per text), got shape {tuple(img.shape)}")
        if img.is_floating_point() or img.is_complex() or img.dtype == torch.bool:
            raise ValueError(f"text_to_image must hold integer image indices, got dtype {img.dtype}")
        if len(img) != num_texts:
            raise ValueError(f"text_to_image has {len(img)} entries but there are {num_texts} texts "
                             f"(similarity is (N_images, N_texts) = ({num_images}, {num_texts}))")
        img = img.long().cpu()
        txt = torch.arange(num_texts)
    if len(img) and (int(img.min()) < 0 or int(img.max()) >= num_images):
        bad = int(torch.nonzero((img < 0) | (img >= num_images))[0])
        raise ValueError(f"text_to_image[{int(txt[bad])}] = {int(img[bad])} is not an image index in [0, {num_images})")
    counts = torch.bincount(img, minlength=num_images)
    if (counts == 0).any():
        missing = torch.nonzero(counts == 0).flatten()
        raise ValueError(f"{len(missing)} image(s) have no text in text_to_image (first: "
                         f"{missing[:5].tolist()}); every image needs at least one text, so drop "
                         "caption-less images before scoring")
    order = torch.argsort(img, stable=True)
    return img[order].to(device), txt[order].to(device)


def _check_args(ks: Sequence[int], chunk_size: int | None, ties: str, max_memory: int | None = None
                ) -> tuple[int, ...]:
    ks = tuple(dict.fromkeys(int(k) for k in ks))
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1 (or None to derive it from max_memory), got {chunk_size}")
    if max_memory is not None and int(max_memory) < 1:
        raise ValueError(f"max_memory must be a positive number of bytes, got {max_memory}")
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
    return ks


def _check_finite(values: Tensor, what: str, start: int = 0) -> None:
    """Raise ValueError naming the first row with NaN/inf. Checked in slices of about 16 MB: `isfinite`
    builds an abs() copy and two masks, which for a whole 500k x 512 table would be 1.7 GB."""
    row_bytes = max(1, values[0:1].numel() * values.element_size())
    step = max(1, (16 << 20) // row_bytes)
    for r0 in range(0, len(values), step):
        part = values[r0:r0 + step]
        if not torch.isfinite(part).all():
            row = start + r0 + int(torch.nonzero(~torch.isfinite(part))[0, 0])
            raise ValueError(f"{what} contains NaN or inf (first in row {row})")


def _median(values: Tensor) -> float:
    v = values.double().sort().values
    n = len(v)
    return float(v[n // 2]) if n % 2 else float((v[n // 2 - 1] + v[n // 2]) / 2)


def _rows_per_block(max_memory: int, num_images: int, num_texts: int, itemsize: int) -> int:
    """Image rows per similarity block so that the block and the pass's other temporaries (a few
    int64 vectors per image and per text, the in-cache comparisons, 64 MB of slack for BLAS work
    buffers) fit in ``max_memory`` bytes."""
    other = 48 * (num_images + num_texts) + (64 << 20)
    return max(1, (int(max_memory) - other) // (num_texts * itemsize))


def _sub_rows(num_texts: int, device: torch.device) -> int:
    """Rows compared at once inside a block.

    Counting a whole (c, N) comparison can materialise an int copy of it, so the comparisons and
    counts run over a slice of rows at a time: on a CPU a few rows (the scores stay in cache), on a
    GPU up to 16M scores (temporaries of at most 128 MB, few kernel launches).
    """
    if device.type != "cpu":
        return max(1, (1 << 24) // max(num_texts, 1))
    return max(1, min(64, (1 << 18) // max(num_texts, 1)))


def _one_pass_metrics(image_rows: Callable[[int, int], Tensor], correct: Tensor, num_images: int,
                      num_texts: int, pairs: tuple[Tensor, Tensor], ks: tuple[int, ...], block_rows: int, ties: str,
                      check_finite: bool) -> dict[str, float]:
    """Core of both entry points: both directions from one pass over image-row blocks.

    Args:
        image_rows: ``(i0, i1) -> (i1 - i0, N_texts)`` scores of images i0..i1-1 against all texts.
        correct: (N_texts,) score of every text with its best correct image, in the dtype of the rows.
        pairs: the validated positive (image, text) index pairs, sorted by image, on the rows' device.
        block_rows: image rows scored at once.
        check_finite: reject NaN/inf scores (checked on the image rows, which cover every score).
    """
    pessimistic = ties == "pessimistic"
    pair_img, pair_txt = pairs
    device = pair_img.device

    # Image -> text: rank of the best-scoring own text. Pairs sorted by image make the own
    # texts of an image block one contiguous slice, so no (block, N_texts) mask is needed.
    starts = torch.zeros(num_images + 1, dtype=torch.long, device=device)
    starts[1:] = torch.bincount(pair_img, minlength=num_images).cumsum(0)
    i2t_ahead = torch.empty(num_images, dtype=torch.long, device=device)
    # Text -> image: for every text, the images scoring >= (pessimistic) or > (optimistic) its
    # correct score, counted column-wise over the same blocks. The correct image itself is taken
    # out by index afterwards, not by value, so the count stays right even where the block's
    # own score and `correct` differ in the last bit (embeddings: two different dot-product kernels).
    t2i_ahead = torch.zeros(num_texts, dtype=torch.int64, device=device)
    self_counted = torch.zeros(num_texts, dtype=torch.int64, device=device)
    sub = _sub_rows(num_texts, device)
    correct_row = correct[None, :]                                             # (1, N_t)
    for i0 in range(0, num_images, block_rows):
        i1 = min(i0 + block_rows, num_images)
        scores = image_rows(i0, i1)                                            # (c, N_t)
        if check_finite:
            _check_finite(scores, "similarity", i0)
        own_txt = pair_txt[int(starts[i0]):int(starts[i1])]                    # (m,) own texts of the block
        own_row = pair_img[int(starts[i0]):int(starts[i1])] - i0               # (m,) their row in the block
        own_scores = scores[own_row, own_txt]                                  # (m,)
        best = torch.full((i1 - i0,), float("-inf"), dtype=scores.dtype, device=device)
        best = best.scatter_reduce(0, own_row, own_scores, reduce="amax")      # (c,)
        own_correct = correct[own_txt]
        # A text's correct images that the column count includes are not negatives (a text's images may sit in
        # several blocks, so this accumulates).
        self_counted.scatter_add_(0, own_txt, (own_scores >= own_correct if pessimistic
                                               else own_scores > own_correct).long())
        ahead_blk = torch.empty(i1 - i0, dtype=torch.int64, device=device)
        for r0 in range(0, i1 - i0, sub):
            r1 = min(r0 + sub, i1 - i0)
            s = scores[r0:r1]                                                  # (r, N_t)
            if pessimistic:
                ahead_blk[r0:r1] = (s >= best[r0:r1, None]).sum(dim=1, dtype=torch.int64)
                t2i_ahead += (s >= correct_row).sum(dim=0, dtype=torch.int64)
            else:
                ahead_blk[r0:r1] = (s > best[r0:r1, None]).sum(dim=1, dtype=torch.int64)
                t2i_ahead += (s > correct_row).sum(dim=0, dtype=torch.int64)
        del s                                                                  # a view: it keeps the block alive
        if pessimistic:
            # Texts scoring >= best, minus the own texts among them (those equal to best).
            own_at_best = torch.zeros_like(ahead_blk).scatter_add_(0, own_row, (own_scores >= best[own_row]).long())
            i2t_ahead[i0:i1] = ahead_blk - own_at_best
        else:
            # Own texts never beat their own maximum, so "> best" only counts negatives.
            i2t_ahead[i0:i1] = ahead_blk
        del scores

    i2t_ranks = (1 + i2t_ahead).cpu()
    t2i_ranks = (1 + t2i_ahead - self_counted).cpu()
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


def metrics_from_rows(image_rows: Callable[[int, int], Tensor], own_scores: Tensor,
                      text_to_image: Tensor | Sequence[int], num_images: int, ks: Sequence[int] = (1, 5, 10),
                      block_rows: int = 64, ties: str = "pessimistic", check_finite: bool = True) -> dict[str, float]:
    """Retrieval metrics for a caller's own similarity function, in one pass (e.g. SHE-Net's hierarchy).

    Args:
        image_rows: ``(i0, i1) -> (i1 - i0, N_texts)`` scores of images i0..i1-1 against every text.
        own_scores: (N_texts,) score of every text with its own image (from the caller's pairwise path; with
            several correct images, the best of them).
        text_to_image: (N_texts,) image index of every text, or a list of every text's image indices.
        num_images: N_images.
        ks, ties: as `retrieval_metrics`.
        block_rows: image rows `image_rows` is asked for at once.
        check_finite: reject NaN/inf scores.
    Returns:
        The keys of `retrieval_metrics`.
    """
    ks = _check_args(ks, block_rows, ties)
    num_texts = len(own_scores)
    pairs = _as_text_to_image(text_to_image, num_images, num_texts, own_scores.device)
    if check_finite and not torch.isfinite(own_scores).all():
        first = int(torch.nonzero(~torch.isfinite(own_scores))[0, 0])
        raise ValueError(f"own-pair scores contain NaN or inf (first at text {first})")
    return _one_pass_metrics(image_rows, own_scores, num_images, num_texts, pairs, ks, int(block_rows), ties,
                             check_finite)


def _own_scores(img: Tensor, txt: Tensor, pairs: tuple[Tensor, Tensor], max_memory: int) -> Tensor:
    """(N_texts,) dot product of every text with its (best) correct image, in chunks that fit ``max_memory``."""
    pair_img, pair_txt = pairs
    out = torch.full((len(txt),), float("-inf"), dtype=txt.dtype, device=txt.device)
    step = max(1, int(max_memory) // (8 * img.shape[1] * img.element_size()))   # two temporaries <= budget / 4
    for p0 in range(0, len(pair_img), step):
        pi, pt = pair_img[p0:p0 + step], pair_txt[p0:p0 + step]
        out.scatter_reduce_(0, pt, (img[pi] * txt[pt]).sum(dim=1), reduce="amax")
    return out


def embed_and_score(image_embeds: Tensor, text_embeds: Tensor, text_to_image: Tensor | Sequence[int],
                    chunk_size: int | None = None, *, ks: Sequence[int] = (1, 5, 10),
                    ties: str = "pessimistic", max_memory: int = DEFAULT_MAX_MEMORY) -> dict[str, float]:
    """Retrieval metrics from embeddings, without ever holding the full similarity matrix.

    Similarity is the plain dot product ``image_embeds @ text_embeds.T`` (pass L2-normalised
    embeddings, as ``model.encode_image`` / ``encode_text`` return, for cosine similarity),
    computed in float32 (or float64 if given) one block of image rows at a time, once: both
    directions are counted from the same blocks. It runs on the device of the embeddings (move
    them to a GPU to score there).

    Args:
        image_embeds: (N_images, E) tensor.
        text_embeds: (N_texts, E) tensor on the same device.
        text_to_image: (N_texts,) image index of every text, or a list of every text's image indices.
        chunk_size: image rows scored at once; None (default) derives it from ``max_memory``.
        ks: the K of Recall@K.
        ties: ``"pessimistic"`` or ``"optimistic"`` (see the module docstring).
        max_memory: bytes one block of scores may take (default 1 GiB); the extra memory is this
            plus O(N_images + N_texts).

    Returns:
        The same dict as :func:`retrieval_metrics`.
    """
    ks = _check_args(ks, chunk_size, ties, max_memory)
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
    pairs = _as_text_to_image(text_to_image, len(img), len(txt), img.device)
    _check_finite(img, "image_embeds")
    _check_finite(txt, "text_embeds")
    rows = int(chunk_size) if chunk_size is not None else _rows_per_block(max_memory, len(img), len(txt), img.element_size())
    with torch.no_grad():
        txt_t = txt.T                                                        # (E, N_t) view
        correct = _own_scores(img, txt, pairs, max_memory)
        # One block buffer reused by every block: fresh multi-GB allocations would each pay page faults.
        buf = torch.empty(min(rows, len(img)), len(txt), dtype=dtype, device=img.device)   # (c, N_t)
        return _one_pass_metrics(lambda i0, i1: torch.matmul(img[i0:i1], txt_t, out=buf[:i1 - i0]), correct,
                                 len(img), len(txt), pairs, ks, rows, ties, check_finite=False)


def retrieval_metrics(similarity: Tensor | None, text_to_image: Tensor | Sequence[int],
                      ks: Sequence[int] = (1, 5, 10), chunk_size: int | None = None, *,
                      image_embeds: Tensor | None = None, text_embeds: Tensor | None = None,
                      ties: str = "pessimistic", max_memory: int = DEFAULT_MAX_MEMORY) -> dict[str, float]:
    """Recall@K in both directions plus text->image median/mean rank.

    Give either a precomputed ``similarity`` or (with ``similarity=None``) ``image_embeds``
    and ``text_embeds``, which are passed to :func:`embed_and_score`.

    Args:
        similarity: (N_images, N_texts) scores, higher = more similar; or None.
        text_to_image: (N_texts,) index of the image each text belongs to, or a list of every text's
            correct images; every image needs at least one text (uneven counts are fine).
        ks: the K of Recall@K.
        chunk_size: image rows compared at once; None (default) derives it from ``max_memory``.
        image_embeds: (N_images, E), only with ``similarity=None``.
        text_embeds: (N_texts, E), only with ``similarity=None``.
        ties: ``"pessimistic"`` (default: equal-scoring negatives rank ahead) or ``"optimistic"``.
        max_memory: bytes of temporary scores allowed at once (default 1 GiB).

    Returns:
        ``{"image_to_text_R@k": %, ..., "text_to_image_R@k": %, ..., "text_to_image_median_rank",
        "text_to_image_mean_rank", "mean_recall": %}`` as Python floats; ranks are 1-based.

    Raises:
        ValueError: on a bad shape, a bad index, an image without texts, or NaN/inf scores.
    """
    if similarity is None:
        if image_embeds is None or text_embeds is None:
            raise ValueError("retrieval_metrics needs a similarity matrix or both image_embeds and text_embeds")
        return embed_and_score(image_embeds, text_embeds, text_to_image, chunk_size, ks=ks, ties=ties,
                               max_memory=max_memory)
    if image_embeds is not None or text_embeds is not None:
        raise ValueError("give either similarity or image_embeds/text_embeds, not both")
    ks = _check_args(ks, chunk_size, ties, max_memory)
    sim = torch.as_tensor(similarity)
    if sim.dim() != 2:
        raise ValueError(f"similarity must be 2-D (N_images, N_texts), got shape {tuple(sim.shape)}")
    if sim.shape[0] == 0 or sim.shape[1] == 0:
        raise ValueError(f"similarity must have at least one image and one text, got shape {tuple(sim.shape)}")
    if not sim.is_floating_point():
        raise ValueError(f"similarity must be a floating-point tensor, got dtype {sim.dtype}")
    num_images, num_texts = sim.shape
    pairs = _as_text_to_image(text_to_image, num_images, num_texts, sim.device)
    # Blocks are views of `similarity`; the budget bounds the temporaries made from them.
    rows = int(chunk_size) if chunk_size is not None else _rows_per_block(max_memory, num_images, num_texts, sim.element_size())
    with torch.no_grad():
        correct = torch.full((num_texts,), float("-inf"), dtype=sim.dtype, device=sim.device)
        correct.scatter_reduce_(0, pairs[1], sim[pairs[0], pairs[1]], reduce="amax")  # (N_t,) best correct image
        return _one_pass_metrics(lambda i0, i1: sim[i0:i1], correct, num_images, num_texts, pairs, ks, rows, ties,
                                 check_finite=True)
