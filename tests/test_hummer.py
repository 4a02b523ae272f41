"""Hummer: ADC on a hand-made accuracy table, the preference evaluation's numbers by hand, and a reward model
trained through run_recipe (above chance; hybrid sampling resumes exactly)."""
import json
import os

import numpy as np
import pytest
import torch

from polymodal import methods
from polymodal.eval import tasks
from polymodal.eval.conflict import (ConflictResult, accuracy_table, adc, deviation_matrix, measure_conflict,
                                     write_conflict_report)
from polymodal.eval.preference import preference_accuracy

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

DIMS = ["a", "b", "c"]
BASE = {"a": 0.80, "b": 0.70, "c": 0.60}
TUNED = {"a": {"a": 0.95, "b": 0.50, "c": 0.65},     # tuning on a: b drops 0.2, c rises
         "b": {"a": 0.70, "b": 0.90, "c": 0.60},     # a drops 0.1, c unchanged
         "c": {"a": 0.80, "b": 0.75, "c": 0.90}}     # no drop


def test_adc_on_a_hand_made_table():
    D = deviation_matrix(BASE, TUNED, DIMS)
    assert np.allclose(D, [[0.15, -0.20, 0.05], [-0.10, 0.20, 0.0], [0.0, 0.05, 0.30]])
    # 1/(n(n-1)) * sum of squared drops off the diagonal: (0.2^2 + 0.1^2) / 6
    assert adc(D) == pytest.approx((0.04 + 0.01) / 6)
    assert adc(D, "negative_pairs") == pytest.approx((0.04 + 0.01) / 2)
    assert adc(D, "rms") == pytest.approx(((0.04 + 0.01) / 6) ** 0.5)
    # a drop on the diagonal (tuning on a dimension hurts itself) does not count
    D2 = D.copy()
    D2[2, 2] = -0.5
    assert adc(D2) == adc(D)
    assert adc(np.abs(D)) == 0.0 and adc(np.abs(D), "negative_pairs") == 0.0
    with pytest.raises(ValueError, match="reading must be one of"):
        adc(D, "mean")


def test_measure_conflict_runs_the_protocol_and_writes_the_report(tmp_path):
    tuned_models = []

    def finetune(base, k):
        tuned_models.append(k)
        return ("tuned", k)

    def accuracy(model):
        return BASE if model == "base" else TUNED[model[1]]

    res = measure_conflict("base", DIMS, finetune, accuracy)
    assert tuned_models == DIMS and res.adc == pytest.approx(0.05 / 6)
    table = accuracy_table(res)
    assert "| tuned on a | 0.950 | 0.500 | 0.650 |" in table
    paths = write_conflict_report(res, tmp_path, "c")
    assert json.loads(open(paths["json"]).read())["adc"] == pytest.approx(0.05 / 6)
    assert open(paths["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert isinstance(res, ConflictResult)


def test_preference_accuracy_by_hand():
    rc = torch.tensor([1.0, 0.0, 2.0, 3.0, 0.5])
    rr = torch.tensor([0.0, 1.0, 2.0, 1.0, 0.0])            # right, wrong, tie (wrong), right, right
    m = preference_accuracy(rc, rr, ["x", "x", "y", "y", "y"], ["chat", "chat", "safety", "", "safety"])
    assert m["accuracy"] == pytest.approx(3 / 5) and m["pairs"] == 5
    assert m["accuracy_x"] == 0.5 and m["accuracy_y"] == pytest.approx(2 / 3)
    assert m["worst_dimension_accuracy"] == 0.5
    assert m["subset_chat"] == 0.5 and m["subset_safety"] == 0.5 and m["subset_mean"] == 0.5
    assert m["reward_gap"] == pytest.approx((1 - 1 + 0 + 2 + 0.5) / 5)


# ---- end to end through run_recipe -----------------------------------------------------------------------
@pytest.fixture
def reward_tables(monkeypatch):
    """The `reward` method and `preference` eval rows: the tables' own when the lead has added them."""
    if "reward" not in methods.METHODS:
        monkeypatch.setitem(methods.METHODS, "reward", "polymodal.methods.reward:RewardMethod")
    if "preference" not in tasks.TASKS:
        monkeypatch.setitem(tasks.TASKS, "preference", tasks._lazy("preference", "preference_eval_task"))
    from polymodal.methods.reward import RewardMethod
    assert methods.get_method("reward") is RewardMethod


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from polymodal.data.synthetic.preferences import generate_preferences
    out = tmp_path_factory.mktemp("prefs")
    generate_preferences(out, n_train=40, n_base=80, n_val=8, n_test=20, seed=2, imbalance={})
    return out


def _recipe(out, world, *extra):
    from polymodal.train.run import load_recipe
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return load_recipe(os.path.join(root, "recipes", "reward_tiny.yaml"), [
        f"out_dir={out}", f"data.train={world}/base/train.jsonl", "data.batch_size=16", "train.progress=false",
        "train.threads=1", "reward.text={width: 32, layers: 2, heads: 2}", "reward.max_length=48",
        "tokenizer.vocab_size=300", f"eval.tasks=[{{task: preference, data: {world}/test.jsonl}}]",
        "optim.lr=2e-3", "optim.warmup_steps=5", *extra])


def test_a_tiny_reward_model_trains_above_chance_through_run_recipe(reward_tables, world, tmp_path):
    from polymodal.eval.preference import preference_eval_task
    from polymodal.train.run import run_recipe
    final = run_recipe(_recipe(tmp_path / "run", world, "train.steps=60", "train.ckpt_every=0",
                               "train.log_every=20"))
    assert final["eval/preference/accuracy"] > 0.65, final        # chance is 0.5
    saved = preference_eval_task(str(tmp_path / "run" / "model"), f"{world}/test.jsonl")
    assert saved["accuracy"] == pytest.approx(final["eval/preference/accuracy"])
    assert set(k for k in saved if k.startswith("accuracy_")) >= {"accuracy_tone", "accuracy_depth"}
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("reward_gap" in x for x in lines)


def test_hybrid_sampling_resumes_exactly_through_the_trainer(reward_tables, world, tmp_path):
    from polymodal.hub import load_model
    from polymodal.train.run import run_recipe
    common = [f"data.train={world}/conflicting/train.jsonl", "reward.sampling=hybrid", "reward.refresh_every=3",
              f"reward.val={world}/val.jsonl", "train.steps=10", "train.ckpt_every=4", "eval.tasks=[]",
              "optim.schedule=constant"]
    run_recipe(_recipe(tmp_path / "whole", world, *common))
    run_recipe(_recipe(tmp_path / "parts", world, *common, "train.stop_after=6"))    # killed after step 6
    assert not (tmp_path / "parts" / "model").exists()
    run_recipe(_recipe(tmp_path / "parts", world, *common))                          # resumes from step 6
    a = load_model(tmp_path / "whole" / "model").state_dict()
    b = load_model(tmp_path / "parts" / "model").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ckpt = torch.load(sorted((tmp_path / "whole" / "checkpoints").glob("step_*.pt"))[-1], weights_only=False)
    state = ckpt["task"]["_extra_state"]
    assert state["calls"] == 10 and state["sampler"]["updates"] == 3 and state["sampler"]["mode"] == "hybrid"
    w = np.asarray(state["sampler"]["val_acc"])
    assert w.shape == (6,)


def test_recipe_errors_name_the_key(reward_tables, world, tmp_path):
    from polymodal.config import ConfigError
    with pytest.raises(ConfigError, match="reward.sampling must be one of mix, uniform, hybrid"):
        _recipe(tmp_path, world, "reward.sampling=adaptive")
    with pytest.raises(ConfigError, match="needs data.num_workers=0"):
        _recipe(tmp_path, world, "reward.sampling=hybrid", "data.num_workers=2")
