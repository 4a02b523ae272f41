"""ManifestDataset, sentence splitting and sub-captions, the collate, the sampler and the loader."""
import io
import json
import os
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from polymodal.data.datasets import (
    ImageTextCollate,
    ManifestDataset,
    SampleBuilder,
    ShardedSampler,
    build_loader,
    sample_subcaptions,
    set_loader_epoch,
    split_sentences,
)
from polymodal.data.manifests import ManifestError, read_manifest

SIZE = 16


def transform(img):
    """Stand-in for images.ImageTransform: resize to 16x16, scale to [0, 1], (3, S, S)."""
    return torch.from_numpy(np.asarray(img.resize((SIZE, SIZE)), dtype=np.float32)).permute(2, 0, 1) / 255


def pil_loader(path):
    """Stand-in for images.load_image."""
    with Image.open(path) as im:
        return im.convert("RGB")


class CharTokenizer:
    """Stand-in tokenizer: one id per character (code point mod 1000 + 1), pad 0, fixed length."""
    pad_id = 0

    def __init__(self, length=24):
        self.length = length

    def __call__(self, texts, context_length=None):
        n = context_length or self.length
        out = torch.zeros(len(texts), n, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [ord(c) % 1000 + 1 for c in t][:n]
            out[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


def colour(i):
    return (10 * i % 256, 255 - 7 * i % 256, 3 * i % 256)


def make_manifest(root, records, name="m.jsonl"):
    """Write one solid-colour PNG per record (unless it names its own image) and a JSONL manifest."""
    os.makedirs(root / "imgs", exist_ok=True)
    lines = []
    for i, rec in enumerate(records):
        rec = dict(rec)
        if "image" not in rec:
            Image.new("RGB", (20, 12), colour(i)).save(root / "imgs" / f"{i}.png")
            rec["image"] = f"imgs/{i}.png"
        lines.append(json.dumps(rec, ensure_ascii=False))
    (root / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(root / name)


def truncated_png(path):
    """A PNG cut in half: the header parses, the pixel data does not."""
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
    data = buf.getvalue()
    path.write_bytes(data[: len(data) // 2])
    return path


LONG = "The cube is red. A ball rolls left! Is the sky blue? Two cones stand still. The end."
LONG_SENTENCES = ["The cube is red.", "A ball rolls left!", "Is the sky blue?", "Two cones stand still.", "The end."]


# ---------------------------------------------------------------- sentences and sub-captions
@pytest.mark.parametrize("text,expected", [
    (LONG, LONG_SENTENCES),
    ("猫在桌子上。狗在跑！你好吗？最后一句", ["猫在桌子上。", "狗在跑！", "你好吗？", "最后一句"]),
    ("Pi is 3.14 here. Next line\nthird part", ["Pi is 3.14 here.", "Next line", "third part"]),
    ('He said "stop." Then left...  Done', ['He said "stop."', "Then left...", "Done"]),
    ("  ", []),
])
def test_split_sentences(text, expected):
    assert split_sentences(text) == expected


def _runs(sentences, joiner, lo, hi):
    """Every run of lo..hi consecutive sentences, joined: the allowed sub-captions."""
    return {joiner.join(sentences[a:a + k]) for k in range(lo, hi + 1) for a in range(len(sentences) - k + 1)}


def test_subcaptions_are_consecutive_runs_and_cover_all_sentences():
    allowed = _runs(LONG_SENTENCES, " ", 1, 3)
    seen = set()
    for epoch in range(30):
        subs = sample_subcaptions(LONG, 4, (1, 3), np.random.default_rng([0, epoch, 5, 1]))
        assert len(subs) == 4 and set(subs) <= allowed
        seen |= {s for s in LONG_SENTENCES if any(s in sub for sub in subs)}
    assert seen == set(LONG_SENTENCES)


def test_subcaptions_chinese_and_short_texts():
    zh = ["猫在桌子上。", "狗在跑！", "鸟在飞？"]
    subs = sample_subcaptions("".join(zh), 20, (2, 3), np.random.default_rng(1))
    assert set(subs) <= _runs(zh, "", 2, 3) and len(set(subs)) > 1
    assert sample_subcaptions("Only one.", 3, (2, 3), np.random.default_rng(0)) == ["Only one."] * 3
    assert sample_subcaptions("", 3, (1, 3), np.random.default_rng(0)) == []


def test_dataset_subcaptions_deterministic_per_seed_epoch_index(tmp_path):
    path = make_manifest(tmp_path, [{"caption": f"c{i}", "long_caption": LONG} for i in range(6)])
    kw = dict(transform=transform, num_subcaptions=3, seed=7)
    a, b = (ManifestDataset(path, SampleBuilder(**kw), image_loader=pil_loader),
            ManifestDataset(path, SampleBuilder(**kw), image_loader=pil_loader))
    for ds in (a, b):
        ds.set_epoch(2)
    assert [a[i]["long_captions"] for i in range(6)] == [b[i]["long_captions"] for i in range(6)]
    expected = sample_subcaptions(LONG, 3, (1, 3), np.random.default_rng([7, 2, 4, 1]))
    assert a[4]["long_captions"] == expected
    per_epoch = []
    for e in range(4):
        a.set_epoch(e)
        per_epoch.append(a[0]["long_captions"])
    assert len({tuple(x) for x in per_epoch}) > 1                 # changes with the epoch


def test_missing_long_caption_falls_back_to_caption(tmp_path):
    path = make_manifest(tmp_path, [{"caption": "short one"}])
    ds = ManifestDataset(path, SampleBuilder(transform, num_subcaptions=2), image_loader=pil_loader)
    assert ds[0]["long_captions"] == ["short one", "short one"]


# ---------------------------------------------------------------- dataset samples
def test_sample_fields_and_pixels(tmp_path):
    path = make_manifest(tmp_path, [{"caption": "a", "label": 3, "labels": [0, 2], "lang": "en"},
                                    {"caption": "b", "label": 1, "labels": [], "lang": "zh"}])
    ds = ManifestDataset(path, SampleBuilder(transform, num_classes=4), image_loader=pil_loader)
    s = ds[1]
    expected = torch.tensor(colour(1), dtype=torch.float32).view(3, 1, 1).expand(3, SIZE, SIZE) / 255
    assert torch.allclose(s["pixels"], expected)
    assert (s["caption"], s["label"], s["labels"], s["lang"], s["index"]) == ("b", 1, [], "zh", 1)
    assert ds[0]["multi_hot"].tolist() == [1, 0, 1, 0] and s["multi_hot"].tolist() == [0, 0, 0, 0]


def test_caption_choice_depends_only_on_seed_epoch_index(tmp_path):
    caps = [f"caption {k}" for k in range(5)]
    path = make_manifest(tmp_path, [{"captions": caps} for _ in range(3)])
    a = ManifestDataset(path, SampleBuilder(transform, seed=1), image_loader=pil_loader)
    b = ManifestDataset(path, SampleBuilder(transform, seed=1), image_loader=pil_loader)
    picks = []
    for e in range(25):
        a.set_epoch(e)
        b.set_epoch(e)
        row = [a[i]["caption"] for i in range(3)]
        assert row == [b[i]["caption"] for i in reversed(range(3))][::-1]   # order of access is irrelevant
        picks.extend(row)
    assert set(picks) == set(caps)                                # every caption gets used


def test_string_labels_with_class_names_and_bad_label(tmp_path):
    path = make_manifest(tmp_path, [{"caption": "a", "labels": ["dog", 0]}, {"caption": "b", "labels": ["yak"]}])
    ds = ManifestDataset(path, SampleBuilder(transform, class_names=["cat", "dog", "eel"]), image_loader=pil_loader)
    assert ds[0]["multi_hot"].tolist() == [1, 1, 0]
    with pytest.raises(ManifestError, match=r"line 2: label 'yak' is not one of the class_names"):
        ds[1]
    skip = ManifestDataset(path, SampleBuilder(transform, class_names=["cat", "dog", "eel"]), image_loader=pil_loader, on_bad_record="skip")
    assert skip[1] == {"_bad": "bad_label", "index": 1}


# ---------------------------------------------------------------- corrupt images
def _corrupt_manifest(tmp_path):
    recs = [{"caption": f"c{i}"} for i in range(6)]
    path = make_manifest(tmp_path, recs)
    truncated_png(tmp_path / "imgs" / "2.png")
    truncated_png(tmp_path / "imgs" / "5.png")
    return path


def test_corrupt_image_error_names_manifest_line_and_image(tmp_path):
    path = _corrupt_manifest(tmp_path)
    ds = ManifestDataset(path, SampleBuilder(transform), image_loader=pil_loader)
    ds[1]
    with pytest.raises(ManifestError) as e:
        ds[2]
    msg = str(e.value)
    assert f"{path} line 3" in msg and os.path.join("imgs", "2.png") in msg
    assert "cannot be read" in msg and "data.on_bad_record=skip" in msg


def test_corrupt_image_skip_counted_through_workers(tmp_path):
    path = _corrupt_manifest(tmp_path)
    tok = CharTokenizer()
    ds = ManifestDataset(path, SampleBuilder(transform), image_loader=pil_loader, on_bad_record="skip")
    assert ds[2] == {"_bad": "unreadable_image", "index": 2} and ds.bad_counts == Counter(unreadable_image=1)
    loader = build_loader(ds, batch_size=4, shuffle=False, num_workers=2, tokenizer=tok)
    seen, bad = [], Counter()
    for batch in loader:
        seen += batch["index"].tolist()
        bad += batch["bad_reasons"]
        assert batch["num_bad"] == sum(batch["bad_reasons"].values())
        assert torch.equal(batch["input_ids"], tok(batch["captions"]))
    assert seen == [0, 1, 3, 4] and bad == Counter(unreadable_image=2)


def test_real_load_image_on_good_and_truncated_files(tmp_path):
    images = pytest.importorskip("polymodal.data.images")
    path = _corrupt_manifest(tmp_path)
    ds = ManifestDataset(read_manifest(path), SampleBuilder(transform))          # default loader = images.load_image
    assert torch.allclose(ds[0]["pixels"][:, 0, 0], torch.tensor(colour(0), dtype=torch.float32) / 255)
    with pytest.raises(ManifestError, match=r"line 3: image .*2\.png' cannot be read"):
        ds[2]
    skip = ManifestDataset(read_manifest(path), SampleBuilder(transform), on_bad_record="skip")
    assert skip[5] == {"_bad": "unreadable_image", "index": 5}
    assert issubclass(images.ImageError, ValueError)


# ---------------------------------------------------------------- collate
def test_collate_shapes_and_contents(tmp_path):
    recs = [{"caption": f"cap {i}", "long_caption": LONG, "label": i, "labels": [i % 3]} for i in range(4)]
    path = make_manifest(tmp_path, recs)
    tok = CharTokenizer(20)
    ds = ManifestDataset(path, SampleBuilder(transform, num_subcaptions=3, num_classes=3), image_loader=pil_loader)
    samples = [ds[i] for i in range(4)] + [None, {"_bad": "unreadable_image", "index": 9}]
    batch = ImageTextCollate(tok, context_length=20)(samples)
    assert batch["pixels"].shape == (4, 3, SIZE, SIZE)
    assert torch.equal(batch["input_ids"], tok([f"cap {i}" for i in range(4)]))
    assert batch["long_input_ids"].shape == (4, 3, 20)
    for i in range(4):
        assert torch.equal(batch["long_input_ids"][i], tok(samples[i]["long_captions"]))
    assert batch["labels"].tolist() == [0, 1, 2, 3] and batch["index"].tolist() == [0, 1, 2, 3]
    assert torch.equal(batch["multi_labels"], torch.eye(3)[[0, 1, 2, 0]])
    assert batch["num_bad"] == 2 and batch["bad_reasons"] == Counter(unknown=1, unreadable_image=1)
    # the dataset can tokenize in the worker instead; the batch is the same
    ds_tok = ManifestDataset(path, SampleBuilder(transform, tokenizer=tok, num_subcaptions=3, num_classes=3, context_length=20), image_loader=pil_loader)
    batch2 = ImageTextCollate()([ds_tok[i] for i in range(4)])
    assert torch.equal(batch2["input_ids"], batch["input_ids"])
    assert torch.equal(batch2["long_input_ids"], batch["long_input_ids"])


def test_collate_all_bad_and_mixed_fields():
    out = ImageTextCollate()([{"_bad": "unreadable_image", "index": 0}])
    assert out["index"].numel() == 0 and out["num_bad"] == 1
    px = torch.zeros(3, 2, 2)
    mixed = [{"pixels": px, "caption": "a", "index": 0, "label": 1, "input_ids": torch.ones(3, dtype=torch.long)},
             {"pixels": px, "caption": "b", "index": 1, "input_ids": torch.ones(5, dtype=torch.long)}]
    with pytest.raises(ValueError, match=r"'label' is present in some samples.*\[1\]"):
        ImageTextCollate()(mixed)
    del mixed[0]["label"]
    ids = ImageTextCollate()(mixed)["input_ids"]                  # ragged lengths are right-padded
    assert ids.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]


# ---------------------------------------------------------------- sampler and loader
@pytest.mark.parametrize("n,world", [(12, 2), (11, 2), (10, 3)])
def test_sampler_ranks_equal_length_disjoint_cover(n, world):
    per_rank = [list(ShardedSampler(n, world, r, seed=3)) for r in range(world)]
    size = -(-n // world)
    assert all(len(p) == size for p in per_rank)
    flat = [i for p in per_rank for i in p]
    assert set(flat) == set(range(n))
    assert len(flat) - len(set(flat)) == size * world - n          # only the wrap-around padding repeats
    if n % world == 0:
        assert len(set(per_rank[0]) & set(per_rank[1])) == 0


def test_sampler_permutation_depends_on_seed_and_epoch():
    s = ShardedSampler(20, seed=5)
    e0 = list(s)
    assert list(ShardedSampler(20, seed=5)) == e0 and sorted(e0) == list(range(20))
    s.set_epoch(1)
    assert list(s) != e0 and sorted(list(s)) == list(range(20))
    assert list(ShardedSampler(20, shuffle=False)) == list(range(20))
    assert list(ShardedSampler(10, 3, 2, shuffle=False, drop_last=True)) == [2, 5, 8]


def _epoch_batches(loader):
    return [b["index"].tolist() for b in loader]


def test_loader_resume_mid_epoch_reproduces_remaining_batches(tmp_path):
    path = make_manifest(tmp_path, [{"captions": [f"x{i}", f"y{i}"]} for i in range(23)])
    tok = CharTokenizer(8)

    def loader(rank):
        ds = ManifestDataset(path, SampleBuilder(transform, seed=4), image_loader=pil_loader)
        return build_loader(ds, batch_size=3, seed=11, rank=rank, world_size=2, tokenizer=tok)

    for rank in (0, 1):
        first = loader(rank)
        set_loader_epoch(first, 2)
        full = [(b["index"].tolist(), b["captions"]) for b in first]
        state = first.sampler.state_dict()
        resumed = loader(rank)
        resumed.sampler.load_state_dict(state)
        resumed.sampler.skip(2)
        set_loader_epoch(resumed, 2)                               # same epoch: the skip stays
        assert len(resumed) == len(full) - 2
        assert [(b["index"].tolist(), b["captions"]) for b in resumed] == full[2:]
        assert [(b["index"].tolist(), b["captions"]) for b in resumed] == full   # skip used up
    ranks = [_epoch_batches(loader(r)) for r in (0, 1)]
    seen = [i for r in ranks for b in r for i in b]
    assert set(seen) == set(range(23)) and len(seen) == 24         # 23 padded to 2 x 12


def test_sampler_refuses_state_from_other_layout():
    state = ShardedSampler(10, 2, 0).state_dict()
    with pytest.raises(ValueError, match="num_replicas"):
        ShardedSampler(10, 4, 0).load_state_dict(state)
    with pytest.raises(ValueError, match="n=10"):
        ShardedSampler(11, 2, 0).load_state_dict(state)


@pytest.mark.parametrize("label,words", [("cat", "no classes file maps names"), ("3.5", "not an integer class index")])
def test_a_label_that_is_no_class_index_names_the_manifest_line(tmp_path, label, words):
    """A class name without a classes file, or a CSV cell like 3.5, stops with the manifest line (a TypeError in
    the collate before), or is counted under on_bad_record=skip."""
    path = make_manifest(tmp_path, [{"caption": "a", "label": 1}, {"caption": "b", "label": label}])
    ds = ManifestDataset(path, SampleBuilder(transform=transform), image_loader=pil_loader)
    assert ds[0]["label"] == 1
    with pytest.raises(ManifestError, match=rf"line 2: .*{words}"):
        ds[1]
    skip = ManifestDataset(path, SampleBuilder(transform=transform), on_bad_record="skip", image_loader=pil_loader)
    assert skip[1]["_bad"] == "bad_label"
