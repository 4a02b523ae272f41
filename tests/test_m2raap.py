"""M2-RAAP: the pair filter, the Mug similarity, ACG fusion, the branch learning rate, and one filter+train run."""
import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import polymodal.methods
from polymodal.data.manifests import read_manifest, write_manifest
from polymodal.data.text import train_tokenizer
from polymodal.data.video import read_video
from polymodal.methods.m2raap import M2RAAPMethod, M2RAAPTask
from polymodal.models.factory import create_model
from polymodal.models.video import VideoCLIP
from polymodal.models.video_heads import ACGFusion, M2RAAPModel, mug_loss, mug_similarity, text_token_features
from polymodal.prepare.filtering import CausalLMRewriter, filter_manifest, normalize_caption, select


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from polymodal.data.synthetic.moving_shapes import generate_moving_shapes
    out = tmp_path_factory.mktemp("noisy")
    generate_moving_shapes(out, n_train=80, n_test=0, n_val=0, seed=3, num_frames=8, image_size=32, workers=1,
                           mismatch_fraction=0.3, progress=False)
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    for r in rows:   # an "oracle captioner": what one frame shows (subject, no action), as ACG input
        s = r["subject"]
        r["aux_captions"] = [f"a {s['size']} {s['color']} {s['shape']}"]
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


@pytest.fixture(scope="module")
def clip(world):
    torch.manual_seed(0)
    texts = [json.loads(line)["caption"] for line in (world / "train.jsonl").read_text().splitlines()]
    return create_model("tiny", tokenizer=train_tokenizer(texts, kind="bpe", vocab_size=200)).eval()


# ---- filter ---------------------------------------------------------------------------------------------
def _direct_scores(model, records, num_frames):
    out = []
    with torch.no_grad():
        for r in records:
            c = read_video(r["video"], num_frames=num_frames)
            frames = torch.stack([model.image_transform(Image.fromarray(f.numpy())) for f in c.frames])
            v = F.normalize(F.normalize(model.encode_image(frames), dim=-1)[c.valid].mean(0), dim=-1)
            caps = r.get("captions") or [r["caption"]]
            t = model.encode_text(model.tokenizer(caps))
            out.append(float((t @ v).mean()))
    return out


def test_filter_scores_equal_the_models_similarity_and_the_manifest_round_trips(world, clip, tmp_path):
    records = read_manifest(world / "train.jsonl", media="video").records[:12]
    src = tmp_path / "src.jsonl"
    write_manifest(records, src)
    out = tmp_path / "kept.jsonl"
    summary = filter_manifest(src, clip, out, keep=0.5, num_frames=3, rewrite="none")
    want = _direct_scores(clip, records, 3)
    kept = read_manifest(out, media="video").records                      # round-trips: videos resolve
    dropped = read_manifest(tmp_path / "kept.dropped.jsonl", media="video").records
    assert len(kept) == 6 and len(dropped) == 6 and summary["num_kept"] == 6
    got = {r["video"]: r["filter_score"] for r in kept + dropped}
    for r, w in zip(records, want):
        assert got[r["video"]] == pytest.approx(w, abs=1e-5)
    # top half by score, in manifest order
    best = sorted(range(12), key=lambda i: -want[i])[:6]
    assert [r["video"] for r in kept] == [records[i]["video"] for i in sorted(best)]
    assert all(r["video"].endswith(".mp4") for r in kept)
    saved = json.loads((tmp_path / "kept.summary.json").read_text())
    assert saved["num_kept"] == 6 and saved["cutoff_score"] == pytest.approx(min(want[i] for i in best), abs=1e-5)
    assert saved["mismatched_total"] == sum(r["mismatched"] for r in records)


def test_threshold_and_fraction_modes():
    s = torch.tensor([0.1, 0.5, 0.3, 0.5, -0.2])
    mask, cut = select(s, threshold=0.3)
    assert mask.tolist() == [False, True, True, True, False] and cut == pytest.approx(0.3)
    mask, cut = select(s, keep=0.4)                                       # 2 of 5
    assert mask.tolist() == [False, True, False, True, False] and cut == pytest.approx(0.5)
    mask, _ = select(s, keep=0.2)                                         # tie at 0.5: the earlier record
    assert mask.tolist() == [False, True, False, False, False]
    with pytest.raises(ValueError, match="exactly one"):
        select(s, keep=0.5, threshold=0.1)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        select(s, keep=1.5)


def test_rewriting_hooks(world, clip, tmp_path):
    assert normalize_caption("  A red   circle grows. ") == "a red circle grows"
    assert normalize_caption("NASA rocket") == "NASA rocket"
    records = read_manifest(world / "train.jsonl", media="video").records[:4]
    src = tmp_path / "src.jsonl"
    write_manifest(records, src)
    filter_manifest(src, clip, tmp_path / "up.jsonl", threshold=-2.0, num_frames=2, rewrite=str.upper)
    kept = read_manifest(tmp_path / "up.jsonl", media="video").records
    assert [r["caption"] for r in kept] == [r["caption"].upper() for r in records]
    assert [r["caption_original"] for r in kept] == [r["caption"] for r in records]


def test_causal_lm_rewriter_loads_a_local_model(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    words = ["[UNK]", "[EOS]", "a", "red", "circle", "grows", "rewrite", "caption", ":", "rewritten", "the", "video",
             "clearly", "."]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", eos_token="[EOS]").save_pretrained(tmp_path)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(words), n_positions=64, n_embd=16, n_layer=1, n_head=2)
                    ).save_pretrained(tmp_path)
    rw = CausalLMRewriter(str(tmp_path), max_new_tokens=4)
    a, b = rw("a red circle grows"), rw("a red circle grows")
    assert isinstance(a, str) and a and a == b                            # greedy: deterministic, never empty
    with pytest.raises(FileNotFoundError, match="not a folder"):
        CausalLMRewriter(str(tmp_path / "missing"))


# ---- Mug ------------------------------------------------------------------------------------------------
def _mug_loop(txt, tmask, vid, vmask, tau):
    out = torch.zeros(len(txt), len(vid), dtype=torch.float64)
    for a in range(len(txt)):
        toks = [l for l in range(txt.shape[1]) if tmask[a, l]]
        for b in range(len(vid)):
            frs = [t for t in range(vid.shape[1]) if vmask[b, t]]
            R = {(l, t): float(txt[a, l] @ vid[b, t]) for l in toks for t in frs}
            per_tok = []
            for l in toks:
                w = torch.softmax(torch.tensor([tau * R[l, t] for t in frs], dtype=torch.float64), 0)
                per_tok.append(sum(float(w[i]) * R[l, t] for i, t in enumerate(frs)))
            per_frm = []
            for t in frs:
                w = torch.softmax(torch.tensor([tau * R[l, t] for l in toks], dtype=torch.float64), 0)
                per_frm.append(sum(float(w[i]) * R[l, t] for i, l in enumerate(toks)))
            w1 = torch.softmax(tau * torch.tensor(per_tok, dtype=torch.float64), 0)
            w2 = torch.softmax(tau * torch.tensor(per_frm, dtype=torch.float64), 0)
            out[a, b] = (float(w1 @ torch.tensor(per_tok, dtype=torch.float64))
                         + float(w2 @ torch.tensor(per_frm, dtype=torch.float64))) / 2
    return out


def test_mug_similarity_equals_a_direct_loop_with_padding_and_blocks():
    g = torch.Generator().manual_seed(0)
    txt = F.normalize(torch.randn(5, 6, 8, generator=g, dtype=torch.float64), dim=-1)
    vid = F.normalize(torch.randn(3, 4, 8, generator=g, dtype=torch.float64), dim=-1)
    tmask = torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6, [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0]],
                         dtype=torch.bool)
    vmask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    for tau in (100.0, 5.0):
        want = _mug_loop(txt, tmask, vid, vmask, tau)
        got = mug_similarity(txt, tmask, vid, vmask, tau=tau, block_size=2)
        assert torch.allclose(got, want, atol=1e-9), (tau, got, want)
    s = mug_similarity(txt[:3], tmask[:3], vid, vmask)
    logits = s / 0.01
    want_loss = (F.cross_entropy(logits, torch.arange(3)) + F.cross_entropy(logits.T, torch.arange(3))) / 2
    assert mug_loss(s) == pytest.approx(float(want_loss))


def test_text_token_features_hold_the_pooled_embedding_at_eot(clip):
    ids = clip.tokenizer(["a red circle grows", "a big blue square slides left"])
    tokens, mask = text_token_features(clip, ids)
    eot = mask.sum(1) - 1
    assert torch.allclose(tokens[torch.arange(2), eot], clip.encode_text(ids), atol=1e-5)
    assert (ids[~mask] == clip.config.text.pad_token_id).all()


# ---- ACG and the branch learning rate --------------------------------------------------------------------
@pytest.mark.parametrize("kind,level", [("mean", "video"), ("stan", "frame")])
def test_acg_with_gate_zero_equals_the_plain_video_embedding(clip, kind, level):
    torch.manual_seed(1)
    model = VideoCLIP.from_image_model(clip, {"kind": kind, "stan_layers": 1} if kind == "stan" else {}).eval()
    m2 = M2RAAPModel.from_video_model(model, acg=True, acg_level=level)
    frames, valid = torch.randn(2, 3, 3, 32, 32), torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    K = 3 if level == "frame" else 2
    aux = clip.tokenizer(["a red circle"] * (2 * K)).view(2, K, -1)
    aux_mask = torch.ones(2, K, dtype=torch.bool)
    from polymodal.models.video_heads import pool_frames
    with torch.no_grad():
        plain = model.encode_video(frames, valid)
        fused = pool_frames(m2, m2.fused_frames(frames, valid, aux, aux_mask), valid)
        assert torch.allclose(fused, plain, atol=1e-6)
        m2.acg.gate.fill_(0.5)
        moved = pool_frames(m2, m2.fused_frames(frames, valid, aux, aux_mask), valid)
    assert not torch.allclose(moved, plain, atol=1e-3)


def test_acg_fusion_formula():
    fuse = ACGFusion(4, "video")
    with torch.no_grad():
        fuse.gate.fill_(2.0)
    x, aux = torch.randn(1, 3, 4), torch.randn(1, 2, 4)
    got = fuse(x, aux, torch.tensor([[True, False]]))
    assert torch.allclose(got, x + 2.0 * aux[:, :1])                      # identity proj, masked mean = caption 0
    assert torch.allclose(fuse(x, aux, torch.tensor([[False, False]])), x)  # no caption: unchanged


def test_stan_branch_gets_the_lr_multiplier(clip):
    from polymodal.train.loop import param_groups
    model = VideoCLIP.from_image_model(clip, {"kind": "stan", "stan_layers": 1})
    task = M2RAAPTask(M2RAAPModel.from_video_model(model, acg=True))
    groups = param_groups(task, 0.05, {"temporal.": 10})
    ids = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    names = dict(task.named_parameters())
    assert all(ids[id(p)] == 10.0 for n, p in names.items() if "temporal." in n)
    assert all(ids[id(p)] == 1.0 for n, p in names.items() if "temporal." not in n)
    assert any("temporal." in n for n in names)


def _batch(clip, B=4, T=2):
    torch.manual_seed(5)
    texts = ["a small red circle moves up", "a blue star grows", "a green heart sinks", "a cyan cross appears"][:B]
    return {"frames": torch.randn(B, T, 3, 32, 32), "frame_valid": torch.ones(B, T, dtype=torch.bool),
            "input_ids": clip.tokenizer(texts)}


@pytest.mark.parametrize("similarity", ["mean", "mug"])
def test_head_temperature_is_learnable_or_fixed_as_configured(clip, similarity):
    """Temperature 0 trains the head at the model's learnable logit scale (the base row's), a positive one at that
    fixed temperature (Mug-STAN: 0.01 for both heads), so an ablation can change the head and nothing else."""
    from polymodal.methods.clip import trim_padding
    model = M2RAAPModel.from_video_model(VideoCLIP.from_image_model(clip), similarity=similarity)
    batch = _batch(clip)
    key = "mug_temperature" if similarity == "mug" else "mean_temperature"
    with torch.no_grad():
        ids = trim_padding(batch["input_ids"], clip.config.text.pad_token_id)
        if similarity == "mug":
            tokens, mask = text_token_features(model, ids)
            frames = F.normalize(model.encode_frames(batch["frames"]), dim=-1)
            scores = mug_similarity(tokens, mask, frames)                                      # (B, B)
        else:
            scores = model.encode_text(ids) @ model.encode_video(batch["frames"]).T
    for temperature, scale in ((0.0, float(model.scale().detach())), (0.01, 100.0)):
        task = M2RAAPTask(model, loss=None, **{key: temperature})
        model.zero_grad()
        out = task(batch)
        assert float(out["loss"]) == pytest.approx(float(mug_loss(scores, 1.0 / scale)), rel=1e-4), temperature
        assert float(out["logit_scale"]) == pytest.approx(scale, rel=1e-5)
        out["loss"].backward()
        grad = model.base.logit_scale.grad
        assert (grad is not None and float(grad.abs()) > 0) == (temperature == 0.0), temperature


def test_section_temperatures_are_checked():
    from polymodal.methods.m2raap import M2RAAPSection
    assert M2RAAPSection(mug_temperature=0.0, mean_temperature=0.01).mean_temperature == 0.01
    with pytest.raises(ValueError, match="m2raap.mean_temperature"):
        M2RAAPSection(mean_temperature=-1.0)


def test_m2raap_retrieval_without_heads_equals_the_plain_video_model(world, clip):
    from polymodal.eval.video_retrieval import video_retrieval_eval
    model = VideoCLIP.from_image_model(clip).eval()
    manifest = world / "train.jsonl"
    want = video_retrieval_eval(model, manifest, limit=10, num_frames=2)
    got = video_retrieval_eval(M2RAAPModel.from_video_model(model), manifest, limit=10, num_frames=2)
    assert got == pytest.approx(want)
    mug = video_retrieval_eval(M2RAAPModel.from_video_model(model, similarity="mug"), manifest, limit=10,
                               num_frames=2)
    assert mug["num_texts"] == want["num_texts"] and 0 <= mug["text_to_video_R@1"] <= 100


def test_mug_retrieval_scores_equal_the_full_mug_matrix(world, clip):
    """The one retrieval loop scores Mug in blocks: its ranks equal those of the whole score matrix."""
    from polymodal.eval.retrieval import retrieval_metrics
    from polymodal.eval.video_retrieval import retrieval_features, retrieval_metrics_of
    model = M2RAAPModel.from_video_model(VideoCLIP.from_image_model(clip), similarity="mug", mug_block=3).eval()
    feats = retrieval_features(model, world / "train.jsonl", limit=7, num_frames=2)
    full = mug_similarity(feats.text.tokens, feats.text.mask, feats.video.frames, feats.video.valid, tau=100.0)
    want = {k.replace("image", "video"): v for k, v in retrieval_metrics(full.T, torch.tensor(feats.owner)).items()}
    got = retrieval_metrics_of(model, feats, block=2)
    assert {k: got[k] for k in want} == pytest.approx(want)


def test_text_token_features_of_an_m2_encoder_hold_its_cls_embedding():
    torch.manual_seed(0)
    tok = train_tokenizer(["a red circle grows", "a blue square moves left"], kind="wordpiece", vocab_size=60)
    m2 = create_model("m2-tiny", tokenizer=tok).eval()
    ids = tok(["a red circle grows", "a blue square"])
    tokens, mask = text_token_features(m2, ids)
    assert torch.allclose(tokens[:, 0], m2.encode_text(ids), atol=1e-5)      # pool "cls"
    assert mask.sum(1).tolist() == [int(n) for n in (ids != m2.config.text.pad_token_id).sum(1)]


def test_frame_shards_give_the_frames_decoded_once(world, clip, tmp_path):
    from polymodal.data.config import DataConfig, builder_from_config
    from polymodal.data.frame_shards import write_frame_shards
    from polymodal.methods.m2raap import FrameShardDataset
    records = read_manifest(world / "train.jsonl", media="video").records[:3]
    write_manifest(records, tmp_path / "m.jsonl")
    write_frame_shards(tmp_path / "m.jsonl", tmp_path / "shards", num_frames=3, strategy="keyframes",
                       image_format="png", progress=False)
    builder = builder_from_config(DataConfig(), clip.image_transform, clip.tokenizer, media="video",
                                  extra_keys=("aux_captions",))
    ds = FrameShardDataset(str(tmp_path / "shards"), builder)
    assert len(ds) == 3
    assert not any(isinstance(v, bytes) for _, _, members in ds.items for v in members.values())  # offsets only
    for i, r in enumerate(records):
        c = read_video(r["video"], num_frames=3, strategy="keyframes")
        want = torch.stack([clip.image_transform(Image.fromarray(f.numpy())) for f in c.frames])
        assert torch.equal(ds[i]["frames"], want) and ds[i]["caption"] in r["captions"]
        assert ds[i]["aux_captions"] == r["aux_captions"]


def test_a_coca_captioner_writes_aux_captions(world, tmp_path):
    from polymodal.prepare.aux_captions import add_aux_captions
    texts = [json.loads(line)["caption"] for line in (world / "train.jsonl").read_text().splitlines()]
    torch.manual_seed(0)
    coca = create_model("coca-tiny", tokenizer=train_tokenizer(texts, kind="bpe", vocab_size=200)).eval()
    records = read_manifest(world / "train.jsonl", media="video").records[:2]
    write_manifest(records, tmp_path / "m.jsonl")
    add_aux_captions(tmp_path / "m.jsonl", coca, tmp_path / "aux.jsonl", num_frames=2)
    out = read_manifest(tmp_path / "aux.jsonl", media="video").records
    assert [len(r["aux_captions"]) for r in out] == [2, 2]
    assert all(isinstance(c, str) for r in out for c in r["aux_captions"])


# ---- end to end -----------------------------------------------------------------------------------------
def test_filter_then_train_the_tiny_recipe_above_chance(world, tmp_path, monkeypatch):
    from polymodal.train.run import load_recipe, run_recipe
    monkeypatch.setitem(polymodal.methods.METHODS, "m2raap", M2RAAPMethod)
    common = [f"data.train={world}/train.jsonl", "model.name=tiny", "data.batch_size=20", "data.num_frames=2",
              "train.log_every=10", "train.ckpt_every=0", "train.progress=false", "train.threads=1",
              "optim.lr=3e-3", "optim.warmup_steps=5", "tokenizer.vocab_size=200", "method=m2raap"]
    # 1. a scorer trained briefly on the noisy pairs filters them
    run_recipe(load_recipe(None, common + [f"out_dir={tmp_path}/scorer", "train.steps=60"]))
    from polymodal.hub import load_model
    scorer = load_model(tmp_path / "scorer" / "model")
    summary = filter_manifest(world / "train.jsonl", scorer, tmp_path / "clean.jsonl", keep=0.6, num_frames=2)
    assert summary["num_kept"] == 48
    assert summary["mismatched_kept"] / 48 < summary["mismatched_total"] / 80      # noise went down
    # 2. Mug + ACG on the filtered pairs, evaluated through the heads
    clean = str(tmp_path / "clean.jsonl")
    final = run_recipe(load_recipe(None, common + [
        f"out_dir={tmp_path}/run", f"data.train={clean}", "train.steps=100",
        "m2raap={similarity: mug, acg: true}",
        f"eval={{tasks: [{{task: video_retrieval, data: {clean}, num_frames: 2}}]}}"]))
    # 48 videos: chance R@5 is 5/48 = 10.4%; these are the training videos (learning end to end, not
    # generalisation). Mug's sharp softmax (tau 100, temperature 0.01) learns slowly in 100 tiny steps.
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert losses[-1] < losses[0] - 0.1, losses
    assert final["eval/video_retrieval/text_to_video_R@5"] > 17.0, final
    assert final["eval/video_retrieval/num_without_aux"] == 0
    model = load_model(tmp_path / "run" / "model")
    assert isinstance(model, M2RAAPModel) and model.config.similarity == "mug"
    assert float(model.acg.gate.detach().abs().sum()) > 0


def test_acg_without_any_aux_caption_stops_at_start_up(world, tmp_path):
    from pathlib import Path

    from polymodal.config import ConfigError
    from polymodal.train.run import load_recipe, run_recipe
    rows = [json.loads(line) for line in (world / "train.jsonl").read_text().splitlines()]
    plain = [{**{k: v for k, v in r.items() if k != "aux_captions"}, "video": str(world / r["video"])} for r in rows]
    (tmp_path / "plain.jsonl").write_text("".join(json.dumps(r) + "\n" for r in plain))
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "m2raap_tiny.yaml"
    base = [f"out_dir={tmp_path}/run", f"data.train={world / 'train.jsonl'}", "train.steps=1", "train.progress=false",
            "model.path="]
    evals = f"eval.tasks=[{{task: video_retrieval, data: {tmp_path / 'plain.jsonl'}, num_frames: 4}}]"
    with pytest.raises(ConfigError, match=r"no record of .*plain.jsonl \(eval video_retrieval\) has a 'aux_captions'"):
        run_recipe(load_recipe(recipe, base + [evals]))
    with pytest.raises(ConfigError, match=r"plain.jsonl \(data.train\).*polymodal data aux-captions .*m2raap.acg=false"):
        run_recipe(load_recipe(recipe, base + [f"data.train={tmp_path / 'plain.jsonl'}", "eval.tasks=[]"]))
    assert not (tmp_path / "run").exists()
