"""Saving and loading our own format, strict loading errors, named configs and missing paths."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import polymodal
from polymodal.hub import CheckpointError, load_state_strict
from polymodal.models.clip import CLIP


def tiny():
    torch.manual_seed(0)
    return polymodal.create_model("tiny").eval()


def test_save_load_round_trip_is_exact(tmp_path):
    model = tiny()
    model.save_pretrained(tmp_path / "m")
    loaded = polymodal.load_model(tmp_path / "m")
    assert isinstance(loaded, CLIP) and not loaded.training
    assert loaded.config == model.config
    ref, got = model.state_dict(), loaded.state_dict()
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    pixels, ids = torch.randn(2, 3, 32, 32), torch.randint(1, 999, (2, 12))
    ids[:, 8] = model.config.text.eot_token_id
    with torch.no_grad():
        a, b = model(pixels, ids), loaded(pixels, ids)
    assert torch.equal(a.image_embeds, b.image_embeds) and torch.equal(a.text_embeds, b.text_embeds)
    assert loaded.image_transform.to_dict() == model.image_transform.to_dict()


def test_save_overwrites_atomically(tmp_path):
    tiny().save_pretrained(tmp_path / "m")
    other = polymodal.create_model("tiny")
    other.save_pretrained(tmp_path / "m")
    loaded = polymodal.load_model(tmp_path / "m")
    assert torch.equal(loaded.logit_scale, other.logit_scale)
    assert torch.equal(loaded.visual.pos, other.visual.pos)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary folders left behind


def test_strict_loading_lists_missing_and_unexpected_keys():
    model = tiny()
    state = dict(model.state_dict())
    del state["text.norm.bias"]
    state["visual.extra"] = torch.zeros(1)
    state["text_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError) as err:
        load_state_strict(model, state, "ckpt.safetensors")
    msg = str(err.value)
    assert msg.startswith("ckpt.safetensors does not match the model")
    assert "missing keys (1): text.norm.bias" in msg
    assert "unexpected keys (1): visual.extra" in msg
    assert "text_proj.weight: checkpoint (3, 3) vs model (32, 32)" in msg


def test_corrupted_saved_dir_is_a_checkpoint_error(tmp_path):
    tiny().save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    state = load_file(str(weights))
    state.pop("visual.cls")
    save_file(state, str(weights))
    with pytest.raises(CheckpointError, match="visual.cls"):
        polymodal.load_model(tmp_path / "m")


def test_missing_path_says_no_download(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        polymodal.load_model(str(tmp_path / "nope"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match=r"'openai/clip-vit-base-patch32' is not in the Hugging Face cache "
                                                r"\(.*hub\) and HF_HUB_OFFLINE is set"):
        polymodal.load_model("openai/clip-vit-base-patch32")


def test_a_hub_id_loads_from_the_cache_as_huggingface_hub_lays_it_out(tmp_path, monkeypatch, capsys):
    """`models--org--name/snapshots/<rev>/` with `refs/main` naming the revision, offline."""
    import shutil

    from polymodal.cli import main
    rev = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "hub" / "models--org--tiny-clip" / "snapshots" / rev
    model = tiny()
    model.save_pretrained(tmp_path / "saved")
    shutil.copytree(tmp_path / "saved", snapshot)
    (tmp_path / "hub" / "models--org--tiny-clip" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--tiny-clip" / "refs" / "main").write_text(rev)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = polymodal.load_model("org/tiny-clip")
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(loaded.encode_image(x), model.eval().encode_image(x))
    # In a recipe (model.path) the id passes the start-up check.
    from polymodal.train.run import check_paths, load_recipe
    check_paths(load_recipe(None, ["model.path=org/tiny-clip", f"out_dir={tmp_path}/run"]))
    assert main(["eval", "org/nope", "--task", "retrieval", "--data", str(tmp_path / "saved" / "config.json")]) == 2
    assert "'org/nope' is not in the Hugging Face cache" in capsys.readouterr().err


def test_named_config_loads():
    model = polymodal.load_model("tiny")
    assert isinstance(model, CLIP)
    assert model.config.text.eot_token_id == 999 and model.config.vision.width == 32
    with torch.no_grad():
        assert model.encode_image(torch.randn(1, 3, 32, 32)).shape == (1, 32)


def test_unknown_directory_is_an_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="not a polymodal directory"):
        polymodal.load_model(tmp_path)
