"""One-pass retrieval equals the two-pass code it replaced, on random inputs with and without ties.

`_two_pass_reference` is the previous implementation (one pass per direction), kept here and only
here as the reference.
"""
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from polymodal.eval.retrieval import _check_finite, _median, embed_and_score, metrics_from_rows, retrieval_metrics


def _two_pass_reference(image_rows: Callable[[int, int], Tensor], text_rows: Callable[[int, int], Tensor],
                       num_images: int, num_texts: int, t2i: Tensor, ks: tuple[int, ...],
                       chunk_size: int, ties: str, check_finite: bool) -> dict[str, float]:
    """The previous two-pass core (one scoring pass per direction).

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



def _old_from_similarity(sim, t2i, ties, chunk_size=5):
    t2i = torch.as_tensor(t2i).long()
    return _two_pass_reference(lambda i0, i1: sim[i0:i1], lambda j0, j1: sim[:, j0:j1].T, sim.shape[0],
                               sim.shape[1], t2i, (1, 5, 10), chunk_size, ties, check_finite=True)


def _old_from_embeddings(img, txt, t2i, ties, chunk_size=5):
    t2i = torch.as_tensor(t2i).long()
    return _two_pass_reference(lambda i0, i1: img[i0:i1] @ txt.T, lambda j0, j1: txt[j0:j1] @ img.T, len(img),
                               len(txt), t2i, (1, 5, 10), chunk_size, ties, check_finite=False)


def _random_case(seed: int, n_img: int, max_texts: int, levels: int | None):
    """Random ownership (1..max_texts texts per image, shuffled); with `levels`, embeddings take few
    small integer values, so dot products are exact and ties are frequent."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, max_texts + 1, (n_img,), generator=g)
    t2i = torch.repeat_interleave(torch.arange(n_img), counts)
    t2i = t2i[torch.randperm(len(t2i), generator=g)]
    if levels is None:
        img = torch.randn(n_img, 8, generator=g)
        txt = img[t2i] + 2.0 * torch.randn(len(t2i), 8, generator=g)
    else:
        img = torch.randint(-levels, levels + 1, (n_img, 4), generator=g).float()
        txt = torch.randint(-levels, levels + 1, (len(t2i), 4), generator=g).float()
    return img, txt, t2i


@pytest.mark.parametrize("ties", ["pessimistic", "optimistic"])
@pytest.mark.parametrize("seed", range(6))
def test_one_pass_equals_two_pass_with_many_ties(seed, ties):
    img, txt, t2i = _random_case(seed, n_img=37, max_texts=4, levels=1 + seed % 2)
    sim = img @ txt.T
    assert (sim[:, :, None] == sim[:, None, :]).any(0).float().mean() > 0.05     # ties really occur
    want = _old_from_similarity(sim, t2i, ties)
    for rows in (1, 4, 100):
        assert retrieval_metrics(sim, t2i, chunk_size=rows, ties=ties) == want
        assert embed_and_score(img, txt, t2i, rows, ties=ties) == _old_from_embeddings(img, txt, t2i, ties)
    assert embed_and_score(img, txt, t2i, ties=ties) == want


@pytest.mark.parametrize("ties", ["pessimistic", "optimistic"])
@pytest.mark.parametrize("seed", range(3))
def test_one_pass_equals_two_pass_on_continuous_scores(seed, ties):
    img, txt, t2i = _random_case(100 + seed, n_img=60, max_texts=5, levels=None)
    sim = img @ txt.T
    want = _old_from_similarity(sim, t2i, ties)
    assert 0 < want["text_to_image_R@1"] < 100 and 0 < want["image_to_text_R@1"] < 100
    assert retrieval_metrics(sim, t2i, ties=ties) == want
    assert retrieval_metrics(sim.double(), t2i, chunk_size=7, ties=ties) == _old_from_similarity(sim.double(), t2i, ties)


def test_low_precision_similarity_with_ties():
    img, txt, t2i = _random_case(7, n_img=30, max_texts=3, levels=None)
    sim = (img @ txt.T).to(torch.bfloat16)                                   # rounding makes exact ties
    for ties in ("pessimistic", "optimistic"):
        assert retrieval_metrics(sim, t2i, chunk_size=3, ties=ties) == _old_from_similarity(sim, t2i, ties)


def test_block_size_follows_the_memory_budget(monkeypatch):
    """A budget of ~3 rows of scores gives 3-row blocks; the result does not depend on it."""
    import polymodal.eval.retrieval as r
    img, txt, t2i = _random_case(3, n_img=20, max_texts=3, levels=1)
    seen = []
    real = r._one_pass_metrics

    def spy(image_rows, correct, n_i, n_t, t2i_, ks, block_rows, ties, check_finite):
        seen.append(block_rows)
        return real(image_rows, correct, n_i, n_t, t2i_, ks, block_rows, ties, check_finite)

    monkeypatch.setattr(r, "_one_pass_metrics", spy)
    budget = 3 * len(txt) * 4 + 48 * (len(img) + len(txt)) + (64 << 20) + 1
    got = embed_and_score(img, txt, t2i, max_memory=budget)
    assert seen == [3]
    assert got == _old_from_embeddings(img, txt, t2i, "pessimistic")
    with pytest.raises(ValueError, match="max_memory"):
        embed_and_score(img, txt, t2i, max_memory=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_one_pass_on_gpu_equals_cpu():
    img, txt, t2i = _random_case(11, n_img=300, max_texts=5, levels=2)
    want = embed_and_score(img, txt, t2i)
    assert embed_and_score(img.cuda(), txt.cuda(), t2i.cuda(), max_memory=1 << 16) == want
    assert embed_and_score(img.cuda(), txt.cuda(), t2i, ties="optimistic") == embed_and_score(img, txt, t2i,
                                                                                                ties="optimistic")


@pytest.mark.parametrize("ties", ["pessimistic", "optimistic"])
def test_callable_entry_for_custom_similarities_equals_two_pass(ties):
    """`metrics_from_rows` (eval/hierarchy_retrieval.py's entry, with its own similarity) keeps the results."""
    img, txt, t2i = _random_case(21, n_img=25, max_texts=4, levels=1)
    sim = img @ txt.T
    own = sim[t2i, torch.arange(len(t2i))]
    got = metrics_from_rows(lambda i0, i1: sim[i0:i1], own, t2i, 25, (1, 5, 10), 4, ties)
    assert got == _old_from_similarity(sim, t2i, ties)


def test_callable_entry_rejects_non_finite_own_scores():
    img, txt, t2i = _random_case(22, n_img=10, max_texts=3, levels=1)
    sim = img @ txt.T
    own = sim[t2i, torch.arange(len(t2i))].clone()
    own[3] = float("nan")
    with pytest.raises(ValueError, match="first at text 3"):
        metrics_from_rows(lambda i0, i1: sim[i0:i1], own, t2i, 10)


def test_finite_check_runs_in_slices_and_names_the_row():
    x = torch.zeros(70000, 64)                                   # 16 MB slices of 65536 rows: two slices
    _check_finite(x, "text_embeds")
    x[65540, 3] = float("inf")
    with pytest.raises(ValueError, match=r"text_embeds contains NaN or inf \(first in row 65540\)"):
        _check_finite(x, "text_embeds")
    with pytest.raises(ValueError, match="first in row 7"):
        _check_finite(torch.tensor([0.0] * 7 + [float("nan")]), "scores")
