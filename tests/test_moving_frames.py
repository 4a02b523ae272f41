"""Tests for MovingFrames (polymodal.data.synthetic.moving_frames): still MovingShapes frames, the stand-in's data."""
import json

import numpy as np
import pytest
from PIL import Image

from polymodal.data.synthetic import moving_frames as mf
from polymodal.data.synthetic import moving_shapes as ms

# Written independently of the module's tables: the words a reader expects per cell.
POSITION_WORDS = {(0, 0): "top left", (0, 1): "top middle", (0, 2): "top right", (1, 0): "middle left",
                  (1, 1): "center", (1, 2): "middle right", (2, 0): "bottom left", (2, 1): "bottom middle",
                  (2, 2): "bottom right"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("frames")
    mf.generate_moving_frames(out, n_train=60, n_test=0, n_val=8, seed=2,
                              cfg=mf.MovingFramesConfig(image_size=32, num_frames=8, positions=True), progress=False)
    return out, [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]


def test_frame_is_the_moving_shapes_frame(world):
    """Each image is exactly (up to rounding of a blend) frame `frame` of the MovingShapes video drawn with the same
    generator state: the same renderer, size, objects and in-between states as the videos a model adapts to."""
    out, records = world
    cfg = mf.MovingFramesConfig(image_size=32, num_frames=8, positions=True)
    for i, rec in enumerate(records[:20]):
        rng = mf._rng(2, "train", i)
        kind = "static" if rng.random() < cfg.static_fraction else "action"
        spec = ms.sample_video(rng, kind, cfg.video_config())
        frames, _ = ms.render_frames(spec, cfg.video_config())
        image = np.asarray(Image.open(out / rec["image"]).convert("RGB")).astype(int)
        assert image.shape == (32, 32, 3)
        assert np.abs(image - frames[rec["frame"]].astype(int)).max() <= 1, (i, rec["action"])


def test_caption_names_the_subject_and_its_cell(world):
    """The caption is MovingShapes' subject wording plus the cell the actor's centre is in."""
    _, records = world
    for rec in records:
        s = rec["subject"]
        texture = "" if s["texture"] == "solid" else s["texture"] + " "
        assert rec["caption"].endswith(f"{s['size']} {s['color']} {texture}{s['shape']} in the "
                                       f"{POSITION_WORDS[tuple(rec['cell'])]}" + (" corner" if rec["cell"][0] != 1
                                       and rec["cell"][1] != 1 else "")), rec["caption"]
        x0, y0, x1, y1 = rec["bbox"]
        cx, cy = (x0 + x1) / 2 / 32, (y0 + y1) / 2 / 32
        assert abs(min(2, int(cy * 3)) - rec["cell"][0]) <= 1 and abs(min(2, int(cx * 3)) - rec["cell"][1]) <= 1


def test_video_caption_covers_the_caption_words_of_moving_shapes(world):
    """`video_caption` is the source video's MovingShapes caption (what the stand-in's tokenizer also trains on)."""
    _, records = world
    actions = {r["action"] for r in records}
    assert len(actions) >= 6
    for rec in records:
        if rec["action"] == "move_left":
            assert any(p.split()[0] in rec["video_caption"] for p, _ in ms.PHRASES_EN["move_left"])


def test_without_positions_captions_name_no_place(tmp_path):
    rec, _ = mf.frame_record(0, "train", 3, mf.MovingFramesConfig(image_size=32, positions=False))
    assert " in the " not in rec["caption"]
    rec2, _ = mf.frame_record(0, "train", 3, mf.MovingFramesConfig(image_size=32, positions=True))
    assert rec2["caption"].startswith(rec["caption"]) and " in the " in rec2["caption"]


def test_same_seed_same_bytes(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out, workers in ((a, 1), (b, 2)):
        mf.generate_moving_frames(out, n_train=12, n_test=0, n_val=0, seed=5, progress=False, workers=workers)
    assert (a / "train.jsonl").read_text() == (b / "train.jsonl").read_text()
    assert (a / "images" / "train_000007.png").read_bytes() == (b / "images" / "train_000007.png").read_bytes()


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="image_size"):
        mf.MovingFramesConfig(image_size=31)
    with pytest.raises(ValueError, match="static_fraction"):
        mf.MovingFramesConfig(static_fraction=1.5)
