"""Video reading: frame choice by time, exactness of seeking, strategies, odd inputs, errors, frame shards.

Test videos are made here with PyAV; frame i is a solid grey of level 6 * i (unless a test needs
other content), so a returned frame's index can be read off its mean value despite codec loss.
"""
import argparse
import json
import os
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
import webdataset
from PIL import Image

from polymodal.data.manifests import ManifestError
from polymodal.data import video
from polymodal.data.command_args import frames_arguments
from polymodal.data.frame_shards import main_from_args, read_frame_sample, write_frame_shards
from polymodal.data.shards import INDEX_NAME, index_tar, read_indexed, read_tar
from polymodal.data.video import VideoClip, VideoError, read_video, video_info

W, H = 64, 48


def grey(i, w=W, h=H):
    return np.full((h, w, 3), 6 * i, np.uint8)             # i < 43


def make_video(path, n=32, codec="libx264", gop=10, w=W, h=H, pts=None, time_base=Fraction(1, 25),
               content=grey, pix_fmt="yuv420p", bframes=True):
    """Encode n frames; `pts` (in `time_base` units) defaults to 0, 1, 2 ..."""
    options = {"x264-params": "scenecut=0"} if codec == "libx264" else {"sc_threshold": "1000000000"}
    if codec == "libx264" and not bframes:
        options["bf"] = "0"
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=25)
        s.width, s.height, s.pix_fmt = w, h, pix_fmt
        s.codec_context.gop_size = gop
        s.codec_context.bit_rate = 4_000_000          # mpeg4's default 200 kb/s shifts grey levels a lot
        s.codec_context.options = options
        s.codec_context.time_base = time_base
        s.time_base = time_base
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(content(i, w, h) if content is grey else content(i), format="rgb24")
            frame.pts = i if pts is None else pts[i]
            frame.time_base = time_base
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return str(path)


def decode_all(path):
    """Independent reference: every frame by plain sequential decoding, with times and key flags."""
    with av.open(str(path)) as c:
        frames = [(f.to_ndarray(format="rgb24"), float(f.time), bool(f.key_frame)) for f in c.decode(video=0)]
    return [f[0] for f in frames], np.array([f[1] for f in frames]), [f[2] for f in frames]


def index_of(frame):
    """Frame index encoded by the grey level (6 * index; codec loss is a level or two)."""
    return int(round(float(np.asarray(frame, dtype=np.float64).mean()) / 6))


def nearest_by_time(times, end, n):
    """Reference choice: for each of n equal segments of [times[0], end), the frame nearest its centre."""
    seg = (end - times[0]) / n
    out = []
    for k in range(n):
        centre = times[0] + (k + 0.5) * seg
        dist = [abs(t - centre) for t in times]
        out.append(int(np.argmin(dist)))          # argmin takes the first of equal distances
    return out


# ----------------------------------------------------------------------------------------
# uniform
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("codec", ["libx264", "mpeg4"])
def test_uniform_seek_equals_sequential_decoding(tmp_path, codec, monkeypatch):
    path = make_video(tmp_path / f"v_{codec}.mp4", n=36, codec=codec, gop=10)
    frames, times, _ = decode_all(path)

    def no_fallback(*args):
        raise AssertionError("the seeking path fell back to sequential decoding")
    monkeypatch.setattr(video, "_read_uniform_sequential", no_fallback)
    clip = read_video(path, num_frames=8)
    expected = nearest_by_time(list(times), 36 / 25, 8)      # segment centres at 2.25, 6.75 ... frames
    assert expected == [2, 7, 11, 16, 20, 25, 29, 34]
    assert torch.equal(clip.frames, torch.from_numpy(np.stack([frames[i] for i in expected])))
    assert torch.allclose(clip.times, torch.tensor(times[expected], dtype=torch.float64))
    assert [index_of(f) for f in clip.frames] == expected
    assert clip.valid.all() and clip.duration == pytest.approx(1.44) and clip.source == path


def test_uniform_falls_back_to_sequential_decoding_when_seeking_fails(tmp_path, monkeypatch):
    path = make_video(tmp_path / "v.mp4", n=36, gop=10)
    seeking = read_video(path, num_frames=8, jitter=True, seed=1)
    monkeypatch.setattr(video, "_decode_at", lambda *args: None)
    fallback = read_video(path, num_frames=8, jitter=True, seed=1)
    assert torch.equal(seeking.frames, fallback.frames) and torch.equal(seeking.times, fallback.times)
    assert seeking.duration == pytest.approx(fallback.duration)


def test_uniform_jitter_is_seeded_and_stays_in_its_segment(tmp_path):
    path = make_video(tmp_path / "v.mp4", n=40)
    frames, times, _ = decode_all(path)
    a, b = read_video(path, 8, jitter=True, seed=3), read_video(path, 8, jitter=True, seed=3)
    c = read_video(path, 8, jitter=True, seed=4)
    assert torch.equal(a.frames, b.frames) and torch.equal(a.times, b.times)
    assert not torch.equal(a.times, c.times)
    seg = 1.6 / 8
    for k, t in enumerate(a.times.tolist()):      # nearest frame to a point of segment k: within half a frame
        assert k * seg - 0.02 <= t <= (k + 1) * seg + 0.02
        i = int(np.argmin(np.abs(times - t)))
        assert np.array_equal(a.frames[k].numpy(), frames[i])


def test_uniform_follows_time_on_variable_frame_rate(tmp_path):
    # 10 frames at 5 fps (0 .. 1.8 s), then 20 frames at 25 fps (2.0 .. 2.76 s): 2.8 s in all
    pts = [200 * i for i in range(10)] + [2000 + 40 * j for j in range(20)]
    path = make_video(tmp_path / "vfr.mp4", n=30, pts=pts, time_base=Fraction(1, 1000))
    _, times, _ = decode_all(path)
    assert np.allclose(times, np.array(pts) / 1000)
    clip = read_video(path, num_frames=4)
    expected = nearest_by_time(list(times), 2.8, 4)   # centres 0.35, 1.05, 1.75, 2.45 s
    assert expected == [2, 5, 9, 21]
    by_index = [int((k + 0.5) * 30 / 4) for k in range(4)]   # what frame counting would pick
    assert expected != by_index
    assert [index_of(f) for f in clip.frames] == expected
    assert np.allclose(clip.times.numpy(), times[expected])


def test_shorter_clip_pads_with_invalid_repeats(tmp_path):
    path = make_video(tmp_path / "short.mp4", n=3)
    for strategy in ("uniform", "keyframes", "scene"):
        clip = read_video(path, num_frames=8, strategy=strategy)
        idx = [index_of(f) for f in clip.frames]
        assert len(clip) == 8 and sorted(set(idx)) == ([0] if strategy == "keyframes" else [0, 1, 2])
        assert idx == sorted(idx)                                    # repeats stay in time order
        assert clip.valid.tolist() == [i == 0 or idx[i] != idx[i - 1] for i in range(8)]
        assert torch.all(clip.times[1:] >= clip.times[:-1])


# ----------------------------------------------------------------------------------------
# keyframes and scene
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("codec", ["libx264", "mpeg4"])
def test_keyframes_strategy_returns_only_key_frames(tmp_path, codec):
    path = make_video(tmp_path / f"k_{codec}.mp4", n=40, codec=codec, gop=5)
    frames, times, keys = decode_all(path)
    key_idx = [i for i, k in enumerate(keys) if k]
    assert key_idx == list(range(0, 40, 5))              # the encoder honoured the GOP
    clip = read_video(path, num_frames=8, strategy="keyframes")
    assert clip.valid.all()
    assert [index_of(f) for f in clip.frames] == key_idx
    assert torch.equal(clip.frames, torch.from_numpy(np.stack([frames[i] for i in key_idx])))
    few = read_video(path, num_frames=3, strategy="keyframes")   # 8 key frames -> 3 spread over them
    got = [index_of(f) for f in few.frames]
    assert set(got) <= set(key_idx) and got == sorted(got) and got[0] <= 5 and got[-1] >= 30


def scene_content(i):
    """4 scenes of 8 frames; inside a scene the picture drifts slowly, between scenes it jumps."""
    base = [30, 200, 90, 160][i // 8]
    img = np.full((H, W, 3), base + (i % 8), np.uint8)
    img[:, : (i % 8) * 2] = base // 2                     # a small moving edge inside each scene
    return img


def test_scene_strategy_picks_the_cuts(tmp_path):
    path = make_video(tmp_path / "scenes.mp4", n=32, content=scene_content, gop=32)
    _, times, _ = decode_all(path)
    clip = read_video(path, num_frames=4, strategy="scene")
    assert np.allclose(clip.times.numpy(), times[[0, 8, 16, 24]])
    means = [float(f.float().mean()) for f in clip.frames]
    assert np.allclose(means, [np.mean(scene_content(i)) for i in (0, 8, 16, 24)], atol=3)


# ----------------------------------------------------------------------------------------
# other inputs
# ----------------------------------------------------------------------------------------
def test_animated_gif_reads(tmp_path):
    path = str(tmp_path / "anim.gif")
    with av.open(path, "w") as c:
        s = c.add_stream("gif", rate=10)
        s.width, s.height, s.pix_fmt = W, H, "rgb8"
        for i in range(12):
            f = av.VideoFrame.from_ndarray(grey(2 * i), format="rgb24").reformat(format="rgb8")
            f.pts = i
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    clip = read_video(path, num_frames=4)
    assert clip.frames.shape == (4, H, W, 3)
    expected = nearest_by_time([i / 10 for i in range(12)], 1.2, 4)
    assert np.allclose(clip.times.numpy(), np.array(expected) / 10)
    assert [round(index_of(f) / 2) for f in clip.frames] == expected


def test_frame_folder_reads_as_video(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(10):
        Image.fromarray(grey(i)).save(folder / f"frame_{i:04d}.png")
    (folder / "notes.txt").write_text("not a frame")
    clip = read_video(folder, num_frames=5, folder_fps=2.0)
    assert [index_of(f) for f in clip.frames] == [1, 3, 5, 7, 9]
    assert clip.times.tolist() == [0.5, 1.5, 2.5, 3.5, 4.5] and clip.duration == 5.0
    keys = read_video(folder, num_frames=20, strategy="keyframes")
    assert int(keys.valid.sum()) == 10
    assert video_info(folder, folder_fps=2.0) == {"duration": 5.0, "num_frames": 10, "fps": 2.0, "width": W,
                                                  "height": H, "codec": "images", "num_keyframes": 10}


def test_one_frame_and_odd_size_videos_read(tmp_path):
    one = make_video(tmp_path / "one.mp4", n=1)
    clip = read_video(one, num_frames=4)
    assert clip.frames.shape == (4, H, W, 3) and clip.valid.tolist() == [True, False, False, False]
    for codec, pix_fmt in [("mpeg4", "yuv420p"), ("libx264", "yuv444p")]:
        odd = make_video(tmp_path / f"odd_{codec}.mp4", n=20, codec=codec, w=63, h=47, pix_fmt=pix_fmt)
        clip = read_video(odd, num_frames=4)
        assert clip.frames.shape == (4, 47, 63, 3)
        assert [index_of(f) for f in clip.frames] == nearest_by_time([i / 25 for i in range(20)], 0.8, 4)


def test_max_side_downscales_keeping_aspect(tmp_path):
    path = make_video(tmp_path / "v.mp4", n=20)
    for strategy in ("uniform", "keyframes", "scene"):
        clip = read_video(path, num_frames=2, strategy=strategy, max_side=32)
        assert clip.frames.shape[1:] == (24, 32, 3)


def test_video_info(tmp_path):
    path = make_video(tmp_path / "v.mp4", n=40, gop=10)
    info = video_info(path)
    assert info["num_frames"] == 40 and info["num_keyframes"] == 4 and info["codec"] == "h264"
    assert (info["width"], info["height"]) == (W, H)
    assert info["fps"] == pytest.approx(25) and info["duration"] == pytest.approx(1.6)


# ----------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------
def noise_content(i):
    return np.random.default_rng(i).integers(0, 256, (H, W, 3), dtype=np.uint8)


@pytest.fixture
def bad_files(tmp_path):
    files = {}
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    files["unreadable"] = corrupt
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    files["empty"] = empty
    whole = make_video(tmp_path / "whole.mp4", n=30, content=noise_content)
    data = open(whole, "rb").read()
    half = tmp_path / "half.mp4"
    half.write_bytes(data[: len(data) // 2])
    files["truncated"] = half
    audio = tmp_path / "speech.m4a"
    with av.open(str(audio), "w") as c:
        s = c.add_stream("aac", rate=16000)
        for i in range(8):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    files["no_video_stream"] = audio
    files["missing"] = tmp_path / "nowhere.mp4"
    return files


@pytest.mark.parametrize("reason", ["unreadable", "empty", "truncated", "no_video_stream", "missing"])
@pytest.mark.parametrize("strategy", ["uniform", "keyframes", "scene"])
def test_bad_files_raise_video_error_with_reason(bad_files, reason, strategy):
    path = bad_files[reason]
    with pytest.raises(VideoError) as info:
        read_video(path, num_frames=4, strategy=strategy)
    assert info.value.reason == reason
    assert os.path.basename(path) in str(info.value)
    assert not isinstance(info.value, av.FFmpegError)


def test_truncated_stream_names_the_time(tmp_path):
    # mkv keeps its header at the front, so a cut file opens and ends early: a mid-stream failure
    whole = make_video(tmp_path / "whole.mkv", n=40, content=noise_content, time_base=Fraction(1, 1000),
                       pts=[40 * i for i in range(40)])
    data = open(whole, "rb").read()
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(data[: len(data) // 2])
    for strategy in ("uniform", "keyframes", "scene"):
        with pytest.raises(VideoError) as info:
            read_video(cut, num_frames=4, strategy=strategy)
        assert info.value.reason == "truncated" and 0.0 < info.value.time < 1.6
        assert "cut.mkv at" in str(info.value) and " s:" in str(info.value)


# ----------------------------------------------------------------------------------------
# frame shards
# ----------------------------------------------------------------------------------------
def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


def read_samples(out_dir):
    index = json.load(open(os.path.join(out_dir, INDEX_NAME)))
    return index, [s for shard in index["shards"] for s in read_tar(os.path.join(out_dir, shard["name"]))]


@pytest.mark.parametrize("strategy", ["keyframes", "uniform"])
def test_frame_shards_round_trip_equals_read_video(tmp_path, strategy):
    videos = [make_video(tmp_path / f"v{i}.mp4", n=20 + 10 * i, gop=5) for i in range(3)]
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"video": os.path.basename(v), "caption": f"clip {i}"}
                                                  for i, v in enumerate(videos)])
    result = write_frame_shards(manifest, tmp_path / "shards", num_frames=6, strategy=strategy, shard_size=2,
                                image_format="png", progress=False)
    index, samples = read_samples(tmp_path / "shards")
    assert index["num_samples"] == 3 and [s["count"] for s in index["shards"]] == [2, 1]
    assert len(result["paths"]) == 2
    for (key, files), video in zip(samples, videos):
        clip = read_frame_sample(files)
        ref = read_video(video, 6, strategy)
        assert torch.equal(clip.frames, ref.frames) and torch.equal(clip.times, ref.times)
        assert torch.equal(clip.valid, ref.valid) and clip.duration == ref.duration
        assert json.loads(files["json"])["caption"] == f"clip {int(key)}"
    wds_sample = next(iter(webdataset.WebDataset(result["paths"][0], shardshuffle=False)))   # same layout
    assert torch.equal(read_frame_sample(wds_sample).frames, read_video(videos[0], 6, strategy).frames)
    jpg = write_frame_shards(manifest, tmp_path / "jpg", num_frames=6, strategy=strategy, progress=False)
    _, samples = read_samples(tmp_path / "jpg")
    clip = read_frame_sample(samples[0][1])
    ref = read_video(videos[0], 6, strategy)
    assert jpg["num_samples"] == 3 and (clip.frames.int() - ref.frames.int()).abs().max() <= 3


def test_frame_shards_skip_counts_bad_videos_and_error_names_the_line(tmp_path, bad_files):
    good = make_video(tmp_path / "good.mp4", n=20)
    records = [{"video": good}] + [{"video": str(bad_files[r])} for r in ("unreadable", "no_video_stream",
                                                                         "missing", "empty")]
    records.append({"caption": "no video field"})
    manifest = write_jsonl(tmp_path / "m.jsonl", records)
    result = write_frame_shards(manifest, tmp_path / "out", num_frames=4, on_bad_record="skip", progress=False)
    assert result["num_samples"] == 1
    assert result["skipped"] == {"unreadable": 1, "no_video_stream": 1, "missing": 1, "empty": 1, "missing_key": 1}
    assert "m.jsonl:2" in result["skipped_examples"]["unreadable"][0]
    strict = write_jsonl(tmp_path / "strict.jsonl", records[:3])      # manifest-level errors come first
    with pytest.raises(ManifestError, match=r"strict\.jsonl line 2: video .*corrupt\.mp4.*\[unreadable\]"):
        write_frame_shards(strict, tmp_path / "out2", num_frames=4, progress=False)
    assert not any(n.endswith(".tar") for n in os.listdir(tmp_path / "out2"))   # no partial shard left
    with pytest.raises(FileExistsError):
        write_frame_shards(manifest, tmp_path / "out", num_frames=4, on_bad_record="skip", progress=False)


def test_frames_cli(tmp_path, capsys):
    videos = [make_video(tmp_path / f"v{i}.mp4", n=20, gop=5) for i in range(2)]
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"video": v} for v in videos])
    parser = frames_arguments(argparse.ArgumentParser())
    args = parser.parse_args([manifest, "--out", str(tmp_path / "s"), "--num-frames", "3", "--strategy",
                              "keyframes", "--no-progress"])
    main_from_args(args)
    assert json.loads(capsys.readouterr().out)["num_samples"] == 2
    _, samples = read_samples(tmp_path / "s")
    assert isinstance(read_frame_sample(samples[1][1]), VideoClip)


def test_indexed_shard_reading_equals_streaming_and_refuses_compressed_tars(tmp_path):
    import gzip
    videos = [make_video(tmp_path / f"v{i}.mp4", n=12, gop=4) for i in range(3)]
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"video": os.path.basename(v), "caption": f"clip {i}"}
                                                  for i, v in enumerate(videos)])
    write_frame_shards(manifest, tmp_path / "shards", num_frames=2, strategy="uniform", shard_size=2, progress=False)
    shards = sorted((tmp_path / "shards").glob("*.tar"))
    for shard in shards:
        streamed = list(read_tar(str(shard)))
        indexed = index_tar(str(shard))
        assert [k for k, _ in indexed] == [k for k, _ in streamed]
        assert [read_indexed(str(shard), m) for _, m in indexed] == [f for _, f in streamed]
    packed = tmp_path / "packed.tar.gz"
    packed.write_bytes(gzip.compress(shards[0].read_bytes()))
    with pytest.raises(ValueError, match="packed.tar.gz: a compressed tar"):
        index_tar(str(packed))
