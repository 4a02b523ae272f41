"""Skew metrics, the fairness loss and the counterfactual generator, against hand computations."""
import argparse
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from polymodal.data.synthetic import counterfactual as cf
from polymodal.eval.fairness import min_max_skew, sample_skew, skew, skew_table
from polymodal.losses.fairness import bound_skews, fairness_loss, fairness_weights


def test_skew_is_log_ratio_to_the_desired_share():
    assert skew(0.25, 0.5) == pytest.approx(math.log(0.5))
    assert skew(0.5, 1 / 3) == pytest.approx(math.log(1.5))
    assert skew(0.0, 0.5) == float("-inf")
    with pytest.raises(ValueError):
        skew(0.5, 0.0)


def test_skew_table_on_hand_made_probabilities():
    # Concept "leader": P = 0.6, 0.8 on circles (mean 0.7), 0.3 on squares; "helper": 0.4, 0.2 / 0.7.
    rows = [{"attributes": {"g": "circle"}, "probs": {"leader": 0.6, "helper": 0.4}},
            {"attributes": {"g": "circle"}, "probs": {"leader": 0.8, "helper": 0.2}},
            {"attributes": {"g": "square"}, "probs": {"leader": 0.3, "helper": 0.7}}]
    table = skew_table(rows, {"g": ["circle", "square"]})
    assert table[("g", "leader")]["circle"] == pytest.approx(math.log((0.7 / 1.0) / 0.5))
    assert table[("g", "leader")]["square"] == pytest.approx(math.log((0.3 / 1.0) / 0.5))
    assert table[("g", "helper")]["square"] == pytest.approx(math.log((0.7 / 1.0) / 0.5))
    m = min_max_skew(table)
    # Per concept: leader max ln1.4 min ln0.6; helper max ln1.4 min ln0.6 -> means the same.
    assert m["max_skew"] == pytest.approx(math.log(1.4)) and m["min_skew"] == pytest.approx(math.log(0.6))
    assert m["max_skew/g"] == m["max_skew"] and m["worst_min_skew"] == pytest.approx(math.log(0.6))


def test_min_max_skew_averages_concepts_then_attributes():
    table = {("a", "x"): {"u": 0.2, "v": -0.4}, ("a", "y"): {"u": 0.0, "v": 0.0},
             ("b", "x"): {"p": 0.6, "q": -1.0, "r": 0.1}}
    m = min_max_skew(table)
    assert m["max_skew/a"] == pytest.approx(0.1) and m["min_skew/a"] == pytest.approx(-0.2)
    assert m["max_skew"] == pytest.approx((0.1 + 0.6) / 2) and m["min_skew"] == pytest.approx((-0.2 - 1.0) / 2)
    assert m["worst_max_skew"] == pytest.approx(0.6) and m["worst_min_skew"] == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="empty"):
        min_max_skew({})


def test_a_samples_skew_is_the_signed_skew_of_its_largest_attribute():
    table = {("g", "leader"): {"circle": 0.3, "square": -0.5}, ("r", "leader"): {"red": -0.2, "blue": 0.4}}
    assert sample_skew(table, "leader", {"g": "square", "r": "blue"}) == pytest.approx(-0.5)
    assert sample_skew(table, "leader", {"g": "circle", "r": "blue"}) == pytest.approx(0.4)
    assert sample_skew(table, "helper", {"g": "circle"}) == 0.0


def test_fairness_loss_weights_are_exp_minus_skew_and_carry_no_gradient():
    nll = torch.tensor([1.0, 2.0, 0.5], requires_grad=True)
    skews = torch.tensor([0.5, -1.0, 0.0], requires_grad=True)
    loss = fairness_loss(nll, skews)
    want = (math.exp(-0.5) * 1.0 + math.exp(1.0) * 2.0 + 0.5) / 3
    assert float(loss.detach()) == pytest.approx(want)
    loss.backward()
    torch.testing.assert_close(nll.grad, torch.exp(-skews.detach()) / 3)
    assert skews.grad is None
    torch.testing.assert_close(fairness_weights(skews), torch.exp(-skews.detach()))


def test_skews_are_floored_at_minus_log_max_weight_and_the_weight_is_capped():
    s = bound_skews([-math.inf, -10.0, -1.0, 0.0, 0.7, math.nan], max_weight=4.0)
    assert s.tolist() == pytest.approx([-math.log(4), -math.log(4), -1.0, 0.0, 0.7, -math.log(4)])
    w = fairness_weights(torch.tensor([-math.inf, -10.0, -1.0, 0.5]), max_weight=4.0)
    torch.testing.assert_close(w, torch.tensor([4.0, 4.0, math.e, math.exp(-0.5)]))
    nll = torch.tensor([1.0, 2.0], requires_grad=True)
    assert fairness_loss(nll, torch.tensor([-math.inf, 0.0]), max_weight=4.0).item() == pytest.approx((4 + 2) / 2)
    with pytest.raises(ValueError, match="max_weight"):
        bound_skews([0.0], max_weight=0.5)


def test_counterfactual_sets_change_one_attribute_and_nothing_else(tmp_path):
    out = tmp_path / "cf"
    cf.generate_counterfactual(out, n_train_sets=9, n_eval_sets=6, seed=3)
    recs = [json.loads(l) for l in (out / "eval.jsonl").read_text().splitlines()]
    by_set = {}
    for r in recs:
        by_set.setdefault(r["set"], {})[r["image"]] = r
    for members in by_set.values():
        imgs = list(members.values())
        varied = imgs[0]["varied"]
        assert len(imgs) == len(cf.ATTRIBUTES[varied][1])
        assert len({r["attributes"][varied] for r in imgs}) == len(imgs)
        for a in cf.ATTRIBUTES:
            if a != varied:
                assert len({r["attributes"][a] for r in imgs}) == 1
        arrays = [np.asarray(Image.open(out / r["image"])).astype(int) for r in imgs]
        diff = np.abs(arrays[0] - arrays[1]).sum(-1) > 0
        assert 0 < diff.mean() < 0.2             # only the figure's pixels change
    # Balanced: every attribute is varied by the same number of sets; eval concept questions have no answer.
    varied = [next(iter(m.values()))["varied"] for m in by_set.values()]
    assert sorted(varied.count(a) for a in cf.ATTRIBUTES) == [2, 2, 2]
    assert all(r["answer"] is None for r in recs if r["kind"] == "concept")
    assert all(r["answer"] in r["options"] for r in recs if r["kind"] == "task")


def test_training_answers_follow_the_stereotype_with_the_configured_strength(tmp_path):
    def share(bias):
        out = tmp_path / f"b{bias}"
        cf.generate_counterfactual(out, 60, 0, seed=1, cfg=cf.CounterfactualConfig(image_size=16, bias=bias,
                                                                                    biased_attributes=["gender"]))
        recs = [json.loads(l) for l in (out / "train.jsonl").read_text().splitlines()]
        concept = [r for r in recs if r["kind"] == "concept"]
        return np.mean([r["answer"] == cf.favoured_concept(r["question"], "gender", r["attributes"]["gender"])
                        for r in concept]), len(concept)
    s0, n = share(0.0)
    s1, _ = share(0.9)
    # Expected share: bias + (1 - bias) / 3.
    assert abs(s0 - 1 / 3) < 3 * math.sqrt(2 / 9 / n)
    assert abs(s1 - (0.9 + 0.1 / 3)) < 3 * math.sqrt(0.07 / n) + 0.02


def test_the_cli_entry_points(tmp_path, capsys):
    parser = cf.add_cli_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--out", str(tmp_path / "c"), "--n-train-sets", "3", "--n-eval-sets", "3",
                              "--bias", "0.5", "--biased-attributes", "age,race", "--image-size", "16"])
    result = cf.main_from_args(args)
    assert result["counts"]["train"] > 0 and json.loads(capsys.readouterr().out)["counts"] == result["counts"]
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    assert meta["config"]["biased_attributes"] == ["age", "race"] and "proxy" in meta["note"]
    with pytest.raises(ValueError, match="biased_attributes"):
        cf.CounterfactualConfig(biased_attributes=["height"])
