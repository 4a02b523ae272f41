"""Reliability: bad config values fail before training, bad data never hangs, a crash leaves nothing that
blocks a resume, a full disk keeps earlier checkpoints, bad bytes and huge images are named.

Exact resume after an interrupted run (bit-identical losses) is `test_trainer.py::
test_resume_equals_uninterrupted_run`; the tests here add the faults a real crash leaves behind.
"""
import errno
import json
import math
import os
import random
import signal
import struct
import subprocess
import sys
import textwrap
import time
import warnings
import zlib
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from polymodal.config import ConfigError, apply_overrides, from_dict
from polymodal.data.images import ImageError, ImageTransform, load_image
from polymodal.data.manifests import ManifestError, read_manifest
from polymodal.train import checkpoint as ckpt_mod
from polymodal.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from polymodal.train.loop import OptimConfig, TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- a tiny task


class Regression(nn.Module):
    """Linear regression with dropout (so an exact resume needs the RNG state too)."""

    def __init__(self, width=16):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, width), nn.Dropout(0.2), nn.Linear(width, 1))

    def forward(self, batch):
        loss = ((self.net(batch["x"]) - batch["y"]) ** 2).mean()
        return {"loss": loss}


def make_loader(epoch, skip):
    g = torch.Generator().manual_seed(100 + epoch)
    x = torch.randn(6 * 8, 4, generator=g)
    y = x.sum(dim=1, keepdim=True)
    return [{"x": x[i:i + 8], "y": y[i:i + 8]} for i in range(0, len(x), 8)][skip:]


def trainer(out, steps=20, loader=make_loader, task=None, optim=None, **train):
    cfg = TrainConfig(steps=steps, log_every=1, ckpt_every=train.pop("ckpt_every", 5), progress=False, **train)
    return Trainer(task or Regression(), loader, optim or OptimConfig(lr=1e-2, warmup_steps=3), cfg, out)


def losses(path):
    return [r["loss"] for r in map(json.loads, open(path)) if "loss" in r]


# --------------------------------------------------------------------------- 1. validation


BAD_OPTIM = [
    ("lr", "fast"), ("lr", float("nan")), ("lr", float("inf")), ("lr", 0.0), ("lr", -1e-3), ("lr", None),
    ("weight_decay", -0.1), ("weight_decay", float("nan")), ("betas", (0.9,)), ("betas", (0.9, 1.0)),
    ("betas", (0.9, "x")), ("betas", (0.9, 0.98, 0.99)), ("eps", 0.0), ("warmup_steps", -1),
    ("schedule", "linear"), ("min_lr_ratio", 1.5), ("min_lr_ratio", -0.1), ("clip_grad", -1.0),
    ("accum_steps", 0), ("accum_steps", 1.5),
]
BAD_TRAIN = [
    ("steps", 0), ("steps", -5), ("steps", "10"), ("ckpt_every", -1), ("log_every", 0), ("eval_every", -1),
    ("keep_last", 0), ("precision", "fp16"), ("resume", ""), ("threads", -1), ("stop_after", -1),
    ("max_empty_batches", 0), ("seed", 1.5),
]


@pytest.mark.parametrize("key,value", BAD_OPTIM)
def test_bad_optim_value_names_file_and_key(key, value):
    cfg = OptimConfig(**{key: value})
    with pytest.raises(ConfigError, match=rf"^recipes/x\.yaml: optim\.{key} must"):
        cfg.validate(where="recipes/x.yaml")


@pytest.mark.parametrize("key,value", BAD_TRAIN)
def test_bad_train_value_names_file_and_key(key, value):
    cfg = TrainConfig(**{key: value})
    with pytest.raises(ConfigError, match=rf"^recipes/x\.yaml: train\.{key} must"):
        cfg.validate(where="recipes/x.yaml")


def test_defaults_and_edge_values_are_valid():
    OptimConfig().validate()
    TrainConfig().validate()
    OptimConfig(lr=1, weight_decay=0, betas=[0.0, 0.999], min_lr_ratio=1.0, clip_grad=0, warmup_steps=0,
                schedule="constant").validate()
    TrainConfig(steps=1, ckpt_every=0, eval_every=0, stop_after=0, threads=0, resume="never").validate()


def test_string_and_nan_from_overrides_are_caught_after_from_dict():
    """`from_dict` passes a str into a float field unchanged; `validate` is what catches it."""
    for raw in ("optim.lr=fast", "optim.lr=nan", "optim.lr=.inf"):
        data = apply_overrides({}, [raw])
        cfg = from_dict(OptimConfig, data["optim"], "r.yaml: optim")
        with pytest.raises(ConfigError, match="optim.lr must be a finite number > 0"):
            cfg.validate("r.yaml")


def test_trainer_rejects_bad_values_before_reading_any_batch(tmp_path):
    calls = []

    def loader(epoch, skip):
        calls.append(epoch)
        return make_loader(epoch, skip)

    for optim, train in [(OptimConfig(accum_steps=0), {}), (OptimConfig(betas=[0.9]), {}),
                         (OptimConfig(schedule="cosin"), {}), (OptimConfig(), {"steps": 0}),
                         (OptimConfig(), {"ckpt_every": -1})]:
        with pytest.raises(ConfigError):
            trainer(tmp_path, loader=loader, optim=optim, **train).fit()
    assert calls == [] and not (tmp_path / "metrics.jsonl").exists()


def test_missing_resume_path_fails_at_construction(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.resume.*nowhere/step_00000005\.pt.*does not exist"):
        trainer(tmp_path, resume=str(tmp_path / "nowhere" / "step_00000005.pt"))


# --------------------------------------------------------------------------- 2. never hang


class GuardedLoader:
    """Batches from `pattern(epoch, i)` (True = usable); raises after `limit` batches so a hang shows as a failure."""

    def __init__(self, pattern, per_epoch, limit=5000, bad=64):
        self.pattern, self.per_epoch, self.limit, self.bad, self.served = pattern, per_epoch, limit, bad, 0

    def __call__(self, epoch, skip):
        for i in range(skip, self.per_epoch):
            self.served += 1
            if self.served > self.limit:
                raise AssertionError(f"the trainer read {self.limit} batches without stopping (a hang)")
            if self.pattern(epoch, i):
                x = torch.full((4, 4), float(i))
                yield {"x": x, "y": x.sum(1, keepdim=True) * 0, "index": torch.arange(4),
                       "bad_reasons": Counter()}
            else:
                yield {"index": torch.zeros(0, dtype=torch.long), "bad_reasons": Counter(corrupt_image=self.bad)}


def test_every_record_bad_ends_with_skip_counts_instead_of_hanging(tmp_path):
    loader = GuardedLoader(lambda e, i: False, per_epoch=5)
    with pytest.raises(RuntimeError, match=r"no usable sample in epoch 0 .*corrupt_image=320") as info:
        trainer(tmp_path, loader=loader).fit()
    assert type(info.value).__name__ == "DataExhausted" and loader.served == 5
    logged = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert logged[-1] == {"step": 0, "bad_records": {"corrupt_image": 320}}


def test_consecutive_empty_batches_are_bounded(tmp_path):
    loader = GuardedLoader(lambda e, i: i == 0, per_epoch=10**6)     # one good batch, then only bad ones
    with pytest.raises(RuntimeError, match=r"no usable sample in 100 consecutive batches \(skipped: "
                                            r"corrupt_image=6400\).*train\.max_empty_batches"):
        trainer(tmp_path, loader=loader, ckpt_every=0).fit()
    assert loader.served == 101
    loader = GuardedLoader(lambda e, i: i == 0, per_epoch=10**6, bad=1)
    with pytest.raises(RuntimeError, match=r"7 consecutive batches \(skipped: corrupt_image=7\)"):
        trainer(tmp_path / "b", loader=loader, ckpt_every=0, max_empty_batches=7).fit()


def test_mostly_broken_data_still_trains(tmp_path):
    loader = GuardedLoader(lambda e, i: i % 40 == 0, per_epoch=200)     # 1 usable batch in 40
    t = trainer(tmp_path, steps=12, loader=loader, ckpt_every=0)
    t.fit()
    assert t.state.step == 12 and t.state.bad_records["corrupt_image"] == 39 * 11 * 64


# --------------------------------------------------------------------------- 3. what a crash leaves


def test_torn_last_metrics_line_is_dropped_and_resume_is_exact(tmp_path):
    trainer(tmp_path / "a").fit()
    trainer(tmp_path / "b", stop_after=7).fit()                       # "killed" after the step-7 checkpoint
    metrics = tmp_path / "b" / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 8, "epoch": 1, "lr": 0.00')                  # the kill cut this line
    with pytest.warns(UserWarning, match=r"metrics\.jsonl: dropping line\(s\) 8 "):
        trainer(tmp_path / "b").fit()
    assert losses(tmp_path / "a" / "metrics.jsonl") == losses(metrics)


def test_torn_line_in_the_middle_is_dropped_with_a_warning(tmp_path):
    trainer(tmp_path, stop_after=7).fit()
    metrics = tmp_path / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    good = losses(metrics)
    lines.insert(3, '{"step": 3, "los')
    lines.insert(5, "7")                                              # parses as JSON but is no record
    metrics.write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning, match=r"dropping line\(s\) 4, 6 "):
        trainer(tmp_path, steps=7).maybe_resume()
    assert losses(metrics) == good and all(json.loads(line) for line in metrics.read_text().splitlines())


def test_metrics_rewrite_is_atomic(tmp_path, monkeypatch):
    """A failure while the metrics file is rewritten leaves the old file whole (temporary file + rename)."""
    trainer(tmp_path, stop_after=7).fit()
    metrics = tmp_path / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 8}\n{"step": 9, "loss": 1.0}\n')           # steps after the checkpoint: to be cut
    before = metrics.read_bytes()

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError, match="No space left"):
        trainer(tmp_path).maybe_resume()
    monkeypatch.undo()
    assert metrics.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_rerun_after_a_crash_before_the_first_checkpoint_does_not_duplicate_steps(tmp_path):
    trainer(tmp_path / "a", steps=8, ckpt_every=0).fit()
    trainer(tmp_path / "b", steps=8, ckpt_every=0, stop_after=4).fit()   # died before any checkpoint
    trainer(tmp_path / "b", steps=8, ckpt_every=0).fit()                 # starts again from step 0
    steps = [r["step"] for r in map(json.loads, open(tmp_path / "b" / "metrics.jsonl")) if "loss" in r]
    assert steps == list(range(1, 9))
    assert losses(tmp_path / "a" / "metrics.jsonl") == losses(tmp_path / "b" / "metrics.jsonl")


def test_stale_temp_files_are_removed_at_start(tmp_path):
    trainer(tmp_path, stop_after=5).fit()
    ckpts = tmp_path / "checkpoints"
    stale = [ckpts / ".step_00000010.pt.k2j3h4.tmp", ckpts / ".step_00000006.pt.x.tmp"]
    for p in stale:
        p.write_bytes(b"PK\x03\x04 half a checkpoint")
    keep = ckpts / "notes.tmp"                                          # not ours: left alone
    keep.write_text("x")
    assert latest_checkpoint(ckpts).name == "step_00000005.pt"
    trainer(tmp_path, steps=6).fit()
    assert not any(p.exists() for p in stale) and keep.exists()


def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    trainer(tmp_path / "a").fit()
    trainer(tmp_path / "b", stop_after=10, keep_last=3).fit()           # checkpoints at 5 and 10
    ckpts = tmp_path / "b" / "checkpoints"
    data = (ckpts / "step_00000010.pt").read_bytes()
    (ckpts / "step_00000015.pt").write_bytes(data[: len(data) // 2])    # newest, cut short
    with pytest.warns(UserWarning, match=r"step_00000015\.pt is incomplete"):
        assert latest_checkpoint(ckpts).name == "step_00000010.pt"
    with pytest.warns(UserWarning, match=r"step_00000015\.pt is incomplete"):
        trainer(tmp_path / "b", keep_last=3).fit()
    assert losses(tmp_path / "a" / "metrics.jsonl") == losses(tmp_path / "b" / "metrics.jsonl")


def test_unloadable_checkpoint_with_intact_zip_directory_also_falls_back(tmp_path):
    trainer(tmp_path, stop_after=10, keep_last=3).fit()
    newest = tmp_path / "checkpoints" / "step_00000010.pt"
    data = bytearray(newest.read_bytes())
    data[200:4000] = bytes(3800)                                        # corrupt the middle, keep the end
    newest.write_bytes(bytes(data))
    t = trainer(tmp_path, keep_last=3)
    with pytest.warns(UserWarning, match=r"step_00000010\.pt cannot be read.*using step_00000005\.pt"):
        t.maybe_resume()
    assert t.state.step == 5


class _Arbitrary:
    """A class outside torch's safe list: unpickling it would import and run our code."""


def test_pickled_code_in_a_checkpoint_is_refused_without_suggesting_unsafe_loading(tmp_path):
    path = tmp_path / "step_00000001.pt"
    torch.save({"task": _Arbitrary()}, path)
    with pytest.raises(RuntimeError, match=r"step_00000001\.pt.*refused for safety") as info:
        load_checkpoint(path)
    assert "weights_only=False" not in str(info.value)


# --------------------------------------------------------------------------- 4. disk full


ENFORCE_FAIL = "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"


def test_failed_checkpoint_write_names_file_keeps_earlier_and_leaves_no_temp(tmp_path, monkeypatch):
    real_save = torch.save
    calls = []

    def save(obj, f):
        calls.append(1)
        if len(calls) < 2:
            return real_save(obj, f)
        f.write(b"PK\x03\x04" + bytes(100))                             # part of the file, then the disk is full
        raise RuntimeError(ENFORCE_FAIL)

    monkeypatch.setattr(ckpt_mod.torch, "save", save)
    with pytest.raises(OSError, match=r"step_00000010\.pt.*disk may be full.*step_00000005\.pt"
                                      r".*train\.resume=auto") as info:
        trainer(tmp_path).fit()
    assert type(info.value).__name__ == "CheckpointWriteError"
    monkeypatch.undo()
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_00000005.pt"]
    assert load_checkpoint(tmp_path / "checkpoints" / names[0])["step"] == 5


def test_enospc_from_the_file_is_a_checkpoint_write_error(tmp_path, monkeypatch):
    from polymodal.train.checkpoint import atomic_torch_save

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError, match=r"step_00000003\.pt.*No space left.*disk may be full") as info:
        atomic_torch_save({"w": torch.zeros(10)}, tmp_path / "step_00000003.pt")
    assert type(info.value).__name__ == "CheckpointWriteError" and info.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


def test_other_save_errors_are_not_reported_as_a_full_disk(tmp_path):
    from polymodal.train.checkpoint import atomic_torch_save
    with pytest.raises(Exception) as info:
        atomic_torch_save({"f": lambda x: x}, tmp_path / "step_00000001.pt")   # not picklable
    assert "disk may be full" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def small_tmpfs(tmp_path):
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    except OSError:
        pytest.skip("no mount command")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()})")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.slow
def test_full_disk_keeps_earlier_checkpoints(small_tmpfs):
    """A 2 MiB disk holds two ~0.7 MB checkpoints (weights + AdamW moments); the third does not fit."""

    class Wide(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(4, 240), nn.Linear(240, 240), nn.Linear(240, 1))

        def forward(self, batch):
            return {"loss": ((self.net(batch["x"]) - batch["y"]) ** 2).mean()}

    t = trainer(small_tmpfs / "run", steps=10, task=Wide(), ckpt_every=1, keep_last=3)
    with pytest.raises(OSError, match=r"step_00000003\.pt.*disk may be full") as info:
        t.fit()
    assert type(info.value).__name__ == "CheckpointWriteError"
    ckpts = small_tmpfs / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000001.pt", "step_00000002.pt"]
    for step, path in list_checkpoints(ckpts):
        assert load_checkpoint(path)["step"] == step


# --------------------------------------------------------------------------- 5. bad bytes in manifests


@pytest.fixture
def images(tmp_path):
    (tmp_path / "imgs").mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "imgs" / name)
    return tmp_path


def _jsonl_with_bad_byte(folder):
    lines = [json.dumps({"image": "imgs/a.png", "caption": f"caption {i}"}).encode() for i in range(9)]
    # line 7: `{"image": "imgs/b.png", "caption": "caf\xff"}`; the bad byte is character 40.
    lines[6] = b'{"image": "imgs/b.png", "caption": "caf\xff"}'
    path = folder / "m.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path, lines[6].index(b"\xff") + 1


def test_non_utf8_byte_names_file_line_and_column(images):
    path, column = _jsonl_with_bad_byte(images)
    with pytest.raises(ManifestError, match=rf"m\.jsonl line 7: not valid UTF-8 \(byte 0xff at column {column}\); "
                                            r"re-save the file as UTF-8.*on_bad_record=skip"):
        read_manifest(path)


def test_non_utf8_byte_is_skipped_and_counted(images):
    path, _ = _jsonl_with_bad_byte(images)
    m = read_manifest(path, on_bad_record="skip")
    assert len(m) == 8 and m.skipped == Counter(bad_encoding=1)
    assert [r["_line"] for r in m.records] == [1, 2, 3, 4, 5, 6, 8, 9]


def test_non_utf8_byte_in_csv_row_is_a_bad_record(images):
    path = images / "m.csv"
    path.write_bytes(b'image,caption\nimgs/a.png,"one"\nimgs/b.png,"two \xe9t\xe9"\nimgs/a.png,"three\nlines"\n'
                     b'imgs/b.png,four\n')
    m = read_manifest(path, on_bad_record="skip")
    assert [r["caption"] for r in m.records] == ["one", "three\nlines", "four"]
    assert [r["_line"] for r in m.records] == [2, 4, 6] and m.skipped == Counter(bad_encoding=1)
    with pytest.raises(ManifestError, match=r"m\.csv line 3: not valid UTF-8 \(byte 0xe9 at column 17\)"):
        read_manifest(path)


def test_utf8_bom_and_multibyte_captions_read(images):
    path = images / "m.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"image": "imgs/a.png", "caption": "中文"}, ensure_ascii=False)
                     .encode() + b"\n")
    assert read_manifest(path)[0]["caption"] == "中文"


def test_video_and_text_only_records_when_asked(images):
    (images / "clips").mkdir()
    (images / "clips" / "a.mp4").write_bytes(b"\x00")
    (images / "clips" / "frames_b").mkdir()                           # a folder of frames
    path = images / "v.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"video": "clips/a.mp4", "caption": "a"}, {"video": "clips/frames_b", "caption": "b"},
        {"video": "clips/missing.mp4", "caption": "c"}, {"caption": "text only"}]) + "\n")
    m = read_manifest(path, media="video", on_bad_record="skip")
    assert [r["video"] for r in m.records] == [str(images / "clips" / "a.mp4"), str(images / "clips" / "frames_b")]
    assert m.skipped == Counter(missing_video=1, missing_key=1)
    with pytest.raises(ManifestError, match=r"line 3: video 'clips/missing\.mp4' not found"):
        read_manifest(path, media="video")
    text = read_manifest(path, media="none", check_images=False)
    assert [r["caption"] for r in text.records] == ["a", "b", "c", "text only"]
    with pytest.raises(ManifestError, match=r"line 1: missing key 'image'"):
        read_manifest(path)                                           # images remain the default


def test_empty_training_manifest_is_an_error(images):
    empty = images / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ManifestError, match=r"empty\.jsonl: no usable record"):
        read_manifest(empty)
    bad = images / "bad.jsonl"
    bad.write_text(json.dumps({"image": "imgs/zzz.png", "caption": "x"}) + "\n")
    with pytest.raises(ManifestError, match=r"bad\.jsonl: no usable record.*missing_image"):
        read_manifest(bad, on_bad_record="skip")
    assert len(read_manifest(empty, allow_empty=True)) == 0


# --------------------------------------------------------------------------- 6. big images


def _png_header_only(path, width, height):
    """A PNG whose header says width x height (RGB, 8 bit) with almost no pixel data: opening it is free,
    decoding it would fail as truncated, so a size error proves the check came before the decode."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    idat = zlib.compress(b"\x00" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def test_huge_image_is_refused_from_the_header(tmp_path):
    from polymodal.data.images import DEFAULT_MAX_IMAGE_PIXELS
    assert DEFAULT_MAX_IMAGE_PIXELS == 40_000_000
    path = _png_header_only(tmp_path / "big.png", 12000, 12000)
    with pytest.raises(ImageError, match=r"big\.png: 12000x12000 = 144\.0 Mpx is over the limit of 40\.0 Mpx.*"
                                         r"data\.max_image_pixels"):
        load_image(path)


def test_pixel_limit_is_configurable_and_reaches_the_transform(tmp_path):
    path = tmp_path / "small.png"
    Image.new("RGB", (100, 60), (5, 6, 7)).save(path)
    assert load_image(path, max_pixels=6000).size == (100, 60)
    with pytest.raises(ImageError, match=r"100x60 .*limit"):
        load_image(path, max_pixels=5999)
    with pytest.raises(ImageError, match=r"small\.png: 100x60"):
        ImageTransform(32, max_pixels=1000)(path)
    assert ImageTransform(32)(path).shape == (3, 32, 32)


def test_pillow_decompression_bomb_becomes_image_error(tmp_path):
    warn_size = _png_header_only(tmp_path / "warn.png", 10000, 10000)     # over Pillow's 89 Mpx warning level
    error_size = _png_header_only(tmp_path / "bomb.png", 20000, 20000)    # over twice that: Pillow raises
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for path in (warn_size, error_size):
            with pytest.raises(ImageError, match=rf"{path.name}: refused by Pillow as a decompression bomb"):
                load_image(path, max_pixels=None)


def test_image_bytes_use_the_same_limit():
    import io
    from polymodal.data.images import load_image_bytes
    buf = io.BytesIO()
    Image.new("RGB", (50, 50)).save(buf, format="PNG")
    assert load_image_bytes(buf.getvalue(), "shard-0.tar:000001.png").size == (50, 50)
    with pytest.raises(ImageError, match=r"shard-0\.tar:000001\.png: 50x50"):
        load_image_bytes(buf.getvalue(), "shard-0.tar:000001.png", max_pixels=100)


# --------------------------------------------------------------------------- 7. kill -9 while checkpointing


_CHILD = textwrap.dedent("""
    import sys, torch
    from torch import nn
    from polymodal.train.loop import OptimConfig, TrainConfig, Trainer
    torch.set_num_threads(1)

    class Wide(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(4, 256), nn.Dropout(0.2), nn.Linear(256, 256), nn.Linear(256, 1))

        def forward(self, batch):
            return {"loss": ((self.net(batch["x"]) - batch["y"]) ** 2).mean()}

    def loader(epoch, skip):
        g = torch.Generator().manual_seed(100 + epoch)
        x = torch.randn(64, 4, generator=g)
        return [{"x": x[i:i + 8], "y": x[i:i + 8].sum(1, keepdim=True)} for i in range(0, 64, 8)][skip:]

    out, steps = sys.argv[1], int(sys.argv[2])
    cfg = TrainConfig(steps=steps, log_every=1, ckpt_every=1, keep_last=2, progress=False)
    Trainer(Wide(), loader, OptimConfig(lr=1e-3, warmup_steps=5), cfg, out).fit()
""")


def _wait_for(predicate, timeout=120.0):
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("timed out waiting for the training child")
        time.sleep(0.001)


@pytest.mark.slow
def test_kill_9_during_checkpoint_writes_then_resume_is_exact(tmp_path):
    """SIGKILL a training process 5 times (3 times while a checkpoint's temporary file exists, i.e. in the
    middle of a write; twice at a random moment), each time check that the newest checkpoint loads, then
    let it finish: the losses equal an uninterrupted run's, bit for bit."""
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    steps = 60
    run = lambda out: subprocess.Popen([sys.executable, str(script), str(out), str(steps)], env=env,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ref = run(tmp_path / "ref")
    assert ref.wait(timeout=600) == 0, ref.stderr.read().decode()[-2000:]
    out = tmp_path / "killed"
    ckpts = out / "checkpoints"
    newest = lambda: max([s for s, _ in list_checkpoints(ckpts)], default=0)
    writing = lambda: ckpts.is_dir() and any(p.name.endswith(".tmp") for p in ckpts.iterdir())
    rng = random.Random(0)
    progress, during_write = [], 0
    for kill in range(5):
        child = run(out)
        before = newest()
        _wait_for(lambda: newest() > before or child.poll() is not None)   # training is under way again
        if kill % 2 == 0:
            _wait_for(lambda: writing() or child.poll() is not None)
        else:
            time.sleep(rng.random() * 0.3)
        assert child.poll() is None, "the child finished before it could be killed; raise `steps`"
        child.send_signal(signal.SIGKILL)
        child.wait()
        during_write += writing()                                         # a kill mid-write leaves its temp file
        latest = latest_checkpoint(ckpts)
        progress.append(load_checkpoint(latest)["step"])                  # never a torn checkpoint
    final = run(out)
    assert final.wait(timeout=600) == 0, final.stderr.read().decode()[-2000:]
    assert during_write >= 3 and progress == sorted(progress) and progress[-1] < steps
    assert not writing()                                                  # the litter was removed at start-up
    a, b = losses(tmp_path / "ref" / "metrics.jsonl"), losses(out / "metrics.jsonl")
    assert len(a) == len(b) == steps and a == b and all(math.isfinite(x) for x in a)


class _StuckDataset(torch.utils.data.Dataset):
    """Record 3 never finishes decoding (as a read from a dead network mount would)."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        if i == 3:
            import time
            time.sleep(600)
        return {"x": torch.zeros(2), "index": i}


def test_a_stuck_loader_worker_is_an_error_not_a_hang(tmp_path):
    from polymodal.data.datasets import build_loader
    from polymodal.train.loop import DataLoaderStuck, OptimConfig, TrainConfig, Trainer

    class Task(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(2))

        def forward(self, batch):
            return {"loss": (batch["x"] - self.w).pow(2).mean()}

    loader = build_loader(_StuckDataset(), batch_size=2, shuffle=False, num_workers=1, timeout=2,
                          collate_fn=torch.utils.data.default_collate)
    trainer = Trainer(Task(), lambda epoch, skip: loader, OptimConfig(warmup_steps=0),
                      TrainConfig(steps=10, ckpt_every=0, progress=False), tmp_path)
    with pytest.raises(DataLoaderStuck, match="data.worker_timeout"):
        trainer.fit()


# --------------------------------------------------------------------------- 8. probes of issue #30


def test_resuming_with_another_model_is_one_line_naming_the_checkpoint_and_the_fix(tmp_path):
    from polymodal.train.checkpoint import CheckpointError, restore_task_state
    trainer(tmp_path, stop_after=5).fit()
    path = latest_checkpoint(tmp_path / "checkpoints")
    other = Regression(width=8)                                        # same names, other shapes
    before = [p.clone() for p in other.parameters()]
    with pytest.raises(CheckpointError) as info:
        restore_task_state(other, load_checkpoint(path)["task"], path)
    text = str(info.value)
    assert "\n" not in text and str(path) in text and "another model" in text and "train.resume=never" in text
    assert "net.0.weight (16, 4) vs (8, 4)" in text and "3 of another shape" in text
    assert all(torch.equal(a, b) for a, b in zip(before, other.parameters()))   # nothing half-loaded
    renamed = nn.Module()
    renamed.body = nn.Linear(4, 1)
    with pytest.raises(CheckpointError, match=r"2 weight\(s\) of this model missing \(body.weight, body.bias\); "
                                              r"4 unknown to it"):
        restore_task_state(renamed, load_checkpoint(path)["task"], path)
    restore_task_state(Regression(), load_checkpoint(path)["task"], path)   # the right model loads
    # The Trainer resumes through it: another model in the same run folder is the same one line.
    resumed = trainer(tmp_path, task=Regression(width=8))
    with pytest.raises(CheckpointError, match=r"another model.*train\.resume=never"):
        resumed.maybe_resume()


def test_a_checkpoint_error_is_a_user_error_on_the_command_line():
    from polymodal import cli
    from polymodal.train.checkpoint import CheckpointError
    try:
        raise CheckpointError("checkpoint x.pt was written for another model")
    except CheckpointError as err:
        assert cli._is_user_error(err)


def test_passed_over_checkpoints_are_named_with_the_one_used(tmp_path):
    from polymodal.train.checkpoint import load_newest_readable
    trainer(tmp_path, stop_after=10, keep_last=3).fit()                 # step 5 and step 10
    ckpts = tmp_path / "checkpoints"
    data = (ckpts / "step_00000010.pt").read_bytes()
    (ckpts / "step_00000020.pt").write_bytes(data[: len(data) // 2])    # newest, truncated
    import pickle
    (ckpts / "step_00000015.pt").write_bytes(pickle.dumps({"task": {}}))  # a plain pickle in the folder
    with pytest.warns(UserWarning) as record:
        path, state = load_newest_readable(ckpts)
    assert path.name == "step_00000010.pt" and state["step"] == 10
    (message,) = [str(w.message) for w in record]
    assert "step_00000020.pt is incomplete (truncated?)" in message
    assert "step_00000015.pt is a plain pickle" in message and "using step_00000010.pt" in message
    with pytest.warns(UserWarning, match=r"step_00000015\.pt is a plain pickle.*using step_00000010\.pt"):
        assert latest_checkpoint(ckpts).name == "step_00000010.pt"


@pytest.mark.parametrize("value,words", [
    ("cat", "is a class name, but no classes file maps names to indices"),
    ("3.5", "is not an integer class index"), (2.0, "is not an integer class index"),
    (-1, "is negative"), (True, "neither a class index nor a class name")])
def test_a_label_that_is_no_class_index_is_one_line_saying_what_to_write(value, words):
    from polymodal.data.labels import LabelError, label_index
    with pytest.raises(LabelError, match=words) as info:
        label_index(value)
    assert "\n" not in str(info.value)
    assert label_index(3) == 3 and label_index(" 4 ") == 4 and label_index("cat", {"dog": 0, "cat": 1}) == 1


def _recipe(tmp_path, out_dir):
    from polymodal.train.run import load_recipe
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"caption": "x"}\n')
    return load_recipe(None, [f"data.train={manifest}", f"out_dir={out_dir}"])


def test_out_dir_that_is_a_file_is_refused_before_anything_is_built(tmp_path):
    from polymodal.train.run import check_paths
    (tmp_path / "notes.txt").write_text("mine")
    for out, words in ((tmp_path / "notes.txt", "notes.txt is a file"),
                       (tmp_path / "notes.txt" / "run", "has a file on its way")):
        with pytest.raises(ConfigError, match=rf"out_dir: .*{words}.*give a folder path") as info:
            check_paths(_recipe(tmp_path, out))
        assert "\n" not in str(info.value)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    check_paths(_recipe(tmp_path, tmp_path / "new" / "run"))            # a folder still to be made is fine


def test_out_dir_on_a_read_only_place_is_refused(tmp_path, monkeypatch):
    from polymodal.train.run import check_paths
    (tmp_path / "ro").mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if str(p) == str(tmp_path / "ro") else
                        real_access(p, mode, **k))
    with pytest.raises(ConfigError, match=r"out_dir: cannot write in .*ro \(read-only file system"):
        check_paths(_recipe(tmp_path, tmp_path / "ro" / "run"))
