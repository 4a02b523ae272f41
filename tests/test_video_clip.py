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
