"""ASD: the epoch resampler (expected counts, exact resume) and fine-tuning a tiny MLLM through run_recipe."""
import json
import math

import numpy as np
import pytest
import torch

from polymodal import methods
from polymodal.data.resample import EpochResampler
from polymodal.eval import tasks
from polymodal.eval.fairness import fairness_task
from polymodal.losses.fairness import fairness_loss, fairness_weights
from polymodal.methods.asd import ASDMethod
from polymodal.train.run import load_recipe, run_recipe

torch.set_num_threads(1)


def test_positive_skew_drops_with_probability_skew_over_skew_plus_tau1():
    n, s, tau1 = 20000, 0.5, 1.0
    r = EpochResampler(n, tau1=tau1, seed=4)
    kept = len(r.draw(np.full(n, s), epoch=0))
    p = s / (s + tau1)
    assert abs((n - kept) - n * p) < 4 * np.sqrt(n * p * (1 - p))
    kept2 = len(EpochResampler(n, tau1=2.0, seed=4).draw(np.full(n, s), epoch=0))
    assert abs((n - kept2) - n * 0.2) < 4 * np.sqrt(n * 0.16)


def test_nonpositive_skew_keeps_and_copies_when_the_accumulator_passes_tau2():
    n = 1000
    skews = np.concatenate([np.full(n // 2, -0.3), np.zeros(n // 2)])
    r = EpochResampler(n, tau2=1.0, seed=0)
    copies = []
    for e in range(10):
        idx = r.draw(skews, epoch=e)
        assert set(range(n)) <= set(idx.tolist())                      # nothing with Skew <= 0 is dropped
        copies.append(len(idx) - n)
    # 0.3 per epoch: copies in epochs 4, 7, 10 (accumulator 1.2 -> 0.2, 1.1 -> 0.1, 1.0 -> 0.0).
    assert copies == [0, 0, 0, n // 2, 0, 0, n // 2, 0, 0, n // 2]
    assert np.bincount(idx, minlength=n)[: n // 2].max() == 2
    # Over many epochs the copies per sample approach epochs * |Skew| / tau2.
    r2 = EpochResampler(1, tau2=0.5)
    total = sum(len(r2.draw([-0.37], e)) - 1 for e in range(100))
    assert total == int(100 * 0.37 / 0.5 + 1e-9)


def test_resume_from_a_state_dict_is_exact():
    rng = np.random.default_rng(0)
    skews = [rng.normal(0, 0.8, 200) for _ in range(6)]
    full = EpochResampler(200, seed=9)
    want = [full.draw(s, e).tolist() for e, s in enumerate(skews)]
    part = EpochResampler(200, seed=9)
    got = [part.draw(s, e).tolist() for e, s in enumerate(skews[:3])]
    state = json.loads(json.dumps(part.state_dict()))                  # survives a checkpoint as plain data
    resumed = EpochResampler(200, seed=123)
    resumed.load_state_dict(state)
    assert resumed.epoch_order(250).tolist() == part.epoch_order(250).tolist()
    got += [resumed.draw(s, e).tolist() for e, s in enumerate(skews[3:], start=3)]
    assert got == want
    with pytest.raises(ValueError, match="same training manifest"):
        EpochResampler(10).load_state_dict(state)


def test_epoch_order_keeps_the_base_length():
    r = EpochResampler(10, seed=1)
    r.draw(np.array([5.0] * 5 + [-2.0] * 5), epoch=0)
    order = r.epoch_order(10)
    assert len(order) == 10 and set(order.tolist()) <= set(r.indices.tolist())


def test_copies_per_epoch_are_capped_and_the_excess_is_not_banked():
    # One sample at -inf (a never-chosen pairing), one at -3.5: at most max_copies copies each, every epoch.
    r = EpochResampler(3, tau2=1.0, seed=0, max_copies=2)
    for e in range(4):
        idx = r.draw([-np.inf, -3.5, 0.0], epoch=e)
        assert np.bincount(idx, minlength=3).tolist() == [3, 3, 1]       # itself + 2 copies, twice; the third once
        assert np.isfinite(r.acc).all() and (r.acc < 1.0).all()          # nothing banked past the cap
    with pytest.raises(ValueError, match="max_copies"):
        EpochResampler(1).draw([-np.inf], epoch=0)                      # no cap: an infinite skew is an error


def test_a_never_chosen_pairing_gets_the_capped_weight_and_copies(monkeypatch):
    # Blue figures are never called leaders by the model: Skew(race, leader, blue) = ln(0) = -inf.
    import polymodal.methods.asd as asd_mod
    from polymodal.methods.asd import ASDConfig, ASDTask

    def rec(race, answer):
        return {"kind": "concept", "attributes": {"race": race}, "options": ["leader", "helper"], "answer": answer}
    records = [rec("red", "leader"), rec("blue", "leader"), rec("red", "helper"), rec("blue", "helper"),
               {"kind": "task", "attributes": {}, "options": ["1", "2"], "answer": "1"}]
    probs = torch.tensor([[0.5, 0.5], [0.0, 1.0], [0.5, 0.5], [0.0, 1.0]])       # (4 concept records, 2 options)
    monkeypatch.setattr(asd_mod, "option_probabilities", lambda model, recs, bs: probs)
    model = torch.nn.Module()
    model.visual = torch.nn.Linear(1, 1)
    cfg = ASDConfig()
    task = ASDTask(model, cfg, records, seed=0)
    task.refresh(0)
    skews = task.skews
    assert skews[1].item() == pytest.approx(-math.log(cfg.max_weight))              # floored, not -10
    w = fairness_weights(skews, cfg.max_weight)
    assert w[1].item() == pytest.approx(cfg.max_weight) and w.max().item() <= cfg.max_weight + 1e-6
    for e in range(1, 5):
        task.refresh(e)
        assert np.bincount(task.resampler.indices, minlength=5)[1] - 1 <= cfg.max_copies
    assert task.floored == pytest.approx(1 / 4)                                   # 1 of 4 concept samples
    assert cfg.max_weight <= 20 and cfg.max_copies <= 3              # bounded by default (the old clip: e^10, 10)
    nll = torch.ones(5, requires_grad=True)
    assert fairness_loss(nll, skews, cfg.max_weight).item() <= cfg.max_weight


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from polymodal.data.synthetic.counterfactual import CounterfactualConfig, generate_counterfactual
    out = tmp_path_factory.mktemp("cf")
    generate_counterfactual(out, n_train_sets=48, n_eval_sets=18, seed=0,
                            cfg=CounterfactualConfig(bias=0.8, biased_attributes=["race"]))
    return out


@pytest.fixture
def asd(monkeypatch):
    monkeypatch.setitem(methods.METHODS, "asd", ASDMethod)              # a table entry made in the test
    monkeypatch.setitem(tasks.TASKS, "fairness", fairness_task)


def recipe(world, out, *extra):
    return load_recipe(None, ["method=asd", f"out_dir={out}", "model.name=mllm-tiny", f"data.train={world}/train.jsonl",
                              "model.overrides={lm.width: 32, lm.heads: 2}",
                              "data.batch_size=32", "train.log_every=10", "train.progress=false", "train.threads=1",
                              "optim.warmup_steps=5", "tokenizer.vocab_size=300", "train.ckpt_every=0",
                              f"eval.tasks=[{{task: fairness, data: {world}/eval.jsonl}}]", *extra])


def test_asd_fine_tuning_reduces_min_skew_on_the_tiny_world(asd, world, tmp_path):
    # A base model trained on the biased world, then the same fine-tuning with and without ASD.
    base = run_recipe(recipe(world, tmp_path / "base", "asd={loss: false, resample: false}", "train.steps=100",
                             "optim.lr=6e-3"))
    tune = [f"model.path={tmp_path}/base/model", "train.steps=25", "optim.lr=2e-3"]
    plain = run_recipe(recipe(world, tmp_path / "ft", *tune, "asd={loss: false, resample: false}"))
    asd = run_recipe(recipe(world, tmp_path / "asd", *tune, "asd={loss: true, resample: true}"))
    before, ft, after = (r["eval/fairness/min_skew/race"] for r in (base, plain, asd))
    assert before < -0.2, before                                          # the biased prior was learned
    # Plain fine-tuning on the biased data keeps learning the bias; ASD (same data, steps, seed) much less.
    assert abs(after) < 0.8 * abs(ft), (before, ft, after)
    assert (tmp_path / "asd" / "model" / "model.safetensors").is_file()
    assert "eval/fairness/task_accuracy" in asd


def test_a_resumed_asd_run_matches_an_uninterrupted_one(asd, world, tmp_path):
    common = ["train.steps=8", "optim.lr=1e-3", "data.batch_size=64", "asd={loss: true, resample: true}",
              "eval.tasks=[]"]
    run_recipe(recipe(world, tmp_path / "full", *common))
    run_recipe(recipe(world, tmp_path / "cut", *common, "train.stop_after=5", "train.ckpt_every=5"))
    ckpt = torch.load(next((tmp_path / "cut" / "checkpoints").glob("*.pt")), weights_only=True)
    assert ckpt["task"]["_extra_state"]["resampler"]["epoch"] >= 0     # the resampler travels with the task
    run_recipe(recipe(world, tmp_path / "cut", *common))
    from safetensors.torch import load_file
    a = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "model" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
