"""Tests for the MovingShapes video-text generator (polymodal.data.synthetic.moving_shapes).

Pixel checks decode the MP4 files with PyAV and locate the actor from the pixels themselves,
independently of the box records.
"""

import argparse
import hashlib
import json
import re
from pathlib import Path

import av
import numpy as np
import pytest

from polymodal.data.manifests import ManifestError, read_manifest
from polymodal.data.synthetic import moving_shapes as ms
from polymodal.data.synthetic.shapes import COLORS
from polymodal.eval.suite import load_classes

CJK = re.compile(r"[\u4e00-\u9fff]")
MOTION = {"move_left", "move_right", "move_up", "move_down"}
# Written independently of the module's tables: the phrase a reader expects in the reversed video.
OPPOSITE_PHRASES = [
    ("moves to the left", "moves to the right"), ("slides left", "slides right"),
    ("travels from right to left", "travels from left to right"),
    ("drifts leftward", "drifts rightward"), ("moves up", "moves down"),
    ("slides upward", "slides downward"),
    ("travels from the bottom to the top", "travels from the top to the bottom"),
    ("rises", "sinks"), ("grows", "shrinks"), ("gets bigger", "gets smaller"),
    ("expands", "contracts"), ("becomes larger", "becomes smaller"), ("appears", "disappears"),
    ("fades in", "fades out"), ("comes into view", "goes out of view"), ("shows up", "vanishes"),
]
SIMPLE = dict(max_objects=1, textures=False, backgrounds=False)   # one solid actor on plain gray


def _read(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def _decode(path):
    """(T, H, W, 3) uint8 frames and the key-frame flags of a video file."""
    with av.open(str(path)) as container:
        frames, keys = [], []
        for frame in container.decode(video=0):
            frames.append(frame.to_ndarray(format="rgb24"))
            keys.append(bool(frame.key_frame))
    return np.stack(frames), keys


def _digest(root):
    root = Path(root)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _mask(frame):
    """Pixels that differ clearly from the frame's dominant (background) colour."""
    bg = np.median(frame.reshape(-1, 3), axis=0)
    return np.abs(frame.astype(np.int32) - bg).sum(-1) > 60                   # (H, W)


def _centroid(frame):
    ys, xs = np.nonzero(_mask(frame))
    return xs.mean(), ys.mean()


@pytest.fixture(scope="module")
def simple(tmp_path_factory):
    """Single-object videos, all in reversed pairs, 64 px so colours survive yuv420p chroma."""
    out = tmp_path_factory.mktemp("moving_simple")
    ms.generate_moving_shapes(out, n_train=40, n_test=2, seed=1, num_frames=8, image_size=64,
                              workers=1, pair_fraction=1.0, static_fraction=0.0, progress=False,
                              **SIMPLE)
    return out, _read(out / "train.jsonl")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Default mix (pairs, static, single) with distractors, at 32 px."""
    out = tmp_path_factory.mktemp("moving_world")
    ms.generate_moving_shapes(out, n_train=20, n_test=4, seed=3, num_frames=8, image_size=32,
                              workers=1, distractor_fraction=1.0, progress=False)
    return out, _read(out / "train.jsonl")


def test_same_seed_gives_identical_bytes_for_any_worker_count(tmp_path):
    kw = dict(n_train=8, n_test=2, seed=11, num_frames=8, image_size=32, distractor_fraction=0.5,
              mismatch_fraction=0.2, progress=False)
    ms.generate_moving_shapes(tmp_path / "a", workers=1, **kw)
    ms.generate_moving_shapes(tmp_path / "b", workers=2, **kw)
    da, db = _digest(tmp_path / "a"), _digest(tmp_path / "b")
    assert len(da) == 8 + 2 + 4       # videos + train/test manifests + classes.json + world.json
    assert da == db
    for name in ("train_000000.mp4", "test_000001.mp4"):
        fa, _ = _decode(tmp_path / "a" / "videos" / name)
        fb, _ = _decode(tmp_path / "b" / "videos" / name)
        assert fa.shape == (8, 32, 32, 3) and fa.tobytes() == fb.tobytes()
    ms.generate_moving_shapes(tmp_path / "c", workers=1, **{**kw, "seed": 12})
    dc = _digest(tmp_path / "c")
    assert sum(da[k] != dc[k] for k in da if k.startswith("videos/")) >= 8


def test_regenerating_smaller_removes_what_the_larger_run_left(tmp_path):
    kw = dict(seed=3, num_frames=4, image_size=16, progress=False, workers=1)
    ms.generate_moving_shapes(tmp_path, n_train=6, n_test=2, n_val=2, **kw)
    (tmp_path / "videos" / "mine.mp4").write_bytes(b"x")          # not the world's: kept
    out = ms.generate_moving_shapes(tmp_path, n_train=3, n_test=2, **kw)
    videos = sorted(p.name for p in (tmp_path / "videos").iterdir())
    assert videos == ["mine.mp4", "test_000000.mp4", "test_000001.mp4", "train_000000.mp4", "train_000001.mp4",
                      "train_000002.mp4"]
    assert out["removed"] == 3 + 2 + 1 and not (tmp_path / "val.jsonl").exists()


def test_videos_are_h264_with_key_frames(simple):
    out, recs = simple
    with av.open(str(out / recs[0]["video"])) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.codec_context.pix_fmt == "yuv420p"
        assert float(stream.average_rate) == 8
    frames, keys = _decode(out / recs[0]["video"])
    assert len(frames) == recs[0]["num_frames"] == 8
    assert keys[0] and sum(keys) >= 2          # gop 4: at least frames 0 and 4


def test_reversed_partner_frames_are_the_reversed_frames(simple):
    out, recs = simple
    pairs = {}
    for r in recs:
        pairs.setdefault(r["pair_id"], []).append(r)
    assert len(pairs) == 20 and all(len(p) == 2 for p in pairs.values())
    for a, b in pairs.values():
        assert (a["reversed"], b["reversed"]) == (False, True)
        assert a["order_sensitive"] and b["order_sensitive"]
        fa, _ = _decode(out / a["video"])
        fb, _ = _decode(out / b["video"])
        assert np.array_equal(fb, fa[::-1])
        assert b["boxes"] == a["boxes"][::-1]
        assert b["action_frames"] == sorted(7 - t for t in a["action_frames"])


def test_pair_captions_are_opposite(simple):
    _, recs = simple
    by_pair = {}
    for r in recs:
        by_pair.setdefault(r["pair_id"], {})[r["reversed"]] = r
    swap = dict(OPPOSITE_PHRASES + [(b, a) for a, b in OPPOSITE_PHRASES])
    seen = set()
    for pair in by_pair.values():
        a, b = pair[False], pair[True]
        for ca, cb in zip(a["captions"], b["captions"]):
            m = re.search(r"from (\w+) to (\w+)$", ca)
            if m:   # colour change: the two colours swap places
                assert cb == ca[:m.start()] + f"from {m.group(2)} to {m.group(1)}"
                seen.add("colour")
            else:
                phrase = next(p for p in swap if ca.endswith(" " + p))
                assert cb == ca[: -len(phrase)] + swap[phrase]
                seen.add(phrase)
        assert a["caption"] != b["caption"] and a["label"] != b["label"]
    assert "colour" in seen and len(seen) >= 6


def test_action_coverage(simple):
    _, recs = simple
    assert {r["action"] for r in recs} == set(ms.ACTIONS)


def test_moving_object_moves_in_the_stated_direction(simple):
    out, recs = simple
    checked = 0
    for r in recs:
        if r["action"] not in MOTION:
            continue
        frames, _ = _decode(out / r["video"])
        (x0, y0), (x1, y1) = _centroid(frames[0]), _centroid(frames[-1])
        dx, dy = x1 - x0, y1 - y0
        d = 0.25 * r["image_size"]
        expected = {"move_left": dx < -d, "move_right": dx > d, "move_up": dy < -d, "move_down": dy > d}
        assert expected[r["action"]], (r["caption"], dx, dy)
        # the recorded boxes agree with the pixels (within the anti-aliasing / chroma fringe)
        for t in (0, len(frames) - 1):
            ys, xs = np.nonzero(_mask(frames[t]))
            found = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            assert np.abs(np.array(found) - np.array(r["boxes"][t])).max() <= 2
        checked += 1
    assert checked >= 4


def test_size_change_from_pixels(simple):
    out, recs = simple
    checked = 0
    for r in recs:
        if r["action"] in ("grow", "shrink"):
            frames, _ = _decode(out / r["video"])
            ratio = _mask(frames[-1]).sum() / _mask(frames[0]).sum()
            assert ratio > 2.5 if r["action"] == "grow" else ratio < 0.4, (r["caption"], ratio)
            checked += 1
    assert checked >= 2


def test_colour_change_goes_from_a_to_b(simple):
    out, recs = simple
    names = list(COLORS)
    table = np.array([COLORS[c] for c in names], np.float32)

    def nearest(frame):
        mean = frame[_mask(frame)].astype(np.float32).mean(0)
        return names[int(np.argmin(((table - mean) ** 2).sum(1)))]

    checked = 0
    for r in recs:
        if r["action"] == "change_color":
            frames, _ = _decode(out / r["video"])
            assert nearest(frames[0]) == r["color_from"] == r["subject"]["color"]
            assert nearest(frames[-1]) == r["color_to"] != r["color_from"]
            assert r["caption"].endswith(f"from {r['color_from']} to {r['color_to']}")
            checked += 1
    assert checked >= 2


def test_appear_and_disappear_from_pixels(simple):
    out, recs = simple
    checked = 0
    for r in recs:
        if r["action"] in ("appear", "disappear"):
            frames, _ = _decode(out / r["video"])
            first, last = _mask(frames[0]).sum(), _mask(frames[-1]).sum()
            if r["action"] == "appear":
                assert first == 0 and last > 10 and r["boxes"][0] is None and r["boxes"][-1]
            else:
                assert last == 0 and first > 10 and r["boxes"][-1] is None and r["boxes"][0]
            checked += 1
    assert checked >= 2


def test_static_videos_are_order_free_and_still(world):
    out, recs = world
    static = [r for r in recs if r["action"] == "static"]
    assert len(static) == 4                                   # static_fraction 0.2 of 20
    for r in static:
        frames, _ = _decode(out / r["video"])
        assert all(np.array_equal(f, frames[0]) for f in frames)
        assert r["order_sensitive"] is False and r["pair_id"] is None and r["action_frames"] == []
        assert r["distractor"] == "none"
    assert all(r["order_sensitive"] for r in recs if r["action"] != "static")


def test_distractor_frames_are_static(world):
    out, recs = world
    kinds = set()
    for r in recs:
        if r["action"] == "static":
            continue
        frames, _ = _decode(out / r["video"])
        af = r["action_frames"]
        assert r["distractor"] in ("still", "unrelated") and af == list(range(af[0], af[-1] + 1))
        assert 2 <= len(af) < len(frames)
        before, after = frames[: af[0]], frames[af[-1] + 1:]
        for segment in (before, after):
            assert all(np.array_equal(f, segment[0]) for f in segment)
        assert not all(np.array_equal(f, frames[af[0]]) for f in frames[af[0]: af[-1] + 1])
        outside = [t for t in range(len(frames)) if t not in af]
        if r["distractor"] == "still":
            if len(before):
                assert np.array_equal(before[0], frames[af[0]])
            if len(after):
                assert np.array_equal(after[0], frames[af[-1]])
        else:
            assert all(r["boxes"][t] is None for t in outside)
        kinds.add(r["distractor"])
    assert kinds == {"still", "unrelated"}


def test_no_distractors_means_the_action_fills_the_video(simple):
    _, recs = simple
    assert all(r["action_frames"] == list(range(8)) and r["distractor"] == "none" for r in recs)


def test_mismatch_fraction_is_honoured_and_true_caption_kept(tmp_path):
    kw = dict(n_train=10, n_test=2, seed=4, num_frames=8, image_size=32, workers=1, progress=False)
    ms.generate_moving_shapes(tmp_path / "clean", **kw)
    ms.generate_moving_shapes(tmp_path / "noisy", mismatch_fraction=0.3, **kw)
    clean, noisy = _read(tmp_path / "clean" / "train.jsonl"), _read(tmp_path / "noisy" / "train.jsonl")
    bad = [i for i, r in enumerate(noisy) if r["mismatched"]]
    assert len(bad) == 3
    for i, (c, n) in enumerate(zip(clean, noisy)):
        assert n["labels"] == c["labels"] and n["boxes"] == c["boxes"]
        if i in bad:
            assert n["true_caption"] == c["caption"] and n["true_caption_zh"] == c["caption_zh"]
            assert n["caption"] not in c["captions"]
            donor = clean[n["mismatch_source"]]
            assert n["caption"] == donor["caption"] and n["caption_zh"] == donor["caption_zh"]
            assert c["pair_id"] is None or donor["pair_id"] != c["pair_id"]
        else:
            assert n["caption"] == c["caption"] and "true_caption" not in n
    digest_c, digest_n = _digest(tmp_path / "clean" / "videos"), _digest(tmp_path / "noisy" / "videos")
    assert digest_c == digest_n                        # captions change, videos do not


def test_label_hierarchy_is_consistent(world, simple):
    out, _ = world
    table = load_classes(out / "classes.json")
    classes, parents = table["classes"], table["parents"]
    assert len(table["classes_zh"]) == len(classes) == len(set(classes))
    assert set(table["temporal"]) <= set(parents) and "stays still" not in table["temporal"]
    assert all(p in table["parent_classes"] for p in parents.values())
    for _, recs in (world, simple):
        for r in recs:
            names = r["scene_labels"]
            assert r["labels"] == sorted(classes.index(n) for n in names)
            child = classes[r["label"]]
            assert child in names and child in table["action_classes"]
            for n in names:
                if n in parents:
                    assert parents[n] in names
            assert f"contains {r['subject']['shape']}" in names
            assert all(f"contains {o['shape']}" in names for o in r["objects"])
            assert sum(n in table["parent_classes"] for n in names) == 1
    by_pair = {}
    for r in simple[1]:
        by_pair.setdefault(r["pair_id"], []).append(classes[r["label"]])
    for a, b in by_pair.values():
        assert a != b and a in table["temporal"] and b in table["temporal"]


def test_captions_words_and_chinese(world):
    _, recs = world
    for r in recs:
        assert 2 <= len(r["captions"]) <= 4 and r["caption"] in r["captions"]
        assert len(r["captions_zh"]) == len(r["captions"]) and r["caption_zh"] in r["captions_zh"]
        assert all(CJK.search(c) for c in r["captions_zh"])
        words = r["caption"].split()
        if r["mismatched"]:
            continue
        assert r["verb"] in words and r["nouns"] == [r["subject"]["shape"]]
        assert all(a in words for a in r["adjectives"])
        assert r["subject"]["shape"] in words
        if r["action"] not in ("grow", "shrink"):
            assert r["subject"]["size"] in words
        assert r["num_frames"] == 8 and r["fps"] == 8 and len(r["boxes"]) == 8


def test_manifest_reads_with_video_media(world):
    out, recs = world
    manifest = read_manifest(out / "train.jsonl", media="video")
    assert len(manifest) == len(recs)
    assert all(Path(r["video"]).is_absolute() and Path(r["video"]).is_file() for r in manifest)
    with pytest.raises(ManifestError, match="image"):
        read_manifest(out / "train.jsonl")                 # default media="image" needs "image"


def test_world_json_stats_match_records(world):
    out, recs = world
    info = json.loads((out / "world.json").read_text(encoding="utf-8"))
    stats = info["stats"]["train"]
    assert stats["records"] == len(recs) == info["counts"]["train"]
    assert stats["pairs"] == len({r["pair_id"] for r in recs if r["pair_id"] is not None}) == 5
    assert stats["static"] == 4 and stats["with_distractors"] == 16


def test_cli_helpers_and_config_errors(tmp_path, capsys):
    parser = ms.add_cli_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--out", str(tmp_path / "cli"), "--n-train", "3", "--n-test", "1",
                              "--num-frames", "8", "--image-size", "32", "--workers", "1"])
    result = ms.main_from_args(args)
    assert result["counts"] == {"train": 3, "test": 1}
    printed = json.loads(capsys.readouterr().out)               # progress bars go to stderr
    assert printed["counts"] == {"train": 3, "test": 1}
    assert len(_read(tmp_path / "cli" / "train.jsonl")) == 3
    with pytest.raises(ValueError, match="even"):
        ms.MovingShapesConfig(image_size=33)
    with pytest.raises(TypeError, match="unknown option"):
        ms.generate_moving_shapes(tmp_path / "x", n_train=1, n_test=0, colour_mode="x")


# ---- compound order labels and single-frame labels (issue 17) ----------------------------------
COMPOUND_CFG = dict(num_frames=8, image_size=32, pair_fraction=0.0, static_fraction=0.0,
                    compound_fraction=1.0, **SIMPLE)


@pytest.fixture(scope="module")
def compound(tmp_path_factory):
    """Only compound videos (one solid actor on plain gray), 32 px."""
    out = tmp_path_factory.mktemp("moving_compound")
    ms.generate_moving_shapes(out, n_train=24, n_test=1, seed=5, workers=1, progress=False, **COMPOUND_CFG)
    return out, _read(out / "train.jsonl")


def _single_frame_labels(r):
    return sorted(n for n in r["scene_labels"] if n.startswith("contains ") or n.endswith((" object", " background")))


def test_label_groups_split_order_and_single_frame_labels():
    table = ms.class_table()
    groups, classes = table["groups"], table["classes"]
    order, single = set(groups["order_dependent"]), set(groups["single_frame"])
    assert not order & single
    # every label that is neither a parent nor "stays still" belongs to one of the two groups
    assert order | single == set(classes) - set(table["parent_classes"]) - {"stays still"}
    assert set(groups["order_compound"]) <= order and "moves left then right" in order
    assert "red object" in single and "white background" in single and "contains star" in single
    assert [i["group"] for i in table["label_info"] if i["name"] == "grows then shrinks"] == ["order"]
    assert len(table["classes_zh"]) == len(classes) and all(CJK.search(z) for z in table["classes_zh"])
    # version 1.0 indices keep their meaning: the old labels come first, in the old order
    assert classes[:5] == ms.PARENTS and classes[5 + 17:5 + 17 + 8] == [f"contains {s}" for s in ms.SHAPES]
    for child in groups["order_compound"]:
        assert table["parents"][child] in ("motion", "size change", "visibility")


def test_compound_videos_from_pixels(compound):
    out, recs = compound
    assert {r["action"] for r in recs} == set(ms.COMPOUNDS) and all(r["compound"] for r in recs)
    h, d = 4, 0.25 * 32
    for r in recs:
        frames, _ = _decode(out / r["video"])
        first, mid, last = frames[0], frames[h - 1], frames[-1]
        a = r["action"]
        if a.startswith("move"):
            (x0, y0), (xm, ym), (x1, y1) = _centroid(first), _centroid(mid), _centroid(last)
            step = {"move_left_right": x0 - xm, "move_right_left": xm - x0,
                    "move_up_down": y0 - ym, "move_down_up": ym - y0}[a]
            back = {"move_left_right": x1 - xm, "move_right_left": xm - x1,
                    "move_up_down": y1 - ym, "move_down_up": ym - y1}[a]
            assert step > d and back > d, (a, step, back)
        elif a in ("grow_shrink", "shrink_grow"):
            ratio = _mask(mid).sum() / _mask(first).sum()
            assert ratio > 2.5 if a == "grow_shrink" else ratio < 0.4, (a, ratio)
            assert abs(int(_mask(last).sum()) - int(_mask(first).sum())) <= 2
        else:
            shown = [_mask(f).sum() > 5 for f in (first, mid, last)]
            assert shown == ([False, True, False] if a == "appear_disappear" else [True, False, True]), a
        assert " and then " in r["caption"] and "然后" in r["caption_zh"]
        assert r["verb"] in r["caption"].split() and ms.action_class(a) in r["scene_labels"]


def test_order_labels_flip_under_reordering_that_keeps_every_frame():
    """Reversal flips a single action's label; swapping halves flips a compound's label. In both
    cases the video has the same frames (an order-free pool cannot tell) and the same single-frame labels."""
    cfg = ms.MovingShapesConfig(**{**COMPOUND_CFG, "pair_fraction": 0.5, "compound_fraction": 0.5})
    classes = ms.class_table()["classes"]
    order = set(ms.class_table()["groups"]["order_dependent"])
    plan = ms.split_plan(2, "train", 24, cfg)
    seen = {"reversal": 0, "swap": 0}
    for slot in plan:
        spec = ms.build_video(2, "train", slot, cfg)
        rec, frames = ms.video_record(spec, slot, cfg, classes)
        child = classes[rec["label"]]
        if slot.pair_id is not None and slot.member == 0:
            rrec, rframes = ms.video_record(spec, ms.Slot(slot.kind, slot.content, 1, slot.pair_id), cfg, classes)
            assert np.array_equal(rframes, frames[::-1])
            assert classes[rrec["label"]] != child and {child, classes[rrec["label"]]} <= order
            assert _single_frame_labels(rrec) == _single_frame_labels(rec)
            seen["reversal"] += 1
        if rec["compound"]:
            assert np.array_equal(frames[::-1], frames)          # reversal alone does not flip a compound
            sw = ms.half_swapped(spec)
            sframes, _ = ms.render_frames(sw, cfg)
            assert np.array_equal(sframes, np.roll(frames, -cfg.num_frames // 2, axis=0))
            srec, _ = ms.video_record(sw, slot, cfg, classes)
            assert classes[srec["label"]] != child and {child, classes[srec["label"]]} <= order
            assert _single_frame_labels(srec) == _single_frame_labels(rec)
            seen["swap"] += 1
    assert seen["reversal"] >= 4 and seen["swap"] >= 4


def test_single_frame_labels_are_readable_from_one_frame():
    """Colour and background labels read back from the pixels of one frame (independent of the records):
    from every frame when nothing in the video changes colour or visibility, else from the union of frames."""
    from polymodal.data.synthetic.shapes import BACKGROUND_NAMES, Scene, render_scene
    cfg = ms.MovingShapesConfig(num_frames=6, image_size=64, distractor_fraction=0.3)
    classes = ms.class_table()["classes"]
    plain = {b: np.asarray(render_scene(Scene([], 0, b), 64)) for b in BACKGROUND_NAMES}
    table = {c: np.array(v, np.int32) for c, v in COLORS.items()}

    def read(frame):
        f = frame.astype(np.int32)
        bg = max(plain, key=lambda b: int((f == plain[b]).all(-1).sum()))
        cols = {c for c, v in table.items() if int((np.abs(f - v).sum(-1) <= 6).sum()) >= 3}
        return {f"{bg} background"} | {f"{c} object" for c in cols}

    checked_every = 0
    for slot in ms.split_plan(4, "train", 30, cfg):
        spec = ms.build_video(4, "train", slot, cfg)
        rec, frames = ms.video_record(spec, slot, cfg, classes)
        truth = {n for n in rec["scene_labels"] if n.endswith((" object", " background"))}
        per_frame = [read(f) for f in frames]
        assert set().union(*per_frame) == truth, (rec["caption"], truth, per_frame)
        if rec["action"] not in ("change_color", "appear", "disappear") and rec["distractor"] != "unrelated":
            assert all(p == truth for p in per_frame), rec["caption"]
            checked_every += 1
    assert checked_every >= 10
