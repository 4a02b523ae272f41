"""MovingFrames: still frames of MovingShapes videos as an image-text world (what a video model adapts from).

Every video method here (M2-RAAP, SHE-Net, the temporal modules) adapts a pretrained image-text model. On
MovingShapes that model is a CLIP trained on *images that look like MovingShapes frames*: this world draws a
MovingShapes video (`moving_shapes.sample_video`: the same objects, sizes, textures, backgrounds, places and
the actor's in-between states: half-way moves, blended colours, interpolated sizes, fades) and keeps one of its
frames, rendered by the same renderer at the same size. The caption names what that one frame shows of the
actor, in MovingShapes' subject wording ("a small red striped star"); with `positions` it also says where the
actor is ("a small red striped star in the top left corner"), so the towers keep positions that a video
model could read directions from.

Records also carry `video_caption`, the caption of the video the frame was drawn from ("a small red striped
star moves to the left"): training never reads it, but a tokenizer trained on `caption` + `video_caption`
(`tokenizer.corpus_keys`) knows every MovingShapes caption word, so the video runs that start from this model
tokenise their captions without unknown pieces.

Every record is a pure function of (seed, split, index, config); the output does not depend on the number of
workers. Command line: ``polymodal data moving-frames --out DIR --n-train N --n-test M [--positions]``.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from ...fileio import atomic_open
from .moving_shapes import STATIC, MovingShapesConfig, describe, sample_video
from .shapes import (COLOR_NAMES, POSITIONS_EN, SHAPES, SIZE_FRACTIONS, SPLIT_IDS, Scene, class_index, class_names,
                     object_bbox, render_scene)

GENERATOR_VERSION = "1.0"
WORLD_TAG = 5147        # mixed into every seed: never the stream of ShapesWorld or MovingShapes
SPLITS = ("train", "val", "test")


@dataclass
class MovingFramesConfig:
    image_size: int = 32          # frame side in pixels (MovingShapes' --image-size)
    num_frames: int = 8           # frames of the video a frame is drawn from (MovingShapes' --num-frames)
    min_objects: int = 1          # objects per frame incl. the actor, inclusive (as MovingShapes)
    max_objects: int = 3
    textures: bool = True         # False = every object solid
    backgrounds: bool = True      # False = every frame on the default background
    antialias: bool = True        # drawn at 2x and box-downsampled (the ShapesWorld renderer)
    static_fraction: float = 0.2  # frames drawn from static videos (the rest from action videos)
    positions: bool = False       # the caption also names the actor's place ("in the top left corner")

    def __post_init__(self) -> None:
        # MovingShapesConfig checks the shared fields (image size, frames, object counts) with its own messages.
        self.video_config()
        if not 0.0 <= self.static_fraction <= 1.0:
            raise ValueError(f"MovingFramesConfig.static_fraction must be in [0, 1], got {self.static_fraction}")

    def video_config(self) -> MovingShapesConfig:
        """The MovingShapes config whose videos the frames come from (no distractors, no compounds)."""
        return MovingShapesConfig(num_frames=self.num_frames, image_size=self.image_size,
                                  min_objects=self.min_objects, max_objects=self.max_objects, textures=self.textures,
                                  backgrounds=self.backgrounds, antialias=self.antialias)


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    return np.random.default_rng(np.random.SeedSequence([int(seed), WORLD_TAG, SPLIT_IDS[split], int(index)]))


def _nearest_size(side: float) -> str:
    """The size word whose box side (fraction of the image) is nearest `side`."""
    return min(SIZE_FRACTIONS, key=lambda s: abs(SIZE_FRACTIONS[s] / 3.0 - side))


def _cell(cx: float, cy: float) -> tuple[int, int]:
    """(row, col) of the 3x3 grid cell holding a box centre (fractions of the image side)."""
    return min(2, max(0, int(cy * 3))), min(2, max(0, int(cx * 3)))


def frame_record(seed: int, split: str, index: int, cfg: MovingFramesConfig) -> tuple[dict, Image.Image]:
    """One frame and its record (without "image").

    The video is drawn as MovingShapes draws one (no distractors, no compounds); the frame index is uniform
    over the video, except that for appear / disappear only frames where the actor is at least half visible
    are kept (the caption names it).

    Args:
        seed: data set seed.
        split: "train", "val" or "test".
        index: record index in the split.
        cfg: generator config.
    Returns:
        (record, RGB image of cfg.image_size). The record holds "caption", "captions" (its paraphrases:
        with and without the article's "a picture of"), "video_caption", "label" (class index of the actor's
        colour + shape among `shapes.class_names()`), "action", "frame", "subject", "cell", "bbox", "lang".
    """
    rng = _rng(seed, split, index)
    vcfg = cfg.video_config()
    kind = "static" if rng.random() < cfg.static_fraction else "action"
    spec = sample_video(rng, kind, vcfg)
    T = vcfg.num_frames
    frames = list(range(T))
    if spec.action == "appear":
        frames = [t for t in frames if t / (T - 1) >= 0.5]
    elif spec.action == "disappear":
        frames = [t for t in frames if 1.0 - t / (T - 1) >= 0.5]
    t = frames[int(rng.integers(len(frames)))]
    p = 0.0 if spec.action == STATIC else t / (T - 1)     # progress of the action at frame t
    a0 = spec.actor
    color = spec.color_to if spec.action == "change_color" and p >= 0.5 else a0.color
    actor = replace(a0, cx=a0.cx + (spec.end_cx - a0.cx) * p, cy=a0.cy + (spec.end_cy - a0.cy) * p,
                    side=a0.side + (spec.end_side - a0.side) * p)
    actor = replace(actor, size=_nearest_size(actor.side), cell=_cell(actor.cx, actor.cy))
    if spec.action == "change_color":          # the frame is the blend MovingShapes draws
        a = np.asarray(render_scene(Scene(spec.statics + [a0], 0, spec.background), cfg.image_size, cfg.antialias))
        b = np.asarray(render_scene(Scene(spec.statics + [replace(a0, color=spec.color_to)], 0, spec.background),
                                    cfg.image_size, cfg.antialias))
        image = Image.fromarray(np.rint((1 - p) * a.astype(np.float32) + p * b.astype(np.float32)).astype(np.uint8))
    elif spec.action in ("appear", "disappear"):
        alpha = p if spec.action == "appear" else 1.0 - p
        hidden = np.asarray(render_scene(Scene(spec.statics, 0, spec.background), cfg.image_size, cfg.antialias))
        shown = np.asarray(render_scene(Scene(spec.statics + [a0], 0, spec.background), cfg.image_size,
                                        cfg.antialias))
        image = Image.fromarray(np.rint((1 - alpha) * hidden.astype(np.float32)
                                        + alpha * shown.astype(np.float32)).astype(np.uint8))
    else:
        image = render_scene(Scene(spec.statics + [actor], 0, spec.background), cfg.image_size, cfg.antialias)
    texture = "" if actor.texture == "solid" else f"{actor.texture} "
    subject = f"{actor.size} {color} {texture}{actor.shape}"
    article = "an" if subject[0] in "aeiou" else "a"
    where = f" in {POSITIONS_EN[actor.cell]}" if cfg.positions else ""
    captions = [f"{article} {subject}{where}", f"a picture of {article} {subject}{where}"]
    video = describe(spec.action, a0.shape, a0.texture, a0.color, a0.size, spec.color_to, spec.template)
    rec = {"caption": captions[0], "captions": captions, "video_caption": video["caption"],
           "label": class_index(color, actor.shape), "action": spec.action, "frame": t,
           "subject": {"shape": actor.shape, "color": color, "size": actor.size, "texture": actor.texture},
           "cell": list(actor.cell), "bbox": object_bbox(actor, cfg.image_size, cfg.antialias), "lang": "en"}
    return rec, image


_WORKER: dict[str, Any] = {}


def _init_worker(out_dir: str, seed: int, cfg_dict: dict) -> None:
    _WORKER.update(out_dir=out_dir, seed=seed, cfg=MovingFramesConfig(**cfg_dict))


def _make_one(task: tuple[str, int]) -> dict[str, Any]:
    split, index = task
    rec, image = frame_record(_WORKER["seed"], split, index, _WORKER["cfg"])
    rel = f"images/{split}_{index:06d}.png"
    image.save(os.path.join(_WORKER["out_dir"], rel), format="PNG")
    return {"image": rel, **rec}


def _write(path: Path, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def generate_moving_frames(out_dir: str | os.PathLike, n_train: int, n_test: int, n_val: int = 0, seed: int = 0,
                           cfg: MovingFramesConfig | None = None, progress: bool = True,
                           workers: int = 1) -> dict[str, Any]:
    """Generate a MovingFrames data set on disk.

    Writes ``images/<split>_<index>.png``, ``train.jsonl``, ``test.jsonl`` (``val.jsonl`` when n_val > 0),
    ``classes.json`` (the 64 ShapesWorld colour + shape classes, for zero-shot eval) and ``meta.json``;
    manifests and JSON files last, each atomically.

    Args:
        out_dir: output folder.
        n_train, n_test, n_val: records per split.
        seed: data set seed.
        cfg: generator config (None = defaults).
        progress: a tqdm bar per split.
        workers: rendering processes (1 = in this process); the output does not depend on it.
    Returns:
        {"out_dir", "counts", "manifests", "classes", "meta", "seconds"}.
    """
    from .workers import sample_map

    cfg = cfg or MovingFramesConfig()
    counts = {"train": n_train, "val": n_val, "test": n_test}
    for split, n in counts.items():
        if n < 0:
            raise ValueError(f"n_{split} must be >= 0, got {n}")
    start = time.perf_counter()
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    splits = [s for s in SPLITS if counts[s] > 0 or s != "val"]
    records: dict[str, list[dict]] = {}
    with sample_map(workers, sum(counts.values()), _init_worker, (str(out), int(seed), asdict(cfg)),
                    max_chunk=64) as run:
        for split in splits:
            bar = tqdm(total=counts[split], desc=f"moving-frames {split}", unit="img",
                       disable=not progress or counts[split] == 0)
            records[split] = []
            for rec in run(_make_one, [(split, i) for i in range(counts[split])]):
                records[split].append(rec)
                bar.update(1)
            bar.close()
    manifests = {}
    for split, recs in records.items():
        path = out / f"{split}.jsonl"
        _write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
        manifests[split] = str(path)
    _write(out / "classes.json", json.dumps({"classes": class_names("en"), "shapes": list(SHAPES),
                                             "colors": list(COLOR_NAMES)}, indent=1) + "\n")
    meta = {"generator": "polymodal.data.synthetic.moving_frames", "version": GENERATOR_VERSION, "seed": int(seed),
            "counts": {s: counts[s] for s in splits}, "config": asdict(cfg)}
    _write(out / "meta.json", json.dumps(meta, indent=1) + "\n")
    return {"out_dir": str(out), "counts": meta["counts"], "manifests": manifests,
            "classes": str(out / "classes.json"), "meta": str(out / "meta.json"),
            "seconds": time.perf_counter() - start}


def add_cli_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `polymodal data moving-frames` options to ``parser`` (returned)."""
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--n-train", type=int, default=6000, help="training images (default 6000)")
    parser.add_argument("--n-test", type=int, default=200, help="test images (default 200)")
    parser.add_argument("--n-val", type=int, default=200, help="validation images (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="data set seed (default 0)")
    parser.add_argument("--image-size", type=int, default=32, help="frame side, as the MovingShapes world (default 32)")
    parser.add_argument("--num-frames", type=int, default=8, help="frames of the source videos (default 8)")
    parser.add_argument("--positions", action="store_true", help="captions also name the actor's place")
    parser.add_argument("--workers", type=int, default=1, help="rendering processes (default 1)")
    return parser


def main_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Run the generator from parsed arguments and print a JSON summary (the `generate_moving_frames` dict)."""
    cfg = MovingFramesConfig(image_size=args.image_size, num_frames=args.num_frames, positions=args.positions)
    result = generate_moving_frames(args.out, args.n_train, args.n_test, args.n_val, args.seed, cfg,
                                    workers=args.workers)
    print(json.dumps({k: result[k] for k in ("out_dir", "counts", "seconds")}, indent=1))
    return result


__all__ = ["MovingFramesConfig", "frame_record", "generate_moving_frames"]
