"""The README's Python snippet runs as written: with the bundled name it shows, and with a trained model."""
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
