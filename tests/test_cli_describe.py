"""The CLI describes itself: a fast `--help`, `recipe show`, "did you mean", strict JSON, `--device` and
`--batch-size`, and a warning for a language the tokenizer never saw (issue: ecosystem, item 6)."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from polymodal import cli

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("argv", [["--help"]] + [[c, "--help"] for c in ("train", "eval", "embed", "index", "search", "serve", "data", "caption", "benchmark")] + [["data", d, "--help"] for d in ("aux-captions", "import", "frames", "filter", "shard")])
def test_help_imports_no_torch(argv):
    code = ("import sys, contextlib, io\n"
            "from polymodal.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            f"    try:\n        main({argv!r})\n    except SystemExit:\n        pass\n"
            "assert 'usage: polymodal' in out.getvalue(), out.getvalue()\n"
            "heavy = [m for m in ('torch', 'numpy', 'transformers', 'PIL') if m in sys.modules]\n"
            "print(','.join(heavy))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "", f"{' '.join(argv)} imported {result.stdout.strip()}"


def test_the_data_commands_offer_the_frame_strategies_the_reader_has():
    from polymodal.data.command_args import FRAME_STRATEGIES
    from polymodal.data.video import STRATEGIES
    assert FRAME_STRATEGIES == STRATEGIES


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_every_command_has_working_help(command, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main([command, "--help"])
    assert done.value.code == 0
    assert "usage: polymodal " + command in capsys.readouterr().out


@pytest.mark.parametrize("name", list(cli._data_commands()))
def test_every_data_command_has_working_help(name, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["data", name, "--help"])
    assert done.value.code == 0
    assert "usage: polymodal data " + name in capsys.readouterr().out


def test_recipe_show_lists_keys_values_types_and_docs(capsys):
    assert cli.main(["recipe", "show", str(REPO / "recipes/clip_shapes.yaml"), "optim.lr=0.002", "--json"]) == 0
    rows = {r["key"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["optim.lr"]["value"] == 0.002 and rows["optim.lr"]["type"] == "float"
    assert rows["data.batch_size"]["doc"] == "per rank"
    assert rows["model.name"]["doc"].startswith("bundled config")
    assert "method_config" not in rows
    assert cli.main(["recipe", "show", str(REPO / "recipes/scene_two_stream.yaml")]) == 0
    text = capsys.readouterr().out
    assert "[scene]" in text and "scene." in text                     # the method's own section


def test_unknown_keys_get_did_you_mean(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: clip\noptim: {lrr: 0.1}\n")
    assert cli.main(["recipe", "show", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert str(recipe) in err and "'lrr'" in err and "did you mean 'lr'?" in err
    recipe.write_text("method: clip\n")
    assert cli.main(["recipe", "show", str(recipe), "trian.steps=3"]) == 2
    err = capsys.readouterr().err
    assert "override 'trian.steps=3'" in err and "did you mean 'train'?" in err and str(recipe) not in err


def test_strict_json_writes_null_for_nan():
    text = cli.dumps_strict({"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": -math.inf}, "e": 2})
    assert json.loads(text) == {"a": None, "b": [1.0, None], "c": {"d": None}, "e": 2}


def test_resolve_device():
    import torch
    assert cli.resolve_device("cpu").type == "cpu"
    assert cli.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="not a device"):
        cli.resolve_device("tpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            cli.resolve_device("cuda")


def test_language_probe_tells_seen_from_unseen_scripts():
    from polymodal.data.languages import tokenizer_covers
    from polymodal.data.text import train_tokenizer
    en = ["a red cat sits by a green tree under the sky"] * 30
    zh = ["一只红色的猫坐在绿色的大树旁边天空是蓝色的"] * 30
    for kind in ("bpe", "wordpiece"):
        assert not tokenizer_covers(train_tokenizer(en, kind=kind, vocab_size=300), "zh")[0], kind
        assert tokenizer_covers(train_tokenizer(en + zh, kind=kind, vocab_size=400), "zh")[0], kind
        assert tokenizer_covers(train_tokenizer(en, kind=kind, vocab_size=300), "en")[0], kind


@pytest.fixture(scope="module")
def shapes_model(tmp_path_factory):
    from polymodal.data.synthetic.shapes import generate_shapes
    from polymodal.data.text import train_tokenizer
    from polymodal.models.factory import create_model
    out = tmp_path_factory.mktemp("describe")
    generate_shapes(out / "shapes", n_train=10, n_test=12, n_val=4, n_hard=4, seed=3, progress=False)
    tok = train_tokenizer(["a red star", "a blue circle on a green square"] * 20, kind="bpe", vocab_size=64)
    create_model("tiny", tokenizer=tok).save_pretrained(out / "clip")
    return out


def test_eval_warns_for_an_unseen_language_and_takes_device_and_batch_size(shapes_model, tmp_path, capsys):
    args = ["eval", str(shapes_model / "clip"), "--task", "retrieval", "--data", str(shapes_model / "shapes/test.jsonl"),
            "--device", "cpu", "--batch-size", "5", "--out", str(tmp_path / "m.json")]
    assert cli.main(args + ["--lang", "zh"]) == 0
    captured = capsys.readouterr()
    assert "warning" in captured.err and "--lang zh" in captured.err
    zh = json.loads(captured.out)
    assert cli.main(args + ["--batch-size", "64"]) == 0               # the batch size changes no number
    captured = capsys.readouterr()
    assert "warning" not in captured.err
    assert cli.main(args[:-4] + ["--lang", "zh", "--out", str(tmp_path / "n.json")]) == 0
    assert json.loads(capsys.readouterr().out) == zh


def test_finetuning_from_model_path_keeps_its_tokenizer(shapes_model, tmp_path, capsys):
    recipe = tmp_path / "ft.yaml"
    recipe.write_text(f"method: clip\nmodel: {{path: {shapes_model / 'clip'}}}\n"
                      f"data: {{train: {shapes_model / 'shapes/train.jsonl'}, batch_size: 4}}\n"
                      f"train: {{steps: 2, progress: false}}\nout_dir: {tmp_path / 'run'}\n")
    assert cli.main(["train", str(recipe)]) == 0
    capsys.readouterr()
    assert not (tmp_path / "run" / "tokenizer").exists()               # no second tokenizer trained or saved
    import polymodal
    before = polymodal.load_model(str(shapes_model / "clip")).tokenizer
    after = polymodal.load_model(str(tmp_path / "run" / "model")).tokenizer
    texts = ["a red star", "a blue circle on a green square"]
    assert before(texts).tolist() == after(texts).tolist()


def _image_folder(shapes_model, folder: Path, n: int, classes: tuple) -> Path:
    """n ShapesWorld test images sorted into one subfolder per class, alternating."""
    import shutil
    records = [json.loads(line) for line in (shapes_model / "shapes/test.jsonl").read_text().splitlines()]
    for i, r in enumerate(records[:n]):
        cls = folder / classes[i % len(classes)]
        cls.mkdir(parents=True, exist_ok=True)
        shutil.copy(shapes_model / "shapes" / r["image"], cls / f"{i}.png")
    return folder


def test_eval_on_an_image_folder_with_inline_classes_and_export(shapes_model, tmp_path, capsys):
    folder = _image_folder(shapes_model, tmp_path / "pets", 6, ("cat", "red car"))
    base = ["eval", str(shapes_model / "clip"), "--task", "zeroshot", "--data", str(folder), "--device", "cpu"]
    assert cli.main(base) == 0
    folder_metrics = json.loads(capsys.readouterr().out)
    assert folder_metrics["num_classes"] == 2 and round(folder_metrics["top1"] * 6 / 100, 6).is_integer()
    assert cli.main(base + ["--classes", 'cat,"red car"']) == 0        # the same classes, inline
    assert json.loads(capsys.readouterr().out) == folder_metrics
    assert cli.main(base + ["--classes", "cat,dog"]) == 2               # a folder that is not a listed class
    assert "red car" in capsys.readouterr().err
    assert cli.main(["export", str(shapes_model / "clip"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    assert (tmp_path / "hf" / "config.json").is_file()


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "recipes").glob("*.yaml")))
def test_every_key_of_every_bundled_recipe_is_described(recipe):
    from polymodal.train.describe import describe_recipe
    from polymodal.train.run import load_recipe
    rows = describe_recipe(load_recipe(REPO / "recipes" / recipe))
    assert rows and [r["key"] for r in rows if not r["doc"]] == []


def test_training_on_an_image_folder(shapes_model, tmp_path, capsys):
    folder = _image_folder(shapes_model, tmp_path / "pets", 8, ("cat", "red_car"))
    args = ["train", str(REPO / "recipes/clip_shapes.yaml"), "model.name=tiny", f"data.train={folder}",
            "data.batch_size=4", "train.steps=2", "train.progress=false", "train.report=false", "eval.retrieval=",
            "eval.longtext=", "eval.classes=", "eval.zeroshot=", "tokenizer.vocab_size=64", f"out_dir={tmp_path / 'run'}"]
    assert cli.main(args) == 0
    capsys.readouterr()
    assert (tmp_path / "run" / "model" / "config.json").is_file()
