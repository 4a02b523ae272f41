"""Multi-label metrics against scikit-learn and hand computations."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, precision_recall_fscore_support

from polymodal.eval.multilabel import average_precision, f1_at_threshold, f1_at_topk, multilabel_metrics

SCORES = torch.tensor([[0.9, 0.1, 0.8],
                       [0.2, 0.7, 0.6],
                       [0.4, 0.3, 0.5]])
TARGETS = torch.tensor([[1, 0, 0],
                        [0, 1, 1],
                        [1, 0, 1]])


def random_case(seed, n=60, c=7, decimals=1):
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, c)) < 0.3).astype(int)
    targets[:, -1] = 0                                   # one class without positives
    targets[0, 0] = 1
    # Rounding to one decimal makes many equal scores, including across labels.
    scores = np.round(rng.random((n, c)) + 0.4 * targets, decimals)
    return scores, targets


def test_ap_hand_case():
    # class 0: ranking + + -          -> AP = (1/1 + 2/2) / 2 = 1
    # class 1: ranking - + - by score -> 0.7 (+) first      -> AP = 1
    # class 2: ranking - + +          -> AP = (1/2 + 2/3) / 2 = 7/12
    got = average_precision(SCORES, TARGETS)
    assert got["AP_per_class"] == pytest.approx([100.0, 100.0, 700 / 12])
    assert got["mAP"] == pytest.approx((200 + 700 / 12) / 3)


def test_ap_tie_group_counts_as_one_threshold():
    # Both samples score 0.5: one threshold with precision 1/2, whatever the order.
    for targets in ([[1], [0]], [[0], [1]]):
        assert average_precision(torch.tensor([[0.5], [0.5]]), torch.tensor(targets))["mAP"] == 50.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ap_matches_sklearn_with_ties(seed):
    scores, targets = random_case(seed)
    got = average_precision(torch.tensor(scores), torch.tensor(targets))
    want = [100 * average_precision_score(targets[:, c], scores[:, c]) for c in range(6)]
    assert got["AP_per_class"][:6] == pytest.approx(want, abs=1e-9)
    assert math.isnan(got["AP_per_class"][6])           # no positives: excluded
    assert got["mAP"] == pytest.approx(np.mean(want), abs=1e-9)
    assert got["num_classes_with_positives"] == 6


def test_topk_hand_case():
    # Top-1 predicts classes 0, 1, 2 for the three samples: 3 hits of 3 predictions, 5 positives.
    got = f1_at_topk(SCORES, TARGETS, k=1)
    assert got["precision_micro"] == pytest.approx(100.0)
    assert got["recall_micro"] == pytest.approx(60.0)
    assert got["f1_micro"] == pytest.approx(75.0)               # 2 * 1 * 0.6 / 1.6
    assert got["precision_macro"] == pytest.approx(100.0)
    assert got["recall_macro"] == pytest.approx(200 / 3)        # (1/2 + 1 + 1/2) / 3
    assert got["f1_macro"] == pytest.approx(700 / 9)            # (2/3 + 1 + 2/3) / 3
    assert got["f1_macro_hm"] == pytest.approx(80.0)            # 2 * 1 * (2/3) / (5/3)


def sklearn_prf(pred, targets):
    out = {}
    for avg in ("micro", "macro"):
        p, r, f, _ = precision_recall_fscore_support(targets, pred, average=avg, zero_division=np.nan)
        out.update({f"precision_{avg}": 100 * p, f"recall_{avg}": 100 * r, f"f1_{avg}": 100 * f})
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_threshold_and_topk_match_sklearn(seed):
    scores, targets = random_case(seed, decimals=3)
    got = f1_at_threshold(torch.tensor(scores), torch.tensor(targets), threshold=0.8)
    want = sklearn_prf((scores >= 0.8).astype(int), targets)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-9), k
    got = f1_at_topk(torch.tensor(scores), torch.tensor(targets), k=2)
    pred = np.zeros_like(targets)
    for i, row in enumerate(scores):
        pred[i, np.argsort(-row, kind="stable")[:2]] = 1
    want = sklearn_prf(pred, targets)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-9), k


def test_multilabel_metrics_combines_and_checks_inputs():
    got = multilabel_metrics(SCORES, TARGETS, k=1, threshold=0.5)
    assert got["mAP"] == average_precision(SCORES, TARGETS)["mAP"]
    assert got["top1_f1_micro"] == pytest.approx(75.0)
    # threshold 0.5 predicts 0.9, 0.8, 0.7, 0.6, 0.5: hits (0,0) (1,1) (1,2) (2,2) -> P 4/5, R 4/5
    assert got["threshold0.5_f1_micro"] == pytest.approx(80.0)
    with pytest.raises(ValueError, match="0/1"):
        average_precision(SCORES, TARGETS * 2)
    with pytest.raises(ValueError, match=r"\(3, 3\) and \(3, 2\)"):
        average_precision(SCORES, TARGETS[:, :2])
    with pytest.raises(ValueError, match="no class has a positive"):
        average_precision(SCORES, torch.zeros(3, 3))


def test_write_json_is_atomic_and_writes_undefined_ap_as_null(tmp_path):
    import json

    from polymodal.eval.report import write_json

    scores, targets = random_case(0)
    metrics = multilabel_metrics(torch.tensor(scores), torch.tensor(targets))
    path = write_json(tmp_path / "new" / "dir" / "metrics.json", metrics)
    loaded = json.loads(path.read_text())
    assert loaded["AP_per_class"][6] is None                 # NaN -> null (strict JSON)
    assert loaded["mAP"] == pytest.approx(metrics["mAP"])
    write_json(path, {"x": torch.tensor(1.5), "y": np.float32(2.0)})   # replaces the file
    assert json.loads(path.read_text()) == {"x": 1.5, "y": 2.0}
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]  # no temp file left
