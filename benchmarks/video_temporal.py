"""Temporal modelling vs mean pooling on MovingShapes: order-sensitive and order-free captions.

1. Generates (or reuses) a MovingShapes world (`polymodal.data.synthetic.moving_shapes`): half the moving
   videos come in order-sensitive pairs (the same frames reversed, the opposite caption: "moves left" /
   "moves right", "turns from red to blue" / "from blue to red"), plus static, order-free videos.
2. Trains `recipes/video_{mean,transformer,stan}.yaml` (identical but for `video_clip.temporal.kind`) for each
   seed, reusing finished runs with the same config.
3. Evaluates on the test split:
   - pair accuracy (`polymodal.eval.order.order_pair_accuracy`): for each order-sensitive pair (A, A reversed),
     the share of the two captions that score their own video above the reversed one (a tie, |difference|
     <= 1e-5, counts one half). With every frame used (`--num-frames` equal to `--frames`, the default) mean
     pooling sees the same set of frames in both videos and scores exactly 50% by construction: the claim's
     reference point. With fewer frames the two clips sample different frames, so mean pooling can differ
     from 50%;
   - text->video R@1/5/10 and MdR on the order-sensitive videos and on the order-free (static) ones separately.

Claim (METHODS.md §5): temporal modelling beats mean pooling on order-sensitive captions and ties it on
order-free ones. Usage: `python benchmarks/video_temporal.py --out docs/results/video_temporal --seeds 0 1`.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:          # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from benchmarks.common import (VERDICT_RULE, base_parser, claim, claim_lines, clip_standin, command_line, finish,  # noqa: E402
                               moving_shapes_world, paired_difference, pm_diff, pm_values, set_threads, verdict)

KINDS = ("mean", "transformer", "stan")


def parse_args(argv=None):
    p = base_parser(__doc__, "docs/results/video_temporal", "runs/video_temporal", seeds=[0, 1],
                    out_help="where results.json / results.md go")
    p.add_argument("--data", default="", help="MovingShapes folder (default <runs>/data)")
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--frames", type=int, default=8, help="frames per video in the world")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--num-frames", type=int, default=8, help="frames per clip in training and evaluation")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="extra recipe override for every run (repeatable)")
    p.add_argument("--start", choices=("standin", "scratch"), default="standin",
                   help="standin: every run adapts the CLIP stand-in (benchmarks/common.py::clip_standin, the papers' "
                        "regime); scratch: random weights (the recipes' model section)")
    p.add_argument("--fresh", action="store_true")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def world(args) -> Path:
    return moving_shapes_world(Path(args.data) if args.data else Path(args.runs) / "data", progress=not args.quiet,
                               n_train=args.n_train, n_test=args.n_test, num_frames=args.frames,
                               image_size=args.image_size)


def subsets(data: Path) -> dict[str, Path]:
    """Test manifests of the order-sensitive and the order-free videos."""
    from polymodal.data.manifests import read_manifest
    from polymodal.fileio import atomic_open
    records = read_manifest(data / "test.jsonl", media="video").records
    out = {}
    for name, keep in (("order_sensitive", lambda r: r.get("order_sensitive") and r.get("pair_id") is not None),
                       ("order_free", lambda r: not r.get("order_sensitive"))):
        path = data / f"test_{name}.jsonl"
        with atomic_open(path, "w", encoding="utf-8") as f:
            for r in records:
                if keep(r):
                    row = {k: v for k, v in r.items() if not k.startswith("_")}
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
        out[name] = path
    return out


@torch.no_grad()
def pair_accuracy(model, manifest: Path, num_frames: int) -> dict:
    """`polymodal.eval.order.order_pair_accuracy` of the order-sensitive test videos (ties count half)."""
    from polymodal.data.manifests import read_manifest
    from polymodal.eval.order import order_pair_accuracy
    from polymodal.encode import encode_texts, encode_videos
    records = read_manifest(manifest, media="video").records
    vid, records = encode_videos(model.eval(), records, num_frames=num_frames)     # (N, E), one caption each
    txt = encode_texts(model, [r["caption"] for r in records])                     # (N, E)
    return order_pair_accuracy(txt @ vid.T, list(range(len(records))), [r["pair_id"] for r in records])


def run(args) -> dict:
    import time

    from polymodal.eval.tasks import run_task
    from polymodal.hub import load_model
    from polymodal.train.reuse import train_or_reuse
    from polymodal.train.run import load_recipe
    set_threads(args.threads)
    start = time.time()
    out, runs = Path(args.out), Path(args.runs)
    data = world(args)
    parts = subsets(data)
    start_from = [] if args.start == "scratch" else [
        f"model.path={clip_standin(runs, args.threads or 1, image_size=args.image_size, num_frames=args.frames)}"]
    rows = []
    for seed in args.seeds:            # seed-major: an interrupted run still has every kind at the first seeds
        for kind in args.kinds:
            overrides = [f"out_dir={runs}/{kind}_s{seed}", f"data.train={data}/train.jsonl", f"train.seed={seed}",
                         f"train.steps={args.steps}", f"train.ckpt_every={args.steps}", f"data.num_frames={args.num_frames}",
                         f"train.progress={'false' if args.quiet else 'true'}", "eval.tasks=[]"]
            if args.threads:
                overrides.append(f"train.threads={args.threads}")
            cfg = load_recipe(ROOT / "recipes" / f"video_{kind}.yaml", overrides + start_from + list(args.sets))
            model_dir, seconds, reused = train_or_reuse(cfg, fresh=args.fresh)
            model = load_model(model_dir)
            row = {"kind": kind, "seed": seed, "train_seconds": seconds, "reused": reused,
                   **pair_accuracy(model, parts["order_sensitive"], args.num_frames)}
            for name, path in parts.items():
                m = run_task("video_retrieval", model, str(path), num_frames=args.num_frames)
                for k in ("text_to_video_R@1", "text_to_video_R@5", "text_to_video_R@10", "text_to_video_median_rank"):
                    row[f"{name}/{k}"] = m[k]
                row[f"{name}/num_videos"] = m["num_videos"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"rows": rows, "claims": claims(rows),
              "command": command_line("video_temporal.py", __name__ == "__main__"),
              "world": {"n_train": args.n_train, "n_test": args.n_test, "frames": args.frames,
                        "image_size": args.image_size}}
    return finish(out, result, start, markdown, "video_temporal")


def _per_seed(rows, kind, key, seeds) -> list[float]:
    return [next(r[key] for r in rows if r["kind"] == kind and r["seed"] == s) for s in seeds]


def claims(rows) -> list[dict]:
    """Per temporal kind: beats mean pooling on pair accuracy (paired over seeds, a verdict) and ties it on the
    order-free videos (R@5 seed means within 5 points)."""
    out = []
    kinds = sorted({r["kind"] for r in rows})
    seeds = sorted({r["seed"] for r in rows if r["kind"] == "mean"})
    if not seeds:
        return out
    for kind in (k for k in kinds if k != "mean"):
        d = paired_difference(_per_seed(rows, kind, "pair_accuracy", seeds),
                              _per_seed(rows, "mean", "pair_accuracy", seeds))
        out.append(claim(f"{kind} beats mean pooling on order-sensitive pairs (pair accuracy)",
                         f"{pm_values(_per_seed(rows, kind, 'pair_accuracy', seeds))} vs "
                         f"{pm_values(_per_seed(rows, 'mean', 'pair_accuracy', seeds))}; paired {pm_diff(d)}",
                         verdict(d)))
        key = "order_free/text_to_video_R@5"
        a, b = _per_seed(rows, kind, key, seeds), _per_seed(rows, "mean", key, seeds)
        gap = abs(sum(a) / len(a) - sum(b) / len(b))
        out.append(claim(f"{kind} ties mean pooling on order-free videos (R@5 within 5 points, seed mean)",
                         f"{pm_values(a)} vs {pm_values(b)}", gap <= 5.0))
    return out


def markdown(result) -> str:
    cols = ["pair_accuracy", "pair_ties", "order_sensitive/text_to_video_R@1", "order_sensitive/text_to_video_R@5",
            "order_free/text_to_video_R@1", "order_free/text_to_video_R@5", "train_seconds"]
    lines = ["| temporal | seed | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for r in result["rows"]:
        lines.append(f"| {r['kind']} | {r['seed']} | " + " | ".join(f"{r[c]:.1f}" for c in cols) + " |")
    return "\n".join(["# Temporal modelling vs mean pooling (MovingShapes)", "", f"Command: `{result['command']}`", "",
                      *lines, "", f"Claims (verdict over seeds: {VERDICT_RULE}):", "",
                      *claim_lines(result["claims"]), ""])


if __name__ == "__main__":
    run(parse_args())
