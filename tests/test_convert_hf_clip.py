"""HF transformers CLIPModel directories load into polymodal and give the same features."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import polymodal
from polymodal.convert import hf_clip
from polymodal.hub import CheckpointError
from polymodal.models.clip import CLIP

transformers = pytest.importorskip("transformers")

VOCAB, CTX, PAD = 100, 16, 1


def _features(out):
    """transformers 5.x returns an output object from get_*_features, older versions a tensor."""
    return out if torch.is_tensor(out) else out.pooler_output


def make_hf_clip(eos_token_id: int, hidden_act: str = "quick_gelu", text_intermediate: int = 64,
                 seed: int = 0) -> "transformers.CLIPModel":
    """A tiny random CLIPModel; every parameter (norms and biases too) is perturbed so none is trivial."""
    torch.manual_seed(seed)
    text = dict(hidden_size=32, intermediate_size=text_intermediate, num_hidden_layers=2, num_attention_heads=2,
                vocab_size=VOCAB, max_position_embeddings=CTX, eos_token_id=eos_token_id, pad_token_id=PAD,
                bos_token_id=98, hidden_act=hidden_act, layer_norm_eps=1e-5)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=32, patch_size=8, hidden_act=hidden_act, layer_norm_eps=1e-6)
    cfg = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)
    model = transformers.CLIPModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def sample_text(eos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask): BOS, random tokens, EOS at different places, pads after it."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 90, (3, CTX), generator=g)
    ids[:, 0] = 98
    for row, end in enumerate((5, 9, CTX - 1)):
        ids[row, end] = eos
        ids[row, end + 1:] = PAD
    mask = torch.zeros_like(ids)
    for row, end in enumerate((5, 9, CTX - 1)):
        mask[row, :end + 1] = 1
    return ids, mask


@pytest.mark.parametrize("eos, pool", [(2, "argmax"), (99, "eot")])
def test_hf_clip_features_match(tmp_path, eos, pool):
    hf = make_hf_clip(eos)
    hf.save_pretrained(tmp_path)
    model = polymodal.load_model(tmp_path)
    assert isinstance(model, CLIP) and not model.training
    assert model.config.text.pool == pool
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    ids, mask = sample_text(eos if eos != 2 else 99)  # legacy configs: the EOT is the largest id
    with torch.no_grad():
        ref_img = _features(hf.get_image_features(pixel_values=pixels))
        ref_txt = _features(hf.get_text_features(input_ids=ids, attention_mask=mask))
        img = model.encode_image(pixels, normalize=False)
        txt = model.encode_text(ids, normalize=False)
        logit_scale = model.scale()
    torch.testing.assert_close(img, ref_img, atol=1e-5, rtol=0)
    torch.testing.assert_close(txt, ref_txt, atol=1e-5, rtol=0)
    assert torch.allclose(logit_scale, hf.logit_scale.exp().clamp(max=100))


def test_hf_clip_gelu_and_odd_mlp_width(tmp_path):
    hf = make_hf_clip(99, hidden_act="gelu", text_intermediate=37)
    hf.save_pretrained(tmp_path)
    model = polymodal.load_model(tmp_path)
    assert model.config.text.act == "gelu" and model.text.transformer.blocks[0].mlp.fc1.out_features == 37
    ids, mask = sample_text(99)
    with torch.no_grad():
        ref = _features(hf.get_text_features(input_ids=ids, attention_mask=mask))
        torch.testing.assert_close(model.encode_text(ids, normalize=False), ref, atol=1e-5, rtol=0)


def test_detect(tmp_path):
    make_hf_clip(99).save_pretrained(tmp_path / "hf")
    assert hf_clip.detect(tmp_path / "hf")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "other" / "model.safetensors").write_bytes(b"")
    assert not hf_clip.detect(tmp_path / "other")
    assert not hf_clip.detect(tmp_path / "hf" / "config.json")


def test_preprocessor_config_and_missing_tokenizer(tmp_path):
    make_hf_clip(99).save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "do_resize": True, "size": {"shortest_edge": 40}, "do_center_crop": True,
        "crop_size": {"height": 32, "width": 32}, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25],
        "resample": 3, "image_processor_type": "CLIPImageProcessor"}))
    model = polymodal.load_model(tmp_path)
    assert model.tokenizer is None
    assert model.image_transform.mean == (0.5, 0.5, 0.5) and model.image_transform.image_size == (32, 32)
    assert model.image_transform.resize_size == (40, 40)


def test_tokenizer_is_attached(tmp_path):
    make_hf_clip(99).save_pretrained(tmp_path)
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "cat", "dog"]))
    model = polymodal.load_model(tmp_path)
    assert model.tokenizer is not None
    assert model.tokenizer.context_length == CTX  # bound to the tower's token budget


def test_unconsumed_and_unfilled_keys_are_listed(tmp_path):
    make_hf_clip(99).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    state = load_file(str(weights))
    del state["text_model.encoder.layers.1.self_attn.k_proj.weight"]
    state["text_model.extra.weight"] = torch.zeros(3)
    save_file(state, str(weights))
    with pytest.raises(CheckpointError) as err:
        polymodal.load_model(tmp_path)
    msg = str(err.value)
    assert "missing keys" in msg and "text.transformer.blocks.1.attn.qkv.weight" in msg
    assert "unexpected keys" in msg and "text_model.extra.weight" in msg
    # the q and v halves of the broken triple are reported, not silently dropped
    assert "text_model.encoder.layers.1.self_attn.q_proj.weight" in msg


def test_position_ids_buffers_are_ignored(tmp_path):
    make_hf_clip(99).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    state = load_file(str(weights))
    state["text_model.embeddings.position_ids"] = torch.arange(CTX)[None]
    state["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    save_file(state, str(weights))
    assert isinstance(polymodal.load_model(tmp_path), CLIP)


def test_to_hf_state_dict_round_trip(tmp_path):
    hf = make_hf_clip(99)
    hf.save_pretrained(tmp_path)
    model = polymodal.load_model(tmp_path)
    back = hf_clip.to_hf_state_dict(model)
    fresh = make_hf_clip(99, seed=5)
    fresh.load_state_dict(back, strict=True)
    for key, value in hf.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
