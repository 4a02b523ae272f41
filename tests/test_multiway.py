"""Multiway transformer and M2-Encoder: branch routing, padding, shapes, save/load, sizes."""
import math

import pytest
import torch
import torch.nn.functional as F

import polymodal as pm
from polymodal.models.clip import CLIPOutput
from polymodal.models.factory import build_config
from polymodal.models.multiway import M2Encoder, MultiwayBlock, count_parameters

torch.set_num_threads(1)


def tiny(**overrides):
    torch.manual_seed(0)
    return pm.create_model("m2-tiny", overrides).eval()


def pixels(n=2, size=32, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def ids_with_pads(pad=0, eot=999):
    # [CLS]=1 then text, the end token, then pads.
    return torch.tensor([[1, 5, 6, 7, eot, pad, pad, pad],
                         [1, 8, 9, eot, pad, pad, pad, pad],
                         [1, 10, 11, 12, 13, 14, 15, eot]])


def params_by_group(model):
    """Split parameter names into vision-only, text-only and shared groups, by name alone."""
    vision, text, shared = [], [], []
    for name, _ in model.named_parameters():
        if ".branches.vision." in name or name.startswith(("stage1.norm.vision", "patch_embed", "cls",
                                                                "vision_pos", "visual_proj")):
            vision.append(name)
        elif ".branches.text." in name or name.startswith(("stage1.norm.text", "token_embed", "text_pos",
                                                                "text_proj")):
            text.append(name)
        elif name.startswith("stage2."):
            shared.append(name)
    return vision, text, shared


def grads_after(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}


def test_shapes_and_clip_output():
    model = tiny()
    out = model(pixels(), ids_with_pads())
    assert isinstance(out, CLIPOutput)
    assert out.image_embeds.shape == (2, 32) and out.text_embeds.shape == (3, 32)
    assert torch.allclose(out.image_embeds.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(out.text_embeds.norm(dim=-1), torch.ones(3), atol=1e-5)
    feats = model.image_features(pixels())
    assert feats.stage1.shape == feats.stage2.shape == (2, 1 + 16, 32)
    assert model.encode_image(pixels(), normalize=False).norm(dim=-1).sub(1).abs().max() > 1e-3


def test_image_path_touches_only_vision_branch_and_stage2():
    model = tiny()
    grads = grads_after(model, model.encode_image(pixels()).sum() * 3 + model.encode_image(pixels()).pow(2).sum())
    vision, text, shared = params_by_group(model)
    assert vision and text and shared
    assert all(grads[n] is None for n in text), [n for n in text if grads[n] is not None]
    assert all(grads[n] is not None and grads[n].abs().sum() > 0 for n in vision + shared)
    assert grads["logit_scale"] is None


def test_text_path_touches_only_text_branch_and_stage2():
    model = tiny()
    grads = grads_after(model, model.encode_text(ids_with_pads()).pow(3).sum())
    vision, text, shared = params_by_group(model)
    assert all(grads[n] is None for n in vision), [n for n in vision if grads[n] is not None]
    # Embedding rows of unused ids get zero gradient; every other text parameter gets some.
    assert all(grads[n] is not None and grads[n].abs().sum() > 0 for n in text + shared)


def test_stage2_is_one_shared_branch():
    model = tiny()
    assert list(model.stage2.blocks[0].branches) == ["shared"]
    assert list(model.stage1.blocks[0].branches) == ["vision", "text"]
    # Changing a shared weight changes both modalities' features.
    img0, txt0 = model.encode_image(pixels()), model.encode_text(ids_with_pads())
    with torch.no_grad():
        model.stage2.blocks[0].branches["shared"].fc2.weight.add_(0.5 * torch.randn_like(model.stage2.blocks[0].branches["shared"].fc2.weight))
    assert not torch.allclose(model.encode_image(pixels()), img0)
    assert not torch.allclose(model.encode_text(ids_with_pads()), txt0)


def test_padding_content_and_length_are_irrelevant():
    model = tiny()
    ids = ids_with_pads()
    base = model.text_features(ids)
    emb = model.encode_text(ids)
    other = ids.clone()
    pads = other == 0
    other[pads] = torch.randint(2, 900, (int(pads.sum()),), generator=torch.Generator().manual_seed(3))
    mask = ids != 0
    longer = torch.cat([ids, torch.zeros(3, 5, dtype=torch.long)], dim=1)
    assert torch.allclose(model.encode_text(other, attention_mask=mask), emb, atol=1e-6)
    assert torch.allclose(model.encode_text(longer), emb, atol=1e-6)
    same = model.text_features(other, attention_mask=mask)
    # Pad inputs are zeroed, so even the pad positions' own states do not depend on the pad token.
    assert torch.allclose(same.stage2, base.stage2, atol=1e-6)
    # Without the mask the pad content would matter: the mask is doing the work.
    no_mask = model.encode_text(other, attention_mask=torch.ones_like(ids, dtype=torch.bool))
    assert not torch.allclose(no_mask, emb, atol=1e-4)


def test_default_mask_keeps_first_end_token_when_pad_equals_end():
    model = tiny(**{"text.pad_token_id": 999, "text.eot_token_id": 999})
    ids = ids_with_pads(pad=999, eot=999)
    expected = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0], [1] * 8]).bool()
    assert torch.equal(model.text_mask(ids), expected)
    assert torch.allclose(model.encode_text(ids), model.encode_text(ids, attention_mask=expected), atol=1e-6)


def test_eot_pooling_reads_the_end_token():
    model = tiny(**{"text.pool": "eot"})
    ids = ids_with_pads()
    states = model.text_features(ids).stage2
    at = torch.tensor([4, 3, 7])
    ref = F.normalize(model.text_proj(states[torch.arange(3), at]), dim=-1)
    assert torch.allclose(model.encode_text(ids), ref, atol=1e-6)


def reference_block(block, x, split, heads):
    """Per-token weights picked by hand: token t uses the vision branch when t < split, else text."""
    B, L, D = x.shape
    names = ["vision" if t < split else "text" for t in range(L)]

    def per_token(fn, h):
        return torch.stack([fn(block.branches[names[t]], h[:, t]) for t in range(L)], dim=1)

    def ln(mod, h):
        return F.layer_norm(h, mod.normalized_shape, mod.weight, mod.bias, mod.eps)

    q, k, v = per_token(lambda b, h: b.qkv(ln(b.norm1, h)), x).chunk(3, dim=-1)
    split_heads = lambda t: t.reshape(B, L, heads, D // heads).transpose(1, 2)   # noqa: E731
    att = (split_heads(q) @ split_heads(k).transpose(-1, -2)) / math.sqrt(D // heads)
    y = (att.softmax(-1) @ split_heads(v)).transpose(1, 2).reshape(B, L, D)
    x = x + per_token(lambda b, h: b.out(ln(b.attn_norm, h)), y)
    return x + per_token(lambda b, h: b.fc2(ln(b.ffn_norm, F.gelu(b.fc1(ln(b.norm2, h))))), x)


@pytest.mark.parametrize("split", [0, 3, 7])
def test_multiway_block_routes_tokens_by_split(split):
    torch.manual_seed(0)
    block = MultiwayBlock(16, heads=2).eval()
    for p in block.parameters():  # LayerNorms away from identity so a wrong branch shows
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 7, 16)
    assert torch.allclose(block(x, split=split), reference_block(block, x, split, 2), atol=1e-5)


def test_multiway_block_rejects_missing_split():
    with pytest.raises(ValueError, match="split"):
        MultiwayBlock(16, heads=2)(torch.randn(1, 3, 16))


def test_save_load_round_trip(tmp_path):
    model = tiny()
    model.save_pretrained(tmp_path / "m2")
    loaded = pm.load_model(tmp_path / "m2")
    assert isinstance(loaded, M2Encoder)
    assert loaded.config == model.config
    assert torch.equal(loaded.encode_image(pixels()), model.encode_image(pixels()))
    assert torch.equal(loaded.encode_text(ids_with_pads()), model.encode_text(ids_with_pads()))
    assert loaded.config.vision.image_size == 32 and loaded.config.text.context_length == 32


def test_larger_images_use_resized_positions():
    model = tiny()
    assert model.encode_image(pixels(size=48)).shape == (2, 32)


def test_too_long_text_is_an_error():
    with pytest.raises(ValueError, match="context_length"):
        tiny().encode_text(torch.ones(1, 33, dtype=torch.long))


def test_grad_checkpointing_gives_the_same_features():
    model = tiny().train()
    ref = model.encode_text(ids_with_pads())
    model.set_grad_checkpointing(True)
    assert torch.allclose(model.encode_text(ids_with_pads()), ref, atol=1e-6)


def test_logit_scale_is_clamped():
    model = tiny()
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model.scale().item() == pytest.approx(100.0)


def formula_count(c) -> int:
    """Parameters by hand from the config (independent of the module code)."""
    D, H, E, p = c.width, int(c.width * c.mlp_ratio), c.embed_dim, c.vision.patch_size
    branch = 2 * 2 * D + (3 * D * D + 3 * D) + 2 * D + (D * D + D) + (D * H + H) + 2 * H + (H * D + D)
    grid = (c.vision.image_size // p) ** 2
    embeds = 3 * p * p * D + D + D + (1 + grid) * D + c.text.vocab_size * D + c.text.context_length * D
    return (c.layers * 2 * branch + 2 * 2 * D + c.vl_layers * branch + 2 * D + embeds + 2 * D * E + 1)


@pytest.mark.parametrize("name", ["m2-tiny", "m2-0.4b", "m2-1b"])
def test_parameter_counts_match_formula(name):
    cfg = build_config(name)
    assert count_parameters(cfg) == formula_count(cfg)


def test_published_sizes():
    # The released "0.4B" config (d768, 9+3 layers, vocab 115244) holds about 0.24B parameters in the
    # used path (0.26B with the released checkpoint's unused copies); 1B: d1024, 21+3 layers.
    assert 0.2e9 < count_parameters(build_config("m2-0.4b")) < 0.3e9
    assert 0.6e9 < count_parameters(build_config("m2-1b")) < 0.8e9
