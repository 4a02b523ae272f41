"""The one loader under bad input (issue 30, findings 5 and 9): a tampered size is refused before allocation, a
truncated weights file and a wrong config type name the file and key, and a task the model cannot run is one line."""
import json
import time

import pytest

from polymodal.cli import main
from polymodal.config import ConfigError
from polymodal.convert.common import CheckpointError
from polymodal.data.text import train_tokenizer
from polymodal.hub import load_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny text reward model and a tiny MLLM, saved."""
    from polymodal.models.mllm import create_mllm, mllm_config
    from polymodal.models.reward import TextRewardModel
    root = tmp_path_factory.mktemp("saved")
    tok = train_tokenizer(["a red circle moves", "the answer is yes"] * 5, kind="bpe", vocab_size=90)
    TextRewardModel.from_tokenizer(tok, {"width": 32, "layers": 1, "heads": 2}).save_pretrained(root / "reward")
    create_mllm(mllm_config("mllm-tiny", {"lm.width": 32, "lm.heads": 2}, tok), tok).save_pretrained(root / "mllm")
    return root


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def _edit_config(folder, edit):
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_a_tampered_width_is_refused_before_anything_is_allocated(saved, tmp_path):
    d = _copy(saved / "reward", tmp_path / "r")
    _edit_config(d, lambda c: c["text"].update(width=10_000_000))
    start = time.monotonic()
    with pytest.raises(CheckpointError, match=r"(?s)r/model.safetensors \(for the model .*r/config.json describes.*"
                                              r"shape mismatches: tower"):
        load_model(d)
    assert time.monotonic() - start < 30                  # refused from the header, not after allocating ~10^15


@pytest.mark.parametrize("kind", ["reward", "mllm"])
def test_a_truncated_weights_file_names_the_file(saved, tmp_path, kind):
    d = _copy(saved / kind, tmp_path / kind)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{kind}/model.safetensors: not a readable safetensors file"):
        load_model(d)


@pytest.mark.parametrize("kind,edit,key", [
    ("reward", lambda c: c["text"].update(layers="two"), r"text.layers: expected an integer|text.layers: expected int"),
    ("mllm", lambda c: c.update(projector=3), r"projector: expected str"),
    ("mllm", lambda c: c["lm"].update(depth=2), r"lm: unknown key\(s\) 'depth'"),
])
def test_a_wrong_config_value_names_the_file_and_the_key(saved, tmp_path, kind, edit, key):
    d = _copy(saved / kind, tmp_path / kind)
    _edit_config(d, edit)
    with pytest.raises(ConfigError, match=rf"{kind}/config.json.*({key})"):
        load_model(d)


def test_retrieval_on_a_reward_model_is_one_line_naming_the_tasks_it_supports(saved, tmp_path, capsys):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"image": "x.png", "caption": "a"}) + "\n")
    code = main(["eval", str(saved / "reward"), "--task", "retrieval", "--data", str(manifest)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "Traceback" not in err
    assert "TextRewardModel" in err and "model_type 'text_reward'" in err and "preference" in err
