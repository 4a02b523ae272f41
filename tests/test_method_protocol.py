"""The method protocol: a method is one module plus one table row, and `train/` knows no method by name."""
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from torch import nn

from polymodal import methods
from polymodal.config import ConfigError
from polymodal.methods.base import Method
from polymodal.train.run import load_recipe, run_recipe

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class ToyConfig:
    weight: float = 1.0


class ToyTask(nn.Module):
    """Pulls every image embedding towards its caption's embedding (a cosine loss): learns, and is not CLIP."""

    def __init__(self, model, cfg: ToyConfig):
        super().__init__()
        self.model, self.cfg = model, cfg
        self.calls = 0

    def forward(self, batch):
        self.calls += 1
        img = self.model.encode_image(batch["pixels"])
        txt = self.model.encode_text(batch["input_ids"])
        loss = self.cfg.weight * (1 - (img * txt).sum(-1)).mean()
        return {"loss": loss, "cosine": (1 - loss.detach() / self.cfg.weight)}


class ToyMethod(Method):
    config_cls = ToyConfig
    built: list = []

    def build_task(self, model):
        task = ToyTask(model, self.cfg)
        ToyMethod.built.append(task)
        return task

    def evaluate(self, task, specs, progress=False):
        return {"toy_calls": float(task.calls)}


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(methods.METHODS, "toy", ToyMethod)   # a table entry made in the test
    ToyMethod.built.clear()
    return ToyMethod


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from polymodal.data.synthetic.shapes import generate_shapes
    out = tmp_path_factory.mktemp("shapes_toy")
    generate_shapes(out, n_train=200, n_test=40, n_val=20, n_hard=8, seed=5, progress=False)
    return out


def test_a_toy_method_from_a_test_file_trains_through_run_recipe(toy, shapes, tmp_path):
    cfg = load_recipe(None, ["method=toy", f"out_dir={tmp_path}/run", "model.name=tiny", "toy={weight: 2.0}",
                             f"data.train={shapes}/train.jsonl", "data.batch_size=16", "train.steps=12",
                             "train.log_every=4", "train.ckpt_every=6", "train.progress=false",
                             f"eval.retrieval={shapes}/val.jsonl", "train.threads=1"])
    assert cfg.toy.weight == 2.0 and cfg.to_dict()["toy"] == {"weight": 2.0}
    final = run_recipe(cfg)
    task = toy.built[-1]
    assert task.calls == 12 and final["eval/toy_calls"] == 12.0
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert any('"cosine"' in line for line in lines)


def test_a_method_section_is_validated_by_its_config(toy):
    with pytest.raises(ConfigError, match=r"recipe.toy: unknown key\(s\) 'wieght'"):
        load_recipe(None, ["method=toy", "toy={wieght: 2.0}"])
    with pytest.raises(ConfigError, match="section 'lotlip' belongs to method 'lotlip'"):
        load_recipe(None, ["method=toy", "lotlip={num_corners: 2}"])


def test_train_package_names_no_method():
    names = [n for n in methods.METHODS if n != "toy"]
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b", re.I)
    for path in (ROOT / "polymodal" / "train").glob("*.py"):
        code = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
        code = re.sub(r'"""[\s\S]*?"""', "", code)            # docstrings may mention examples
        hits = pattern.findall(code)
        assert not hits, f"{path.name} names method(s) {sorted(set(hits))}"


def test_every_table_row_imports_a_method():
    for name in methods.METHODS:
        cls = methods.get_method(name)
        assert issubclass(cls, Method), name
    with pytest.raises(KeyError, match="not one of"):
        methods.get_method("nope")
