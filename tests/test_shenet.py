"""SHE-Net: hit-rate metric by hand, the similarity against an independent loop and its all-zero-weights limit,
and an end-to-end run of the tiny model on MovingShapes with distractor segments."""
import json

import pytest
import torch

import polymodal.methods
from polymodal.data.syntax import batch_nodes
from polymodal.data.text import train_tokenizer
from polymodal.methods.shenet import SHENetMethod
from polymodal.models.factory import create_model
from polymodal.models.hierarchy import (HierarchyConfig, attention_hit, encode_text_features, encode_video_features,
                                        hierarchical_similarity, patch_box_mask)
from polymodal.models.video import VideoCLIP

TEXTS = ["a small red circle moves to the left", "a large star becomes larger", "a blue square slides up"]


def _parse(text, spec):
    """spec: [(word, kind, head index)] -> nodes at each word's first occurrence."""
    out = []
    for w, kind, head in spec:
        s = text.index(w)
        out.append({"kind": kind, "text": w, "start": s, "end": s + len(w), "head": head})
    return out


PARSES = [_parse(TEXTS[0], [("small", "adj", 2), ("red", "adj", 2), ("circle", "noun", 3), ("moves", "verb", None)]),
          _parse(TEXTS[1], [("large", "adj", 1), ("star", "noun", 2), ("becomes", "verb", None)]),
          _parse(TEXTS[2], [("blue", "adj", 1), ("square", "noun", None)])]     # no verb: uniform frames


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    tok = train_tokenizer(TEXTS * 5, kind="bpe", vocab_size=120)
    clip = create_model("tiny", tokenizer=tok)
    return VideoCLIP.from_image_model(clip, {"kind": "mean"}).eval()


def _features(model, T=3):
    torch.manual_seed(1)
    frames = torch.randn(4, T, 3, 32, 32)
    valid = torch.ones(4, T, dtype=torch.bool)
    valid[1, -1] = False                                                   # a padded frame
    ids = model.tokenizer(TEXTS)
    nodes = batch_nodes(model.tokenizer, TEXTS, PARSES)
    with torch.no_grad():
        return (encode_text_features(model, ids, nodes), encode_video_features(model, frames, valid),
                ids, frames, valid)


def test_attention_hit_equals_a_hand_computation():
    att = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.0, 0.0]])
    target = torch.tensor([[False, True, True, False], [True, False, False, True]])
    valid = torch.tensor([[True, True, True, True], [True, True, False, False]])
    hit, uniform = attention_hit(att, target, valid)
    assert hit.tolist() == pytest.approx([0.2 + 0.3, 0.5])                # the last target is a padded unit
    assert uniform.tolist() == pytest.approx([2 / 4, 1 / 2])


def test_patch_box_mask_marks_overlapping_patches():
    # 4x4 grid of 8px patches; box x 5..12, y 17..20 (exclusive ends) at scale 1 touches columns 0-1, row 2.
    m = patch_box_mask([5, 17, 12, 20], (4, 4), 8).view(4, 4)
    want = torch.zeros(4, 4, dtype=torch.bool)
    want[2, 0:2] = True
    assert torch.equal(m, want)
    # Source 64px -> model 32px: the same box in source pixels is halved.
    assert torch.equal(patch_box_mask([10, 34, 24, 40], (4, 4), 8, scale=0.5).view(4, 4), want)


def test_all_level_weights_zero_give_the_sentence_similarity(tiny):
    text, video, ids, frames, valid = _features(tiny)
    cfg = HierarchyConfig(verb_weight=0, noun_weight=0, adj_weight=0)
    s = hierarchical_similarity(text, video, cfg)
    with torch.no_grad():
        want = tiny.encode_text(ids) @ tiny.encode_video(frames, valid).T  # the plain video-text model
    assert s.verb is None and s.noun is None and s.adj is None
    torch.testing.assert_close(s.total, want, atol=1e-5, rtol=1e-5)


def test_retrieval_in_blocks_equals_metrics_of_the_full_hierarchy_matrix(tiny):
    """The one retrieval loop scores an SHE-Net model in blocks of rows; its metrics equal the full matrix's."""
    from polymodal.eval.retrieval import retrieval_metrics
    from polymodal.eval.video_retrieval import RetrievalFeatures, retrieval_metrics_of
    from polymodal.models.hierarchy import SHENetModel
    model = SHENetModel.from_video_model(tiny, verb_weight=0.7, noun_weight=1.3, adj_weight=0.4)
    text, video, *_ = _features(tiny)
    video, owner = video[:3], [2, 0, 1]                                    # text i describes video owner[i]
    feats = RetrievalFeatures([{}] * 3, [], video, TEXTS, owner, text)
    full = model.similarity(text, video)                                   # (3, 3)
    want = {k.replace("image", "video"): v for k, v in retrieval_metrics(full.T, torch.tensor(owner)).items()}
    got = retrieval_metrics_of(model, feats, block=2)
    assert {k: got[k] for k in want} == pytest.approx(want)
    pairs = model.similarity(text, video[torch.tensor(owner)], pairs=True)
    torch.testing.assert_close(pairs, full[torch.arange(3), torch.tensor(owner)])


def _loop_score(text, video, cfg, n, m):
    """One text-video score by plain loops over nodes, frames and patches (independent of the einsums)."""
    tau, T = cfg.tau, video.frames.shape[1]
    frames = [t for t in range(T) if video.valid[m, t]]
    total = float(text.sentence[n] @ video.video[m])

    def verb_att(k):
        logits = torch.stack([text.nodes["verb"][n, k] @ video.frames[m, t] for t in frames])
        return torch.softmax(logits / tau, 0), logits

    verbs = [k for k in range(text.nodes["verb"].shape[1]) if text.node_valid["verb"][n, k]]
    if verbs:
        total += cfg.verb_weight * sum(float((a * lg).sum()) for a, lg in map(verb_att, verbs)) / len(verbs)
    noun_w = {}
    for kind, weight in (("noun", cfg.noun_weight), ("adj", cfg.adj_weight)):
        ks = [k for k in range(text.nodes[kind].shape[1]) if text.node_valid[kind][n, k]]
        scores = []
        for k in ks:
            head = int(text.heads[kind][n, k])
            if kind == "noun":
                w = verb_att(head)[0] if head >= 0 else torch.full((len(frames),), 1 / len(frames))
                noun_w[k] = w
            else:
                w = noun_w.get(head, torch.full((len(frames),), 1 / len(frames))) if head >= 0 \
                    else torch.full((len(frames),), 1 / len(frames))
            per_frame = []
            for t in frames:
                lg = video.patches[m, t] @ text.nodes[kind][n, k]
                per_frame.append(float((torch.softmax(lg / tau, 0) * lg).sum()))
            scores.append(float((w * torch.tensor(per_frame)).sum()))
        if scores:
            total += weight * sum(scores) / len(scores)
    if cfg.score_norm == "weights":            # a weighted mean of the levels this text has
        total /= 1 + sum(w for kind, w in (("verb", cfg.verb_weight), ("noun", cfg.noun_weight), ("adj", cfg.adj_weight))
                         if bool(text.node_valid[kind][n].any()))
    return total


def test_hierarchical_similarity_equals_an_independent_loop(tiny):
    text, video, *_ = _features(tiny)
    cfg = HierarchyConfig(verb_weight=0.7, noun_weight=1.3, adj_weight=0.4, tau=0.2)
    s = hierarchical_similarity(text, video, cfg, return_attention=True)
    for n in range(len(text)):
        for m in range(len(video)):
            assert float(s.total[n, m]) == pytest.approx(_loop_score(text, video, cfg, n, m), abs=1e-5), (n, m)
    assert float(s.verb_attention[0, 1, 0, -1]) == 0.0                    # the padded frame gets no attention
    pairs = hierarchical_similarity(text, video[:3], cfg, pairs=True)
    torch.testing.assert_close(pairs.total[:, 0], torch.diagonal(s.total[:, :3]), atol=1e-6, rtol=1e-6)
    owner = torch.tensor([3, 0, 3])                                        # each text's video, gathered (the eval)
    own = hierarchical_similarity(text, video[owner], cfg, pairs=True).total[:, 0]
    torch.testing.assert_close(own, s.total[torch.arange(3), owner], atol=1e-6, rtol=1e-6)


def test_loop_score_with_the_plain_sum_too(tiny):
    text, video, *_ = _features(tiny)
    cfg = HierarchyConfig(verb_weight=0.7, noun_weight=1.3, adj_weight=0.4, tau=0.2, score_norm="sum")
    s = hierarchical_similarity(text, video, cfg)
    assert float(s.total[2, 1]) == pytest.approx(_loop_score(text, video, cfg, 2, 1), abs=1e-5)


def test_total_score_is_a_cosine_when_every_feature_is_the_same():
    """Every cosine 1: the default total is 1 (a weighted mean), not 1 + l_v + l_n + l_a (the plain sum, which made
    SHE-Net's logits 3.5x sharper than the scale was set for); a text without verb nodes divides by 1 + l_n + l_a."""
    from polymodal.models.hierarchy import TextFeatures, VideoFeatures
    e = torch.nn.functional.normalize(torch.ones(8), dim=0)
    N, K, T, P = 2, 2, 3, 4
    valid = {"verb": torch.tensor([[True, False], [False, False]]), "noun": torch.ones(N, K, dtype=torch.bool),
             "adj": torch.ones(N, K, dtype=torch.bool)}
    text = TextFeatures(e.expand(N, 8), {k: e.expand(N, K, 8) for k in valid}, valid,
                        {"noun": torch.full((N, K), -1), "adj": torch.full((N, K), -1)})
    video = VideoFeatures(e.expand(3, 8), e.expand(3, T, 8), e.expand(3, T, P, 8), torch.ones(3, T, dtype=torch.bool))
    cfg = HierarchyConfig(verb_weight=1.0, noun_weight=1.0, adj_weight=0.5)
    torch.testing.assert_close(hierarchical_similarity(text, video, cfg).total, torch.ones(N, 3))
    plain = hierarchical_similarity(text, video, HierarchyConfig(1.0, 1.0, 0.5, score_norm="sum")).total
    torch.testing.assert_close(plain, torch.tensor([[3.5] * 3, [2.5] * 3]))     # text 1 has no verb node


def test_first_loss_of_an_untrained_model_is_near_chance(tiny):
    """At initialisation the InfoNCE on the hierarchy is about ln(B), as for the sentence-level model; the plain sum
    starts higher (its logits are up to 3.5x sharper on features that are not yet aligned)."""
    import math

    from polymodal.models.hierarchy import hierarchical_infonce
    torch.manual_seed(3)
    texts = [TEXTS[i % 3] for i in range(4)]
    frames, valid = torch.randn(4, 3, 3, 32, 32), torch.ones(4, 3, dtype=torch.bool)
    with torch.no_grad():
        text = encode_text_features(tiny, tiny.tokenizer(texts), batch_nodes(tiny.tokenizer, texts,
                                                                             [PARSES[i % 3] for i in range(4)]))
        video = encode_video_features(tiny, frames, valid)
        scale = torch.tensor(100.0)            # a trained CLIP's logit scale: what a pretrained start brings
        losses = {norm: float(hierarchical_infonce(hierarchical_similarity(
            text, video, HierarchyConfig(1.0, 1.0, 0.5, score_norm=norm)).total, scale)) for norm in ("weights", "sum")}
        sentence = float(hierarchical_infonce(text.sentence @ video.video.T, scale))
    assert abs(losses["weights"] - sentence) < 0.3                            # on the sentence model's scale
    assert losses["sum"] > sentence + 1.5 and losses["sum"] > math.log(4) + 2.0


@pytest.fixture(scope="module")
def world(moving_world):
    return moving_world(n_train=96, n_test=8, seed=3, num_frames=8, distractor_fraction=0.8)


def test_shenet_recipe_trains_a_tiny_model_above_chance(world, tmp_path, monkeypatch):
    from polymodal.train.run import load_recipe, run_recipe
    monkeypatch.setitem(polymodal.methods.METHODS, "shenet", SHENetMethod)
    cfg = load_recipe(None, [
        "method=shenet", f"out_dir={tmp_path}/run", "model.name=tiny", f"data.train={world}/train.jsonl",
        "data.batch_size=16", "data.num_frames=4", "train.steps=100", "train.log_every=10", "train.ckpt_every=0",
        "train.progress=false", "train.threads=1", "optim.lr=3e-3", "optim.warmup_steps=5",
        "shenet={verb_weight: 1.0, noun_weight: 1.0, adj_weight: 0.5}", "tokenizer.vocab_size=200",
        f"eval={{tasks: [{{task: shenet_retrieval, data: {world}/train.jsonl, num_frames: 4, limit: 48}}]}}"])
    final = run_recipe(cfg)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines if "loss" in r]
    assert losses[-1] < losses[0] - 0.3
    assert (world / "train.syntax.json").is_file()                        # parses cached beside the manifest
    # 48 training videos: chance R@5 is about 10% (learning end to end, not generalisation).
    key = "eval/shenet_retrieval/"
    assert final[key + "text_to_video_R@5"] > 20.0, final
    assert final[key + "verb_videos"] > 0 and final[key + "noun_videos"] > 0
    for level in ("verb", "noun"):
        assert 0.0 <= final[key + f"{level}_hit"] <= 100.0 and 0.0 < final[key + f"{level}_uniform"] < 100.0
