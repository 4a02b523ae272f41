"""Tar shards: writing, exact round trip, rank x worker splitting, shuffling, bad samples, CLI."""
import argparse
import io
import json
import os
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from polymodal.data.datasets import ImageTextCollate, ManifestDataset, SampleBuilder
from polymodal.data.manifests import ManifestError, read_manifest
from polymodal.data.command_args import shard_arguments
from polymodal.data.shards import ShardDataset, resolve_shards, shard_main, write_shards

SIZE = 16


def transform(img):
    """Stand-in for images.ImageTransform: resize to 16x16, scale to [0, 1], (3, S, S)."""
    return torch.from_numpy(np.asarray(img.resize((SIZE, SIZE)), dtype=np.float32)).permute(2, 0, 1) / 255


def zeros_tokenizer(texts, context_length=None):
    """Stand-in tokenizer for tests that do not look at the ids."""
    return torch.zeros(len(texts), context_length or 4, dtype=torch.long)


def pil_loader(path):
    with Image.open(path) as im:
        return im.convert("RGB")


def make_manifest(root, n, truncated=()):
    """n noise images (even: PNG, odd: JPEG) with captions, labels and a pass-through field."""
    os.makedirs(root / "imgs", exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        name = f"imgs/{i}.png" if i % 2 == 0 else f"imgs/{i}.jpeg"
        Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(root / name)
        if i in truncated:
            data = (root / name).read_bytes()
            (root / name).write_bytes(data[: len(data) // 2])
        rec = {"image": name, "captions": [f"cap {i}", f"alt {i}"], "label": i % 3, "extra": {"k": i}}
        if i % 4 == 0:
            rec["long_caption"] = f"First of {i}. Second of {i}! Third?"
        lines.append(json.dumps(rec))
    (root / "m.jsonl").write_text("\n".join(lines) + "\n")
    return str(root / "m.jsonl")


def test_write_shards_layout_bytes_and_index(tmp_path):
    path = make_manifest(tmp_path, 12)
    out = tmp_path / "shards"
    paths = write_shards(path, out, max_count=5, progress=False)
    assert [os.path.basename(p) for p in paths] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert sorted(os.listdir(out)) == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar", "shards.json"]
    index = json.loads((out / "shards.json").read_text())
    assert [s["count"] for s in index["shards"]] == [5, 5, 2] and index["num_samples"] == 12
    manifest = read_manifest(path)
    members = {}
    for p in paths:
        with tarfile.open(p) as tar:
            for m in tar.getmembers():
                members[m.name] = tar.extractfile(m).read()
    assert len(members) == 24
    for i, rec in enumerate(manifest.records):
        ext = "png" if i % 2 == 0 else "jpg"
        with open(rec["image"], "rb") as f:
            assert members[f"{i:09d}.{ext}"] == f.read()           # original bytes, as-is
        assert json.loads(members[f"{i:09d}.json"]) == {k: v for k, v in rec.items() if k != "image"}


def test_max_size_splits_shards_and_rewrite_is_deterministic(tmp_path):
    path = make_manifest(tmp_path, 6)
    out = tmp_path / "s"
    # a PNG sample takes 2048 member bytes, a JPEG one 2560: PNG + JPEG fits 5 KiB, a third does not
    paths = write_shards(path, out, max_count=100, max_size=5 * 1024, progress=False)
    assert len(paths) == 3
    for p in paths:                                   # member bytes (headers + data blocks) within the limit
        with tarfile.open(p) as tar:
            members = tar.getmembers()
        used = sum(512 + -(-m.size // 512) * 512 for m in members)
        assert used <= 5 * 1024 and len(members) == 4
    counts = json.loads((out / "shards.json").read_text())["shards"]
    assert sum(s["count"] for s in counts) == 6
    first = [open(p, "rb").read() for p in paths]
    with pytest.raises(FileExistsError, match="overwrite"):
        write_shards(path, out, progress=False)
    again = write_shards(path, out, max_count=100, max_size=5 * 1024, overwrite=True, progress=False)
    assert again == paths and [open(p, "rb").read() for p in again] == first
    fewer = write_shards(path, out, max_count=100, overwrite=True, progress=False)
    assert len(fewer) == 1 and sorted(os.listdir(out)) == ["shard-000000.tar", "shards.json"]  # stale ones gone


def test_round_trip_matches_manifest_dataset(tmp_path):
    path = make_manifest(tmp_path, 9)
    write_shards(path, tmp_path / "s", max_count=4, progress=False)
    kw = dict(transform=transform, num_subcaptions=2, seed=3)
    shard_ds = ShardDataset(tmp_path / "s", SampleBuilder(**kw), shuffle=False)
    shard_ds.set_epoch(1)
    map_ds = ManifestDataset(path, SampleBuilder(**kw), image_loader=pil_loader)
    map_ds.set_epoch(1)
    got = list(shard_ds)
    assert [s["index"] for s in got] == list(range(9)) and shard_ds.num_samples == 9
    for s in got:
        ref = map_ds[s["index"]]
        assert torch.equal(s["pixels"], ref["pixels"])             # PNG exact, JPEG same decoder
        assert (s["caption"], s["long_captions"], s["label"]) == (ref["caption"], ref["long_captions"], ref["label"])


def test_webdataset_package_reads_our_shards(tmp_path):
    wds = pytest.importorskip("webdataset")
    path = make_manifest(tmp_path, 4)
    shard = write_shards(path, tmp_path / "s", progress=False)[0]
    samples = wds.WebDataset(shard, shardshuffle=False)
    keys = [(s["__key__"], sorted(k for k in s if not k.startswith("__"))) for s in samples]
    assert keys == [(f"{i:09d}", sorted(["json", "png" if i % 2 == 0 else "jpg"])) for i in range(4)]


def _indices(rank, world, workers, source, **kw):
    ds = ShardDataset(source, SampleBuilder(transform, seed=5), rank=rank, world_size=world, seed=5, shuffle_buffer=4, **kw)
    loader = DataLoader(ds, batch_size=2, num_workers=workers, collate_fn=ImageTextCollate(zeros_tokenizer))
    return [i for b in loader for i in b["index"].tolist()]


def test_two_ranks_two_workers_disjoint_and_cover(tmp_path):
    path = make_manifest(tmp_path, 14)
    write_shards(path, tmp_path / "s", max_count=2, progress=False)   # 7 shards >= 4 splits
    per_rank = [_indices(r, 2, 2, tmp_path / "s") for r in (0, 1)]
    assert not set(per_rank[0]) & set(per_rank[1])
    flat = per_rank[0] + per_rank[1]
    assert sorted(flat) == list(range(14))                       # each sample exactly once


def test_fewer_shards_than_splits_warns_and_splits_samples(tmp_path):
    path = make_manifest(tmp_path, 10)
    write_shards(path, tmp_path / "s", max_count=4, progress=False)   # 3 shards < 4 splits
    per_rank = []
    for r in range(4):
        with pytest.warns(UserWarning, match="3 shards for 4"):
            per_rank.append(_indices(r, 4, 0, tmp_path / "s"))
    flat = [i for p in per_rank for i in p]
    assert sorted(flat) == list(range(10))
    assert [len(p) for p in per_rank] == [3, 3, 2, 2]


def test_shuffle_deterministic_per_epoch_and_complete(tmp_path):
    path = make_manifest(tmp_path, 12)
    write_shards(path, tmp_path / "s", max_count=3, progress=False)
    ds = ShardDataset(tmp_path / "s", SampleBuilder(transform, seed=1), seed=1, shuffle_buffer=5)
    orders = {}
    for epoch in (0, 1, 0):
        ds.set_epoch(epoch)
        order = [s["index"] for s in ds]
        assert sorted(order) == list(range(12))
        assert orders.setdefault(epoch, order) == order
    assert orders[0] != orders[1] and orders[0] != list(range(12))


def test_corrupt_image_in_shard_under_both_policies(tmp_path):
    path = make_manifest(tmp_path, 5, truncated=(2,))
    write_shards(path, tmp_path / "s", progress=False)            # existence is all the writer checks
    with pytest.raises(ManifestError) as e:
        list(ShardDataset(tmp_path / "s", SampleBuilder(transform), shuffle=False))
    msg = str(e.value)
    assert "shard-000000.tar key 000000002 (manifest line 3)" in msg and "cannot be read" in msg
    assert "data.on_bad_record=skip" in msg
    ds = ShardDataset(tmp_path / "s", SampleBuilder(transform), shuffle=False, on_bad_record="skip")
    samples = list(ds)
    assert samples[2] == {"_bad": "unreadable_image", "index": 2}
    assert ds.bad_counts == Counter(unreadable_image=1)
    batch = ImageTextCollate(zeros_tokenizer)(samples)
    assert batch["index"].tolist() == [0, 1, 3, 4] and batch["num_bad"] == 1


def test_incomplete_sample_and_broken_shard(tmp_path):
    shard = tmp_path / "shard-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in [("000000000.json", b'{"caption": "only text"}')]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ManifestError, match="needs an image and a .json, .txt or .cls member"):
        list(ShardDataset(shard, SampleBuilder(transform), shuffle=False))
    broken = tmp_path / "broken.tar"
    broken.write_bytes(b"\x00garbage" * 200)
    ds = ShardDataset([str(broken)], SampleBuilder(transform), on_bad_record="skip")
    assert list(ds) == [{"_bad": "unreadable_shard", "index": -1}]


def test_resolve_shards_patterns(tmp_path):
    path = make_manifest(tmp_path, 6)
    paths = write_shards(path, tmp_path / "s", max_count=2, progress=False)
    assert resolve_shards(tmp_path / "s")[0] == paths
    assert resolve_shards(str(tmp_path / "s" / "shard-*.tar"))[0] == paths
    assert resolve_shards(str(tmp_path / "s" / "shard-{000000..000002}.tar"))[0] == paths
    with pytest.raises(FileNotFoundError, match="shard-000008.tar"):
        resolve_shards(str(tmp_path / "s" / "shard-{000008..000009}.tar"))
    with pytest.raises(FileNotFoundError, match="no shards"):
        resolve_shards(tmp_path)


def test_cli_helpers(tmp_path, capsys):
    path = make_manifest(tmp_path, 5)
    parser = shard_arguments(argparse.ArgumentParser())
    args = parser.parse_args([path, "--out", str(tmp_path / "cli"), "--max-count", "2", "--max-size", "1M",
                              "--no-progress"])
    assert args.max_size == 1 << 20
    assert shard_main(args) == 0
    assert "wrote 5 samples in 3 shards" in capsys.readouterr().out
    assert json.loads((tmp_path / "cli" / "shards.json").read_text())["num_samples"] == 5


def _img2dataset_folder(root, n=4, with_counts=False):
    """A folder as img2dataset writes it: 00000.tar, 00001.tar with <key>.jpg + <key>.txt (the caption) +
    <key>.json (metadata without the caption), and its _stats.json files; no shards.json."""
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(1)
    for s in range(2):
        with tarfile.open(root / f"{s:05d}.tar", "w") as tar:
            for i in range(n):
                key = f"{s:05d}{i:04d}"
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(buf, format="JPEG")
                for ext, data in (("jpg", buf.getvalue()), ("txt", f"caption {key}".encode()),
                                  ("json", json.dumps({"key": key, "status": "success", "width": 10}).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        (root / f"{s:05d}_stats.json").write_text(json.dumps({"successes": n}))
    return root


def test_img2dataset_folders_read_without_an_index_with_captions_from_txt(tmp_path):
    from polymodal.data.shards import count_samples
    root = _img2dataset_folder(tmp_path / "img2dataset")
    paths, counts = resolve_shards(root)
    assert [os.path.basename(p) for p in paths] == ["00000.tar", "00001.tar"] and counts is None
    assert count_samples(paths) == {paths[0]: 4, paths[1]: 4}
    samples = list(ShardDataset(root, SampleBuilder(transform), shuffle=False))
    assert sorted(s["caption"] for s in samples) == sorted(f"caption {s:05d}{i:04d}" for s in range(2) for i in range(4))


def test_a_cls_member_is_the_label(tmp_path):
    shard = tmp_path / "0.tar"
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    with tarfile.open(shard, "w") as tar:
        for name, data in (("s0000000.png", buf.getvalue()), ("s0000000.cls", b"7"), ("s0000000.txt", b"a cat")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (sample,) = list(ShardDataset(str(shard), SampleBuilder(transform), shuffle=False))
    assert sample["label"] == 7 and sample["caption"] == "a cat"


def test_shard_globs_and_ranges_pass_the_start_up_check(tmp_path):
    from polymodal.train.run import check_paths, load_recipe
    path = make_manifest(tmp_path, 6)
    write_shards(path, tmp_path / "s", max_count=2, progress=False)
    for source in (f"{tmp_path}/s/shard-*.tar", f"{tmp_path}/s/shard-{{000000..000002}}.tar"):
        check_paths(load_recipe(None, [f"data.shards={source}", f"out_dir={tmp_path}/run"]))
    with pytest.raises(FileNotFoundError, match=r"data.shards: shard not found: .*shard-000008.tar"):
        check_paths(load_recipe(None, [f"data.shards={tmp_path}/s/shard-{{000008..000009}}.tar",
                                       f"out_dir={tmp_path}/run"]))


def test_a_named_config_with_its_own_tokenizer_needs_no_training_data(tmp_path):
    from types import SimpleNamespace

    from polymodal.methods.base import ModelSpec, TokenizerSpec, build_tokenizer
    run = SimpleNamespace(tokenizer=TokenizerSpec(), model=ModelSpec(name="vit-b-32"),
                          data=SimpleNamespace(train="", shards="some/shards", langs=["en"]))
    assert build_tokenizer(run, tmp_path) is None                 # create_model attaches the bundled CLIP BPE
    run.model = ModelSpec(name="tiny")
    with pytest.raises(ValueError, match="tokenizer.path is empty and data.train is not set"):
        build_tokenizer(run, tmp_path)
