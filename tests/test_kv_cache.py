"""KV-cached CoCa decoding equals the uncached path (whole prefix re-run every step), token for token."""
import pytest
import torch

from polymodal.models.coca import CachedStep
from polymodal.models.factory import create_model
from polymodal.models.layers import KVCache


def tiny(dtype=torch.float32, **overrides):
    torch.manual_seed(0)
    return create_model("coca-tiny", overrides or None).eval().to(dtype)


def images(B=4, seed=2, dtype=torch.float32):
    return torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(seed)).to(dtype)


def with_early_eos(m, px):
    """Make a token the uncached greedy captions emit mid-way the EOS id, so rows finish at different steps."""
    ids = m.generate(px, max_len=12, use_cache=False)
    m.config.text.eot_token_id = int(ids[0, 3])
    return m


@pytest.mark.parametrize("overrides", [{}, {"text.norm_first": False, "text.embed_norm": True},
                                       {"num_image_queries": 0}])
def test_cached_logits_match_the_full_prefix_at_every_step(overrides):
    m = tiny(torch.float64, **overrides)
    px = images(3, dtype=torch.float64)
    context = m.image_context(m.visual(px).tokens)
    ids = torch.randint(1, 990, (3, 9), generator=torch.Generator().manual_seed(5))
    step = CachedStep(m, context, max_len=9)
    slots = torch.arange(3)
    with torch.no_grad():
        for t in range(1, 10):
            got = step(ids[:, :t], slots)                                    # (3, V)
            want = m.decode(m.text(ids[:, :t]).tokens, context)[:, -1]
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_cached_step_on_a_subset_of_slots_reads_only_their_history():
    m = tiny(torch.float64)
    px = images(3, dtype=torch.float64)
    context = m.image_context(m.visual(px).tokens)
    ids = torch.randint(1, 990, (3, 5), generator=torch.Generator().manual_seed(6))
    step = CachedStep(m, context, max_len=5)
    with torch.no_grad():
        for t in range(1, 3):
            step(ids[:, :t], torch.arange(3))
        rows = torch.tensor([2, 0])                                          # row 1 finished
        for t in range(3, 6):
            got = step(ids[rows, :t], rows)
            want = m.decode(m.text(ids[rows, :t]).tokens, context[rows])[:, -1]
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_greedy_cached_equals_uncached(dtype):
    m = tiny(dtype)
    px = images(dtype=dtype)
    for max_len in (2, 12, m.text.max_tokens):
        assert torch.equal(m.generate(px, max_len=max_len), m.generate(px, max_len=max_len, use_cache=False))
    m = with_early_eos(m, px)
    got = m.generate(px, max_len=12)
    assert torch.equal(got, m.generate(px, max_len=12, use_cache=False))
    assert (got == m.pad_id).any() and got.shape[1] > 4                      # rows finished at different steps


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_beam_cached_equals_uncached(length_penalty):
    m = tiny()
    px = images()
    for beams in (1, 3):
        kw = dict(method="beam", max_len=10, num_beams=beams, length_penalty=length_penalty)
        assert torch.equal(m.generate(px, **kw), m.generate(px, use_cache=False, **kw))
    m = with_early_eos(m, px)
    kw = dict(method="beam", max_len=10, num_beams=3, length_penalty=length_penalty)
    got = m.generate(px, **kw)
    assert torch.equal(got, m.generate(px, use_cache=False, **kw))


def test_nucleus_cached_equals_uncached_with_the_same_seed():
    m = tiny()
    px = images()
    kw = dict(method="nucleus", max_len=14, top_p=0.9, temperature=1.5)
    got = m.generate(px, generator=torch.Generator().manual_seed(3), **kw)
    want = m.generate(px, generator=torch.Generator().manual_seed(3), use_cache=False, **kw)
    assert torch.equal(got, want)
    greedy = m.generate(px, max_len=14)
    assert not torch.equal(got, greedy)                                      # really sampled


def test_kv_cache_reorder_and_bounds():
    cache = KVCache(num_slots=3, max_len=2)
    k = torch.arange(3.0).view(3, 1, 1, 1)
    cache.write(None, 0, k, -k)
    cache.reorder(torch.tensor([2, 2, 0]), length=1)
    assert cache.k[:, 0, 0, 0].tolist() == [2.0, 2.0, 0.0] and cache.v[:, 0, 0, 0].tolist() == [-2.0, -2.0, 0.0]
    keys, _ = cache.write(torch.tensor([1]), 1, k[:1] + 10, k[:1])
    assert keys[0, 0, :, 0].tolist() == [2.0, 10.0]
    with pytest.raises(ValueError, match="past the cache length"):
        cache.write(None, 2, k, k)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cached_generation_on_gpu_equals_uncached():
    m = tiny().cuda()
    px = images(8).cuda()
    for kw in (dict(method="greedy"), dict(method="beam", num_beams=3)):
        assert torch.equal(m.generate(px, max_len=16, **kw), m.generate(px, max_len=16, use_cache=False, **kw))
    g1, g2 = (torch.Generator(device="cuda").manual_seed(1) for _ in range(2))
    assert torch.equal(m.generate(px, method="nucleus", max_len=16, generator=g1),
                       m.generate(px, method="nucleus", max_len=16, generator=g2, use_cache=False))


def test_bf16_autocast_generation_runs_cached_and_uncached():
    """bf16 rounds differently along the two paths, so only the layout is compared."""
    m = tiny()
    px = images()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = m.generate(px, max_len=8)
        want = m.generate(px, max_len=8, use_cache=False)
    assert got.shape == want.shape == (4, 8) and got.dtype == torch.long
    assert (got[:, 0] == m.bos_id).all()
    got[:, 0] = 0                                                            # an ordinary tensor: writable
