"""Scene recognition (docs/methods.md, scene): labels, losses, refinement, metrics, and one end-to-end run."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import polymodal.eval.tasks
import polymodal.methods
from polymodal.data.labels import hierarchy_from_tree, load_hierarchy
from polymodal.eval.scene import hit_at_k, scene_metrics
from polymodal.losses.distill import distillation_kl, multilabel_loss, multilabel_softmax_loss, self_distillation
from polymodal.models.scene import refine_with_parents
from polymodal.config import ConfigError

RECIPES = Path(__file__).resolve().parents[1] / "recipes"

TREE = [{"name": "motion", "name_zh": "运动", "groups": ["temporal"], "children": [
            {"name": "moves left", "name_zh": "向左移动", "groups": ["temporal"], "children": [
                {"name": "moves left fast", "name_zh": "快速向左"}]},
            {"name": "moves right", "name_zh": "向右移动"}]},
        {"name": "contains star", "name_zh": "含有星形", "groups": ["frame_level"]}]


def _tree():
    return hierarchy_from_tree(TREE)


# ---- labels ----------------------------------------------------------------------------------------------
def test_label_tree_loads_names_parents_groups_and_order(tmp_path):
    path = tmp_path / "tree.json"
    path.write_text(json.dumps({"labels": TREE}, ensure_ascii=False), encoding="utf-8")
    h = load_hierarchy(path)
    assert h.names == ["motion", "moves left", "moves left fast", "moves right", "contains star"]
    assert h.display_names("zh")[2] == "快速向左"
    assert h.parent_index().tolist() == [-1, 0, 1, 0, -1]
    assert h.ancestors("moves left fast") == ["moves left", "motion"] and h.depth("moves left fast") == 2
    assert h.children("motion") == ["moves left", "moves right"]
    assert h.groups == {"temporal": ["motion", "moves left"], "frame_level": ["contains star"]}
    order = h.order()
    assert all(order.index(int(p)) < order.index(c) for c, p in enumerate(h.parent_index()) if p >= 0)
    t = h.targets([["moves left fast"], [4]], close=True)
    assert t.tolist() == [[1, 1, 1, 0, 0], [0, 0, 0, 0, 1]]


def test_label_hierarchy_round_trips_through_its_dict_with_every_group():
    """A saved scene model stores its labels as this dict: names, parents and every group must come back (a group
    outside the standard keys was lost, and with it the model's per-group mAPs)."""
    from polymodal.data.labels import hierarchy_from_classes
    tree = TREE + [{"name": "red object", "groups": ["colour", "single_frame"]}]
    h = hierarchy_from_tree(tree)
    back = hierarchy_from_classes(json.loads(json.dumps(h.to_dict())))
    assert back.names == h.names and back.parents == h.parents and back.names_zh == h.names_zh
    assert back.groups == h.groups and "colour" in back.groups


def test_label_hierarchy_rejects_cycles_unknown_parents_and_bad_zh(tmp_path):
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps({"classes": ["a", "b"], "parents": {"a": "b", "b": "a"}}))
    with pytest.raises(ConfigError, match="cycle"):
        load_hierarchy(bad)
    bad.write_text(json.dumps({"classes": ["a"], "parents": {"a": "zz"}}))
    with pytest.raises(ConfigError, match="'zz'"):
        load_hierarchy(bad)
    bad.write_text(json.dumps({"classes": ["a", "b"], "classes_zh": ["甲"]}))
    with pytest.raises(ConfigError, match="1 Chinese names for 2 labels"):
        load_hierarchy(bad)


def test_consistency_counts_predicted_children_whose_parent_is_predicted():
    h = _tree()
    pred = torch.tensor([[1, 1, 1, 0, 1],      # children: moves left (parent on), fast (parent on)
                         [0, 1, 0, 1, 0],      # moves left (parent off), moves right (parent off)
                         [1, 0, 1, 0, 0]])     # fast (parent "moves left" off)
    assert h.consistency(pred) == pytest.approx(100 * 2 / 5)
    assert math.isnan(h.consistency(torch.zeros(1, 5)))


# ---- losses ----------------------------------------------------------------------------------------------
def test_multilabel_softmax_loss_equals_a_direct_computation_incl_rows_without_positives():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 6, generator=g, dtype=torch.float64) * 3
    y = torch.tensor([[1, 0, 0, 1, 0, 0], [0] * 6, [1] * 6, [0, 0, 1, 0, 0, 0]])
    want = []
    for zi, yi in zip(z.tolist(), y.tolist()):
        neg = sum(math.exp(v) for v, t in zip(zi, yi) if not t)
        pos = sum(math.exp(-v) for v, t in zip(zi, yi) if t)
        want.append(math.log(1 + neg) + math.log(1 + pos))
    got = multilabel_softmax_loss(z, y, reduction="none")
    assert got.tolist() == pytest.approx(want, rel=1e-12)
    assert multilabel_loss(z, y).item() == pytest.approx(np.mean(want), rel=1e-12)
    big = torch.tensor([[200.0, -200.0]])                  # stable where exp would overflow
    assert multilabel_softmax_loss(big, torch.tensor([[0, 1]])).item() == pytest.approx(400.0)


def test_bce_and_asl_options_match_their_formulas():
    z = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64)
    y = torch.tensor([[1, 0, 0]])
    p = torch.sigmoid(z)[0].tolist()
    bce = -(math.log(p[0]) + math.log(1 - p[1]) + math.log(1 - p[2]))
    assert multilabel_loss(z, y, "bce").item() == pytest.approx(bce, rel=1e-10)
    assert multilabel_loss(z, y, "asl", gamma_neg=0, gamma_pos=0, clip=0).item() == pytest.approx(bce, rel=1e-6)
    with pytest.raises(ValueError, match="loss kind"):
        multilabel_loss(z, y, "hinge")


def test_distillation_kl_matches_the_formula_and_never_trains_the_target():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    tau = 2.0
    q, p = torch.softmax(t.detach() / tau, 1), torch.softmax(s.detach() / tau, 1)
    want = tau ** 2 * (q * (q.log() - p.log())).sum(1).mean()
    loss = distillation_kl(s, t, tau)
    assert loss.item() == pytest.approx(want.item(), rel=1e-10)
    loss.backward()
    assert t.grad is None and s.grad is not None and s.grad.abs().sum() > 0
    qb, pb = torch.sigmoid(t.detach()), torch.sigmoid(s.detach())
    want_b = (qb * (qb / pb).log() + (1 - qb) * ((1 - qb) / (1 - pb)).log()).sum(1).mean()
    assert distillation_kl(s, t, 1.0, "bernoulli").item() == pytest.approx(want_b.item(), rel=1e-9)


def test_bernoulli_distillation_is_a_per_label_forward_kl_at_temperature_tau():
    # Independent formula at tau = 2: tau^2 * mean_n sum_c KL(Bern(sigmoid(t/tau)) || Bern(sigmoid(s/tau))).
    g = torch.Generator().manual_seed(3)
    s = (3 * torch.randn(4, 6, generator=g, dtype=torch.float64)).requires_grad_(True)
    t = (3 * torch.randn(4, 6, generator=g, dtype=torch.float64)).requires_grad_(True)
    tau = 2.0
    q, p = torch.sigmoid(t.detach() / tau), torch.sigmoid(s.detach() / tau)          # (N, C) each
    want = tau ** 2 * (q * (q / p).log() + (1 - q) * ((1 - q) / (1 - p)).log()).sum(1).mean()
    loss = distillation_kl(s, t, tau, "bernoulli")
    assert loss.item() == pytest.approx(want.item(), rel=1e-9)
    loss.backward()
    # Forward KL (teacher || student): d/ds = tau * (p - q) / N per label; the reverse KL has another gradient.
    torch.testing.assert_close(s.grad, tau * (p - q) / len(s), rtol=1e-9, atol=1e-12)
    assert t.grad is None                                                            # the target is detached
    # Labels are independent: changing one label's teacher score changes only that label's gradient.
    s2 = s.detach().clone().requires_grad_(True)
    t2 = t.detach().clone()
    t2[:, 2] += 5.0
    distillation_kl(s2, t2, tau, "bernoulli").backward()
    changed = (s2.grad - s.grad).abs() > 1e-12                                        # (N, C)
    assert changed[:, 2].all() and not changed[:, [0, 1, 3, 4, 5]].any()
    # Equal logits give 0, also for large |logits| (log-sigmoid form, no log(0)).
    big = torch.tensor([[60.0, -60.0, 0.0]], dtype=torch.float64)
    assert distillation_kl(big, big, tau, "bernoulli").item() == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="both be"):
        distillation_kl(s.detach(), t.detach().T, tau, "bernoulli")


def test_self_distillation_gradient_reaches_each_stream_only_through_its_own_term():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    loss, ens = self_distillation([a, b], tau=1.5)
    assert not ens.requires_grad
    loss.backward()
    target = ((a + b) / 2).detach()
    a2 = a.detach().clone().requires_grad_(True)
    (distillation_kl(a2, target, 1.5) / 2).backward()     # the gradient a gets from its own KL only
    assert torch.allclose(a.grad, a2.grad, atol=1e-12)


def test_label_residual_lets_labels_with_identical_name_embeddings_score_apart():
    from polymodal.models.scene import LabelClassifier
    torch.manual_seed(0)
    labels = torch.nn.functional.normalize(torch.randn(1, 8), dim=-1).expand(2, 8)   # (C=2, E): same name embedding
    h = torch.randn(5, 8)
    plain = LabelClassifier(8, 2, 10.0)
    z = plain(h, labels)                                                             # (5, 2)
    torch.testing.assert_close(z[:, 0] - plain.bias[0], z[:, 1] - plain.bias[1])     # any video: the same score
    res = LabelClassifier(8, 2, 10.0, residual=0.5)
    assert 0.2 < res.label_delta.norm(dim=1).mean() < 1.0                            # rows of about norm 0.5
    d = res(h, labels)
    assert not torch.allclose(d[:, 0] - d[:, 1], (d[:, 0] - d[:, 1]).mean().expand(5))   # video-dependent from the start
    res.load_state_dict({**plain.state_dict(), "label_delta": torch.zeros(2, 8)})
    torch.testing.assert_close(res(h, labels), z)                                    # a zero residual changes nothing
    assert LabelClassifier(8, 2, 10.0, residual=0.0).label_delta is None


def test_scene_recipes_train_with_a_label_residual_and_older_saved_configs_load_without_one():
    from polymodal.config import from_dict
    from polymodal.methods.scene import SceneSection
    from polymodal.models.scene import SceneConfig, TemporalStream
    cfg = SceneSection().scene_config()
    assert cfg.label_residual == 0.5
    assert TemporalStream(32, 4, cfg, 2).classifier.label_delta.shape == (4, 32)
    assert SceneSection(model={"label_residual": 0}).scene_config().label_residual == 0
    assert from_dict(SceneConfig, {}, "saved").label_residual == 0.0          # a config.json from before the option


# ---- refinement ------------------------------------------------------------------------------------------
def test_parent_refinement_adds_the_scores_along_the_path_on_a_hand_made_tree():
    h = _tree()
    z = torch.tensor([[1.0, 2.0, 4.0, 8.0, 16.0]], requires_grad=True)
    out = refine_with_parents(z, h.parent_index())
    # motion 1; moves left 2+1; fast 4+(2+1); moves right 8+1; contains star (a root) 16
    assert out.tolist() == [[1.0, 3.0, 7.0, 9.0, 16.0]]
    out[0, 2].backward()                                      # fast depends on itself, moves left, motion
    assert z.grad.tolist() == [[1.0, 1.0, 1.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match="cycle"):
        refine_with_parents(z, torch.tensor([1, 0, -1, -1, -1]))


# ---- metrics ---------------------------------------------------------------------------------------------
def test_scene_metrics_equal_scikit_learn_and_hand_counts():
    from sklearn.metrics import average_precision_score, f1_score
    h = _tree()
    g = torch.Generator().manual_seed(3)
    y = (torch.rand(40, 5, generator=g) < 0.4).float()
    y[:, 0] = 1.0
    s = torch.round(torch.randn(40, 5, generator=g) + 1.5 * y, decimals=1)     # ties included
    m = scene_metrics(s, y, h, threshold=0.5)
    yn, sn = y.numpy(), s.numpy()
    ap = [average_precision_score(yn[:, c], sn[:, c]) for c in range(5)]
    assert m["mAP"] == pytest.approx(100 * np.mean(ap), abs=1e-9)
    assert m["mAP_temporal"] == pytest.approx(100 * np.mean(ap[:2]), abs=1e-9)
    assert m["mAP_frame_level"] == pytest.approx(100 * ap[4], abs=1e-9)
    pred = (sn >= 0.5).astype(int)
    assert m["f1_micro"] == pytest.approx(100 * f1_score(yn, pred, average="micro"), abs=1e-9)
    assert m["f1_macro"] == pytest.approx(100 * f1_score(yn, pred, average="macro"), abs=1e-9)
    for k in (1, 3):
        top = np.argsort(-sn, axis=1, kind="stable")[:, :k]
        want = 100 * np.mean([yn[i, top[i]].max() for i in range(len(yn))])
        assert hit_at_k(s, y, k) == pytest.approx(want)
    assert m["consistency"] == pytest.approx(h.consistency(s >= 0.5))


# ---- end to end ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(moving_world):
    return moving_world(n_train=96, n_test=8, seed=2, num_frames=8)


def test_scene_recipe_trains_a_two_stream_model_above_chance(world, tmp_path, monkeypatch):
    from polymodal.eval.scene import scene_eval_task
    from polymodal.methods.scene import SceneMethod
    from polymodal.hub import load_model
    from polymodal.models.scene import SceneModel
    from polymodal.train.run import load_recipe, run_recipe
    monkeypatch.setitem(polymodal.methods.METHODS, "scene", SceneMethod)
    monkeypatch.setitem(polymodal.eval.tasks.TASKS, "scene", polymodal.eval.tasks._lazy("scene", "scene_eval_task"))
    torch.set_num_threads(1)
    cfg = load_recipe(None, [
        "method=scene", f"out_dir={tmp_path}/run", "model.name=tiny", f"data.train={world}/train.jsonl",
        "data.batch_size=16", "data.num_frames=2", "train.steps=100", "train.log_every=10", "train.ckpt_every=0",
        "train.progress=false", "train.threads=1", "optim.lr=3e-3", "optim.warmup_steps=5",
        "tokenizer.vocab_size=200", "tokenizer.corpus_keys=[caption, scene_labels]",
        "scene={model: {layers: 1, fusion_layers: 1}, distill_weight: 1.0}",
        f"eval={{tasks: [{{task: scene, data: {world}/train.jsonl, num_frames: 2, limit: 48}}]}}"])
    final = run_recipe(cfg)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in lines if "loss" in x]
    assert "distill" in next(x for x in lines if "loss" in x)
    assert losses[-1] < losses[0] - 0.3
    # chance mAP = mean prevalence of the classes with positives (random scores); the run sees these videos
    # in training, so this checks learning end to end (data, both streams, loss, eval), not generalisation.
    recs = [json.loads(x) for x in (world / "train.jsonl").read_text().splitlines()][:48]
    h = load_hierarchy(world / "classes.json")
    prev = h.targets([r["labels"] for r in recs]).mean(0)
    chance = 100 * float(prev[prev > 0].mean())
    assert final["eval/scene/mAP"] > chance + 8, (final, chance)
    assert final["eval/scene/num_videos"] == 48
    model = load_model(tmp_path / "run" / "model")
    assert isinstance(model, SceneModel) and model.hierarchy.names == h.names
    again = scene_eval_task(model, str(world / "train.jsonl"), num_frames=2, limit=48)
    assert again["mAP"] == pytest.approx(final["eval/scene/mAP"], abs=1e-4)


def test_frame_stream_ignores_frame_order_and_the_temporal_stream_does_not():
    from polymodal.models.scene import FrameStream, SceneConfig, TemporalStream
    torch.manual_seed(0)
    cfg = SceneConfig(layers=1)
    labels = torch.nn.functional.normalize(torch.randn(5, 32), dim=-1)           # (C, E)
    x = torch.randn(2, 4, 32)                                                   # (B, T, E)
    valid = torch.tensor([[True] * 4, [True, True, True, False]])
    rev = torch.tensor([[3, 2, 1, 0], [2, 1, 0, 3]])                            # reverse the valid frames
    x_rev = torch.stack([x[b, rev[b]] for b in range(2)])
    frame, temporal = FrameStream(32, 5, cfg, 2).eval(), TemporalStream(32, 5, cfg, 2).eval()
    assert torch.allclose(frame(x, valid, labels)[0], frame(x_rev, valid, labels)[0], atol=1e-6)
    assert not torch.allclose(temporal(x, valid, labels), temporal(x_rev, valid, labels), atol=1e-4)
    padded = x.clone()
    padded[1, 3] = 100.0                                                         # a padded frame never counts
    assert torch.allclose(temporal(x, valid, labels), temporal(padded, valid, labels), atol=1e-5)
    assert torch.allclose(frame(x, valid, labels)[0], frame(padded, valid, labels)[0], atol=1e-6)


def test_the_temporal_stream_starts_as_sensitive_to_frame_order_as_to_frame_content():
    # Reversing the frames must move the stream's feature a good part of what other frames do, at initialisation:
    # with time embeddings far smaller than the layer-normed frames (std 0.02, the old start) it moved 2-3%, no
    # order gradient reached the stream, and trained streams scored an order label and its opposite at chance.
    from polymodal.models.scene import SceneConfig, TemporalStream
    torch.manual_seed(0)
    stream = TemporalStream(64, 5, SceneConfig(layers=2), 2).eval()
    x, other = torch.randn(16, 8, 64), torch.randn(16, 8, 64)                   # (B, T, E)

    def feature(frames):                                                        # the CLS feature the classifier reads
        B, T, _ = frames.shape
        h = torch.cat([stream.cls.expand(B, 1, -1), stream.norm_in(frames) + stream.time[:T]], dim=1)
        return stream.norm(stream.transformer(h)[:, 0])                          # (B, E)
    with torch.no_grad():
        h, h_rev, h_other = feature(x), feature(x.flip(1)), feature(other)
    ratio = (h - h_rev).norm(dim=1).mean() / (h - h_other).norm(dim=1).mean()
    assert ratio > 0.3, ratio


def test_scene_recipes_load_and_validate(monkeypatch):
    from polymodal.methods.scene import SceneMethod
    from polymodal.train.run import load_recipe
    monkeypatch.setitem(polymodal.methods.METHODS, "scene", SceneMethod)
    monkeypatch.setitem(polymodal.eval.tasks.TASKS, "scene", polymodal.eval.tasks._lazy("scene", "scene_eval_task"))
    for name in ("two_stream", "temporal", "frame"):
        cfg = load_recipe(str(RECIPES / f"scene_{name}.yaml"), [])
        assert cfg.method == "scene"
    with pytest.raises(ValueError, match="distill_weight"):
        load_recipe(str(RECIPES / "scene_temporal.yaml"), ["scene.distill_weight=1.0"])
    with pytest.raises(ValueError, match="streams"):
        load_recipe(str(RECIPES / "scene_two_stream.yaml"), ["scene.model.streams=three"])


def test_moving_shapes_label_groups_reach_the_hierarchy_and_the_group_metrics(tmp_path):
    """classes.json's order-dependent / single-frame groups load as hierarchy groups, and the per-group mAP equals
    scikit-learn's mAP over exactly those columns."""
    from sklearn.metrics import average_precision_score

    from polymodal.data.synthetic.moving_shapes import class_table
    path = tmp_path / "classes.json"
    path.write_text(json.dumps(class_table()), encoding="utf-8")
    h = load_hierarchy(path)
    assert {"order_dependent", "single_frame", "order_compound"} <= set(h.groups)
    assert h.ancestors("moves left then right") == ["motion"] and h.ancestors("red object") == []
    assert len(h.display_names("zh")) == len(h) and "先向左再向右移动" in h.display_names("zh")
    g = torch.Generator().manual_seed(0)
    N, C = 40, len(h)
    targets = (torch.rand(N, C, generator=g) < 0.3).float()
    scores = torch.randn(N, C, generator=g) + 2 * targets
    out = scene_metrics(scores, targets, h)
    for group in ("order_dependent", "single_frame"):
        cols = [h.index[n] for n in h.groups[group]]
        aps = [average_precision_score(targets[:, c].numpy(), scores[:, c].numpy()) for c in cols
               if targets[:, c].any()]
        assert out[f"mAP_{group}"] == pytest.approx(100 * float(np.mean(aps)), abs=1e-3)
