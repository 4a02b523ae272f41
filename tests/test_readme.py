"""The README's Python snippet runs as written: with the bundled name it shows, and with a trained model."""
import json
import re
from pathlib import Path

import pytest
from PIL import Image

README = Path(__file__).resolve().parents[1] / "README.md"


def _snippet() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    return next(b for b in blocks if "pm.load_model(" in b)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (80, 60), (200, 30, 30)).save(tmp_path / "cat.jpg")
    return tmp_path


def test_snippet_runs_with_the_bundled_name(in_tmp):
    namespace: dict = {}
    exec(compile(_snippet(), "README.md", "exec"), namespace)
    assert tuple(namespace["sims"].shape) == (1, 2)
    assert (in_tmp / "my-model" / "config.json").is_file()


def test_snippet_runs_with_a_trained_model(in_tmp):
    from polymodal.data.text import train_tokenizer
    from polymodal.models.factory import create_model
    tok = train_tokenizer(["a photo of a cat", "a dog on the grass"] * 20, kind="bpe", vocab_size=64)
    create_model("tiny", tokenizer=tok).save_pretrained(in_tmp / "trained")
    code = re.sub(r'pm\.load_model\("[^"]+"\)', 'pm.load_model("trained")', _snippet())
    assert 'pm.load_model("trained")' in code
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert tuple(namespace["sims"].shape) == (1, 2)


def test_your_datasets_table_names_real_formats_and_protocols():
    from polymodal.data.importers import FORMATS
    from polymodal.eval.benchmark import PROTOCOLS
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Your datasets"):text.index("## Pretrained weights")]
    formats = set(re.findall(r"polymodal data import ([a-z][\w-]+)", section))
    assert formats and formats <= set(FORMATS), formats - set(FORMATS)
    assert set(FORMATS) <= formats | {"parquet"} | set(re.findall(r"`([\w-]+)`", section))    # every format shown
    protocols = set(re.findall(r"--dataset ([\w-]+)", section)) - {"NAME"}
    protocols |= {p for row in re.findall(r"\| ([^|]*) \|\n", section) for p in re.findall(r"`([\w-]+)`", row)}
    assert set(PROTOCOLS) <= protocols, set(PROTOCOLS) - protocols


def test_training_from_shards_runs_as_the_readme_writes_it(in_tmp):
    text = README.read_text(encoding="utf-8")
    block = text[text.index("**Training from shards.**"):text.index("`data.shards` also takes")]
    assert "tokenizer.path=runs/clip_shapes/tokenizer" in block
    from polymodal.cli import main
    from polymodal.data.synthetic.shapes import generate_shapes
    from polymodal.data.text import train_tokenizer
    generate_shapes("data/mine", n_train=40, n_test=8, n_val=0, n_hard=0, seed=1, progress=False)
    captions = [json.loads(x)["caption"] for x in open("data/mine/train.jsonl", encoding="utf-8")]
    train_tokenizer(captions, kind="bpe", vocab_size=200).save("runs/clip_shapes/tokenizer")
    assert main(["data", "shard", "data/mine/train.jsonl", "--out", "data/mine/shards", "--no-progress"]) == 0
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "clip_shapes.yaml"
    assert main(["train", str(recipe), "data.shards=data/mine/shards", "data.train=", "out_dir=runs/shards",
                 "tokenizer.path=runs/clip_shapes/tokenizer", "model.name=tiny", "train.steps=2", "data.batch_size=8",
                 "train.progress=false", "train.report=false", "eval={}", "train.val_loss_every=0",
                 "train.val_data="]) == 0
