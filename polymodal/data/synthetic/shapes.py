"""ShapesWorld: a deterministic synthetic image-text world that every demo and test trains on.

Each image holds 1 to 6 objects on a 3x3 grid (one object per cell). An object has a shape
(8 kinds), a colour (8 well separated RGB values), a size (small / medium / large), a texture
(solid / striped / dotted) and a cell. Exactly one object, the *salient* one, is drawn large;
all others are small or medium, so the salient object is always the one with the biggest
bounding box. Every image comes with

- a short caption naming only the salient object ("a large red star."),
- a long caption describing every object, its attributes and its place (60-200 words for
  multi-object images),
- Chinese versions of both, written from fixed vocabulary tables,
- a class label (salient colour + shape: 8 x 8 = 64 classes such as "red star"), the sorted
  list of shapes present (multi-label) and per-object boxes.

The *hard* split groups images (``hard_group_size`` per group) that share the salient object
and all other objects except one non-salient object, which differs in exactly one attribute
(colour or shape). Short captions are identical within a group, so only a model that reads
the whole long caption can pick the right image.

Everything is a pure function of ``(seed, split, index)``: the output does not depend on the
number of workers. Command line: ``polymodal data shapes --out DIR --n-train N --n-test M``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageChops, ImageDraw
from tqdm import tqdm

from ...fileio import atomic_open
from .workers import remove_stale, sample_map

GENERATOR_VERSION = "1.0"

# ----------------------------------------------------------------------------------------
# Vocabulary tables (order fixes the class indices; never reorder without a version bump)
# ----------------------------------------------------------------------------------------
SHAPES = ["circle", "square", "triangle", "diamond", "star", "cross", "hexagon", "heart"]
SHAPES_ZH = {
    "circle": "圆形", "square": "正方形", "triangle": "三角形", "diamond": "菱形",
    "star": "五角星", "cross": "十字形", "hexagon": "六边形", "heart": "心形",
}
SHAPE_PLURALS = {"cross": "crosses"}  # all others take "s"

# Well separated, saturated colours; none close to a background colour.
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (30, 70, 225),
    "yellow": (245, 215, 20),
    "orange": (250, 130, 0),
    "purple": (135, 45, 185),
    "pink": (250, 120, 200),
    "cyan": (0, 195, 210),
}
COLOR_NAMES = list(COLORS)
COLORS_ZH = {
    "red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色",
    "orange": "橙色", "purple": "紫色", "pink": "粉色", "cyan": "青色",
}

SIZES = ["small", "medium", "large"]
SIZES_ZH = {"small": "小的", "medium": "中等大小的", "large": "大的"}
# Side of an object's (square) box as a fraction of the cell side. "large" is reserved for
# the salient object, so its box is always at least 0.90 / 0.62 = 1.45x any other box.
SIZE_FRACTIONS = {"small": 0.42, "medium": 0.62, "large": 0.90}

TEXTURES = ["solid", "striped", "dotted"]
TEXTURES_EN = {"solid": "", "striped": "striped ", "dotted": "dotted "}
TEXTURES_ZH = {"solid": "", "striped": "带条纹的", "dotted": "带圆点的"}

# name -> (top colour, bottom colour); equal colours = plain background.
BACKGROUNDS = {
    "white": ((250, 250, 250), (250, 250, 250)),
    "light gray": ((205, 205, 205), (205, 205, 205)),
    "dark gray": ((70, 70, 70), (70, 70, 70)),
    "light blue gradient": ((235, 242, 252), (165, 190, 228)),
    "beige gradient": ((250, 242, 225), (212, 192, 155)),
}
BACKGROUND_NAMES = list(BACKGROUNDS)
BACKGROUNDS_ZH = {
    "white": "白色", "light gray": "浅灰色", "dark gray": "深灰色",
    "light blue gradient": "浅蓝色渐变", "beige gradient": "米色渐变",
}
DEFAULT_BACKGROUND = "light gray"  # used when backgrounds are switched off

POSITIONS_EN = {
    (0, 0): "the top left corner", (0, 1): "the top middle", (0, 2): "the top right corner",
    (1, 0): "the middle left", (1, 1): "the center", (1, 2): "the middle right",
    (2, 0): "the bottom left corner", (2, 1): "the bottom middle", (2, 2): "the bottom right corner",
}
POSITIONS_ZH = {
    (0, 0): "左上角", (0, 1): "上方中间", (0, 2): "右上角",
    (1, 0): "左侧中间", (1, 1): "正中央", (1, 2): "右侧中间",
    (2, 0): "左下角", (2, 1): "下方中间", (2, 2): "右下角",
}
NUMBERS_EN = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
NUMBERS_ZH = ["零", "一", "两", "三", "四", "五", "六", "七", "八", "九"]

# Split name -> integer mixed into the per-image seed.
SPLIT_IDS = {"train": 0, "val": 1, "test": 2, "hard": 3}

# Caption templates. A scene draws one template index; hard-group members share it so their
# short captions are identical.
SHORT_TEMPLATES_EN = [
    "a {desc}.",
    "a picture of a {desc}.",
    "an image with a {desc}.",
    "a {desc} in the picture.",
]
SHORT_TEMPLATES_ZH = [
    "一个{desc}。",
    "一张有{desc}的图片。",
    "图中有一个{desc}。",
    "画面里是一个{desc}。",
]
LONG_INTRO_EN = [
    "The image shows {n} {objects} on a {bg} background.",
    "This picture contains {n} {objects} placed on a {bg} background.",
    "There {are} {n} {objects} in this image, set against a {bg} background.",
]
LONG_OBJECT_EN = [
    "In {pos} there is a {desc}.",
    "In {pos} we can see a {desc}.",
    "A {desc} sits in {pos}.",
]
LONG_SALIENT_EN = [
    "The largest and most eye-catching object is the {desc} in {pos}.",
    "The biggest object, which stands out first, is the {desc} in {pos}.",
    "Most noticeable is the {desc} in {pos}, the biggest object in the scene.",
]
LONG_INTRO_ZH = [
    "图中有{n}个物体，背景是{bg}。",
    "这张图片里共有{n}个物体，背景为{bg}。",
    "画面中可以看到{n}个物体，背景是{bg}。",
]
LONG_OBJECT_ZH = [
    "{pos}有一个{desc}。",
    "在{pos}可以看到一个{desc}。",
    "{pos}放着一个{desc}。",
]
LONG_SALIENT_ZH = [
    "其中最大、最显眼的物体是{pos}的{desc}。",
    "最大的物体是{pos}的{desc}，它最先引人注意。",
    "最引人注目的是{pos}的{desc}，它是画面中最大的物体。",
]


def class_names(lang: str = "en") -> list[str]:
    """The 64 zero-shot classes (salient colour + shape), colour-major.

    Args:
        lang: "en" ("red star") or "zh" ("红色五角星").

    Returns:
        Class names; index ``c * len(SHAPES) + s`` is colour ``c`` with shape ``s``.
    """
    if lang == "en":
        return [f"{c} {s}" for c in COLOR_NAMES for s in SHAPES]
    if lang == "zh":
        return [f"{COLORS_ZH[c]}{SHAPES_ZH[s]}" for c in COLOR_NAMES for s in SHAPES]
    raise ValueError(f"lang must be 'en' or 'zh', got {lang!r}")


def class_index(color: str, shape: str) -> int:
    """Index of the class "<color> <shape>" in :func:`class_names`."""
    return COLOR_NAMES.index(color) * len(SHAPES) + SHAPES.index(shape)


# ----------------------------------------------------------------------------------------
# Config and scene
# ----------------------------------------------------------------------------------------
@dataclass
class ShapesConfig:
    image_size: int = 64          # output side in pixels
    min_objects: int = 1          # objects per image (train/val/test), inclusive
    max_objects: int = 6          # at most 9: one object per cell of the 3x3 grid
    textures: bool = True         # False = every object solid
    backgrounds: bool = True      # False = every image on DEFAULT_BACKGROUND
    antialias: bool = True        # draw at 2x and box-downsample
    hard_group_size: int = 4      # images per hard group (2..8: distinct colour/shape values)
    hard_min_objects: int = 3     # hard scenes have >= this many objects (>= 2 needed)
    n_hard: int | None = None     # hard images; None = n_test rounded down to whole groups
    png_compress_level: int = 6   # zlib level of the PNG files (bytes stay deterministic)

    def __post_init__(self) -> None:
        if self.image_size < 16:
            raise ValueError(f"ShapesConfig.image_size must be >= 16, got {self.image_size}")
        if not 1 <= self.min_objects <= self.max_objects <= 9:
            raise ValueError(
                "ShapesConfig needs 1 <= min_objects <= max_objects <= 9 (3x3 grid), "
                f"got min_objects={self.min_objects}, max_objects={self.max_objects}")
        if not 2 <= self.hard_group_size <= min(len(SHAPES), len(COLOR_NAMES)):
            raise ValueError(
                f"ShapesConfig.hard_group_size must be in 2..8, got {self.hard_group_size}")
        if not 2 <= self.hard_min_objects <= 9:
            raise ValueError(
                f"ShapesConfig.hard_min_objects must be in 2..9, got {self.hard_min_objects}")


@dataclass
class SceneObject:
    """One object. Geometry is in fractions of the image side, so a scene renders at any size."""

    shape: str
    color: str
    size: str
    texture: str
    cell: tuple[int, int]         # (row, col) on the 3x3 grid
    cx: float                     # box centre, fraction of image width
    cy: float                     # box centre, fraction of image height
    side: float                   # side of the square box the shape is fitted into, fraction

    def describe(self, lang: str = "en", with_size: bool = True) -> str:
        """Noun phrase such as "small blue striped circle" / "小的带条纹的蓝色圆形"."""
        if lang == "en":
            size = f"{self.size} " if with_size else ""
            return f"{size}{self.color} {TEXTURES_EN[self.texture]}{self.shape}"
        size = SIZES_ZH[self.size] if with_size else ""
        return f"{size}{TEXTURES_ZH[self.texture]}{COLORS_ZH[self.color]}{SHAPES_ZH[self.shape]}"


@dataclass
class Scene:
    objects: list[SceneObject]    # in reading order of their cells (row-major)
    salient: int                  # index into objects of the large object
    background: str
    template: int = 0             # caption template index (shared within a hard group)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. hard-group bookkeeping


# ----------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------
def _pick(rng: np.random.Generator, items: list) -> Any:
    return items[int(rng.integers(len(items)))]


def _place(rng: np.random.Generator, cell: tuple[int, int], size: str) -> tuple[float, float, float]:
    """Box centre and side (fractions of the image) for an object of ``size`` in ``cell``."""
    cell_side = 1.0 / 3.0
    side = SIZE_FRACTIONS[size] * cell_side
    margin = 0.04 * cell_side     # keeps boxes of neighbouring cells apart
    free = cell_side - side - 2 * margin
    ox, oy = rng.uniform(0.0, max(free, 0.0), size=2)
    row, col = cell
    cx = col * cell_side + margin + float(ox) + side / 2
    cy = row * cell_side + margin + float(oy) + side / 2
    return cx, cy, side


def sample_scene(rng: np.random.Generator, cfg: ShapesConfig, n_objects: int | None = None) -> Scene:
    """Sample a random scene.

    Args:
        rng: numpy Generator; the scene is a pure function of its state.
        cfg: generator config (object counts, textures, backgrounds).
        n_objects: fixed object count; None draws uniformly from cfg.min_objects..max_objects.

    Returns:
        A :class:`Scene` whose salient object is the only "large" one.
    """
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1)) if n_objects is None else n_objects
    if not 1 <= n <= 9:
        raise ValueError(f"a scene holds 1..9 objects (3x3 grid), got {n}")
    cells = sorted(int(c) for c in rng.choice(9, size=n, replace=False))
    salient = int(rng.integers(n))
    objects = []
    for i, c in enumerate(cells):
        cell = (c // 3, c % 3)
        size = "large" if i == salient else _pick(rng, ["small", "medium"])
        texture = _pick(rng, TEXTURES) if cfg.textures else "solid"
        shape, color = _pick(rng, SHAPES), _pick(rng, COLOR_NAMES)
        cx, cy, side = _place(rng, cell, size)
        objects.append(SceneObject(shape, color, size, texture, cell, cx, cy, side))
    background = _pick(rng, BACKGROUND_NAMES) if cfg.backgrounds else DEFAULT_BACKGROUND
    template = int(rng.integers(len(LONG_INTRO_EN) * len(SHORT_TEMPLATES_EN)))
    return Scene(objects, salient, background, template)


def _rng_for(seed: int, split: str, index: int) -> np.random.Generator:
    if split not in SPLIT_IDS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_IDS)}")
    return np.random.default_rng(np.random.SeedSequence([int(seed), SPLIT_IDS[split], int(index)]))


def hard_group(seed: int, group: int, cfg: ShapesConfig) -> list[Scene]:
    """The scenes of one hard group.

    All members share every object except one non-salient object (the *target*), whose colour
    or shape (one attribute, chosen per group) takes ``cfg.hard_group_size`` distinct values.

    Args:
        seed: data set seed.
        group: group id (0-based).
        cfg: generator config.

    Returns:
        ``cfg.hard_group_size`` scenes; ``scene.extra`` holds group, variant, attribute, target.
    """
    rng = _rng_for(seed, "hard", group)
    lo = max(cfg.hard_min_objects, cfg.min_objects, 2)
    hi = max(cfg.max_objects, lo)
    base = sample_scene(rng, cfg, n_objects=int(rng.integers(lo, hi + 1)))
    others = [i for i in range(len(base.objects)) if i != base.salient]
    target = others[int(rng.integers(len(others)))]
    attribute = _pick(rng, ["color", "shape"])
    vocab = COLOR_NAMES if attribute == "color" else SHAPES
    values = [vocab[int(i)] for i in rng.choice(len(vocab), size=cfg.hard_group_size, replace=False)]
    scenes = []
    for v, value in enumerate(values):
        objects = list(base.objects)
        objects[target] = replace(base.objects[target], **{attribute: value})
        extra = {"group": group, "variant": v, "hard_attribute": attribute, "hard_object": target}
        scenes.append(Scene(objects, base.salient, base.background, base.template, extra))
    return scenes


def build_scene(seed: int, split: str, index: int, cfg: ShapesConfig) -> Scene:
    """The scene of record ``index`` of ``split``: a pure function of (seed, split, index).

    Args:
        seed: data set seed.
        split: "train", "val", "test" or "hard".
        index: record index within the split (for "hard": group * group_size + variant).
        cfg: generator config.

    Returns:
        The :class:`Scene`.
    """
    if split == "hard":
        group, variant = divmod(index, cfg.hard_group_size)
        return hard_group(seed, group, cfg)[variant]
    return sample_scene(_rng_for(seed, split, index), cfg)


# ----------------------------------------------------------------------------------------
# Geometry and rendering
# ----------------------------------------------------------------------------------------
def _fit_unit(points: list[tuple[float, float]]) -> tuple[tuple[float, float], ...]:
    """Scale/shift a polygon so its bounding box is centred and its longer side is 1."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    scale = 1.0 / max(max(xs) - min(xs), max(ys) - min(ys))
    mx, my = (max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2
    return tuple(((x - mx) * scale, (y - my) * scale) for x, y in points)


def _unit_polygons() -> dict[str, tuple[tuple[float, float], ...]]:
    """Polygons (y down) fitted to the unit box [-0.5, 0.5]^2; circle is drawn as an ellipse."""
    star = []
    for k in range(10):
        r = 1.0 if k % 2 == 0 else 0.45
        a = -math.pi / 2 + k * math.pi / 5
        star.append((r * math.cos(a), r * math.sin(a)))
    w = 0.18  # half arm width of the cross
    cross = [(-w, -0.5), (w, -0.5), (w, -w), (0.5, -w), (0.5, w), (w, w), (w, 0.5),
             (-w, 0.5), (-w, w), (-0.5, w), (-0.5, -w), (-w, -w)]
    heart = []
    for k in range(48):
        t = 2 * math.pi * k / 48
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        heart.append((x, -y))
    return {
        "square": _fit_unit([(-0.5, -0.5), (0.5, -0.5), (0.5, 0.5), (-0.5, 0.5)]),
        "triangle": _fit_unit([(0.0, -math.sqrt(3)), (1.0, 0.0), (-1.0, 0.0)]),  # equilateral
        "diamond": ((0.0, -0.5), (0.36, 0.0), (0.0, 0.5), (-0.36, 0.0)),
        "star": _fit_unit(star),
        "cross": _fit_unit(cross),
        "hexagon": _fit_unit([(math.cos(k * math.pi / 3), math.sin(k * math.pi / 3)) for k in range(6)]),
        "heart": _fit_unit(heart),
    }


_UNIT_POLYGONS = _unit_polygons()


def _pixel_points(obj: SceneObject, canvas_size: int) -> list[tuple[int, int]]:
    """Integer vertices on a canvas of ``canvas_size`` (circle: its two box corners)."""
    cx, cy, s = obj.cx * canvas_size, obj.cy * canvas_size, obj.side * canvas_size
    if obj.shape == "circle":
        unit = ((-0.5, -0.5), (0.5, 0.5))
    else:
        unit = _UNIT_POLYGONS[obj.shape]
    return [(round(cx + x * s), round(cy + y * s)) for x, y in unit]


def object_bbox(obj: SceneObject, image_size: int, antialias: bool = True) -> list[int]:
    """Pixel box ``[x0, y0, x1, y1]`` (x1, y1 exclusive) that holds every pixel the object touches.

    Args:
        obj: the object.
        image_size: output image side.
        antialias: whether the image is drawn at 2x (as :func:`render_scene` does).

    Returns:
        The box, clipped to the image.
    """
    scale = 2 if antialias else 1
    pts = _pixel_points(obj, image_size * scale)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    # PIL fills vertex pixels inclusively; a 2x pixel p lands in output pixel p // 2.
    box = [min(xs) // scale, min(ys) // scale, max(xs) // scale + 1, max(ys) // scale + 1]
    return [max(0, min(v, image_size)) for v in box]


@functools.lru_cache(maxsize=16)
def _background(name: str, size: int) -> Image.Image:
    top, bottom = BACKGROUNDS[name]
    if top == bottom:
        return Image.new("RGB", (size, size), top)
    t = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None]                 # (H, 1)
    rows = (1 - t) * np.array(top, np.float32) + t * np.array(bottom, np.float32)  # (H, 3)
    arr = np.broadcast_to(np.rint(rows)[:, None, :], (size, size, 3)).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(arr), "RGB")


@functools.lru_cache(maxsize=16)
def _texture_mask(texture: str, size: int) -> Image.Image:
    """Full-canvas L mask of the texture marks (255 = mark), period tied to the image size.

    Periods are chosen so that after the 2x downsampling stripes stay stripes and dots stay
    dots (a finer dot grid aliases into a checkerboard at 64 px).
    """
    yy, xx = np.mgrid[0:size, 0:size]
    if texture == "striped":       # diagonal stripes, ~40% of the period wide
        period = max(4, round(size / 16))
        on = ((xx + yy) % period) < max(1, round(0.4 * period))
    elif texture == "dotted":      # round dots on a square grid
        period = max(6, round(size / 11))
        c = (period - 1) / 2
        on = ((xx % period - c) ** 2 + (yy % period - c) ** 2) <= (0.28 * period) ** 2
    else:
        raise ValueError(f"unknown texture {texture!r}")
    return Image.fromarray((on * 255).astype(np.uint8), "L")


def _texture_color(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(int(v * 0.5) for v in rgb)  # a darker shade of the object colour


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, pts: list[tuple[int, int]], fill) -> None:
    if shape == "circle":
        draw.ellipse([pts[0], pts[1]], fill=fill)
    else:
        draw.polygon(pts, fill=fill)


def render_scene(scene: Scene, image_size: int, antialias: bool = True) -> Image.Image:
    """Draw a scene.

    Args:
        scene: the scene.
        image_size: output side in pixels.
        antialias: draw at 2x and average 2x2 blocks (objects get smooth edges).

    Returns:
        An RGB ``PIL.Image`` of ``image_size`` x ``image_size``.
    """
    scale = 2 if antialias else 1
    size = image_size * scale
    canvas = _background(scene.background, size).copy()
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        pts = _pixel_points(obj, size)
        rgb = COLORS[obj.color]
        _draw_shape(draw, obj.shape, pts, rgb)
        if obj.texture == "solid":
            continue
        # Texture marks = shape mask AND texture pattern, pasted in a darker shade.
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        x0, y0, x1, y1 = min(xs), min(ys), max(xs) + 1, max(ys) + 1
        shape_mask = Image.new("L", (x1 - x0, y1 - y0), 0)
        _draw_shape(ImageDraw.Draw(shape_mask), obj.shape, [(x - x0, y - y0) for x, y in pts], 255)
        pattern = _texture_mask(obj.texture, size).crop((x0, y0, x1, y1))
        canvas.paste(_texture_color(rgb), (x0, y0, x1, y1), ImageChops.multiply(shape_mask, pattern))
    return canvas.reduce(2) if antialias else canvas


# ----------------------------------------------------------------------------------------
# Captions
# ----------------------------------------------------------------------------------------
def _plural_en(word: str, n: int) -> str:
    return word if n == 1 else SHAPE_PLURALS.get(word, word + "s")


def _join_en(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _relation(obj: SceneObject, ref: SceneObject, lang: str) -> str:
    dr, dc = obj.cell[0] - ref.cell[0], obj.cell[1] - ref.cell[1]
    if lang == "en":
        parts = []
        if dr:
            parts.append("above" if dr < 0 else "below")
        if dc:
            parts.append("to the left of" if dc < 0 else "to the right of")
        return " and ".join(parts) if len(parts) == 2 else parts[0]
    vert = "" if not dr else ("上" if dr < 0 else "下")
    horiz = "" if not dc else ("左" if dc < 0 else "右")
    if vert and horiz:
        return f"{horiz}{vert}方"
    return f"{vert}方" if vert else f"{horiz}边"


def short_captions(scene: Scene, lang: str = "en") -> list[str]:
    """All short-caption variants for the salient object (one per template)."""
    sal = scene.objects[scene.salient]
    if lang == "en":
        return [t.format(desc=sal.describe("en")) for t in SHORT_TEMPLATES_EN]
    if lang == "zh":
        return [t.format(desc=sal.describe("zh")) for t in SHORT_TEMPLATES_ZH]
    raise ValueError(f"lang must be 'en' or 'zh', got {lang!r}")


def describe_short(scene: Scene, lang: str = "en") -> str:
    """Short caption naming only the salient object, e.g. "a large red star.".

    Args:
        scene: the scene.
        lang: "en" or "zh".

    Returns:
        One sentence; the wording template is ``scene.template``'s choice.
    """
    variants = short_captions(scene, lang)
    return variants[scene.template % len(variants)]


def describe_long(scene: Scene, lang: str = "en") -> str:
    """Long caption describing every object with its attributes and position.

    Sentences: an introduction with the count and the background; one sentence per object in
    reading order; which object is the largest; where each other object lies relative to it;
    and a summary of the shapes and colours present.

    Args:
        scene: the scene.
        lang: "en" or "zh".

    Returns:
        The caption (60-200 words in English for scenes with 2 to 6 objects).
    """
    t = (scene.template // len(SHORT_TEMPLATES_EN)) % len(LONG_INTRO_EN)
    objs, sal = scene.objects, scene.objects[scene.salient]
    n = len(objs)
    shape_counts: dict[str, int] = {}
    colors: list[str] = []
    for o in objs:
        shape_counts[o.shape] = shape_counts.get(o.shape, 0) + 1
        if o.color not in colors:
            colors.append(o.color)
    if lang == "en":
        out = [LONG_INTRO_EN[t].format(n=NUMBERS_EN[n], objects="object" if n == 1 else "objects",
                                       are="is" if n == 1 else "are", bg=scene.background)]
        out[0] = out[0][0].upper() + out[0][1:]
        for o in objs:
            s = LONG_OBJECT_EN[t].format(pos=POSITIONS_EN[o.cell], desc=o.describe("en"))
            out.append(s[0].upper() + s[1:])
        if n == 1:
            out.append("It is the only object in the picture, so it is also the largest one.")
            return " ".join(out)
        out.append(LONG_SALIENT_EN[t].format(desc=sal.describe("en"), pos=POSITIONS_EN[sal.cell]))
        for i, o in enumerate(objs):
            if i != scene.salient:
                out.append(f"The {o.color} {o.shape} is {_relation(o, sal, 'en')} "
                           f"the {sal.color} {sal.shape}.")
        counts = [f"{NUMBERS_EN[c]} {_plural_en(s, c)}" for s, c in shape_counts.items()]
        out.append(f"Altogether the picture contains {_join_en(counts)}, "
                   f"in {_join_en(colors)}.")
        return " ".join(out)
    if lang == "zh":
        out = [LONG_INTRO_ZH[t].format(n=NUMBERS_ZH[n], bg=BACKGROUNDS_ZH[scene.background])]
        for o in objs:
            out.append(LONG_OBJECT_ZH[t].format(pos=POSITIONS_ZH[o.cell], desc=o.describe("zh")))
        if n == 1:
            out.append("它是画面中唯一的物体，因此也是最大的物体。")
            return "".join(out)
        out.append(LONG_SALIENT_ZH[t].format(desc=sal.describe("zh"), pos=POSITIONS_ZH[sal.cell]))
        sal_name = COLORS_ZH[sal.color] + SHAPES_ZH[sal.shape]
        for i, o in enumerate(objs):
            if i != scene.salient:
                name = COLORS_ZH[o.color] + SHAPES_ZH[o.shape]
                out.append(f"{name}位于{sal_name}的{_relation(o, sal, 'zh')}。")
        counts = [f"{NUMBERS_ZH[c]}个{SHAPES_ZH[s]}" for s, c in shape_counts.items()]
        out.append(f"画面中一共有{'、'.join(counts)}，颜色有{'、'.join(COLORS_ZH[c] for c in colors)}。")
        return "".join(out)
    raise ValueError(f"lang must be 'en' or 'zh', got {lang!r}")


def scene_record(scene: Scene, image_size: int, antialias: bool = True) -> dict[str, Any]:
    """The manifest record of a scene (without the "image" key).

    Args:
        scene: the scene.
        image_size: image side, for the boxes.
        antialias: whether the image is drawn at 2x (boxes depend on it by at most a pixel).

    Returns:
        Dict with captions (en/zh, short/long), "label", "labels", "objects", "salient",
        "background", "lang" and, for hard scenes, "group", "variant", "hard_attribute",
        "hard_object".
    """
    sal = scene.objects[scene.salient]
    rec: dict[str, Any] = {
        "caption": describe_short(scene, "en"),
        "captions": short_captions(scene, "en"),
        "long_caption": describe_long(scene, "en"),
        "caption_zh": describe_short(scene, "zh"),
        "captions_zh": short_captions(scene, "zh"),
        "long_caption_zh": describe_long(scene, "zh"),
        "label": class_index(sal.color, sal.shape),
        "labels": sorted({o.shape for o in scene.objects}),
        "objects": [
            {"shape": o.shape, "color": o.color, "size": o.size, "texture": o.texture,
             "cell": list(o.cell), "bbox": object_bbox(o, image_size, antialias)}
            for o in scene.objects
        ],
        "salient": scene.salient,
        "background": scene.background,
        "lang": "en",
    }
    rec.update(scene.extra)
    return rec


# ----------------------------------------------------------------------------------------
# Writing a data set
# ----------------------------------------------------------------------------------------
_WORKER: dict[str, Any] = {}


def _init_worker(out_dir: str, seed: int, cfg_dict: dict) -> None:
    _WORKER.update(out_dir=out_dir, seed=seed, cfg=ShapesConfig(**cfg_dict))


def _make_one(task: tuple[str, int]) -> dict[str, Any]:
    """Render, save and describe one record; runs in a worker (or in-process)."""
    split, index = task
    cfg: ShapesConfig = _WORKER["cfg"]
    scene = build_scene(_WORKER["seed"], split, index, cfg)
    rel = f"images/{split}_{index:06d}.png"
    image = render_scene(scene, cfg.image_size, cfg.antialias)
    image.save(os.path.join(_WORKER["out_dir"], rel), format="PNG",
               compress_level=cfg.png_compress_level)
    return {"image": rel, **scene_record(scene, cfg.image_size, cfg.antialias)}


def _write_atomic(path: Path, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def generate_shapes(
    out_dir: str | os.PathLike,
    n_train: int,
    n_test: int,
    n_val: int | None = None,
    n_hard: int | None = None,
    seed: int = 0,
    cfg: ShapesConfig | None = None,
    progress: bool = True,
    workers: int = 2,
) -> dict[str, Any]:
    """Generate a ShapesWorld data set on disk.

    Writes ``images/<split>_<index>.png``, ``train.jsonl``, ``val.jsonl``, ``test.jsonl``,
    ``hard.jsonl``, ``classes.json`` and ``meta.json`` into ``out_dir``. Manifests are written
    last, each through a temporary file and ``os.replace``.

    Args:
        out_dir: output folder (created if missing; existing files of the same names are replaced, and
            images an earlier, larger generation left there are deleted: "removed" counts them).
        n_train: number of training images.
        n_test: number of test images.
        n_val: number of validation images; None = ``n_test``.
        n_hard: number of hard-set images, a multiple of ``cfg.hard_group_size``; None =
            ``cfg.n_hard`` or else ``n_test`` rounded down to whole groups.
        seed: data set seed; each image depends only on (seed, split, index).
        cfg: generator config; None = defaults.
        progress: show a tqdm bar per split.
        workers: processes that render (1 = in this process); the output does not depend on it.

    Returns:
        Dict with "out_dir", "counts" (per split), "manifests" (split -> path), "classes",
        "meta" (paths) and "seconds" (wall time).
    """
    cfg = cfg or ShapesConfig()
    n_val = n_test if n_val is None else n_val
    g = cfg.hard_group_size
    if n_hard is None:
        n_hard = cfg.n_hard if cfg.n_hard is not None else (n_test // g) * g
    counts = {"train": n_train, "val": n_val, "test": n_test, "hard": n_hard}
    for split, n in counts.items():
        if n < 0:
            raise ValueError(f"n_{split} must be >= 0, got {n}")
    if n_hard % g:
        raise ValueError(f"n_hard={n_hard} must be a multiple of hard_group_size={g} "
                         f"(whole groups); use e.g. n_hard={(n_hard // g) * g}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")

    start = time.perf_counter()
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    init_args = (str(out), int(seed), asdict(cfg))
    records: dict[str, list[dict]] = {}
    with sample_map(workers, sum(counts.values()), _init_worker, init_args, max_chunk=64) as run:
        for split, n in counts.items():
            tasks = [(split, i) for i in range(n)]
            bar = tqdm(total=n, desc=f"shapes {split}", unit="img", disable=not progress or n == 0)
            it = run(_make_one, tasks)
            records[split] = []
            for rec in it:
                records[split].append(rec)
                bar.update(1)
            bar.close()

    manifests = {}
    for split, recs in records.items():
        path = out / f"{split}.jsonl"
        _write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
        manifests[split] = str(path)
    classes = {
        "classes": class_names("en"),
        "classes_zh": class_names("zh"),
        "shapes": list(SHAPES),
        "shapes_zh": [SHAPES_ZH[s] for s in SHAPES],
        "colors": list(COLOR_NAMES),
        "colors_zh": [COLORS_ZH[c] for c in COLOR_NAMES],
        "sizes": list(SIZES),
        "textures": list(TEXTURES),
        "backgrounds": list(BACKGROUND_NAMES),
    }
    _write_atomic(out / "classes.json", json.dumps(classes, ensure_ascii=False, indent=1) + "\n")
    meta = {"generator": "polymodal.data.synthetic.shapes", "version": GENERATOR_VERSION,
            "seed": int(seed), "counts": counts, "config": asdict(cfg)}
    _write_atomic(out / "meta.json", json.dumps(meta, indent=1) + "\n")
    # last, once the new manifests are in place: images of an earlier, larger generation
    removed = remove_stale(out / "images", r"(train|val|test|hard)_\d{6}\.png",
                           {Path(r["image"]).name for recs in records.values() for r in recs})
    return {"out_dir": str(out), "counts": counts, "manifests": manifests,
            "classes": str(out / "classes.json"), "meta": str(out / "meta.json"), "removed": removed,
            "seconds": time.perf_counter() - start}


# ----------------------------------------------------------------------------------------
# Command line helpers (called by polymodal/cli.py for `polymodal data shapes`)
# ----------------------------------------------------------------------------------------
def add_cli_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `polymodal data shapes` options to ``parser``.

    Args:
        parser: an (sub)parser.

    Returns:
        The same parser.
    """
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--n-train", type=int, default=2000, help="training images (default 2000)")
    parser.add_argument("--n-test", type=int, default=500, help="test images (default 500)")
    parser.add_argument("--n-val", type=int, default=None, help="validation images (default: n-test)")
    parser.add_argument("--n-hard", type=int, default=None,
                        help="hard long-text images, a multiple of the group size 4 "
                             "(default: n-test rounded down to whole groups)")
    parser.add_argument("--seed", type=int, default=0, help="data set seed (default 0)")
    parser.add_argument("--image-size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--workers", type=int, default=2, help="rendering processes (default 2)")
    return parser


def main_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Run the generator from parsed arguments and print a JSON summary.

    Args:
        args: namespace produced by a parser set up with :func:`add_cli_arguments`.

    Returns:
        The dict returned by :func:`generate_shapes`.
    """
    cfg = ShapesConfig(image_size=args.image_size)
    result = generate_shapes(args.out, n_train=args.n_train, n_test=args.n_test, n_val=args.n_val,
                             n_hard=args.n_hard, seed=args.seed, cfg=cfg, workers=args.workers)
    print(json.dumps({"out_dir": os.path.abspath(result["out_dir"]), "counts": result["counts"],
                      "removed": result["removed"], "seconds": result["seconds"]}, indent=1))
    return result


if __name__ == "__main__":  # pragma: no cover - the real entry point is `polymodal data shapes`
    main_from_args(add_cli_arguments(argparse.ArgumentParser(description=__doc__)).parse_args())
