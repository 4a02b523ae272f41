"""Tests for the ShapesWorld generator (polymodal.data.synthetic.shapes)."""

import argparse
import hashlib
import itertools
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from polymodal.data.synthetic import shapes as sw

CJK = re.compile(r"[\u4e00-\u9fff]")
# Written independently of the module's tables: the words a reader expects per cell.
POSITION_WORDS = {
    (0, 0): "top left", (0, 1): "top middle", (0, 2): "top right",
    (1, 0): "middle left", (1, 1): "center", (1, 2): "middle right",
    (2, 0): "bottom left", (2, 1): "bottom middle", (2, 2): "bottom right",
}


def _read(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def _tree_digest(root):
    """sha256 of every file under root, keyed by relative path."""
    root = Path(root)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes64")
    result = sw.generate_shapes(out, n_train=40, n_test=8, n_val=4, n_hard=16, seed=3,
                                progress=False, workers=1)
    return out, result


def _all_records(out):
    return {split: _read(out / f"{split}.jsonl") for split in ("train", "val", "test", "hard")}


def test_same_seed_gives_identical_bytes_for_any_worker_count(tmp_path):
    cfg = sw.ShapesConfig(image_size=32)
    kw = dict(n_train=12, n_test=4, n_val=2, n_hard=8, seed=11, cfg=cfg, progress=False)
    sw.generate_shapes(tmp_path / "a", workers=1, **kw)
    sw.generate_shapes(tmp_path / "b", workers=2, **kw)
    da, db = _tree_digest(tmp_path / "a"), _tree_digest(tmp_path / "b")
    assert len(da) == 12 + 4 + 2 + 8 + 6  # images + 4 manifests + classes.json + meta.json
    assert da == db


def test_different_seed_gives_different_data(tmp_path):
    cfg = sw.ShapesConfig(image_size=32)
    for seed in (0, 1):
        sw.generate_shapes(tmp_path / str(seed), 6, 0, n_val=0, n_hard=0, seed=seed, cfg=cfg,
                           progress=False, workers=1)
    a, b = _read(tmp_path / "0" / "train.jsonl"), _read(tmp_path / "1" / "train.jsonl")
    assert [r["long_caption"] for r in a] != [r["long_caption"] for r in b]


def test_record_depends_only_on_seed_split_index():
    cfg = sw.ShapesConfig()
    a = sw.build_scene(5, "train", 17, cfg)
    b = sw.build_scene(5, "train", 17, cfg)
    assert sw.describe_long(a) == sw.describe_long(b)
    assert sw.describe_long(a) != sw.describe_long(sw.build_scene(5, "test", 17, cfg))
    assert np.array_equal(np.asarray(sw.render_scene(a, 48)), np.asarray(sw.render_scene(b, 48)))


def test_counts_layout_and_meta(world):
    out, result = world
    recs = _all_records(out)
    assert {k: len(v) for k, v in recs.items()} == {"train": 40, "val": 4, "test": 8, "hard": 16}
    assert result["counts"] == {"train": 40, "val": 4, "test": 8, "hard": 16}
    meta = json.loads((out / "meta.json").read_text())
    assert meta["seed"] == 3 and meta["counts"] == result["counts"]
    assert meta["version"] == sw.GENERATOR_VERSION
    for split, rs in recs.items():
        for i, r in enumerate(rs):
            assert r["image"] == f"images/{split}_{i:06d}.png"
            with Image.open(out / r["image"]) as im:
                assert im.size == (64, 64) and im.mode == "RGB"
            assert r["lang"] == "en"
            assert 1 <= len(r["objects"]) <= 6
    assert not list(out.glob("*.tmp"))


def test_default_splits_and_bad_n_hard(tmp_path):
    cfg = sw.ShapesConfig(image_size=32)
    res = sw.generate_shapes(tmp_path, 2, 9, cfg=cfg, progress=False, workers=1)
    assert res["counts"] == {"train": 2, "val": 9, "test": 9, "hard": 8}  # hard: whole groups of 4
    with pytest.raises(ValueError, match="multiple of hard_group_size"):
        sw.generate_shapes(tmp_path, 1, 1, n_hard=6, cfg=cfg, progress=False, workers=1)
    with pytest.raises(ValueError, match="max_objects"):
        sw.ShapesConfig(max_objects=10)


def test_short_caption_names_salient_object(world):
    out, _ = world
    for rs in _all_records(out).values():
        for r in rs:
            sal = r["objects"][r["salient"]]
            tex = "" if sal["texture"] == "solid" else sal["texture"] + " "
            phrase = f"large {sal['color']} {tex}{sal['shape']}"
            assert phrase in r["caption"], (r["caption"], sal)
            assert r["caption"] in r["captions"]
            assert all(phrase in c for c in r["captions"])
            # no other object's shape is named unless it shares the salient's shape
            for o in r["objects"]:
                if o["shape"] != sal["shape"]:
                    assert o["shape"] not in r["caption"]


def test_long_caption_describes_every_object_and_position(world):
    out, _ = world
    for rs in _all_records(out).values():
        for r in rs:
            text = r["long_caption"]
            assert r["background"] in text
            assert sw.NUMBERS_EN[len(r["objects"])] in text.lower()
            sentences = [s for s in text.split(". ") if s]
            for o in r["objects"]:
                tex = "" if o["texture"] == "solid" else o["texture"] + " "
                phrase = f"{o['size']} {o['color']} {tex}{o['shape']}"
                where = POSITION_WORDS[tuple(o["cell"])]
                # one sentence places exactly this object at its cell
                assert any(phrase in s and where in s for s in sentences), (phrase, where, text)


def test_long_caption_length_range(world):
    out, _ = world
    lengths = {}
    for rs in _all_records(out).values():
        for r in rs:
            lengths.setdefault(len(r["objects"]), []).append(len(r["long_caption"].split()))
    multi = [n for k, v in lengths.items() if k >= 2 for n in v]
    assert len(multi) >= 20
    assert 60 <= min(multi) and max(multi) <= 200, lengths


def test_long_caption_length_extremes_for_six_objects():
    cfg = sw.ShapesConfig(min_objects=2, max_objects=6)
    for i in range(200):
        for n in (2, 6):
            scene = sw.sample_scene(np.random.default_rng(i), cfg, n_objects=n)
            assert 60 <= len(sw.describe_long(scene).split()) <= 200


def test_chinese_captions_present(world):
    out, _ = world
    classes = json.loads((out / "classes.json").read_text(encoding="utf-8"))
    for rs in _all_records(out).values():
        for r in rs:
            assert CJK.search(r["caption_zh"]) and CJK.search(r["long_caption_zh"])
            assert not re.search(r"[A-Za-z]", r["caption_zh"] + r["long_caption_zh"])
            # the salient colour+shape in Chinese appears in the short Chinese caption
            assert classes["classes_zh"][r["label"]] in r["caption_zh"]
            for o in r["objects"]:
                zh = sw.COLORS_ZH[o["color"]] + sw.SHAPES_ZH[o["shape"]]
                assert zh in r["long_caption_zh"]
            assert len(r["long_caption_zh"]) > len(r["caption_zh"])


def test_salient_object_is_largest(world):
    out, _ = world
    for rs in _all_records(out).values():
        for r in rs:
            objs = r["objects"]
            assert [o["size"] for o in objs].count("large") == 1
            assert objs[r["salient"]]["size"] == "large"
            side = [max(o["bbox"][2] - o["bbox"][0], o["bbox"][3] - o["bbox"][1]) for o in objs]
            others = [s for i, s in enumerate(side) if i != r["salient"]]
            assert all(side[r["salient"]] > s for s in others), (side, r["salient"])


def test_classes_json_consistent_with_labels(world):
    out, _ = world
    classes = json.loads((out / "classes.json").read_text(encoding="utf-8"))
    assert len(classes["shapes"]) >= 8 and len(classes["colors"]) >= 8
    assert len(classes["classes"]) == len(classes["classes_zh"]) == 64
    assert len(set(classes["classes"])) == 64 and len(set(classes["classes_zh"])) == 64
    assert set(classes["classes"]) == {f"{c} {s}" for c in classes["colors"] for s in classes["shapes"]}
    assert len(classes["shapes_zh"]) == len(classes["shapes"])
    for rs in _all_records(out).values():
        for r in rs:
            sal = r["objects"][r["salient"]]
            assert classes["classes"][r["label"]] == f"{sal['color']} {sal['shape']}"
            assert r["labels"] == sorted({o["shape"] for o in r["objects"]})
            assert set(r["labels"]) <= set(classes["shapes"])


def test_hard_groups_differ_in_one_non_salient_attribute(world):
    out, _ = world
    hard = _read(out / "hard.jsonl")
    groups = {}
    for r in hard:
        groups.setdefault(r["group"], []).append(r)
    assert len(groups) == 4 and all(len(g) == 4 for g in groups.values())
    for g in groups.values():
        assert len({r["caption"] for r in g}) == 1
        assert len({r["caption_zh"] for r in g}) == 1
        assert len({r["long_caption"] for r in g}) == len(g)
        assert len({r["long_caption_zh"] for r in g}) == len(g)
        assert len({r["salient"] for r in g}) == 1
        for a, b in itertools.combinations(g, 2):
            assert len(a["objects"]) == len(b["objects"]) >= 2
            diffs = []
            for i, (oa, ob) in enumerate(zip(a["objects"], b["objects"])):
                for key in ("shape", "color", "size", "texture", "cell"):
                    if oa[key] != ob[key]:
                        diffs.append((i, key))
            assert len(diffs) == 1, diffs
            i, key = diffs[0]
            assert i != a["salient"] and key in ("shape", "color")


def test_bboxes_inside_image_and_solid_centres_have_object_colour(world):
    out, _ = world
    checked = 0
    for rs in _all_records(out).values():
        for r in rs:
            img = np.asarray(Image.open(out / r["image"]).convert("RGB"))
            h, w, _ = img.shape
            for o in r["objects"]:
                x0, y0, x1, y1 = o["bbox"]
                assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
                if o["texture"] == "solid":
                    px = img[(y0 + y1) // 2, (x0 + x1) // 2]
                    assert np.abs(px.astype(int) - sw.COLORS[o["color"]]).max() <= 2, (o, px)
                    checked += 1
    assert checked >= 20


def test_pixels_outside_boxes_are_background():
    cfg = sw.ShapesConfig(image_size=64, backgrounds=False)
    bg = np.array(sw.BACKGROUNDS[sw.DEFAULT_BACKGROUND][0])
    for i in range(30):
        scene = sw.sample_scene(np.random.default_rng(100 + i), cfg)
        img = np.asarray(sw.render_scene(scene, 64)).astype(int)
        inside = np.zeros((64, 64), bool)
        for o in scene.objects:
            x0, y0, x1, y1 = sw.object_bbox(o, 64)
            inside[y0:y1, x0:x1] = True
            # every box contains some object-coloured pixels
            assert (np.abs(img[y0:y1, x0:x1] - bg).max(axis=-1) > 30).any()
        assert (img[~inside] == bg).all()


def test_colours_are_well_separated():
    cols = np.array(list(sw.COLORS.values()), float)
    d = np.linalg.norm(cols[:, None] - cols[None], axis=-1)
    assert d[~np.eye(len(cols), dtype=bool)].min() > 60
    for top, bottom in sw.BACKGROUNDS.values():
        for ref in (top, bottom):
            assert np.linalg.norm(cols - np.array(ref, float), axis=-1).min() > 60


def test_render_sizes_and_no_antialias():
    cfg = sw.ShapesConfig()
    scene = sw.build_scene(0, "val", 3, cfg)
    for size in (32, 96):
        assert sw.render_scene(scene, size).size == (size, size)
    hard_img = np.asarray(sw.render_scene(scene, 64, antialias=False))
    palette = {tuple(v) for v in sw.COLORS.values()}
    palette |= {tuple(int(c * 0.5) for c in v) for v in sw.COLORS.values()}
    top, bottom = sw.BACKGROUNDS[scene.background]
    if top == bottom:  # without antialiasing only palette and background colours appear
        palette.add(tuple(top))
        assert {tuple(p) for p in hard_img.reshape(-1, 3)} <= palette


def test_cli_helpers(tmp_path, capsys):
    parser = sw.add_cli_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--out", str(tmp_path), "--n-train", "3", "--n-test", "4",
                              "--n-val", "1", "--n-hard", "4", "--seed", "2",
                              "--image-size", "32", "--workers", "1"])
    result = sw.main_from_args(args)
    assert result["counts"] == {"train": 3, "val": 1, "test": 4, "hard": 4}
    assert json.loads(capsys.readouterr().out)["counts"]["hard"] == 4
    with Image.open(tmp_path / "images" / "train_000002.png") as im:
        assert im.size == (32, 32)


@pytest.mark.slow
def test_throughput_2000_images(tmp_path):
    start = time.perf_counter()
    res = sw.generate_shapes(tmp_path, 2000, 0, n_val=0, n_hard=0, progress=False, workers=2)
    seconds = time.perf_counter() - start
    print(f"\nShapesWorld: 2000 images (64 px, 2 workers) in {seconds:.2f} s "
          f"= {2000 / seconds:.0f} img/s")
    assert res["counts"]["train"] == 2000
    assert seconds < 20  # 20k/minute target = 6 s for 2000; leave room for a busy machine


def test_regenerating_smaller_removes_the_images_the_larger_run_left(tmp_path):
    from polymodal.data.synthetic.shapes import generate_shapes
    generate_shapes(tmp_path, n_train=5, n_test=2, n_val=0, n_hard=0, seed=1, progress=False, workers=1)
    out = generate_shapes(tmp_path, n_train=2, n_test=2, n_val=0, n_hard=0, seed=1, progress=False, workers=1)
    assert out["removed"] == 3
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [
        "test_000000.png", "test_000001.png", "train_000000.png", "train_000001.png"]
