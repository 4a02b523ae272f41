"""SyCoCa: mask selection, TG-MIM targets and loss, the task's losses, analysis helpers, a short training run."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from polymodal.methods.sycoca import SyCoCaConfig, SyCoCaTask, mask_hit_rate, reconstruction_error
from polymodal.models.factory import create_model
from polymodal.models.mim import (masked_mse, mim_target, patch_relevance, patchify, select_mask,
                                  visible_indices)

PAD, BOS, EOS = 0, 998, 999


def batch(B=4, L=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 990, (B, L), generator=g)
    ids[:, 0] = BOS
    for i in range(B):
        n = 4 + i % 4
        ids[i, n - 1] = EOS
        ids[i, n:] = PAD
    return {"pixels": torch.randn(B, 3, 32, 32, generator=g), "input_ids": ids}


def task(**cfg) -> SyCoCaTask:
    torch.manual_seed(0)
    model = create_model("coca-tiny")
    return SyCoCaTask(model, SyCoCaConfig(decoder_width=32, decoder_heads=2, decoder_layers=1, **cfg))


# ---- mask selection ------------------------------------------------------------------------------
def test_attentive_mask_picks_the_most_or_least_relevant_patches():
    g = torch.Generator().manual_seed(0)
    rel = torch.rand(3, 16, generator=g)
    for direction, pick in (("most", lambda r: r.topk(6).indices), ("least", lambda r: (-r).topk(6).indices)):
        mask = select_mask(16, 6 / 16, rel, attentive_ratio=1.0, direction=direction)
        for b in range(3):
            assert set(mask[b].nonzero().squeeze(1).tolist()) == set(pick(rel[b]).tolist())


def test_mixed_mask_has_exact_counts_and_a_disjoint_random_part():
    rel = torch.arange(64, dtype=torch.float).repeat(2, 1)        # patch 63 most relevant
    top = set(range(64 - 16, 64))                                 # n = 32, n_att = 16
    random_parts = []
    for seed in range(5):
        mask = select_mask(64, 0.5, rel, attentive_ratio=0.5, generator=torch.Generator().manual_seed(seed))
        assert (mask.sum(1) == 32).all()
        for b in range(2):
            chosen = set(mask[b].nonzero().squeeze(1).tolist())
            assert top <= chosen
            random_parts.append(frozenset(chosen - top))
    assert len(set(random_parts)) > 1                              # the rest is drawn, not fixed
    assert any(min(p) < 40 for p in random_parts)                  # and from anywhere outside the top set


def test_random_mask_count_and_rough_uniformity():
    g = torch.Generator().manual_seed(0)
    mask = select_mask(16, 0.25, None, batch_size=2000, generator=g)
    assert (mask.sum(1) == 4).all()
    freq = mask.float().mean(0)
    assert torch.allclose(freq, torch.full((16,), 0.25), atol=0.04)
    keep = visible_indices(mask)
    assert keep.shape == (2000, 12)
    assert not mask.gather(1, keep).any()


def test_patch_relevance_is_a_softmax_of_scaled_dot_products():
    g = torch.Generator().manual_seed(0)
    t, p = torch.randn(2, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    want = np.exp(3.0 * np.einsum("be,bpe->bp", t.numpy(), p.numpy()))
    want /= want.sum(1, keepdims=True)
    assert np.allclose(patch_relevance(t, p, 3.0).numpy(), want, atol=1e-5)


# ---- targets and loss ----------------------------------------------------------------------------
def test_patchify_order_matches_the_vit_patch_embedding():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 16, 24, generator=g)
    conv = torch.nn.Conv2d(3, 7, 8, 8, bias=False)
    tokens = conv(x).flatten(2).transpose(1, 2)                    # the ViT's token order
    w = conv.weight.permute(0, 2, 3, 1).reshape(7, -1)             # (row, col, channel) flattening
    assert torch.allclose(patchify(x, 8) @ w.T, tokens, atol=1e-5)


def test_normalised_pixel_target():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 16, 16, generator=g) * 3 + 1
    got = mim_target(x, 8, norm_pix=True)
    arr = x[0].numpy()
    for k in range(4):
        r, c = divmod(k, 2)
        patch = arr[:, 8 * r:8 * r + 8, 8 * c:8 * c + 8].transpose(1, 2, 0).reshape(-1)
        want = (patch - patch.mean()) / np.sqrt(patch.var(ddof=1) + 1e-6)
        assert np.allclose(got[0, k].numpy(), want, atol=1e-4)
    assert torch.allclose(mim_target(x, 8, norm_pix=False), patchify(x, 8))


def test_mim_loss_counts_only_masked_patches():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 6, 5, generator=g), torch.randn(2, 6, 5, generator=g)
    mask = torch.tensor([[1, 0, 1, 0, 0, 0], [0, 1, 0, 0, 1, 1]], dtype=torch.bool)
    loss = masked_mse(pred, target, mask)
    want = torch.stack([((pred[b, p] - target[b, p]) ** 2).mean() for b in range(2) for p in range(6) if mask[b, p]]).mean()
    assert torch.allclose(loss, want)
    changed = pred.clone()
    changed[~mask] += 10.0                                         # visible predictions do not matter
    assert torch.allclose(masked_mse(changed, target, mask), loss)
    changed[0, 0] += 1.0                                           # masked ones do
    assert not torch.allclose(masked_mse(changed, target, mask), loss)


def test_encoder_sees_only_visible_patches():
    t = task(masking="random")
    b = batch()
    m = t.model
    mask = select_mask(16, 0.5, None, batch_size=4, generator=torch.Generator().manual_seed(0))
    txt = m.text(b["input_ids"])
    tmask = torch.ones_like(b["input_ids"], dtype=torch.bool)
    pred = t.reconstruct(b["pixels"], mask, txt.tokens, tmask)
    px = b["pixels"].clone()
    pm = patchify(px, 8)
    pm[mask] = torch.randn_like(pm[mask])                          # new content in masked patches only
    px2 = pm.view(4, 4, 4, 8, 8, 3).permute(0, 5, 1, 3, 2, 4).reshape(4, 3, 32, 32)
    assert torch.allclose(patchify(px2, 8)[~mask], patchify(px, 8)[~mask])
    assert torch.allclose(t.reconstruct(px2, mask, txt.tokens, tmask), pred, atol=1e-5)
    # ... and the decoder reads the text
    other = m.text(batch(seed=5)["input_ids"]).tokens
    assert (t.reconstruct(b["pixels"], mask, other, tmask) - pred).abs().max() > 1e-4


# ---- the task --------------------------------------------------------------------------------------
def local_infonce(img, txt, scale):
    """Independent symmetric InfoNCE for a single process."""
    logits = scale * img @ txt.T
    labels = torch.arange(len(img))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def test_coca_task_is_itc_plus_weighted_captioning():
    t = task(masking="none")
    assert t.mim_head is None
    b = batch()
    out = t(b)
    m = t.model
    o = m(b["pixels"], b["input_ids"])
    itc = local_infonce(o.image_embeds, o.text_embeds, o.logit_scale)
    assert torch.allclose(out["itc"], itc, atol=1e-5)
    assert out["mim"].item() == 0.0
    assert torch.allclose(out["loss"], itc + 2.0 * out["ic"], atol=1e-5)


@pytest.mark.parametrize("masking", ["attentive", "random"])
def test_sycoca_task_losses_and_gradients(masking):
    t = task(masking=masking, lambda_mim=0.5)
    out = t(batch())
    assert set(out) == {"loss", "itc", "ic", "mim"}
    assert torch.allclose(out["loss"], out["itc"] + 2 * out["ic"] + 0.5 * out["mim"], atol=1e-5)
    out["loss"].backward()
    assert t.mim_head.mask_token.grad.abs().sum() > 0
    assert t.model.visual.patch_embed.weight.grad.abs().sum() > 0
    assert t.model.text.token_embed.weight.grad.abs().sum() > 0


def test_attentive_masking_follows_the_relevance():
    t = task(masking="attentive", mask_ratio=0.25, attentive_ratio=1.0)
    b = batch()
    m = t.model
    with torch.no_grad():
        vis = m.visual(b["pixels"])
        temb = m.encode_text(b["input_ids"])
        rel = t.relevance(vis.tokens, temb)
        mask = t.choose_mask(vis.tokens, temb)
    assert not rel.requires_grad
    want = F.normalize(m.patch_embeds(vis.tokens), dim=-1) @ temb[..., None] * m.scale()
    assert torch.allclose(rel, want.squeeze(-1).softmax(-1), atol=1e-5)
    for i in range(4):
        assert set(mask[i].nonzero().squeeze(1).tolist()) == set(rel[i].topk(4).indices.tolist())


# ---- analysis helpers ------------------------------------------------------------------------------
def test_reconstruction_error_uses_one_mask_and_the_given_captions():
    t = task(masking="attentive").eval()
    b = batch()
    shuffled = b["input_ids"][torch.tensor([1, 2, 3, 0])]
    err = reconstruction_error(t, b, b["input_ids"], generator=torch.Generator().manual_seed(0))
    again = reconstruction_error(t, b, b["input_ids"], generator=torch.Generator().manual_seed(0))
    other = reconstruction_error(t, b, shuffled, generator=torch.Generator().manual_seed(0))
    assert err.shape == (4,) and torch.equal(err, again)
    assert not torch.allclose(err, other)
    mask = select_mask(16, 0.5, None, batch_size=4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        txt = t.model.text(b["input_ids"]).tokens
        from polymodal.models.coca import caption_mask
        pred = t.reconstruct(b["pixels"], mask, txt, caption_mask(b["input_ids"], EOS, PAD))
    want = masked_mse(pred, mim_target(b["pixels"], 8), mask, reduction="none")
    assert torch.allclose(reconstruction_error(t, b, b["input_ids"], mask=mask), want, atol=1e-6)


def test_mask_hit_rate_by_hand():
    # 32 px image, 8 px patches: 4 x 4 grid. Box [6, 6, 10, 10] touches patches 0, 1, 4, 5;
    # [0, 0, 8, 8] only patch 0 (x1, y1 exclusive).
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, [0, 5, 15]] = True
    mask[1, [0, 1]] = True
    rate = mask_hit_rate(mask, [[[6, 6, 10, 10]], [[0, 0, 8, 8]]], 32, 8)
    assert rate == pytest.approx((2 + 1) / 5)
    assert mask_hit_rate(mask, [[], []], 32, 8) == 0.0
    with pytest.raises(ValueError, match="patches"):
        mask_hit_rate(mask, [[], []], 64, 8)


# ---- a short training run ------------------------------------------------------------------------
def test_thirty_steps_reduce_the_total_loss():
    torch.manual_seed(0)
    t = task(masking="attentive").train()
    b = batch(B=8, seed=3)
    opt = torch.optim.AdamW(t.parameters(), lr=2e-3)
    losses = []
    for _ in range(30):
        out = t(b)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    assert out["mim"].item() > 0


def test_recipe_loss_section_reaches_the_itc_term():
    from polymodal.train.run import build_task, load_recipe
    model = create_model("coca-tiny")
    task = build_task(load_recipe(None, ["method=sycoca", "loss.gather=local", "sycoca={masking: none}"]), model)
    assert task.loss_cfg.gather == "local" and task.mim_head is None
    with pytest.raises(ValueError, match="infonce"):
        build_task(load_recipe(None, ["method=sycoca", "loss.kind=siglip"]), model)
