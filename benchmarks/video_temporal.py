"""Temporal modelling vs mean pooling on MovingShapes: order-sensitive and order-free captions.

1. Generates (or reuses) a MovingShapes world (`polymodal.data.synthetic.moving_shapes`): half the moving
   videos come in order-sensitive pairs (the same frames reversed, the opposite caption: "moves left" /
   "moves right", "turns from red to blue" / "from blue to red"), plus static, order-free videos.
2. Trains `recipes/video_{mean,transformer,stan}.yaml` (identical but for `video_clip.temporal.kind`) for each
   seed, reusing finished runs with the same config; every run adapts the CLIP stand-in (`clip_standin`, positions
   on unless `--standin-positions off`; `--start scratch`: random weights). `--kinds` also takes the order variants
   of `VARIANTS` (order loss, partner batches, a larger time embedding, a frozen text tower).
3. Evaluates on the test split:
   - pair accuracy (`polymodal.eval.order.order_pair_accuracy`): for each order-sensitive pair (A, A reversed),
     the share of the two captions that score their own video above the reversed one (a tie, |difference|
     <= 1e-5, counts one half). With every frame used (`--num-frames` equal to `--frames`, the default) mean
     pooling sees the same set of frames in both videos and scores exactly 50% by construction: the claim's
     reference point. With fewer frames the two clips sample different frames, so mean pooling can differ
     from 50%;
   - text->video R@1/5/10 and MdR on the order-sensitive videos and on the order-free (static) ones separately;
   - the measured causes of order blindness (`order_diagnostics`): caption-vs-reversed-caption cosine, video-vs-
     reversal cosine, first-vs-last frame cosine; with `--train-pairs N` also pair accuracy on N training pairs.

Claim (docs/methods.md, M2-RAAP): temporal modelling beats mean pooling on order-sensitive captions and ties it on
order-free ones. Usage: `python benchmarks/video_temporal.py --out docs/results/video_temporal --seeds 0 1 2`.
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
                               machine_line, moving_shapes_world, paired_difference, pm_diff, pm_values, set_threads,
                               verdict)

KINDS = ("mean", "transformer", "stan")
# variant -> (recipe kind, extra overrides): the three modules, then the order options of issue #31 item 7
VARIANTS = {
    "mean": ("mean", []),
    "transformer": ("transformer", []),
    "stan": ("stan", []),
    "transformer+order": ("transformer", ["video_clip.order_weight=1.0"]),
    "stan+order": ("stan", ["video_clip.order_weight=1.0"]),
    "transformer+partners": ("transformer", ["video_clip.partner_batches=true", "data.batch_size=16"]),
    "transformer+order+time1": ("transformer", ["video_clip.order_weight=1.0", "video_clip.temporal.time_init=1.0"]),
    # the text tower (and its projection) held at the stand-in's weights (lr x 1e-6): captions stay as apart as
    # the stand-in put them, so the two partners' order terms no longer cancel on the video side
    "transformer+order+frozen_text": ("transformer", ["video_clip.order_weight=1.0",
                                                      'optim.lr_scale={"base.text": 1.0e-6}']),
    "stan+order+frozen_text": ("stan", ["video_clip.order_weight=1.0",
                                        'optim.lr_scale={"temporal.": 10.0, "base.text": 1.0e-6}']),
    "transformer+frozen_text": ("transformer", ['optim.lr_scale={"base.text": 1.0e-6}']),
    "transformer+order+time1+frozen_text": ("transformer", ["video_clip.order_weight=1.0",
                                                            "video_clip.temporal.time_init=1.0",
                                                            'optim.lr_scale={"base.text": 1.0e-6}']),
    "transformer+order10+time1+frozen_text": ("transformer", ["video_clip.order_weight=10.0",
                                                              "video_clip.temporal.time_init=1.0",
                                                              'optim.lr_scale={"base.text": 1.0e-6}']),
    "transformer+order+time1+frozen_text+partners": ("transformer", ["video_clip.order_weight=1.0",
                                                                     "video_clip.temporal.time_init=1.0",
                                                                     'optim.lr_scale={"base.text": 1.0e-6}',
                                                                     "video_clip.partner_batches=true",
                                                                     "data.batch_size=16"]),
}


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
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(VARIANTS),
                   help="variants: the temporal kinds, and with +order the order loss (video_clip.order_weight=1), "
                        "with +partners order-partner batches (16 pairs = 32 videos a batch)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="extra recipe override for every run (repeatable)")
    p.add_argument("--start", choices=("standin", "scratch"), default="standin",
                   help="standin: every run adapts the CLIP stand-in (benchmarks/common.py::clip_standin, the papers' "
                        "regime); scratch: random weights (the recipes' model section)")
    p.add_argument("--standin-positions", choices=("on", "off"), default="on",
                   help="the stand-in's captions name the actor's place (on, the default stand-in) or not")
    p.add_argument("--standin-runs", default="runs", help="where the CLIP stand-in is built and cached (<dir>/standin/<key>; "
                   "shared by every video benchmark)")
    p.add_argument("--train-pairs", type=int, default=0,
                   help="also report pair accuracy on the first N order pairs of the training split (fit vs rule)")
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


def train_pairs(data: Path, n: int) -> Path:
    """A manifest of the first `n` order pairs (both members) of the training split."""
    from polymodal.data.manifests import read_manifest
    from polymodal.fileio import atomic_open
    records = [r for r in read_manifest(data / "train.jsonl", media="video").records if r.get("pair_id") is not None]
    ids = list(dict.fromkeys(r["pair_id"] for r in records))[:n]
    path = data / f"train_pairs{n}.jsonl"
    with atomic_open(path, "w", encoding="utf-8") as f:
        for r in records:
            if r["pair_id"] in ids:
                f.write(json.dumps({k: v for k, v in r.items() if not k.startswith("_")}, ensure_ascii=False) + "\n")
    return path


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


@torch.no_grad()
def order_diagnostics(model, manifest: Path, num_frames: int) -> dict:
    """The measured causes of order blindness, on the order-sensitive test videos (one caption each):

    - `text_reversal_cos`: mean cosine between a caption and its partner's (opposite) caption: 1 = the text tower
      cannot tell "moves left" from "moves right";
    - `video_reversal_cos`: mean cosine between a video's embedding and its reversal's: 1 = order-blind video side
      (mean pooling is exactly 1);
    - `frame_ends_cos`: mean cosine between the first and the last frame's image embedding: how much the image
      tower changes between the two ends of an action (the position / size / colour a direction is read from).
    """
    from polymodal.data.manifests import read_manifest
    from polymodal.encode import clip_batches, encode_texts
    from polymodal.eval.order import partners
    model = model.eval()
    records = read_manifest(manifest, media="video").records
    txt = encode_texts(model, [r["caption"] for r in records])                                  # (N, E)
    part = partners([r["pair_id"] for r in records])
    has = part >= 0
    text_cos = (txt[has] * txt[part[has]]).sum(-1).mean()
    vids, revs, ends = [], [], []
    from polymodal.models.video import VideoCLIP
    if not isinstance(model, VideoCLIP):               # an image-text model: the zero-shot frame mean
        model = VideoCLIP.from_image_model(model).eval()
    for _, frames, valid, _ in clip_batches(model, records, num_frames=num_frames):
        fwd, rev = model.encode_video_and_reversal(frames, valid)                              # (B, E) x 2
        vids.append(fwd)
        revs.append(rev)
        img = torch.nn.functional.normalize(model.base.encode_image(frames[:, [0, -1]].flatten(0, 1)), dim=-1)
        img = img.view(len(frames), 2, -1)
        ends.append((img[:, 0] * img[:, 1]).sum(-1))
    video_cos = (torch.cat(vids) * torch.cat(revs)).sum(-1).mean()
    return {"text_reversal_cos": float(text_cos), "video_reversal_cos": float(video_cos),
            "frame_ends_cos": float(torch.cat(ends).mean())}


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
    if args.train_pairs:
        parts_train = train_pairs(data, args.train_pairs)
    start_from = ["model.path="] if args.start == "scratch" else [   # the recipes start from the stand-in
        f"model.path={clip_standin(Path(args.standin_runs), args.threads or 1, image_size=args.image_size, num_frames=args.frames, positions=args.standin_positions == 'on')}"]
    rows = []
    diagnostics = {"standin": order_diagnostics(load_model(start_from[0].split("=", 1)[1]), parts["order_sensitive"],
                                                args.num_frames)} if args.start != "scratch" else {}
    for seed in args.seeds:            # seed-major: an interrupted run still has every kind at the first seeds
        for variant in args.kinds:
            kind, extra = VARIANTS[variant]
            overrides = [f"out_dir={runs}/{variant}_s{seed}", f"data.train={data}/train.jsonl", f"train.seed={seed}",
                         f"train.steps={args.steps}", f"train.ckpt_every={args.steps}", f"data.num_frames={args.num_frames}",
                         f"train.progress={'false' if args.quiet else 'true'}", "eval.tasks=[]"]
            if args.threads:
                overrides.append(f"train.threads={args.threads}")
            cfg = load_recipe(ROOT / "recipes" / f"video_{kind}.yaml", overrides + start_from + extra + list(args.sets))
            model_dir, seconds, reused = train_or_reuse(cfg, fresh=args.fresh)
            model = load_model(model_dir)
            row = {"kind": variant, "seed": seed, "train_seconds": seconds, "reused": reused,
                   **pair_accuracy(model, parts["order_sensitive"], args.num_frames),
                   **order_diagnostics(model, parts["order_sensitive"], args.num_frames)}
            if args.train_pairs:
                row["train_pair_accuracy"] = pair_accuracy(model, parts_train, args.num_frames)["pair_accuracy"]
            for name, path in parts.items():
                m = run_task("video_retrieval", model, str(path), num_frames=args.num_frames)
                for k in ("text_to_video_R@1", "text_to_video_R@5", "text_to_video_R@10", "text_to_video_median_rank"):
                    row[f"{name}/{k}"] = m[k]
                row[f"{name}/num_videos"] = m["num_videos"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"rows": rows, "claims": claims(rows), "diagnostics": diagnostics,
              "start": args.start + ("" if args.start == "scratch" else f" (positions {args.standin_positions})"),
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
    rows = result["rows"]
    cols = ["pair_accuracy", "pair_ties", "order_sensitive/text_to_video_R@1", "order_sensitive/text_to_video_R@5",
            "order_free/text_to_video_R@1", "order_free/text_to_video_R@5", "video_reversal_cos", "text_reversal_cos",
            "frame_ends_cos", "train_seconds"] + (["train_pair_accuracy"] if "train_pair_accuracy" in rows[0] else [])
    digits = {"video_reversal_cos": 3, "text_reversal_cos": 3, "frame_ends_cos": 3}
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    seeds = sorted({r["seed"] for r in rows})
    summary = ["| variant | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for kind in kinds:
        summary.append(f"| {kind} | " + " | ".join(
            pm_values([r[c] for r in rows if r["kind"] == kind], digits=digits.get(c, 1)) for c in cols) + " |")
    per_seed = ["| variant | seed | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for r in rows:
        per_seed.append(f"| {r['kind']} | {r['seed']} | " + " | ".join(
            f"{r[c]:.{digits.get(c, 1)}f}" for c in cols) + " |")
    diag = result.get("diagnostics", {}).get("standin")
    extra = [f"The stand-in itself (zero-shot frame mean): text reversal cosine {diag['text_reversal_cos']:.3f}, "
             f"video reversal cosine {diag['video_reversal_cos']:.3f}, first vs last frame cosine "
             f"{diag['frame_ends_cos']:.3f}.", ""] if diag else []
    machine = result.get("machine")
    return "\n".join(["# Temporal modelling vs mean pooling (MovingShapes)", "", f"Command: `{result['command']}`", "",
                      f"Start: {result.get('start', 'scratch')}. Mean ± sample sd over seeds {seeds}.", "", *summary,
                      "", *extra, f"Claims (verdict over seeds: {VERDICT_RULE}):", "",
                      *claim_lines(result["claims"]), "", "Per seed:", "", *per_seed, "",
                      f"Machine: {machine_line(machine)}." if machine else "", ""])


if __name__ == "__main__":
    run(parse_args())
