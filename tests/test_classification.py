"""Linear probe and classification (issue #34 item 1): logistic regression on frozen features with the penalty
chosen on validation, and `method: classify` (a head on a frozen or fine-tuned encoder)."""
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import polymodal
from polymodal.cli import main
from polymodal.data.text import train_tokenizer
from polymodal.eval.classification import classification_metrics as probe_metrics
from polymodal.eval.linear_probe import choose_weight_decay, fit_logistic, linear_probe_task

REPO = Path(__file__).resolve().parents[1]
COLOURS = {"red": (210, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 210)}


def test_metrics_by_hand():
    logits = torch.tensor([[3.0, 1, 0], [0, 2, 1], [2, 0, 1], [0, 1, 3]])
    y = torch.tensor([0, 1, 1, 2])
    m = probe_metrics(logits, y, 3)
    assert m["top1"] == 0.75 and m["mean_per_class_recall"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert "top5" not in m                                   # 3 classes: top-5 would always be 1


def test_the_fit_is_deterministic_and_the_penalty_is_chosen_on_validation():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 2
    y = torch.arange(4).repeat(30)
    x = centres[y] + torch.randn(len(y), 16, generator=g)
    a, b = fit_logistic(x, y, 4, 1e-3), fit_logistic(x, y, 4, 1e-3)
    assert torch.equal(a.weight, b.weight)
    assert probe_metrics(a(x.double()), y, 4)["top1"] > 0.9
    strong = fit_logistic(x, y, 4, 10.0)
    assert strong.weight.norm() < a.weight.norm()            # the penalty shrinks the weights
    # labels that only noise predicts: validation prefers a strong penalty over fitting the noise
    y_noise = torch.randint(0, 4, (120,), generator=g)
    wd, scores = choose_weight_decay(x[:80], y_noise[:80], x[80:], y_noise[80:], 4, [1e-6, 1e-1, 10.0])
    assert wd == max(scores, key=lambda k: (scores[k], k)) and set(scores) == {1e-6, 1e-1, 10.0}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Colour-coded images: train / val / test manifests with class-name labels and classes.json."""
    root = tmp_path_factory.mktemp("probe")
    (root / "imgs").mkdir()
    g = torch.Generator().manual_seed(1)
    for split, n in (("train", 24), ("val", 9), ("test", 12)):
        rows = []
        for i in range(n):
            name = list(COLOURS)[i % 3]
            jitter = (torch.randint(-25, 25, (3,), generator=g)).tolist()
            colour = tuple(max(0, min(255, c + d)) for c, d in zip(COLOURS[name], jitter))
            Image.new("RGB", (24, 24), colour).save(root / "imgs" / f"{split}{i}.png")
            rows.append({"image": f"imgs/{split}{i}.png", "caption": f"a {name} square", "label": name})
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "classes.json").write_text(json.dumps({"classes": list(COLOURS)}))
    torch.manual_seed(0)
    tok = train_tokenizer([f"a {n} square" for n in COLOURS] * 5, vocab_size=120, context_length=16)
    polymodal.create_model("tiny", tokenizer=tok).save_pretrained(root / "model")
    return root


def test_linear_probe_from_the_command_line(world, tmp_path, capsys):
    args = ["eval", str(world / "model"), "--task", "linear_probe", "--data", str(world / "train.jsonl"),
            "--val", str(world / "val.jsonl"), "--test", str(world / "test.jsonl"), "--out", str(tmp_path / "m.json")]
    assert main(args) in (0, None)
    out = json.loads((tmp_path / "m.json").read_text())
    assert (out["num_train"], out["num_val"], out["num_test"], out["num_classes"]) == (24, 9, 12, 3)
    assert out["chance"] == pytest.approx(1 / 3) and out["weight_decay"] in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
    assert out["top1"] > 0.6                     # colour is linearly readable even from random weights
    again = linear_probe_task(polymodal.load_model(world / "model"), world / "train.jsonl", val=world / "val.jsonl",
                              test=world / "test.jsonl")
    assert again["top1"] == out["top1"] and again["weight_decay"] == out["weight_decay"]    # deterministic
    held = linear_probe_task(polymodal.load_model(world / "model"), world / "train.jsonl")  # val from train
    assert (held["num_train"], held["num_val"], held["num_test"]) == (21, 3, 12)


def test_probe_features_are_encoded_once_with_a_feature_cache(world, tmp_path, capsys, monkeypatch):
    """`--feature-cache`: a second probe of the same model (another penalty grid) reads every feature back."""
    from polymodal.models.clip import CLIP
    calls = []
    plain = CLIP.encode_image
    monkeypatch.setattr(CLIP, "encode_image", lambda self, pixels: calls.append(len(pixels)) or plain(self, pixels))
    args = ["eval", str(world / "model"), "--task", "linear_probe", "--data", str(world / "train.jsonl"),
            "--val", str(world / "val.jsonl"), "--test", str(world / "test.jsonl"),
            "--feature-cache", str(tmp_path / "features")]
    assert main(args + ["--out", str(tmp_path / "a.json")]) in (0, None)
    assert sum(calls) == 24 + 9 + 12
    calls.clear()
    assert main(args + ["-o", "weight_decays=1e-3,1e-2", "--out", str(tmp_path / "b.json")]) in (0, None)
    assert calls == []                                            # every chunk read back
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    assert b["weight_decay"] in (1e-3, 1e-2) and (a["num_train"], a["num_test"]) == (b["num_train"], b["num_test"])
    if a["weight_decay"] == b["weight_decay"]:
        assert a["top1"] == b["top1"]


def test_bad_inputs_are_one_line_errors(world, tmp_path, capsys):
    model = polymodal.load_model(world / "model")
    with pytest.raises(FileNotFoundError, match=r"linear_probe: val manifest .*nope.jsonl does not exist"):
        linear_probe_task(model, world / "train.jsonl", val=tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="weight_decays must be positive"):
        linear_probe_task(model, world / "train.jsonl", weight_decays="1e-3,0")
    from polymodal.eval.tasks import check_model
    with pytest.raises(ValueError, match="eval task 'linear_probe' needs a model with encode_image"):
        check_model("linear_probe", torch.nn.Linear(2, 2))


@pytest.mark.parametrize("freeze", [True, False])
def test_classify_recipe_trains_a_head_and_its_numbers_come_back_from_the_saved_model(world, tmp_path, freeze):
    from polymodal.train.run import load_recipe, run_recipe
    out = tmp_path / "run"
    overrides = [f"out_dir={out}", f"model.path={world / 'model'}", f"data.train={world / 'train.jsonl'}",
                 f"classify.classes={world / 'classes.json'}", f"classify.freeze={str(freeze).lower()}",
                 f"eval.tasks=[{{task: classification, data: {world / 'test.jsonl'}}}]", "data.batch_size=8",
                 "train.steps=30", "train.eval_every=0", "train.ckpt_every=0", "train.progress=false",
                 "train.threads=1", "train.report=false", "optim.warmup_steps=0", "optim.lr=0.05"]
    final = run_recipe(load_recipe(REPO / "recipes/classify_shapes.yaml", overrides))
    assert final["eval/classification/top1"] > 0.6 and final["eval/classification/chance"] == pytest.approx(1 / 3)
    saved = polymodal.load_model(out / "model")
    assert type(saved).__name__ == "ImageClassifier" and saved.class_names == list(COLOURS)
    start, after = polymodal.load_model(world / "model").state_dict(), saved.base.state_dict()
    changed = any(not torch.equal(start[k], after[k]) for k in start)
    assert changed is not freeze                               # frozen: the encoder is as loaded
    args = ["eval", str(out / "model"), "--task", "classification", "--data", str(world / "test.jsonl"),
            "--out", str(tmp_path / "m.json")]
    assert main(args) in (0, None)
    assert json.loads((tmp_path / "m.json").read_text())["top1"] == pytest.approx(final["eval/classification/top1"],
                                                                                  abs=1e-6)
