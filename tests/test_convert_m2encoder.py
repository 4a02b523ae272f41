"""Importing the released M2-Encoder key layout, checked against a reference forward on the raw tensors.

The reference below is written from the layout facts of the released code (torchscale BEiT-3 with
multiway A/B copies, sub-LN, fairseq position offset 2, stage 2 run through branch A, ITC heads on
the stage-2 CLS state) and reads the released key names directly; it shares no code with the model.
"""
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import polymodal as pm
from polymodal.convert import m2encoder
from polymodal.hub import CheckpointError
from polymodal.models.multiway import M2Encoder

torch.set_num_threads(1)

W, HEADS, LAYERS, VL, VOCAB, PATCH, IMAGE, EMBED, CTX, TEXT_ROWS = 32, 2, 2, 1, 100, 8, 32, 24, 12, 40
CLS_ID, END_ID = 98, 99   # end token doubles as pad, as in the released GLM tokenizer
RELEASED_CONFIG = {"encoder_layers": LAYERS, "beit3_vl_layers": VL, "encoder_embed_dim": W,
                   "encoder_attention_heads": HEADS, "out_embed_dim": EMBED, "image_size": IMAGE,
                   "patch_size": PATCH, "vocab_size": VOCAB, "max_text_len": CTX}


def released_state(seed=0, sub_ln=True, width=W):
    """A random state dict in the released key layout, including the keys the import drops."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.2            # noqa: E731
    ln = lambda n: 1 + torch.randn(n, generator=g) * 0.2          # noqa: E731
    D, H = width, 4 * width
    sd = {
        "backbone.text_embed.weight": r(VOCAB, D),
        "backbone.vision_embed.proj.weight": r(D, 3, PATCH, PATCH),
        "backbone.vision_embed.proj.bias": r(D),
        "backbone.vision_embed.cls_token": r(1, 1, D),
        "backbone.vision_embed.mask_token": r(1, 1, D),
        "backbone.encoder.embed_positions.A.weight": r(2 + 1 + (IMAGE // PATCH) ** 2, D),
        "backbone.encoder.embed_positions.B.weight": r(TEXT_ROWS, D),
        "itc_image_proj.fc.weight": r(EMBED, D), "itc_text_proj.fc.weight": r(EMBED, D),
        "itc_vl_image_proj.fc.weight": r(EMBED, D), "itc_vl_text_proj.fc.weight": r(EMBED, D),
        "logit_scale": torch.tensor(2.5), "logit_vl_scale": torch.tensor(2.0),
        "pooler.dense.weight": r(D, D), "pooler.dense.bias": r(D), "norm.weight": ln(D), "norm.bias": r(D),
    }

    def layer(prefix):
        for X in "AB":
            for n in "qkv":
                sd[f"{prefix}.self_attn.{n}_proj.{X}.weight"], sd[f"{prefix}.self_attn.{n}_proj.{X}.bias"] = r(D, D), r(D)
            sd[f"{prefix}.self_attn.out_proj.{X}.weight"], sd[f"{prefix}.self_attn.out_proj.{X}.bias"] = r(D, D), r(D)
            for n, size in (("self_attn_layer_norm", D), ("final_layer_norm", D), ("self_attn.inner_attn_ln", D),
                            (f"ffn.{X}.ffn_layernorm", H)):
                if "inner" in n or "ffn_layernorm" in n:
                    if not sub_ln:
                        continue
                key = f"{prefix}.{n}" if n.startswith("ffn.") else f"{prefix}.{n}.{X}"
                sd[f"{key}.weight"], sd[f"{key}.bias"] = ln(size), r(size)
            sd[f"{prefix}.ffn.{X}.fc1.weight"], sd[f"{prefix}.ffn.{X}.fc1.bias"] = r(H, D), r(H)
            sd[f"{prefix}.ffn.{X}.fc2.weight"], sd[f"{prefix}.ffn.{X}.fc2.bias"] = r(D, H), r(D)

    for i in range(LAYERS):
        layer(f"backbone.encoder.layers.{i}")
    for i in range(VL):
        layer(f"backbone_vl.layers.{i}")
    for enc in ("backbone.encoder", "backbone_vl"):
        for X in "AB":
            sd[f"{enc}.layer_norm.{X}.weight"], sd[f"{enc}.layer_norm.{X}.bias"] = ln(D), r(D)
    return sd


# ---- reference forward on the raw released tensors ----
def ref_layer(sd, p, X, x, pad, heads, sub_ln=True):
    B, L, D = x.shape
    lnorm = lambda h, n: F.layer_norm(h, h.shape[-1:], sd[f"{n}.weight"], sd[f"{n}.bias"], 1e-5)  # noqa: E731
    lin = lambda h, n: h @ sd[f"{n}.weight"].T + sd[f"{n}.bias"]                                 # noqa: E731
    h = lnorm(x, f"{p}.self_attn_layer_norm.{X}")
    q, k, v = (lin(h, f"{p}.self_attn.{n}_proj.{X}").view(B, L, heads, -1).transpose(1, 2) for n in "qkv")
    scores = (q * (D // heads) ** -0.5) @ k.transpose(-1, -2)                    # (B, H, L, L)
    if pad is not None:
        scores = scores.masked_fill(pad[:, None, None, :], float("-inf"))
    a = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, L, D)
    if sub_ln:
        a = lnorm(a, f"{p}.self_attn.inner_attn_ln.{X}")
    x = x + lin(a, f"{p}.self_attn.out_proj.{X}")
    h = F.gelu(lin(lnorm(x, f"{p}.final_layer_norm.{X}"), f"{p}.ffn.{X}.fc1"))
    if sub_ln:
        h = lnorm(h, f"{p}.ffn.{X}.ffn_layernorm")
    return x + lin(h, f"{p}.ffn.{X}.fc2")


def ref_encode(sd, x, X, pad, heads, sub_ln=True, head="itc_vl_image_proj"):
    """Stage 1 with branch X, stage 2 with branch A, stage-2 CLS -> ITC head -> L2 norm."""
    for enc, n, branch in (("backbone.encoder", LAYERS, X), ("backbone_vl", VL, "A")):
        if pad is not None:
            x = x * (~pad)[..., None]
        for i in range(n):
            x = ref_layer(sd, f"{enc}.layers.{i}", branch, x, pad, heads, sub_ln)
        x = F.layer_norm(x, x.shape[-1:], sd[f"{enc}.layer_norm.{branch}.weight"],
                         sd[f"{enc}.layer_norm.{branch}.bias"], 1e-5)
    return F.normalize(x[:, 0] @ sd[f"{head}.fc.weight"].T, dim=-1)


def ref_image(sd, pixels, heads=HEADS, sub_ln=True):
    x = F.conv2d(pixels, sd["backbone.vision_embed.proj.weight"], sd["backbone.vision_embed.proj.bias"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd["backbone.vision_embed.cls_token"].expand(len(x), 1, -1), x], dim=1)
    x = x + sd["backbone.encoder.embed_positions.A.weight"][2:2 + x.shape[1]]   # fairseq offset 2
    return ref_encode(sd, x, "A", None, heads, sub_ln, "itc_vl_image_proj")


def ref_text(sd, ids, text_masks, heads=HEADS, sub_ln=True):
    x = sd["backbone.text_embed.weight"][ids] + sd["backbone.encoder.embed_positions.B.weight"][2:2 + ids.shape[1]]
    return ref_encode(sd, x, "B", text_masks == 0, heads, sub_ln, "itc_vl_text_proj")


def sample_inputs(size=IMAGE):
    g = torch.Generator().manual_seed(7)
    pixels = torch.randn(2, 3, size, size, generator=g)
    ids = torch.tensor([[CLS_ID, 5, 6, 7, END_ID, END_ID, END_ID, END_ID],
                        [CLS_ID, 8, 9, 10, 11, 12, 13, END_ID],
                        [CLS_ID, 14, END_ID, END_ID, END_ID, END_ID, END_ID, END_ID]])
    masks = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0], [1] * 8, [1, 1, 1, 0, 0, 0, 0, 0]])
    return pixels, ids, masks


def write(tmp_path, sd, name="m2_encoder_tiny.ckpt", config=RELEASED_CONFIG):
    d = tmp_path / "release"
    d.mkdir(exist_ok=True)
    if name.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in sd.items()}, str(d / name))
    else:
        torch.save(sd, d / name)
    if config is not None:
        (d / "Encoder_tiny.json").write_text(json.dumps(config))
    return d / name


def check_matches_reference(model, sd, heads=HEADS, sub_ln=True):
    pixels, ids, masks = sample_inputs()
    with torch.no_grad():
        assert torch.allclose(model.encode_image(pixels), ref_image(sd, pixels, heads, sub_ln), atol=1e-5)
        assert torch.allclose(model.encode_text(ids, attention_mask=masks), ref_text(sd, ids, masks, heads, sub_ln),
                              atol=1e-5)


def test_released_layout_loads_and_matches_reference_forward(tmp_path):
    sd = released_state()
    path = write(tmp_path, sd)
    assert m2encoder.detect(path) and m2encoder.detect(path.parent)
    model = pm.load_model(path, pad_token_id=END_ID, eot_token_id=END_ID)
    assert isinstance(model, M2Encoder)
    assert (model.config.width, model.config.layers, model.config.vl_layers, model.config.heads) == (W, LAYERS, VL, HEADS)
    assert model.config.text.context_length == CTX and model.config.embed_dim == EMBED
    check_matches_reference(model, sd)
    # The default padding rule (pad == end id: the first end token is real) gives the tokenizer's mask.
    _, ids, masks = sample_inputs()
    with torch.no_grad():
        assert torch.allclose(model.encode_text(ids), ref_text(sd, ids, masks), atol=1e-5)
    assert model.scale().item() == pytest.approx(torch.tensor(2.5).exp().item())
    assert model.image_transform.mean == (0.5, 0.5, 0.5) and model.image_transform.resize == "squash"


def test_sizes_inferred_from_shapes_without_config(tmp_path):
    sd = released_state(seed=1)
    path = write(tmp_path, sd, "weights.safetensors", config=None)
    assert m2encoder.detect(path)
    model = pm.load_model(path)                     # width 32 -> one head by the width/64 rule
    assert model.config.heads == 1 and model.config.text.context_length == TEXT_ROWS - 2  # table shorter than 52
    pixels, _, _ = sample_inputs()
    with torch.no_grad():
        assert torch.allclose(model.encode_image(pixels), ref_image(sd, pixels, heads=1), atol=1e-5)
    model2 = m2encoder.load(path, heads=HEADS, context_length=CTX)
    check_matches_reference(model2, sd)


def test_without_sub_ln(tmp_path):
    sd = released_state(seed=2, sub_ln=False)
    model = m2encoder.load(write(tmp_path, sd))
    assert model.config.sub_ln is False
    check_matches_reference(model, sd, sub_ln=False)


def test_position_offset_rows_are_never_read(tmp_path):
    sd = released_state(seed=3)
    a = m2encoder.load(write(tmp_path, sd))
    sd2 = dict(sd)
    for key in ("backbone.encoder.embed_positions.A.weight", "backbone.encoder.embed_positions.B.weight"):
        sd2[key] = sd[key].clone()
        sd2[key][:2] += 100.0
        sd2[key][2 + 1 + (IMAGE // PATCH) ** 2:] += 100.0 if key.endswith("A.weight") else 0.0
    sd2["backbone.encoder.embed_positions.B.weight"][2 + CTX:] += 100.0   # rows past the context length
    b = m2encoder.load(write(tmp_path, sd2, "other.ckpt"))
    assert torch.equal(a.vision_pos, sd["backbone.encoder.embed_positions.A.weight"][2:])
    assert torch.equal(a.text_pos, sd["backbone.encoder.embed_positions.B.weight"][2:2 + CTX])
    pixels, ids, masks = sample_inputs()
    assert torch.equal(a.encode_image(pixels), b.encode_image(pixels))
    assert torch.equal(a.encode_text(ids, attention_mask=masks), b.encode_text(ids, attention_mask=masks))


def test_new_image_size_interpolates_vision_positions(tmp_path):
    sd = released_state(seed=4)
    model = m2encoder.load(write(tmp_path, sd), image_size=48)
    table = sd["backbone.encoder.embed_positions.A.weight"]
    grid = table[3:].reshape(1, 4, 4, W).permute(0, 3, 1, 2)
    resized = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(36, W)
    assert model.config.vision.image_size == 48 and model.vision_pos.shape == (37, W)
    assert torch.allclose(model.vision_pos, torch.cat([table[2:3], resized]), atol=1e-6)
    assert model.encode_image(torch.randn(1, 3, 48, 48)).shape == (1, EMBED)


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    sd = released_state(seed=5)
    del sd["backbone.encoder.layers.1.ffn.B.fc2.bias"]
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): backbone\.encoder\.layers\.1\.ffn\.B\.fc2\.bias"):
        m2encoder.load(write(tmp_path, sd))
    sd = released_state(seed=5)
    sd["mlm_score.decoder.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): mlm_score\.decoder\.weight"):
        m2encoder.load(write(tmp_path, sd))
    m2encoder.load(write(tmp_path, sd), ignore=(r"mlm_score\.",))


def test_config_that_disagrees_with_shapes_is_an_error(tmp_path):
    path = write(tmp_path, released_state(seed=6), config={**RELEASED_CONFIG, "encoder_layers": 5})
    with pytest.raises(CheckpointError, match="layers=5"):
        m2encoder.load(path)


def test_lightning_and_deepspeed_wrappers(tmp_path):
    sd = released_state(seed=8)
    lightning = write(tmp_path, {"state_dict": sd, "epoch": 3}, "lightning.ckpt")
    check_matches_reference(m2encoder.load(lightning), sd)
    deepspeed = write(tmp_path, {"module": {f"_forward_module.{k}": v for k, v in sd.items()}}, "ds.pt")
    assert m2encoder.detect(deepspeed)
    check_matches_reference(m2encoder.load(deepspeed), sd)


def test_detect_rejects_other_layouts(tmp_path):
    clip = pm.create_model("tiny")
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(tmp_path / "clip.safetensors"))
    torch.save({"a.weight": torch.zeros(2)}, tmp_path / "other.pt")
    assert not m2encoder.detect(tmp_path / "clip.safetensors")
    assert not m2encoder.detect(tmp_path / "other.pt")
    assert not m2encoder.detect(tmp_path / "missing.pt")
    assert not m2encoder.detect(tmp_path)            # two weights files: ambiguous


def test_converted_model_round_trips_through_save_pretrained(tmp_path):
    sd = released_state(seed=9)
    model = m2encoder.load(write(tmp_path, sd))
    model.save_pretrained(tmp_path / "ours")
    again = pm.load_model(tmp_path / "ours")
    pixels, ids, masks = sample_inputs()
    assert torch.equal(again.encode_image(pixels), model.encode_image(pixels))
    assert torch.equal(again.encode_text(ids, attention_mask=masks), model.encode_text(ids, attention_mask=masks))
    assert again.image_transform.to_dict() == model.image_transform.to_dict()


def test_pickles_with_objects_need_trust(tmp_path):
    import argparse
    sd = released_state(seed=10)
    path = write(tmp_path, {"state_dict": sd, "hyper_parameters": argparse.Namespace(lr=1e-4)}, "hp.ckpt")
    assert m2encoder.detect(path)                    # found without unpickling
    with pytest.raises(CheckpointError, match="trust_pickle=True"):
        m2encoder.load(path)
    check_matches_reference(m2encoder.load(path, trust_pickle=True), sd)
