"""Towers and the CLIP dual encoder: shapes, normalisation, positions, patch dropout, text pooling."""
import pytest
import torch
import torch.nn.functional as F

from polymodal.models.clip import CLIP, CLIPConfig
from polymodal.models.layers import interpolate_positions
from polymodal.models.text import TextConfig, TextTower
from polymodal.models.vision import VisionConfig, VisionTower

EOT, PAD = 99, 0


def vision_cfg(**kw):
    return VisionConfig(**{"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "heads": 2, **kw})


def text_cfg(**kw):
    return TextConfig(**{"vocab_size": 100, "context_length": 16, "width": 32, "layers": 2, "heads": 2,
                         "eot_token_id": EOT, "pad_token_id": PAD, **kw})


def clip(**kw):
    torch.manual_seed(0)
    return CLIP(CLIPConfig(vision=vision_cfg(), text=text_cfg(), embed_dim=24, **kw)).eval()


def ids_with_eot(lengths, L=16, seed=0):
    """Rows `SOT tokens.. EOT pad..`; EOT at index `n` for each n in lengths."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 90, (len(lengths), L), generator=g)
    ids[:, 0] = 98
    for row, n in enumerate(lengths):
        ids[row, n] = EOT
        ids[row, n + 1:] = PAD
    return ids


def test_clip_shapes_and_normalisation():
    model = clip()
    pixels, ids = torch.randn(3, 3, 32, 32), ids_with_eot([3, 7, 15])
    with torch.no_grad():
        out = model(pixels, ids)
        raw_img = model.encode_image(pixels, normalize=False)
        raw_txt = model.encode_text(ids, normalize=False)
    assert out.image_embeds.shape == (3, 24) and out.text_embeds.shape == (3, 24)
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out.text_embeds.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out.image_embeds, raw_img / raw_img.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(out.text_embeds, raw_txt / raw_txt.norm(dim=-1, keepdim=True))
    assert out.logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-5)


def test_logit_scale_is_clamped():
    model = clip()
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model.scale().item() == pytest.approx(100.0)


def test_vision_tokens_shape_and_pooling():
    torch.manual_seed(0)
    tower = VisionTower(vision_cfg()).eval()
    out = tower(torch.randn(2, 3, 32, 32))
    assert out.pooled.shape == (2, 32) and out.tokens.shape == (2, 16, 32)
    tower_mean = VisionTower(vision_cfg(pool="mean")).eval()
    tower_mean.load_state_dict(tower.state_dict())
    out_mean = tower_mean(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(out_mean.pooled, out_mean.tokens.mean(dim=1))


def test_other_image_size_uses_bicubic_resized_positions():
    """A 4x4-grid tower on 48 px images equals a 6x6-grid tower whose table was resized by hand."""
    torch.manual_seed(0)
    small = VisionTower(vision_cfg()).eval()
    big = VisionTower(vision_cfg(image_size=48)).eval()
    state = dict(small.state_dict())
    W = 32
    grid = small.pos[1:].detach().reshape(1, 4, 4, W).permute(0, 3, 1, 2)
    resized = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)
    state["pos"] = torch.cat([small.pos[:1].detach(), resized.permute(0, 2, 3, 1).reshape(36, W)])
    big.load_state_dict(state)
    pixels = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        a, b = small(pixels), big(pixels)
    assert a.tokens.shape == (2, 36, W)
    torch.testing.assert_close(a.pooled, b.pooled, atol=1e-5, rtol=0)


def test_interpolation_keeps_prefix_and_constants():
    pos = torch.cat([torch.randn(1, 8), torch.full((16, 8), 0.3)])
    out = interpolate_positions(pos, (4, 4), (3, 5))
    assert out.shape == (16, 8)
    assert torch.equal(out[0], pos[0])
    torch.testing.assert_close(out[1:], torch.full((15, 8), 0.3))
    assert interpolate_positions(pos, (4, 4), (4, 4)) is pos


def test_patch_dropout_only_in_training():
    torch.manual_seed(0)
    tower = VisionTower(vision_cfg(patch_dropout=0.5))
    plain = VisionTower(vision_cfg())
    plain.load_state_dict(tower.state_dict())
    pixels = torch.randn(2, 3, 32, 32)
    tower.train()
    assert tower(pixels).tokens.shape == (2, 8, 32)
    tower.eval(), plain.eval()
    with torch.no_grad():
        out, ref = tower(pixels), plain(pixels)
    assert out.tokens.shape == (2, 16, 32)
    torch.testing.assert_close(out.pooled, ref.pooled)


def test_causal_text_pools_first_eot_and_ignores_what_follows():
    torch.manual_seed(0)
    tower = TextTower(text_cfg()).eval()
    ids = ids_with_eot([4, 9])
    ids[0, 12] = EOT                                  # a second EOT must not be the one pooled
    with torch.no_grad():
        out = tower(ids)
        for row, n in enumerate((4, 9)):
            # causal: the EOT state equals a run on the prefix up to EOT alone
            alone = tower(ids[row:row + 1, :n + 1])
            torch.testing.assert_close(out.pooled[row], alone.tokens[0, n], atol=1e-5, rtol=0)
        changed = ids.clone()
        changed[0, 5:] = torch.randint(1, 90, (11,))
        changed[1, 10:] = torch.randint(1, 90, (6,))
        torch.testing.assert_close(tower(changed).pooled, out.pooled)


def test_argmax_pool_is_largest_id():
    torch.manual_seed(0)
    tower = TextTower(text_cfg(pool="argmax")).eval()
    ids = ids_with_eot([6])
    with torch.no_grad():
        out = tower(ids)
    torch.testing.assert_close(out.pooled[0], out.tokens[0, 6])


def test_bidirectional_padding_mask_makes_pad_content_irrelevant():
    torch.manual_seed(0)
    tower = TextTower(text_cfg(causal=False, pool="cls")).eval()
    ids = ids_with_eot([5, 11])
    with torch.no_grad():
        out = tower(ids)
        # the unpadded sequence alone gives the same CLS state
        alone = tower(ids[:1, :6])
        torch.testing.assert_close(out.pooled[0], alone.pooled[0], atol=1e-5, rtol=0)
        # with an explicit mask, whatever sits in the masked positions does not matter
        mask = ids != PAD
        noisy = torch.where(mask, ids, torch.randint(1, 90, ids.shape))
        torch.testing.assert_close(tower(noisy, attention_mask=mask).pooled, out.pooled, atol=1e-6, rtol=0)
        # and without the mask the noise does matter (the test can fail)
        assert not torch.allclose(tower(noisy).pooled, out.pooled, atol=1e-3)


def test_too_long_text_is_an_error():
    tower = TextTower(text_cfg())
    with pytest.raises(ValueError, match="at most 16"):
        tower(torch.zeros(1, 17, dtype=torch.long))


def test_patch_embedding_matches_the_convolution():
    torch.manual_seed(0)
    tower = VisionTower(vision_cfg(patch_bias=True))
    pixels = torch.randn(2, 3, 40, 36)                 # not whole patches: the remainder is dropped
    ref = tower.patch_embed(pixels).flatten(2).transpose(1, 2)
    got, gh, gw = tower.patchify(pixels)
    assert (gh, gw) == (5, 4)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kw", [dict(), dict(pool="argmax"), dict(num_readout_tokens=2),
                                dict(causal=False, pool="cls"), dict(causal=False, pool="cls", num_readout_tokens=2),
                                dict(causal=False, pool="cls", pooler="dense_tanh", norm_first=False,
                                     embed_norm=True)])
def test_text_pooled_only_gives_the_same_pooled_and_readouts(kw):
    torch.manual_seed(0)
    tower = TextTower(text_cfg(**kw)).eval()
    K = tower.config.num_readout_tokens
    ids = ids_with_eot([3, 8], L=16 - K)
    with torch.no_grad():
        full, fast = tower(ids), tower(ids, pooled_only=True)
    torch.testing.assert_close(fast.pooled, full.pooled, atol=1e-5, rtol=0)
    if K:
        torch.testing.assert_close(fast.readouts, full.readouts, atol=1e-5, rtol=0)
    assert fast.tokens.shape == (2, 1 + K, 32)


def test_text_pooled_only_gradients_match():
    """Same gradients (in float64, where fp32 rounding noise of either path cannot hide a difference)."""
    torch.manual_seed(0)
    tower = TextTower(text_cfg()).double()
    ids = ids_with_eot([3, 8])
    grads = []
    for pooled_only in (False, True):
        tower.zero_grad()
        tower(ids, pooled_only=pooled_only).pooled.square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in tower.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-10, rtol=1e-8, msg=name)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_vision_pooled_only_matches_full(checkpointing):
    torch.manual_seed(0)
    tower = VisionTower(vision_cfg())
    tower.transformer.grad_checkpointing = checkpointing
    pixels = torch.randn(2, 3, 32, 32)
    full, fast = tower(pixels).pooled, tower(pixels, pooled_only=True)
    torch.testing.assert_close(fast.pooled, full, atol=1e-5, rtol=0)
    assert fast.tokens.shape == (2, 0, 32)
    fast.pooled.sum().backward()
    assert tower.transformer.blocks[0].attn.qkv.weight.grad is not None


def test_clip_encoders_equal_full_tower_outputs():
    """encode_* take the fast paths; they must equal projecting the full towers' pooled states."""
    model = clip()
    pixels, ids = torch.randn(2, 3, 32, 32), ids_with_eot([3, 8])
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(pixels, normalize=False),
                                   model.visual_proj(model.visual(pixels).pooled), atol=1e-5, rtol=0)
        torch.testing.assert_close(model.encode_text(ids, normalize=False),
                                   model.text_proj(model.text(ids).pooled), atol=1e-5, rtol=0)
