"""Multi-label adapter, random perturbation, ASL and ranking losses."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from polymodal.losses.multilabel import AsymmetricLoss, RankingLoss, asymmetric_loss, ranking_loss
from polymodal.models.multilabel import AdapterConfig, MultiLabelAdapter, load_adapter, perturb, save_adapter


def _adapter(**kw):
    torch.manual_seed(0)
    cfg = AdapterConfig(embed_dim=16, hidden_dim=24, **kw)
    return MultiLabelAdapter(cfg, torch.randn(5, 16), [f"l{i}" for i in range(5)])


def test_adapter_shapes_and_logits_are_scaled_cosines():
    a = _adapter(alpha=0.3, zero_init=False, logit_scale=7.0).eval()
    x = torch.randn(4, 16)
    logits = a(x)
    assert logits.shape == (4, 5)
    xn = F.normalize(x, dim=-1)
    expected_x = F.normalize(xn + 0.3 * a.mlp(xn), dim=-1)
    expected = 7.0 * expected_x @ F.normalize(a.label_embeds, dim=-1).T
    assert torch.allclose(logits, expected, atol=1e-5)
    assert torch.allclose(a.embed(x).norm(dim=-1), torch.ones(4), atol=1e-5)


def test_alpha_zero_or_zero_init_keeps_the_input_direction():
    x = torch.randn(6, 16)
    for a in (_adapter(alpha=0.0, zero_init=False), _adapter(alpha=0.5, zero_init=True)):
        assert torch.allclose(a.eval().embed(x), F.normalize(x, dim=-1), atol=1e-6)
    moved = _adapter(alpha=0.5, zero_init=False).eval().embed(x)
    assert not torch.allclose(moved, F.normalize(x, dim=-1), atol=1e-3)


def test_frozen_and_trainable_parts_follow_the_config():
    frozen = _adapter()
    names = {n for n, p in frozen.named_parameters()}
    assert names == {"mlp.0.weight", "mlp.0.bias", "mlp.3.weight", "mlp.3.bias"}
    full = _adapter(learn_alpha=True, learn_logit_scale=True, train_classifier=True)
    names = {n for n, p in full.named_parameters()}
    assert {"alpha", "log_logit_scale", "label_embeds"} <= names
    assert full.logit_scale.item() == pytest.approx(20.0)


def test_save_load_round_trip_is_exact_and_atomic(tmp_path):
    a = _adapter(zero_init=False, learn_alpha=True, alpha=0.25)
    with torch.no_grad():
        a.alpha.fill_(0.7)
    save_adapter(a, tmp_path / "ad")
    save_adapter(a, tmp_path / "ad")                      # overwriting an existing folder works
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]  # no temporary leftovers
    b = load_adapter(tmp_path / "ad")
    x = torch.randn(3, 16)
    assert torch.equal(a.eval()(x), b(x))
    assert b.label_names == a.label_names and b.config == a.config and b.alpha.item() == pytest.approx(0.7)
    meta = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    meta["config"]["alpah"] = 1
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="alpah"):
        load_adapter(tmp_path / "ad")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(tmp_path / "nope")
    a.save_pretrained(tmp_path / "sp")                   # what a run writes as out_dir/model
    assert torch.equal(a(x), load_adapter(tmp_path / "sp")(x))


def test_perturbation_statistics():
    torch.manual_seed(1)
    x = F.normalize(torch.randn(2000, 64), dim=-1)
    assert torch.allclose(perturb(x, 0.0), x, atol=1e-6)         # sigma = 0: unchanged (up to rounding)
    cosines = []
    for sigma in (0.01, 0.05, 0.2):
        y = perturb(x, sigma, torch.Generator().manual_seed(0))
        assert torch.allclose(y.norm(dim=-1), torch.ones(len(y)), atol=1e-5)
        cosines.append(float((x * y).sum(-1).mean()))
        # For E-dim isotropic noise the cosine is about 1 / sqrt(1 + E sigma^2).
        assert cosines[-1] == pytest.approx(1 / math.sqrt(1 + 64 * sigma ** 2), abs=0.02)
    assert cosines[0] > cosines[1] > cosines[2]
    a = perturb(x, 0.1, torch.Generator().manual_seed(3))
    b = perturb(x, 0.1, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    with pytest.raises(ValueError):
        perturb(x, -0.1)


def _asl_direct(logits, y, gn, gp, m):
    total = 0.0
    for n in range(logits.shape[0]):
        for c in range(logits.shape[1]):
            p = 1 / (1 + math.exp(-float(logits[n, c])))
            if y[n, c]:
                total += -((1 - p) ** gp) * math.log(p)
            else:
                pm = max(p - m, 0.0)
                total += -(pm ** gn) * math.log(1 - pm)
    return total / logits.shape[0]


def test_asl_matches_the_paper_formula():
    torch.manual_seed(2)
    logits = torch.randn(6, 5) * 3
    y = (torch.rand(6, 5) < 0.4).float()
    for gn, gp, m in ((4.0, 0.0, 0.05), (2.0, 1.0, 0.2), (0.0, 0.0, 0.0)):
        assert asymmetric_loss(logits, y, gn, gp, m).item() == pytest.approx(_asl_direct(logits, y, gn, gp, m), rel=1e-5)
    # No focusing, no shifting = binary cross-entropy summed over classes.
    bce = F.binary_cross_entropy_with_logits(logits, y, reduction="sum") / 6
    assert asymmetric_loss(logits, y, 0.0, 0.0, 0.0).item() == pytest.approx(bce.item(), rel=1e-5)
    assert AsymmetricLoss(2.0, 1.0, 0.2)(logits, y).item() == pytest.approx(_asl_direct(logits, y, 2.0, 1.0, 0.2), rel=1e-5)
    # Negatives with p <= clip cost nothing.
    easy = torch.full((1, 3), -10.0)
    assert asymmetric_loss(easy, torch.zeros(1, 3), clip=0.05).item() == 0.0


def test_ranking_loss_matches_a_direct_double_loop():
    torch.manual_seed(3)
    logits = torch.randn(5, 6)
    y = (torch.rand(5, 6) < 0.4).float()
    y[0] = 0                      # no positive: no pair, left out of the mean
    y[1] = 1                      # no negative: left out too
    y[2, :2] = torch.tensor([1.0, 0.0])
    per = []
    for n in range(5):
        pairs = [max(0.0, 0.5 - float(logits[n, i]) + float(logits[n, j]))
                 for i in range(6) for j in range(6) if y[n, i] == 1 and y[n, j] == 0]
        if pairs:
            per.append(sum(pairs) / len(pairs))
    assert ranking_loss(logits, y, margin=0.5).item() == pytest.approx(sum(per) / len(per), rel=1e-6)
    assert RankingLoss(0.5, "sum")(logits, y).item() == pytest.approx(sum(per), rel=1e-6)
    assert ranking_loss(logits, torch.zeros(5, 6)).item() == 0.0


def test_losses_reject_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        asymmetric_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        ranking_loss(torch.zeros(3), torch.zeros(3))
