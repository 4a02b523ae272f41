"""`polymodal benchmark` runs every named video and preference protocol on fixtures in the datasets' own layouts
(the image protocols: tests/test_importers.py). Each row's numbers equal `polymodal eval` on the imported set."""
import json

import pytest
import torch

from polymodal.cli import main
from test_importers_preference import _hh, _ultrafeedback
from test_importers_video import _activitynet, _didemo, _msrvtt, _msvd


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from polymodal.data.text import train_tokenizer
    from polymodal.models.factory import create_model
    from polymodal.models.reward import TextRewardModel
    from polymodal.models.video import VideoCLIP
    root = tmp_path_factory.mktemp("models")
    tok = train_tokenizer(["a man is cooking", "two dogs run", "a woman sings", "a car drives", "hello"] * 3,
                          kind="bpe", vocab_size=120)
    torch.manual_seed(0)
    VideoCLIP.from_image_model(create_model("tiny", tokenizer=tok)).save_pretrained(root / "video")
    TextRewardModel.from_tokenizer(tok, {"width": 32, "layers": 1, "heads": 2}).save_pretrained(root / "reward")
    return root


@pytest.mark.parametrize("name,build,folder,model", [
    ("msrvtt-1ka", _msrvtt, "msrvtt", "video"), ("msvd", _msvd, "msvd", "video"),
    ("didemo", _didemo, "didemo", "video"), ("activitynet", _activitynet, "activitynet", "video"),
    ("hh-rlhf", _hh, "hh-rlhf", "reward"), ("ultrafeedback", _ultrafeedback, "ultrafeedback", "reward")])
def test_protocol_runs_from_the_shipped_layout(name, build, folder, model, models, tmp_path, capsys):
    from polymodal.eval.benchmark import PROTOCOLS
    build(tmp_path / "data" / folder)
    out = tmp_path / "table.md"
    assert main(["benchmark", str(models / model), "--dataset", name, "--root", str(tmp_path / "data"),
                 "--cache", str(tmp_path / "cache"), "--out", str(out), "--device", "cpu"]) == 0
    (row,) = json.loads(out.with_suffix(".json").read_text())["rows"]
    p = PROTOCOLS[name]
    assert row["task"] == p.task and all(k in row["metrics"] for k in p.headline)
    # The same numbers from `polymodal eval` on the imported manifest with the protocol's options.
    capsys.readouterr()
    argv = ["eval", str(models / model), "--task", p.task, "--data", row["manifest"]]
    for k, v in row["options"].items():
        argv += ["-o", f"{k}={json.dumps(v) if not isinstance(v, str) else v}"]
    assert main(argv) == 0
    again = json.loads(capsys.readouterr().out)
    assert again == pytest.approx(row["metrics"])
    if p.options.get("paragraph"):
        assert row["metrics"]["num_texts"] == row["metrics"]["num_videos"]       # one paragraph per video
