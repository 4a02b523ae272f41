"""Video-text retrieval metrics against an independent computation, and one end-to-end video_clip run."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from polymodal.data.text import train_tokenizer
from polymodal.data.video import read_video
from polymodal.eval.tasks import run_task
from polymodal.models.factory import create_model


@pytest.fixture(scope="module")
def world(moving_world):
    return moving_world(n_train=120, n_test=12, seed=1, num_frames=8)


@pytest.fixture(scope="module")
def clip(world):
    torch.manual_seed(0)
    texts = [json.loads(line)["caption"] for line in (world / "train.jsonl").read_text().splitlines()]
    return create_model("tiny", tokenizer=train_tokenizer(texts, kind="bpe", vocab_size=200)).eval()


def _independent(model, records, num_frames):
    """Zero-shot frame-mean retrieval, ranks counted by hand (pessimistic ties)."""
    with torch.no_grad():
        vids = []
        for r in records:
            clip = read_video(r["video"], num_frames=num_frames)
            frames = torch.stack([model.image_transform(Image.fromarray(f.numpy())) for f in clip.frames])
            emb = model.encode_image(frames)[clip.valid].mean(0)
            vids.append(F.normalize(emb, dim=-1))
        texts, owner = [], []
        for i, r in enumerate(records):
            for c in r["captions"]:
                texts.append(c)
                owner.append(i)
        txt = model.encode_text(model.tokenizer(texts))
    s = (txt @ torch.stack(vids).T).numpy().astype(np.float64)        # (N_texts, N_videos)
    owner = np.array(owner)
    t2v = np.array([1 + sum(s[j, v] >= s[j, owner[j]] for v in range(s.shape[1]) if v != owner[j])
                    for j in range(len(owner))])
    v2t = []
    for v in range(s.shape[1]):
        own = np.where(owner == v)[0]
        neg = np.where(owner != v)[0]
        v2t.append(min(1 + int((s[neg, v] >= s[j, v]).sum()) for j in own))
    v2t = np.array(v2t)
    return {"text_to_video_R@1": 100 * np.mean(t2v <= 1), "text_to_video_R@5": 100 * np.mean(t2v <= 5),
            "video_to_text_R@1": 100 * np.mean(v2t <= 1), "video_to_text_R@5": 100 * np.mean(v2t <= 5),
            "text_to_video_median_rank": float(np.median(t2v)), "text_to_video_mean_rank": float(t2v.mean())}


def test_video_retrieval_equals_an_independent_computation(world, clip):
    from polymodal.data.manifests import read_manifest
    records = read_manifest(world / "test.jsonl", media="video").records
    got = run_task("video_retrieval", clip, str(world / "test.jsonl"), num_frames=4)
    want = _independent(clip, records, 4)
    assert got["num_videos"] == len(records) and got["num_texts"] == sum(len(r["captions"]) for r in records)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-6), k


def test_bad_videos_are_named_or_skipped(world, clip, tmp_path):
    from polymodal.data.manifests import ManifestError
    lines = (world / "test.jsonl").read_text().splitlines()
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x01garbage" * 50)
    rows = [json.loads(line) for line in lines[:4]]
    for r in rows:
        r["video"] = str(world / r["video"])
    rows[1]["video"] = str(broken)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ManifestError, match=r"m.jsonl line 2: .*broken.mp4"):
        run_task("video_retrieval", clip, str(manifest), num_frames=2)
    with pytest.warns(UserWarning, match="skipped 1 video"):
        out = run_task("video_retrieval", clip, str(manifest), num_frames=2, on_bad_record="skip")
    assert out["num_videos"] == 3 and out["num_skipped"] == 1       # the count lands in the JSON too


def test_video_clip_recipe_trains_a_tiny_video_model_above_chance(world, tmp_path):
    from polymodal.hub import load_model
    from polymodal.models.video import VideoCLIP
    from polymodal.train.run import load_recipe, run_recipe
    cfg = load_recipe(None, [
        "method=video_clip", f"out_dir={tmp_path}/run", "model.name=tiny", f"data.train={world}/train.jsonl",
        "data.batch_size=24", "data.num_frames=2", "train.steps=120", "train.log_every=10", "train.ckpt_every=0",
        "train.progress=false", "train.threads=1", "optim.lr=3e-3", "optim.warmup_steps=5",
        "video_clip={temporal: {kind: transformer, layers: 1}}", "tokenizer.vocab_size=200",
        f"eval={{tasks: [{{task: video_retrieval, data: {world}/train.jsonl, num_frames: 2, limit: 48}}]}}"])
    final = run_recipe(cfg)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert losses[-1] < losses[0] - 0.3
    # 48 videos: chance R@5 is about 10%. The run sees these videos in training, so this checks learning
    # end to end (data, temporal module, loss, eval), not generalisation.
    assert final["eval/video_retrieval/text_to_video_R@5"] > 20.0, final
    model = load_model(tmp_path / "run" / "model")
    assert isinstance(model, VideoCLIP) and model.config.temporal.kind == "transformer"


def test_frame_jitter_depends_only_on_seed_epoch_and_record(world, clip):
    from polymodal.data.config import DataConfig
    from polymodal.data.datasets import ManifestDataset, SampleBuilder
    from polymodal.methods.base import _video_loader
    loader = _video_loader(DataConfig(num_frames=2, frame_jitter=True), seed=0)
    calls = [loader(str(world / "videos" / "train_000001.mp4"), index=1, epoch=e).times.tolist() for e in range(6)]
    again = loader(str(world / "videos" / "train_000001.mp4"), index=1, epoch=0).times.tolist()
    assert again == calls[0] and len({tuple(c) for c in calls}) > 1
    plain = _video_loader(DataConfig(num_frames=2), seed=0)
    centres = {tuple(plain(str(world / "videos" / "train_000001.mp4"), index=1, epoch=e).times.tolist())
               for e in range(3)}
    assert len(centres) == 1
    ds = ManifestDataset(world / "train.jsonl", SampleBuilder(clip.image_transform, media="video"),
                         video_loader=loader)
    ds.set_epoch(3)
    sample = ds[1]
    assert sample["frames"].shape == (2, 3, 32, 32) and sample["frame_valid"].all()


def test_an_m2_encoder_video_model_evaluates_chinese_video_captions(world):
    from polymodal.data.manifests import read_manifest
    from polymodal.models.video import VideoCLIP
    records = read_manifest(world / "test.jsonl", media="video").records
    zh = [c for r in records for c in r["captions_zh"]]
    tok = train_tokenizer(zh + [r["caption"] for r in records], kind="wordpiece", vocab_size=300)
    torch.manual_seed(0)
    video = VideoCLIP.from_image_model(create_model("m2-tiny", tokenizer=tok).eval(), {"kind": "transformer"})
    out = run_task("video_retrieval", video.eval(), str(world / "test.jsonl"), lang="zh", num_frames=2)
    assert out["num_texts"] == len(zh) and out["num_videos"] == len(records)
    assert 0 <= out["text_to_video_R@1"] <= 100 and out["text_to_video_median_rank"] >= 1


# ---- order: the explicit order loss and partner batches --------------------------------------------------------
def test_order_loss_equals_a_hand_computation():
    from polymodal.methods.video_clip import order_loss
    torch.manual_seed(0)
    v, r, t, u = (F.normalize(torch.randn(3, 8), dim=-1) for _ in range(4))
    has = torch.tensor([True, False, True])
    loss, acc = order_loss(v, r, t, u, has, torch.tensor(10.0))
    want, right = 0.0, 0
    for i in (0, 2):
        pos, nv, nt = float(t[i] @ v[i]), float(t[i] @ r[i]), float(u[i] @ v[i])
        lt = -10 * pos + float(torch.logsumexp(torch.tensor([10 * pos, 10 * nv]), 0))
        lv = -10 * pos + float(torch.logsumexp(torch.tensor([10 * pos, 10 * nt]), 0))
        want += (lt + lv) / 2 / 2
        right += pos > nv
    assert float(loss) == pytest.approx(want, rel=1e-5) and float(acc) == pytest.approx(right / 2)
    zero, _ = order_loss(v, r, t, u, torch.zeros(3, dtype=torch.bool), torch.tensor(10.0))
    assert float(zero) == 0.0


@pytest.mark.parametrize("kind", ["mean", "transformer", "stan"])
def test_reversal_embedding_is_the_flipped_clip(clip, kind):
    from polymodal.models.temporal import TemporalConfig
    from polymodal.models.video import VideoCLIP
    torch.manual_seed(2)
    model = VideoCLIP.from_image_model(clip, TemporalConfig(kind=kind, layers=1, stan_layers=1)).eval()
    for p in model.temporal.parameters():               # a trained-like module: not the zero-initialised identity
        torch.nn.init.normal_(p, std=0.2) if p.dim() > 1 else None
    frames = torch.randn(2, 3, 3, 32, 32)
    valid = torch.tensor([[True, True, True], [True, True, False]])
    with torch.no_grad():
        fwd, rev = model.encode_video_and_reversal(frames, valid)
        torch.testing.assert_close(fwd, model.encode_video(frames, valid), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rev, model.encode_video(frames.flip(1), valid.flip(1)), atol=1e-5, rtol=1e-5)
        if kind != "mean":                               # an order-aware module tells the two apart
            assert (fwd - rev).abs().max() > 1e-4


def test_partner_units_keep_each_order_pair_whole():
    from polymodal.data.samplers import partner_units
    records = [{"pair_id": 0}, {"pair_id": None}, {"pair_id": 1}, {"pair_id": 0}, {}, {"pair_id": 1}, {"pair_id": 2}]
    units = partner_units(records)
    assert sorted(i for u in units for i in set(u)) == list(range(7))
    assert (0, 3) in units and (2, 5) in units
    singles = [u for u in units if u not in ((0, 3), (2, 5))]
    assert singles == [(1, 4), (6, 6)]                  # unpaired records two by two (pair id 2 has one member)


def test_reversed_captions_are_the_partners_parallel_paraphrases(world):
    from polymodal.data.manifests import read_manifest
    from polymodal.methods.video_clip import REVERSED_KEY, add_reversed_captions
    records = read_manifest(world / "train.jsonl", media="video").records
    n = add_reversed_captions(records)
    paired = [r for r in records if r.get("pair_id") is not None]
    assert n == len(paired) > 0
    for r in paired:
        partner = next(p for p in paired if p["pair_id"] == r["pair_id"] and p is not r)
        assert [r[REVERSED_KEY][c] for c in r["captions"]] == partner["captions"]
    assert all(REVERSED_KEY not in r for r in records if r.get("pair_id") is None)


def test_order_options_train_end_to_end(world, tmp_path):
    """order_weight adds a logged order loss on the videos with partners; partner_batches keeps pairs in a batch."""
    from polymodal.methods.video_clip import VideoCLIPMethod
    from polymodal.train.run import load_recipe, run_recipe
    cfg = load_recipe(None, [
        "method=video_clip", f"out_dir={tmp_path}/run", "model.name=tiny", f"data.train={world}/train.jsonl",
        "data.batch_size=6", "data.num_frames=2", "train.steps=3", "train.log_every=1", "train.ckpt_every=0",
        "train.progress=false", "train.threads=1", "tokenizer.vocab_size=200", "eval={}",
        "video_clip={temporal: {kind: transformer, layers: 1}, order_weight: 1.0, partner_batches: true}"])
    method = cfg.method_impl
    assert isinstance(method, VideoCLIPMethod)
    run_recipe(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("order" in r for r in rows) and all(r["loss"] >= r["contrastive"] - 1e-6 for r in rows if "order" in r)
    # The loader's batches: 6 units of two videos, each order pair whole.
    model = method.build_model(method.build_tokenizer(tmp_path / "run"))
    dataset, _ = method.build_dataset(model, 0, 1)
    batch = method.collate(model)([dataset[k] for k in range(6)])
    assert batch["frames"].shape[0] == 12 and batch["reversed_input_ids"].shape == batch["input_ids"].shape
    records = dataset.manifest.records
    ids = [records[i].get("pair_id") for u in dataset.units[:6] for i in u]
    assert all(ids[k] == ids[k + 1] for k in range(0, 12, 2) if ids[k] is not None)
    assert bool(batch["has_reversed"].any())
