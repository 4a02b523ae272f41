"""Export to HF transformers (loaded back by transformers) and OpenCLIP (loaded by an OpenCLIP-layout model)."""
import argparse
import json

import pytest
import torch
from PIL import Image

import polymodal
from polymodal.convert.export import ExportError, add_cli_arguments, export_model, main_from_args
from polymodal.data.text import clip_bpe_tokenizer, is_clip_bpe, train_tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = ["a photo of a cat", "Two RED cars, parked!", "a dog"]


def clip_config(vocab=49408, act="quick_gelu", pool="eot", **text):
    return {"model_type": "clip", "embed_dim": 24,
            "vision": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "heads": 2, "act": act},
            "text": {"vocab_size": vocab, "context_length": 16, "width": 32, "layers": 2, "heads": 2, "act": act,
                     "pool": pool, "eot_token_id": vocab - 1, **text}}


def perturbed(model, seed=0):
    """Noise on every weight (LayerNorm gains and biases too), so a swapped or dropped tensor shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def clip_with_bpe(seed=0):
    torch.manual_seed(seed)
    return perturbed(polymodal.create_model(clip_config(), tokenizer=clip_bpe_tokenizer()), seed)


def images():
    return [Image.new("RGB", (48, 40), (220, 40, 40)), Image.radial_gradient("L").convert("RGB").resize((40, 56))]


def features(model, pixels, ids):
    with torch.no_grad():
        return model.encode_image(pixels), model.encode_text(ids)


def hf_features(hf, pixels, ids, mask=None):
    with torch.no_grad():
        img = hf.get_image_features(pixel_values=pixels)
        txt = hf.get_text_features(input_ids=ids, attention_mask=mask)
    img, txt = (getattr(x, "pooler_output", x) for x in (img, txt))   # transformers 5 returns an output object
    return torch.nn.functional.normalize(img, dim=-1), torch.nn.functional.normalize(txt, dim=-1)


def test_hf_export_loads_in_transformers_with_equal_features(tmp_path):
    model = clip_with_bpe()
    export_model(model, tmp_path / "hf", format="hf")
    hf = transformers.CLIPModel.from_pretrained(tmp_path / "hf").eval()
    processor = transformers.CLIPProcessor.from_pretrained(tmp_path / "hf")
    batch = processor(text=TEXTS, images=images(), return_tensors="pt", padding="max_length", truncation=True,
                      max_length=16)
    ours_ids, mask = model.tokenizer.tokenize_with_mask(TEXTS)
    assert torch.equal(batch["attention_mask"].bool(), mask)
    assert torch.equal(batch["input_ids"][mask], ours_ids[mask])          # same tokenizer, HF pads with EOT
    ours_pixels = torch.stack([model.image_transform(im) for im in images()])
    torch.testing.assert_close(batch["pixel_values"], ours_pixels, atol=2e-2, rtol=0)   # resize kernels differ a little
    img, txt = features(model, batch["pixel_values"], ours_ids)
    hf_img, hf_txt = hf_features(hf, batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(hf_img, img, atol=1e-5, rtol=0)
    torch.testing.assert_close(hf_txt, txt, atol=1e-5, rtol=0)
    assert abs(float(hf.logit_scale.detach()) - float(model.logit_scale.detach())) < 1e-6
    tok = transformers.CLIPTokenizer.from_pretrained(tmp_path / "hf")
    assert tok("a photo of a cat")["input_ids"] == ours_ids[0][mask[0]].tolist()
    # polymodal reads its own export back exactly (weights, tokenizer)
    back = polymodal.load_model(tmp_path / "hf")
    ref, got = model.state_dict(), back.state_dict()
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert is_clip_bpe(back.tokenizer)
    assert torch.equal(back.tokenizer(TEXTS), model.tokenizer(TEXTS))


def test_hf_export_with_a_trained_tokenizer_and_gelu(tmp_path):
    tok = train_tokenizer(["a red cat on a mat", "two blue dogs in the park", "a green car"] * 10, vocab_size=300,
                          context_length=16)
    torch.manual_seed(2)
    model = perturbed(polymodal.create_model(clip_config(vocab=300, act="gelu"), tokenizer=tok), 2)
    export_model(model, tmp_path / "hf", format="hf")
    hf = transformers.CLIPModel.from_pretrained(tmp_path / "hf").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = model.tokenizer(TEXTS)
    theirs = hf_tok(TEXTS, padding="max_length", truncation=True, max_length=16, return_tensors="pt")["input_ids"]
    # Our trained tokenizers end with id 2, which transformers takes for argmax pooling: the export
    # exchanges ids 2 and V-1 (vocabulary and embedding rows).
    last = model.config.text.vocab_size - 1
    assert model.tokenizer.eos_id == 2 and hf.config.text_config.eos_token_id == last
    swapped = ids.clone()
    swapped[ids == 2], swapped[ids == last] = last, 2
    assert torch.equal(theirs, swapped)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    img, txt = features(model, pixels, ids)
    hf_img, hf_txt = hf_features(hf, pixels, theirs)
    torch.testing.assert_close(hf_img, img, atol=1e-5, rtol=0)
    torch.testing.assert_close(hf_txt, txt, atol=1e-5, rtol=0)
    back = polymodal.load_model(tmp_path / "hf")                    # and polymodal reads the renumbered export
    torch.testing.assert_close(features(back, pixels, back.tokenizer(TEXTS))[1], txt, atol=1e-5, rtol=0)


def test_argmax_pooling_with_eot_not_last_uses_the_legacy_marker(tmp_path):
    torch.manual_seed(3)
    model = perturbed(polymodal.create_model(clip_config(vocab=120, pool="argmax", eot_token_id=100)), 3)
    export_model(model, tmp_path / "hf", format="hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["text_config"]["eos_token_id"] == 2
    hf = transformers.CLIPModel.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(3, 99, (3, 16), generator=torch.Generator().manual_seed(1))
    ids[:, 7] = 110                                                  # the largest id: pooled by argmax
    pixels = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(hf_features(hf, pixels, ids)[1], features(model, pixels, ids)[1], atol=1e-5, rtol=0)


def test_openclip_export_loads_in_the_openclip_layout_model(tmp_path):
    from test_convert_openclip import RefCLIP, inputs
    torch.manual_seed(4)
    # The reference's sizes: embed 24, width 32, 2 layers, 32 px / 8 px patches, vocab 100, context 16.
    cfg = clip_config(vocab=100, pool="argmax")
    model = perturbed(polymodal.create_model(cfg), 4)
    export_model(model, tmp_path / "oc", format="openclip")
    assert sorted(p.name for p in (tmp_path / "oc").iterdir()) == ["open_clip_config.json",
                                                                   "open_clip_model.safetensors"]
    from safetensors.torch import load_file
    ref = RefCLIP(quick_gelu=True).eval()
    ref.load_state_dict(load_file(str(tmp_path / "oc" / "open_clip_model.safetensors")), strict=True)
    pixels, ids = inputs()
    with torch.no_grad():
        torch.testing.assert_close(ref.visual(pixels), model.encode_image(pixels, normalize=False), atol=1e-5, rtol=0)
        torch.testing.assert_close(ref.encode_text(ids), model.encode_text(ids, normalize=False), atol=1e-5, rtol=0)
    assert torch.equal(ref.logit_scale, model.logit_scale)


def test_openclip_export_round_trips_through_our_importer(tmp_path):
    model = clip_with_bpe(5)
    export_model(model, tmp_path / "oc", format="openclip")
    cfg = json.loads((tmp_path / "oc" / "open_clip_config.json").read_text())
    assert cfg["model_cfg"]["quick_gelu"] is True and cfg["model_cfg"]["text_cfg"]["pool_type"] == "eos"
    assert not (tmp_path / "oc" / "tokenizer.json").exists()         # the CLIP BPE ships with OpenCLIP
    back = polymodal.load_model(tmp_path / "oc")
    ref, got = model.state_dict(), back.state_dict()
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert is_clip_bpe(back.tokenizer)                               # the bundled one, by vocabulary
    pixels = torch.randn(2, 3, 32, 32)
    ids = model.tokenizer(TEXTS)
    for a, b in zip(features(model, pixels, ids), features(back, pixels, ids)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert back.image_transform.to_dict() == model.image_transform.to_dict()


def test_openclip_export_keeps_a_trained_tokenizer_and_projection_bias(tmp_path):
    tok = train_tokenizer(["a red cat", "a blue dog"] * 10, vocab_size=200, context_length=16)
    torch.manual_seed(6)
    model = polymodal.create_model({**clip_config(vocab=200), "proj_bias": True}, tokenizer=tok)
    with torch.no_grad():
        model.visual_proj.bias.zero_()                               # OpenCLIP's visual.proj has no bias
        model.text_proj.bias.normal_()
    export_model(model, tmp_path / "oc", format="openclip")
    back = polymodal.load_model(tmp_path / "oc")
    assert torch.equal(back.text_proj.bias, model.text_proj.bias)
    assert torch.equal(back.tokenizer(TEXTS), model.tokenizer(TEXTS))
    with torch.no_grad():
        model.visual_proj.bias.fill_(0.5)
    with pytest.raises(ExportError, match="visual_proj has a non-zero bias"):
        export_model(model, tmp_path / "oc2", format="openclip")
    with pytest.raises(ExportError, match="proj_bias=True"):
        export_model(model, tmp_path / "hf", format="hf")
    assert not (tmp_path / "oc2").exists() and not (tmp_path / "hf").exists()


def test_unmappable_models_are_refused_by_name(tmp_path):
    lotlip = polymodal.create_model(clip_config(vocab=100, num_readout_tokens=2))
    for fmt in ("hf", "openclip"):
        with pytest.raises(ExportError, match="num_readout_tokens=2") as info:
            export_model(lotlip, tmp_path / fmt, format=fmt)
        # Neither layout takes it: the message says so once, instead of pointing at the other format.
        assert "no equivalent in the HF or the OpenCLIP layout" in str(info.value) and "--format" not in str(info.value)
    coca = polymodal.create_model("coca-tiny")
    with pytest.raises(ExportError, match="only CLIP dual encoders"):
        export_model(coca, tmp_path / "c", format="hf")
    with pytest.raises(ExportError, match="not one of hf, openclip"):
        export_model(lotlip, tmp_path / "x", format="onnx")
    assert [p.name for p in tmp_path.iterdir()] == []               # nothing half-written


def small_clip(seed):
    torch.manual_seed(seed)
    tok = train_tokenizer(["a red cat", "a blue dog"] * 10, vocab_size=200, context_length=16)
    return perturbed(polymodal.create_model(clip_config(vocab=200), tokenizer=tok), seed)


def test_export_replaces_an_old_directory_atomically(tmp_path):
    export_model(small_clip(7), tmp_path / "out", format="openclip")
    (tmp_path / "out" / "stale.txt").write_text("old")
    model = small_clip(8)
    export_model(model, tmp_path / "out", format="openclip")
    assert not (tmp_path / "out" / "stale.txt").exists()
    assert torch.equal(polymodal.load_model(tmp_path / "out").logit_scale, model.logit_scale)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_cli_arguments_export_a_saved_model(tmp_path):
    small_clip(9).save_pretrained(tmp_path / "ours")
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    args = parser.parse_args([str(tmp_path / "ours"), "--format", "hf", "--out", str(tmp_path / "hf")])
    result = main_from_args(args)
    assert result["format"] == "hf" and {"config.json", "model.safetensors", "tokenizer.json"} <= set(result["files"])
    assert transformers.CLIPModel.from_pretrained(tmp_path / "hf").config.projection_dim == 24
    with pytest.raises(SystemExit):
        parser.parse_args([str(tmp_path / "ours"), "--format", "onnx", "--out", "x"])
