"""MovingShapes: a deterministic synthetic video-text world built on the ShapesWorld vocabulary.

Each video shows 1 to 3 objects (ShapesWorld shapes, colours, sizes, textures) on a
ShapesWorld background. Exactly one object, the *actor*, performs one action during an action
segment; all other objects are static. Actions:

- motion: moves left / right / up / down (across its row or column of the 3x3 grid),
- size change: grows (small -> large) / shrinks (large -> small),
- colour change: turns from colour A to colour B (a gradual blend),
- visibility: appears (fades in) / disappears (fades out),
- static: nothing happens (order-free videos, captions name the subject only).

Videos are H.264 (libx264, yuv420p, a small GOP so codec key frames exist) written with PyAV.
By default the encoding is lossless (``crf=0``): a time-reversed copy then decodes to exactly the
reversed frames, and static frames decode to identical pixels.

Study structures, all recorded per manifest record:

- **order-sensitive pairs** (``pair_fraction``): two records with the same ``pair_id`` whose
  frames are each other's reversal and whose captions are opposite ("moves to the left" /
  "moves to the right", "turns from red to blue" / "turns from blue to red"); ``reversed``
  marks the reversed copy. Action videos are ``order_sensitive: true``; static videos
  (``static_fraction``) are ``order_sensitive: false``.
- **distractor segments** (``distractor_fraction``): the action fills only part of the video;
  the other frames either hold the first/last state still (``distractor: "still"``) or show an
  unrelated static ShapesWorld scene (``"unrelated"``). ``action_frames`` lists the frames of
  the action segment; ``boxes`` gives the actor's box per frame (``None`` when invisible).
- **mismatched captions** (``mismatch_fraction``): exactly ``round(f * n)`` records of a split
  carry another record's caption, with ``mismatched: true`` and ``true_caption`` kept.
- **hierarchical scene labels**: parents ("motion", "size change", "colour change",
  "visibility", "static"), action children ("moves left", ..., "turns red", ..., "appears",
  "stays still") and frame-level labels ("contains star": a shape visible in some frame), in
  ``classes.json`` with a ``parents`` map and the ``temporal`` (order-dependent) names.
- **compound order actions** (``compound_fraction``, default 0): single action videos may instead
  do two opposite things in turn ("moves left then right", "grows then shrinks", "appears then
  disappears"). The two halves of such a video, swapped, give the video of the opposite compound
  ("moves right then left") with exactly the same frames in another order, so neither one frame
  nor an order-free pool of frames tells the two labels apart (see :func:`half_swapped`).
  Reversing a compound video gives the same video back; reversing a single action flips it.
- **single-frame labels**: every record also carries "<colour> object" (an object of that colour
  is drawn) and "<background> background" labels next to "contains <shape>". ``classes.json``
  lists the label groups under ``groups``: ``order_dependent`` (every label that needs frame
  order), ``single_frame`` (every label one frame can show), ``order_compound``, ``colour``,
  ``background``.

Every record is a pure function of (seed, split, index, split size, config); the output does
not depend on the number of workers. The split size enters only through the split's *plan*
(which indices form pairs, which are static, which are mismatched). Command line (to be wired
in cli.py): ``polymodal data moving-shapes --out DIR --n-train N --n-test M``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import av
import numpy as np
from tqdm import tqdm

from ...fileio import atomic_open
from .workers import remove_stale, sample_map
from ..manifests import write_manifest
from .shapes import (
    BACKGROUND_NAMES,
    BACKGROUNDS_ZH,
    COLOR_NAMES,
    COLORS_ZH,
    DEFAULT_BACKGROUND,
    SHAPES,
    SHAPES_ZH,
    SIZE_FRACTIONS,
    SIZES_ZH,
    SPLIT_IDS,
    TEXTURES,
    TEXTURES_ZH,
    Scene,
    SceneObject,
    ShapesConfig,
    object_bbox,
    render_scene,
    sample_scene,
)

GENERATOR_VERSION = "1.1"   # 1.1: compound order actions, colour and background labels
WORLD_TAG = 7311       # mixed into every seed so MovingShapes never shares a stream with ShapesWorld
SPLITS = ("train", "val", "test")

# ----------------------------------------------------------------------------------------
# Actions and their wording (order of ACTIONS and of each phrase list is part of the data set;
# never reorder without a version bump). Phrase lists of opposite actions are written in
# parallel, so template k of "move_left" mirrors template k of "move_right".
# ----------------------------------------------------------------------------------------
ACTIONS = ["move_left", "move_right", "move_up", "move_down", "grow", "shrink",
           "change_color", "appear", "disappear"]
STATIC = "static"
OPPOSITE = {"move_left": "move_right", "move_right": "move_left", "move_up": "move_down",
            "move_down": "move_up", "grow": "shrink", "shrink": "grow",
            "change_color": "change_color", "appear": "disappear", "disappear": "appear",
            STATIC: STATIC}
NUM_TEMPLATES = 4

# (verb phrase, main verb as it appears in the phrase)
PHRASES_EN: dict[str, list[tuple[str, str]]] = {
    "move_left": [("moves to the left", "moves"), ("slides left", "slides"),
                  ("travels from right to left", "travels"), ("drifts leftward", "drifts")],
    "move_right": [("moves to the right", "moves"), ("slides right", "slides"),
                   ("travels from left to right", "travels"), ("drifts rightward", "drifts")],
    "move_up": [("moves up", "moves"), ("slides upward", "slides"),
                ("travels from the bottom to the top", "travels"), ("rises", "rises")],
    "move_down": [("moves down", "moves"), ("slides downward", "slides"),
                  ("travels from the top to the bottom", "travels"), ("sinks", "sinks")],
    "grow": [("grows", "grows"), ("gets bigger", "gets"), ("expands", "expands"),
             ("becomes larger", "becomes")],
    "shrink": [("shrinks", "shrinks"), ("gets smaller", "gets"), ("contracts", "contracts"),
               ("becomes smaller", "becomes")],
    "change_color": [("turns from {a} to {b}", "turns"), ("changes colour from {a} to {b}", "changes"),
                     ("goes from {a} to {b}", "goes"), ("fades from {a} to {b}", "fades")],
    "appear": [("appears", "appears"), ("fades in", "fades"), ("comes into view", "comes"),
               ("shows up", "shows")],
    "disappear": [("disappears", "disappears"), ("fades out", "fades"),
                  ("goes out of view", "goes"), ("vanishes", "vanishes")],
    STATIC: [("stays still", "stays"), ("does not move", "move"), ("stays in place", "stays"),
             ("remains still", "remains")],
}
PHRASES_ZH: dict[str, list[str]] = {
    "move_left": ["向左移动", "向左滑动", "从右边移到左边", "慢慢往左移"],
    "move_right": ["向右移动", "向右滑动", "从左边移到右边", "慢慢往右移"],
    "move_up": ["向上移动", "向上滑动", "从下方移到上方", "慢慢升起"],
    "move_down": ["向下移动", "向下滑动", "从上方移到下方", "慢慢落下"],
    "grow": ["变大", "变得更大", "逐渐放大", "越变越大"],
    "shrink": ["变小", "变得更小", "逐渐缩小", "越变越小"],
    "change_color": ["从{a}变成{b}", "的颜色从{a}变为{b}", "由{a}变成了{b}", "从{a}渐渐变成{b}"],
    "appear": ["出现了", "渐渐显现", "进入了画面", "慢慢出现"],
    "disappear": ["消失了", "渐渐隐去", "离开了画面", "慢慢消失"],
    STATIC: ["静止不动", "一动不动", "停在原处", "保持不动"],
}

# Compound order actions: (first action, second action); the second undoes the first, so the
# video returns to its first state. COMPOUND_SWAP maps each to the one with its halves swapped.
COMPOUNDS = {"move_left_right": ("move_left", "move_right"), "move_right_left": ("move_right", "move_left"),
             "move_up_down": ("move_up", "move_down"), "move_down_up": ("move_down", "move_up"),
             "grow_shrink": ("grow", "shrink"), "shrink_grow": ("shrink", "grow"),
             "appear_disappear": ("appear", "disappear"), "disappear_appear": ("disappear", "appear")}
COMPOUND_SWAP = {"move_left_right": "move_right_left", "move_right_left": "move_left_right",
                 "move_up_down": "move_down_up", "move_down_up": "move_up_down",
                 "grow_shrink": "shrink_grow", "shrink_grow": "grow_shrink",
                 "appear_disappear": "disappear_appear", "disappear_appear": "appear_disappear"}
for _c, (_a, _b) in COMPOUNDS.items():
    # Paraphrase k joins paraphrase k of both halves; a time reversal gives the same compound.
    PHRASES_EN[_c] = [(f"{pa} and then {pb}", va) for (pa, va), (pb, _) in zip(PHRASES_EN[_a], PHRASES_EN[_b])]
    PHRASES_ZH[_c] = [f"先{za}，然后{zb}" for za, zb in zip(PHRASES_ZH[_a], PHRASES_ZH[_b])]
    OPPOSITE[_c] = _c
del _c, _a, _b

# ----------------------------------------------------------------------------------------
# Scene labels: parents, action children, frame-level labels (order fixes the indices)
# ----------------------------------------------------------------------------------------
PARENTS = ["motion", "size change", "colour change", "visibility", "static"]
PARENTS_ZH = {"motion": "运动", "size change": "大小变化", "colour change": "颜色变化",
              "visibility": "出现或消失", "static": "静止"}
ACTION_PARENT = {"move_left": "motion", "move_right": "motion", "move_up": "motion",
                 "move_down": "motion", "grow": "size change", "shrink": "size change",
                 "change_color": "colour change", "appear": "visibility",
                 "disappear": "visibility", STATIC: "static"}
_FIXED_CHILDREN = {"move_left": ("moves left", "向左移动"), "move_right": ("moves right", "向右移动"),
                   "move_up": ("moves up", "向上移动"), "move_down": ("moves down", "向下移动"),
                   "grow": ("grows", "变大"), "shrink": ("shrinks", "变小"),
                   "appear": ("appears", "出现"), "disappear": ("disappears", "消失"),
                   STATIC: ("stays still", "静止不动")}
_COMPOUND_CHILDREN = {"move_left_right": ("moves left then right", "先向左再向右移动"),
                      "move_right_left": ("moves right then left", "先向右再向左移动"),
                      "move_up_down": ("moves up then down", "先向上再向下移动"),
                      "move_down_up": ("moves down then up", "先向下再向上移动"),
                      "grow_shrink": ("grows then shrinks", "先变大再变小"),
                      "shrink_grow": ("shrinks then grows", "先变小再变大"),
                      "appear_disappear": ("appears then disappears", "先出现再消失"),
                      "disappear_appear": ("disappears then appears", "先消失再出现")}
for _c, (_a, _) in COMPOUNDS.items():
    ACTION_PARENT[_c] = ACTION_PARENT[_a]
del _c, _a, _


def _child_names() -> list[tuple[str, str, str]]:
    """(name, Chinese name, parent) of every action child, in index order."""
    out = [(*_FIXED_CHILDREN[a], ACTION_PARENT[a]) for a in ACTIONS[:6]]
    out += [(f"turns {c}", f"变成{COLORS_ZH[c]}", "colour change") for c in COLOR_NAMES]
    out += [(*_FIXED_CHILDREN[a], ACTION_PARENT[a]) for a in ("appear", "disappear", STATIC)]
    return out


def colour_label(color: str) -> str:
    """Single-frame label of an object colour ("red object")."""
    return f"{color} object"


def background_label(background: str) -> str:
    """Single-frame label of a background ("white background")."""
    return f"{background} background"


def class_table() -> dict[str, Any]:
    """The scene-label classes, as written to ``classes.json``.

    Index order (never reorder: record ``labels`` index it): parents, single action children,
    "contains <shape>", then (version 1.1) compound order children, "<colour> object",
    "<background> background". Old indices keep their meaning.

    Returns:
        Dict with "classes" (English names), "classes_zh" (same order), "parents"
        ({child: parent}; compound children hang under the parent of their first half),
        "temporal" (single action names whose truth flips when the video is reversed),
        "frame_level" ("contains <shape>", decidable from one frame), "parent_classes",
        "action_classes" (the names ``label`` indexes among "classes", compounds included),
        "groups" ({"order_dependent", "single_frame", "order_compound", "colour",
        "background"}: label names), "label_info" (per label: name, name_zh, parent,
        group = "order" / "single_frame" / "parent" / "order_free"), and the vocabularies
        ("shapes", "colors", "sizes", "textures", "backgrounds").
    """
    children = _child_names()
    frame = [(f"contains {s}", f"含有{SHAPES_ZH[s]}") for s in SHAPES]
    compound = [(*_COMPOUND_CHILDREN[c], ACTION_PARENT[c]) for c in COMPOUNDS]
    colours = [(colour_label(c), f"{COLORS_ZH[c]}物体") for c in COLOR_NAMES]
    backgrounds = [(background_label(b), f"{BACKGROUNDS_ZH[b]}背景") for b in BACKGROUND_NAMES]
    single = frame + colours + backgrounds
    classes = PARENTS + [c[0] for c in children] + [f[0] for f in frame] + [c[0] for c in compound] \
        + [c[0] for c in colours] + [b[0] for b in backgrounds]
    classes_zh = [PARENTS_ZH[p] for p in PARENTS] + [c[1] for c in children] + [f[1] for f in frame] \
        + [c[1] for c in compound] + [c[1] for c in colours] + [b[1] for b in backgrounds]
    parents = {name: parent for name, _, parent in children + compound}
    temporal = [name for name, _, parent in children if parent != "static"]
    order = temporal + [c[0] for c in compound]
    single_names = [f[0] for f in single]

    def group(name: str) -> str:
        if name in PARENTS:
            return "parent"
        return "order" if name in order else "single_frame" if name in single_names else "order_free"
    return {
        "classes": classes,
        "classes_zh": classes_zh,
        "parents": parents,
        "temporal": temporal,
        "frame_level": [f[0] for f in frame],
        "parent_classes": list(PARENTS),
        "action_classes": [c[0] for c in children] + [c[0] for c in compound],
        "groups": {"order_dependent": order, "single_frame": single_names,
                   "order_compound": [c[0] for c in compound], "colour": [c[0] for c in colours],
                   "background": [b[0] for b in backgrounds]},
        "label_info": [{"name": n, "name_zh": z, "parent": parents.get(n), "group": group(n)}
                       for n, z in zip(classes, classes_zh)],
        "shapes": list(SHAPES),
        "colors": list(COLOR_NAMES),
        "sizes": ["small", "medium", "large"],
        "textures": list(TEXTURES),
        "backgrounds": list(BACKGROUND_NAMES),
    }


def action_class(action: str, color_to: str | None = None) -> str:
    """English child-label name of an action ("moves left", "turns blue", "stays still")."""
    if action == "change_color":
        return f"turns {color_to}"
    if action in COMPOUNDS:
        return _COMPOUND_CHILDREN[action][0]
    return _FIXED_CHILDREN[action][0]


# ----------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------
@dataclass
class MovingShapesConfig:
    num_frames: int = 16          # frames per video
    image_size: int = 64          # frame side in pixels (even: yuv420p halves the chroma planes)
    fps: int = 8
    min_objects: int = 1          # objects per video incl. the actor, inclusive
    max_objects: int = 3          # at most 7: a moving actor keeps its whole row/column free
    textures: bool = True         # False = every object solid
    backgrounds: bool = True      # False = every video on DEFAULT_BACKGROUND
    antialias: bool = True        # frames drawn at 2x and box-downsampled (ShapesWorld renderer)
    pair_fraction: float = 0.5    # records in reversed pairs (rounded down to an even count)
    static_fraction: float = 0.2  # order-free static records
    distractor_fraction: float = 0.0  # action videos whose action fills only part of the video
    mismatch_fraction: float = 0.0    # records whose caption is another record's
    compound_fraction: float = 0.0    # single (unpaired) action videos that do a compound order action
    gop: int = 4                  # key-frame interval of the encoder
    crf: int = 0                  # x264 constant rate factor; 0 = lossless
    preset: str = "veryfast"      # x264 preset

    def __post_init__(self) -> None:
        if not 4 <= self.num_frames <= 64:
            raise ValueError(f"MovingShapesConfig.num_frames must be in 4..64, got {self.num_frames}")
        if self.image_size < 16 or self.image_size % 2:
            raise ValueError("MovingShapesConfig.image_size must be even and >= 16 (yuv420p needs "
                             f"an even frame size), got {self.image_size}")
        if self.fps < 1:
            raise ValueError(f"MovingShapesConfig.fps must be >= 1, got {self.fps}")
        if not 1 <= self.min_objects <= self.max_objects <= 7:
            raise ValueError("MovingShapesConfig needs 1 <= min_objects <= max_objects <= 7, got "
                             f"min_objects={self.min_objects}, max_objects={self.max_objects}")
        for name in ("pair_fraction", "static_fraction", "distractor_fraction", "mismatch_fraction",
                     "compound_fraction"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"MovingShapesConfig.{name} must be in [0, 1], got {v}")
        if self.pair_fraction + self.static_fraction > 1.0 + 1e-9:
            raise ValueError("MovingShapesConfig.pair_fraction + static_fraction must be <= 1, got "
                             f"{self.pair_fraction} + {self.static_fraction}")
        if self.gop < 1:
            raise ValueError(f"MovingShapesConfig.gop must be >= 1, got {self.gop}")
        if not 0 <= self.crf <= 51:
            raise ValueError(f"MovingShapesConfig.crf must be in 0..51, got {self.crf}")


# ----------------------------------------------------------------------------------------
# Split plan: which indices are pairs, static, single action videos
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Slot:
    """What record ``index`` of a split is."""

    kind: str                     # "action" or "static"
    content: int                  # content seed index (the first index of its unit)
    member: int                   # 0, or 1 for the reversed copy of a pair
    pair_id: int | None           # shared by the two records of a pair


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), WORLD_TAG, *map(int, keys)]))


def _split_id(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    return SPLIT_IDS[split]


def split_counts(n: int, cfg: MovingShapesConfig) -> dict[str, int]:
    """How many records of a split of size ``n`` are paired, static and single action videos."""
    paired = 2 * int(cfg.pair_fraction * n / 2 + 1e-9)
    static = min(int(cfg.static_fraction * n + 0.5), n - paired)
    return {"paired": paired, "static": static, "single": n - paired - static}


def split_plan(seed: int, split: str, n: int, cfg: MovingShapesConfig) -> list[Slot]:
    """The slot of every record of a split.

    Units (a pair = 2 consecutive records, a static record, a single action record) are
    shuffled with a generator of (seed, split, n), so pairs are spread over the split.

    Args:
        seed: data set seed.
        split: "train", "val" or "test".
        n: number of records in the split.
        cfg: generator config (pair_fraction, static_fraction).

    Returns:
        ``n`` slots; record ``i`` is ``plan[i]``.
    """
    counts = split_counts(n, cfg)
    units = ["pair"] * (counts["paired"] // 2) + ["static"] * counts["static"] + ["single"] * counts["single"]
    order = _rng(seed, _split_id(split), n, 1).permutation(len(units))
    plan: list[Slot] = []
    pair_no = 0
    for u in order:
        first = len(plan)
        if units[u] == "pair":
            plan += [Slot("action", first, 0, pair_no), Slot("action", first, 1, pair_no)]
            pair_no += 1
        else:
            plan.append(Slot("action" if units[u] == "single" else "static", first, 0, None))
    return plan


# ----------------------------------------------------------------------------------------
# Video content
# ----------------------------------------------------------------------------------------
@dataclass
class VideoSpec:
    """Everything needed to draw one video (before any time reversal)."""

    action: str
    actor: SceneObject            # the actor's first state (colour A, start size, start place)
    end_cx: float                 # actor's last state (equal to the first unless it changes)
    end_cy: float
    end_side: float
    size_to: str
    color_to: str
    statics: list[SceneObject]
    background: str
    template: int
    action_start: int             # first frame of the action segment
    action_len: int               # frames in the action segment (>= 2)
    distractor: str = "none"      # "none" | "still" | "unrelated"
    unrelated: Scene | None = None


def _pick(rng: np.random.Generator, items: list) -> Any:
    return items[int(rng.integers(len(items)))]


def _span(rng: np.random.Generator, band: int, side: float) -> float:
    """Centre (image fraction) of a box of ``side`` placed at random inside grid band ``band``."""
    cell = 1.0 / 3.0
    margin = 0.04 * cell          # keeps boxes of neighbouring cells apart (as in ShapesWorld)
    free = max(cell - side - 2 * margin, 0.0)
    return band * cell + margin + float(rng.uniform(0.0, free)) + side / 2


def _side(size: str) -> float:
    return SIZE_FRACTIONS[size] / 3.0


def sample_video(rng: np.random.Generator, kind: str, cfg: MovingShapesConfig,
                 action: str | None = None) -> VideoSpec:
    """Sample the content of one video.

    Draw order: action, template, actor, static objects, background, then distractors last,
    so ``distractor_fraction`` changes nothing else about a video.

    Args:
        rng: numpy Generator; the video is a pure function of its state.
        kind: "action" (one of ACTIONS) or "static".
        cfg: generator config.
        action: a compound action (a COMPOUNDS key) to use instead of drawing one; the actor
            is placed as for the compound's first half, and compound videos get no distractors.

    Returns:
        A :class:`VideoSpec` (for a compound, ``end_*`` / ``size_to`` are the turning state).
    """
    if action is None:
        action = _pick(rng, ACTIONS) if kind == "action" else STATIC
    elif action not in COMPOUNDS:
        raise ValueError(f"sample_video: action override must be one of {list(COMPOUNDS)}, got {action!r}")
    compound, action = action, COMPOUNDS[action][0] if action in COMPOUNDS else action
    template = int(rng.integers(NUM_TEMPLATES))
    shape, color = _pick(rng, SHAPES), _pick(rng, COLOR_NAMES)
    texture = _pick(rng, TEXTURES) if cfg.textures else "solid"
    row, col = int(rng.integers(3)), int(rng.integers(3))
    size = _pick(rng, ["small", "medium", "large"])
    color_to, size_to = color, size
    if action in ("grow", "shrink"):
        size, size_to = ("small", "large") if action == "grow" else ("large", "small")
        side = _side(size)
        cx, cy = (col + 0.5) / 3.0, (row + 0.5) / 3.0   # centred: the large state fills the cell
        end_cx, end_cy, end_side = cx, cy, _side(size_to)
    elif action in ("move_left", "move_right"):
        side = _side(size)
        a, b = _span(rng, 0, side), _span(rng, 2, side)   # from the first to the last column
        cx, end_cx = (b, a) if action == "move_left" else (a, b)
        cy = end_cy = _span(rng, row, side)
        end_side = side
    elif action in ("move_up", "move_down"):
        side = _side(size)
        a, b = _span(rng, 0, side), _span(rng, 2, side)
        cy, end_cy = (b, a) if action == "move_up" else (a, b)
        cx = end_cx = _span(rng, col, side)
        end_side = side
    else:
        side = _side(size)
        cx, cy = _span(rng, col, side), _span(rng, row, side)
        end_cx, end_cy, end_side = cx, cy, side
        if action == "change_color":
            color_to = _pick(rng, [c for c in COLOR_NAMES if c != color])
    actor = SceneObject(shape, color, size, texture, (row, col), cx, cy, side)

    # Static objects avoid the actor's cell and, when it moves, its whole row or column.
    if action in ("move_left", "move_right"):
        free = [(r, c) for r in range(3) for c in range(3) if r != row]
    elif action in ("move_up", "move_down"):
        free = [(r, c) for r in range(3) for c in range(3) if c != col]
    else:
        free = [(r, c) for r in range(3) for c in range(3) if (r, c) != (row, col)]
    n_static = min(int(rng.integers(cfg.min_objects, cfg.max_objects + 1)) - 1, len(free))
    statics = []
    for k in sorted(int(k) for k in rng.choice(len(free), size=n_static, replace=False)):
        r, c = free[k]
        s_size = _pick(rng, ["small", "medium"])
        s_texture = _pick(rng, TEXTURES) if cfg.textures else "solid"
        s_shape, s_color = _pick(rng, SHAPES), _pick(rng, COLOR_NAMES)
        s_side = _side(s_size)
        statics.append(SceneObject(s_shape, s_color, s_size, s_texture, (r, c),
                                   _span(rng, c, s_side), _span(rng, r, s_side), s_side))
    background = _pick(rng, BACKGROUND_NAMES) if cfg.backgrounds else DEFAULT_BACKGROUND

    T = cfg.num_frames
    spec = VideoSpec(compound, actor, end_cx, end_cy, end_side, size_to, color_to, statics,
                     background, template, action_start=0, action_len=T)
    if compound in COMPOUNDS:
        return spec
    if action != STATIC and rng.random() < cfg.distractor_fraction:
        lo, hi = max(2, T // 4), max(2, T // 2)
        spec.action_len = int(rng.integers(lo, hi + 1))
        spec.action_start = int(rng.integers(0, T - spec.action_len + 1))
        spec.distractor = _pick(rng, ["still", "unrelated"])
        if spec.distractor == "unrelated":
            scfg = ShapesConfig(image_size=cfg.image_size, min_objects=1, max_objects=3,
                                textures=cfg.textures, backgrounds=cfg.backgrounds)
            spec.unrelated = sample_scene(rng, scfg)
    return spec


def build_video(seed: int, split: str, slot: Slot, cfg: MovingShapesConfig) -> VideoSpec:
    """The content of a slot: a pure function of (seed, split, slot.content, slot.kind).

    Whether a single (unpaired) action video is a compound is decided by a generator of its
    own, so ``compound_fraction = 0`` leaves every video as it was before compounds existed.
    """
    rng = _rng(seed, _split_id(split), slot.content, 0)
    if slot.kind == "action" and slot.pair_id is None and cfg.compound_fraction > 0:
        crng = _rng(seed, _split_id(split), slot.content, 3)
        if crng.random() < cfg.compound_fraction:
            return sample_video(rng, slot.kind, cfg, action=_pick(crng, list(COMPOUNDS)))
    return sample_video(rng, slot.kind, cfg)


def half_swapped(spec: VideoSpec) -> VideoSpec:
    """The compound video whose frames are ``spec``'s with its two halves swapped.

    "moves left then right" (right -> left -> right) becomes "moves right then left"
    (left -> right -> left) over the same positions; for an even number of frames the swapped
    video is exactly ``np.roll(frames, -T // 2, axis=0)``.

    Args:
        spec: a compound video (``spec.action`` in COMPOUNDS).

    Returns:
        The spec of the opposite compound, same objects, background and template.
    """
    if spec.action not in COMPOUNDS:
        raise ValueError(f"half_swapped needs a compound action ({list(COMPOUNDS)}), got {spec.action!r}")
    a0 = spec.actor
    first = replace(a0, cx=spec.end_cx, cy=spec.end_cy, side=spec.end_side, size=spec.size_to)
    return replace(spec, action=COMPOUND_SWAP[spec.action], actor=first, end_cx=a0.cx, end_cy=a0.cy,
                   end_side=a0.side, size_to=a0.size)


def _progress(spec: VideoSpec, t: int, T: int) -> float:
    """Progress of frame ``t`` from the first state (0) to the end/turning state (1)."""
    if spec.action in COMPOUNDS:
        h = T // 2                                  # first half goes out, second half comes back
        return t / (h - 1) if t < h else 1.0 - (t - h) / (T - 1 - h)
    k = t - spec.action_start
    return min(max(k / (spec.action_len - 1), 0.0), 1.0)   # held at 0 / 1 outside the action


def _lerp(a: float, b: float, p: float) -> float:
    return a + (b - a) * p


def render_frames(spec: VideoSpec, cfg: MovingShapesConfig) -> tuple[np.ndarray, list[list[int] | None]]:
    """Draw a video and the actor's box per frame.

    Args:
        spec: the video content.
        cfg: generator config (num_frames, image_size, antialias).

    Returns:
        frames ``(T, H, W, 3)`` uint8 RGB and, per frame, ``[x0, y0, x1, y1]`` (x1, y1
        exclusive) of the actor or ``None`` where it is invisible.
    """
    T, size, aa = cfg.num_frames, cfg.image_size, cfg.antialias

    def draw(objects: list[SceneObject]) -> np.ndarray:
        return np.asarray(render_scene(Scene(objects, 0, spec.background), size, aa))

    def blend(a: np.ndarray, b: np.ndarray, w: float) -> np.ndarray:
        return np.rint((1.0 - w) * a.astype(np.float32) + w * b.astype(np.float32)).astype(np.uint8)

    a0 = spec.actor
    base = COMPOUNDS[spec.action][0] if spec.action in COMPOUNDS else spec.action
    # Two fixed images are enough for colour and visibility changes: the frame is their blend.
    if base == "change_color":
        ends = (draw(spec.statics + [a0]), draw(spec.statics + [replace(a0, color=spec.color_to)]))
    elif base in ("appear", "disappear"):
        hidden, shown = draw(spec.statics), draw(spec.statics + [a0])
        ends = (hidden, shown) if base == "appear" else (shown, hidden)
    else:
        ends = None
    unrelated = np.asarray(render_scene(spec.unrelated, size, aa)) if spec.unrelated is not None else None

    frames, boxes = [], []
    cache: dict[float, tuple[np.ndarray, list[int] | None]] = {}
    for t in range(T):
        k = t - spec.action_start
        if spec.distractor == "unrelated" and not 0 <= k < spec.action_len:
            frames.append(unrelated)
            boxes.append(None)
            continue
        p = _progress(spec, t, T)
        if p not in cache:
            if ends is not None:
                image = blend(ends[0], ends[1], p)
                alpha = {"appear": p, "disappear": 1.0 - p}.get(base, 1.0)
                box = object_bbox(a0, size, aa) if alpha > 0 else None
            else:
                obj = replace(a0, cx=_lerp(a0.cx, spec.end_cx, p), cy=_lerp(a0.cy, spec.end_cy, p),
                              side=_lerp(a0.side, spec.end_side, p))
                image, box = draw(spec.statics + [obj]), object_bbox(obj, size, aa)
            cache[p] = (image, box)
        frames.append(cache[p][0])
        boxes.append(cache[p][1])
    return np.stack(frames), boxes


def encode_video(path: str | os.PathLike, frames: np.ndarray, cfg: MovingShapesConfig) -> None:
    """Write frames ``(T, H, W, 3)`` uint8 as an H.264 MP4, atomically.

    One encoder thread and fixed options keep the bytes identical from run to run.

    Args:
        path: destination ``.mp4``.
        frames: RGB frames with even H and W.
        cfg: generator config (fps, gop, crf, preset).
    """
    with atomic_open(path, "wb") as fh:
        os.fchmod(fh.fileno(), 0o644)   # the temporary file starts private (0600); a data set is not
        container = av.open(fh, mode="w", format="mp4")
        try:
            stream = container.add_stream("libx264", rate=cfg.fps)
            stream.width, stream.height = frames.shape[2], frames.shape[1]
            stream.pix_fmt = "yuv420p"
            stream.codec_context.gop_size = cfg.gop
            stream.codec_context.thread_count = 1
            stream.options = {"crf": str(cfg.crf), "preset": cfg.preset, "threads": "1"}
            for image in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        finally:
            container.close()


# ----------------------------------------------------------------------------------------
# Captions and record
# ----------------------------------------------------------------------------------------
def _article(phrase: str) -> str:
    return "an" if phrase[:1] in "aeiou" else "a"


def describe(action: str, shape: str, texture: str, color: str, size: str,
             color_to: str, template: int) -> dict[str, Any]:
    """Captions and caption words of a video seen in a given time direction.

    The subject names size, colour, texture and shape, except that a size change does not
    name the size and a colour change does not name the colour (both would give the time
    direction away or be wrong for part of the video).

    Args:
        action: one of ACTIONS or "static", in the direction the video is shown.
        shape, texture, color, size: the actor's first visible state.
        color_to: the last colour (a colour change goes from ``color`` to ``color_to``).
        template: index of the chosen paraphrase.

    Returns:
        Dict with "caption", "captions" (4 paraphrases), "caption_zh", "captions_zh",
        "verb", "nouns", "adjectives" (words of "caption" in caption order).
    """
    with_size = action not in ("grow", "shrink", "grow_shrink", "shrink_grow")
    with_color = action != "change_color"
    adjectives = ([size] if with_size else []) + ([color] if with_color else []) \
        + ([texture] if texture != "solid" else [])
    subject = " ".join(adjectives + [shape])
    subject_zh = (SIZES_ZH[size] if with_size else "") + TEXTURES_ZH[texture] \
        + (COLORS_ZH[color] if with_color else "") + SHAPES_ZH[shape]
    captions, verbs = [], []
    for phrase, verb in PHRASES_EN[action]:
        captions.append(f"{_article(subject)} {subject} {phrase.format(a=color, b=color_to)}")
        verbs.append(verb)
    captions_zh = [f"一个{subject_zh}{p.format(a=COLORS_ZH[color], b=COLORS_ZH[color_to])}"
                   for p in PHRASES_ZH[action]]
    t = template % NUM_TEMPLATES
    if action == "change_color":
        adjectives = adjectives + [color, color_to]
    return {"caption": captions[t], "captions": captions, "caption_zh": captions_zh[t],
            "captions_zh": captions_zh, "verb": verbs[t], "nouns": [shape], "adjectives": adjectives}


def video_record(spec: VideoSpec, slot: Slot, cfg: MovingShapesConfig,
                 classes: list[str]) -> tuple[dict, np.ndarray]:
    """Frames and manifest record (without "video") of a slot; member 1 is the time reversal.

    Args:
        spec: the slot's content.
        slot: the slot (``member == 1`` reverses time).
        cfg: generator config.
        classes: ``class_table()["classes"]``, for the label indices.

    Returns:
        (record dict, frames ``(T, H, W, 3)`` uint8).
    """
    frames, boxes = render_frames(spec, cfg)
    T = cfg.num_frames
    a0 = spec.actor
    action, color, color_to, size = spec.action, a0.color, spec.color_to, a0.size
    action_frames = list(range(spec.action_start, spec.action_start + spec.action_len))
    if action == STATIC:
        action_frames = []
    rev = slot.member == 1
    if rev:
        frames, boxes = frames[::-1], boxes[::-1]
        action = OPPOSITE[action]
        if action not in COMPOUNDS:         # a compound returns to its first state
            color, color_to, size = color_to, color, spec.size_to
        action_frames = sorted(T - 1 - t for t in action_frames)
    words = describe(action, a0.shape, a0.texture, color, size, color_to, spec.template)
    child = action_class(action, color_to)
    drawn = [a0, replace(a0, color=spec.color_to)] + list(spec.statics)
    backgrounds = {spec.background}
    if spec.unrelated is not None:
        drawn += list(spec.unrelated.objects)
        backgrounds.add(spec.unrelated.background)
    present = {o.shape for o in drawn}
    colours = {o.color for o in drawn}
    # "contains X" / "X object" / "X background": some frame shows it (in videos without a colour
    # change, visibility change or unrelated segment, every frame shows it).
    scene_labels = [ACTION_PARENT[action], child] + [f"contains {s}" for s in SHAPES if s in present] \
        + [colour_label(c) for c in COLOR_NAMES if c in colours] \
        + [background_label(b) for b in BACKGROUND_NAMES if b in backgrounds]
    rec: dict[str, Any] = {
        **words,
        "lang": "en",
        "num_frames": T,
        "fps": cfg.fps,
        "image_size": cfg.image_size,
        "action": action,
        "color_from": color if action == "change_color" else None,
        "color_to": color_to if action == "change_color" else None,
        "subject": {"shape": a0.shape, "color": color, "size": size, "texture": a0.texture},
        "label": classes.index(child),
        "labels": sorted(classes.index(n) for n in scene_labels),
        "scene_labels": scene_labels,
        "order_sensitive": action != STATIC,
        "compound": action in COMPOUNDS,
        "pair_id": slot.pair_id,
        "reversed": rev,
        "action_frames": action_frames,
        "boxes": boxes,
        "distractor": spec.distractor,
        "mismatched": False,
        "objects": [{"shape": o.shape, "color": o.color, "size": o.size, "texture": o.texture,
                     "bbox": object_bbox(o, cfg.image_size, cfg.antialias)} for o in spec.statics],
        "background": spec.background,
        "background_zh": BACKGROUNDS_ZH[spec.background],
        "template": spec.template,
    }
    return rec, np.ascontiguousarray(frames)


# ----------------------------------------------------------------------------------------
# Writing a data set
# ----------------------------------------------------------------------------------------
_WORKER: dict[str, Any] = {}
_CAPTION_KEYS = ("caption", "captions", "caption_zh", "captions_zh", "verb", "nouns", "adjectives")


def _init_worker(out_dir: str, seed: int, cfg_dict: dict) -> None:
    _WORKER.update(out_dir=out_dir, seed=seed, cfg=MovingShapesConfig(**cfg_dict),
                   classes=class_table()["classes"])


def _make_one(task: tuple[str, int, Slot]) -> dict[str, Any]:
    """Render, encode and describe one record; runs in a worker (or in-process)."""
    split, index, slot = task
    cfg: MovingShapesConfig = _WORKER["cfg"]
    spec = build_video(_WORKER["seed"], split, slot, cfg)
    rec, frames = video_record(spec, slot, cfg, _WORKER["classes"])
    rel = f"videos/{split}_{index:06d}.mp4"
    encode_video(os.path.join(_WORKER["out_dir"], rel), frames, cfg)
    return {"video": rel, **rec}


def apply_mismatches(records: list[dict], seed: int, split: str, fraction: float) -> list[int]:
    """Give exactly ``round(fraction * n)`` records another record's caption, in place.

    A mismatched record keeps its video and labels; its caption fields (``caption``,
    ``captions``, ``caption_zh``, ``captions_zh``, ``verb``, ``nouns``, ``adjectives``) are the
    donor's true ones, ``true_caption`` / ``true_caption_zh`` keep its own, ``mismatch_source``
    names the donor index. Donors are never the pair partner and never have a caption that
    is one of the record's own paraphrases.

    Args:
        records: the split's records (with true captions).
        seed: data set seed.
        split: split name (mixed into the generator).
        fraction: share of records to mismatch.

    Returns:
        The mismatched indices, sorted.

    Raises:
        ValueError: no valid donor exists for a chosen record.
    """
    n = len(records)
    m = int(fraction * n + 0.5)
    if m == 0:
        return []
    rng = _rng(seed, _split_id(split), n, 2)
    chosen = sorted(int(i) for i in rng.choice(n, size=m, replace=False))
    true = [{k: r[k] for k in _CAPTION_KEYS} for r in records]
    for i in chosen:
        rec = records[i]
        donor = None
        for j in rng.permutation(n):
            j = int(j)
            partner = rec["pair_id"] is not None and records[j]["pair_id"] == rec["pair_id"]
            if j != i and not partner and true[j]["caption"] not in true[i]["captions"]:
                donor = j
                break
        if donor is None:
            raise ValueError(f"{split}: record {i} has no record with a different caption to take "
                             "one from; use more records or mismatch_fraction=0")
        rec.update({k: true[donor][k] for k in _CAPTION_KEYS})
        rec.update(mismatched=True, true_caption=true[i]["caption"],
                   true_caption_zh=true[i]["caption_zh"], mismatch_source=donor)
    return chosen


def _write_json(path: Path, obj: Any) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(obj, ensure_ascii=False, indent=1) + "\n")


def _split_stats(records: list[dict]) -> dict[str, Any]:
    actions: dict[str, int] = {}
    for r in records:
        actions[r["action"]] = actions.get(r["action"], 0) + 1
    return {
        "records": len(records),
        "pairs": len({r["pair_id"] for r in records if r["pair_id"] is not None}),
        "order_sensitive": sum(r["order_sensitive"] for r in records),
        "static": sum(not r["order_sensitive"] for r in records),
        "with_distractors": sum(r["distractor"] != "none" for r in records),
        "mismatched": sum(r["mismatched"] for r in records),
        "compound": sum(r["compound"] for r in records),
        "actions": dict(sorted(actions.items())),
    }


def generate_moving_shapes(
    out_dir: str | os.PathLike,
    n_train: int = 2000,
    n_test: int = 200,
    seed: int = 0,
    num_frames: int = 16,
    image_size: int = 64,
    fps: int = 8,
    workers: int = 2,
    distractor_fraction: float = 0.0,
    mismatch_fraction: float = 0.0,
    pair_fraction: float = 0.5,
    static_fraction: float = 0.2,
    n_val: int = 0,
    progress: bool = True,
    **options: Any,
) -> dict[str, Any]:
    """Generate a MovingShapes data set on disk.

    Writes ``videos/<split>_<index>.mp4``, ``train.jsonl``, ``test.jsonl`` (and ``val.jsonl``
    when ``n_val > 0``), ``classes.json`` and ``world.json`` into ``out_dir``; manifests and
    JSON files last, each atomically.

    Args:
        out_dir: output folder (created if missing; files of the same names are replaced, and the
            videos and split manifests an earlier generation left there are deleted: "removed" counts them).
        n_train: training videos.
        n_test: test videos.
        seed: data set seed.
        num_frames: frames per video.
        image_size: frame side in pixels (even).
        fps: frame rate stored in the files and records.
        workers: processes that render and encode (1 = in this process); the output does not
            depend on it.
        distractor_fraction: share of action videos with static distractor segments.
        mismatch_fraction: share of records per split whose caption is another record's.
        pair_fraction: share of records in reversed (order-sensitive) pairs.
        static_fraction: share of order-free static records.
        n_val: validation videos (0 = no val split).
        progress: show a tqdm bar per split.
        **options: other :class:`MovingShapesConfig` fields (min_objects, max_objects, textures,
            backgrounds, antialias, gop, crf, preset).

    Returns:
        Dict with "out_dir", "counts", "manifests" (split -> path), "classes", "world" (paths),
        "stats" (per split: pairs, static, distractor and mismatched counts, actions), "removed"
        (stale files deleted) and "seconds" (wall time).
    """
    known = {f.name for f in fields(MovingShapesConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"generate_moving_shapes: unknown option(s) {unknown}; "
                        f"valid MovingShapesConfig fields are {sorted(known)}")
    cfg = MovingShapesConfig(num_frames=num_frames, image_size=image_size, fps=fps,
                             distractor_fraction=distractor_fraction,
                             mismatch_fraction=mismatch_fraction, pair_fraction=pair_fraction,
                             static_fraction=static_fraction, **options)
    counts = {"train": n_train, "val": n_val, "test": n_test}
    for split, n in counts.items():
        if n < 0:
            raise ValueError(f"n_{split} must be >= 0, got {n}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    splits = [s for s in SPLITS if s != "val" or n_val > 0]

    start = time.perf_counter()
    out = Path(out_dir)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    init_args = (str(out), int(seed), asdict(cfg))
    records: dict[str, list[dict]] = {}
    with sample_map(workers, sum(counts.values()), _init_worker, init_args, max_chunk=32) as run:
        for split in splits:
            n = counts[split]
            tasks = [(split, i, slot) for i, slot in enumerate(split_plan(seed, split, n, cfg))]
            bar = tqdm(total=n, desc=f"moving-shapes {split}", unit="video",
                       disable=not progress or n == 0)
            it = run(_make_one, tasks)
            records[split] = []
            for rec in it:
                records[split].append(rec)
                bar.update(1)
            bar.close()

    manifests = {}
    for split, recs in records.items():
        apply_mismatches(recs, seed, split, cfg.mismatch_fraction)
        path = out / f"{split}.jsonl"
        # write_manifest takes relative paths as relative to the current directory.
        write_manifest([{**r, "video": str(out / r["video"])} for r in recs], path)
        manifests[split] = str(path)
    _write_json(out / "classes.json", class_table())
    stats = {split: _split_stats(recs) for split, recs in records.items()}
    world = {"generator": "polymodal.data.synthetic.moving_shapes", "version": GENERATOR_VERSION,
             "seed": int(seed), "counts": {s: counts[s] for s in splits}, "config": asdict(cfg),
             "stats": stats, "codec": {"codec": "libx264", "pix_fmt": "yuv420p", "container": "mp4"}}
    _write_json(out / "world.json", world)
    # last, once the new manifests are in place: what an earlier generation into this folder left behind
    removed = remove_stale(out / "videos", r"(train|val|test)_\d{6}\.mp4",
                           {Path(r["video"]).name for recs in records.values() for r in recs})
    removed += remove_stale(out, r"(train|val|test)\.jsonl", {f"{s}.jsonl" for s in splits})
    return {"out_dir": str(out), "counts": world["counts"], "manifests": manifests,
            "classes": str(out / "classes.json"), "world": str(out / "world.json"),
            "stats": stats, "removed": removed, "seconds": time.perf_counter() - start}


# ----------------------------------------------------------------------------------------
# Command line helpers (for `polymodal data moving-shapes` in polymodal/cli.py)
# ----------------------------------------------------------------------------------------
def add_cli_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `polymodal data moving-shapes` options to ``parser``.

    Args:
        parser: an (sub)parser.

    Returns:
        The same parser.
    """
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--n-train", type=int, default=2000, help="training videos (default 2000)")
    parser.add_argument("--n-test", type=int, default=200, help="test videos (default 200)")
    parser.add_argument("--n-val", type=int, default=0, help="validation videos (default 0: none)")
    parser.add_argument("--seed", type=int, default=0, help="data set seed (default 0)")
    parser.add_argument("--num-frames", type=int, default=16, help="frames per video (default 16)")
    parser.add_argument("--image-size", type=int, default=64, help="frame side, even (default 64)")
    parser.add_argument("--fps", type=int, default=8, help="frame rate (default 8)")
    parser.add_argument("--pair-fraction", type=float, default=0.5,
                        help="share of records in time-reversed pairs (default 0.5)")
    parser.add_argument("--static-fraction", type=float, default=0.2,
                        help="share of order-free static records (default 0.2)")
    parser.add_argument("--distractor-fraction", type=float, default=0.0,
                        help="share of action videos with static distractor frames (default 0)")
    parser.add_argument("--mismatch-fraction", type=float, default=0.0,
                        help="share of records with another record's caption (default 0)")
    parser.add_argument("--compound-fraction", type=float, default=0.0,
                        help="share of unpaired action videos with a compound order action (default 0)")
    parser.add_argument("--workers", type=int, default=2, help="rendering processes (default 2)")
    return parser


def main_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Run the generator from parsed arguments and print a JSON summary.

    Args:
        args: namespace produced by a parser set up with :func:`add_cli_arguments`.

    Returns:
        The dict returned by :func:`generate_moving_shapes`.
    """
    result = generate_moving_shapes(
        args.out, n_train=args.n_train, n_test=args.n_test, n_val=args.n_val, seed=args.seed,
        num_frames=args.num_frames, image_size=args.image_size, fps=args.fps, workers=args.workers,
        distractor_fraction=args.distractor_fraction, mismatch_fraction=args.mismatch_fraction,
        pair_fraction=args.pair_fraction, static_fraction=args.static_fraction,
        compound_fraction=getattr(args, "compound_fraction", 0.0))
    print(json.dumps({"out_dir": os.path.abspath(result["out_dir"]), "counts": result["counts"],
                      "removed": result["removed"], "seconds": result["seconds"]}, indent=1))
    return result


if __name__ == "__main__":  # pragma: no cover - the real entry point is `polymodal data moving-shapes`
    main_from_args(add_cli_arguments(argparse.ArgumentParser(description=__doc__)).parse_args())
