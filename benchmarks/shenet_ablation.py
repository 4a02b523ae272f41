"""SHE-Net ablation on MovingShapes with distractor segments: mean pooling vs + verb->frame vs + noun->patch vs full.

1. Generates (or reuses) a MovingShapes world where `--distractor-fraction` of the action videos show the
   action in only part of the clip (the other frames hold still or show an unrelated scene).
2. Trains `recipes/shenet_{mean,verb,noun,full}.yaml` (identical but for the `shenet` level weights; `mean` has
   every weight 0, i.e. the plain frame-mean video model trained with the same loss) for each seed, reusing
   finished runs with the same config; `full_sum` is `full` with `shenet.score_norm: sum` (the unnormalised total,
   the code before issue #31). Every run adapts the CLIP stand-in (`clip_standin`; `--start scratch`: random
   weights); `--variants` picks the rows.
3. Evaluates each on the test split with its own hierarchy (`shenet_retrieval`): text->video R@1/5/10, MdR, and
   the attention-hit rates on the world's ground truth: share of verb attention on the action frames (videos
   with distractor frames only) and of noun attention on the actor's patches, each beside uniform attention.
   For `mean` the attention maps are read out of the same model although no level was trained.
4. Writes `<out>/results.json` and `<out>/results.md` (mean ± sd over seeds, per-seed rows, which claims show).

Claims (docs/methods.md, SHE-Net): verb attention concentrates on action frames; noun attention finds the object;
R@1 beats mean pooling when distractor frames are many; each level ablates; (issue #31) full stays at least level
with mean pooling, and the normalised total beats the unnormalised sum.
Usage: `python benchmarks/shenet_ablation.py --out docs/results/shenet --seeds 0 1 2` (`--quick`: a tiny check).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:          # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from benchmarks.common import (VERDICT_RULE, base_parser, claim, claim_lines, clip_standin, command_line,  # noqa: E402
                               machine_line, machine_info, moving_shapes_world, paired_difference, pm_diff, pm_values, seed_summary,
                               set_threads, verdict, write_results)

VARIANTS = (  # name, label
    ("mean", "mean pooling (all level weights 0)"),
    ("verb", "+ verb->frame"),
    ("noun", "+ noun->patch"),
    ("full", "full (verb + noun + adjective)"),
    ("full_sum", "full, unnormalised sum (score_norm: sum, the code before issue #31)"),
)
RECIPE = {"full_sum": ("full", ["shenet.score_norm=sum"])}     # variant -> (recipe, extra overrides); else itself
METRICS = ("text_to_video_R@1", "text_to_video_R@5", "text_to_video_R@10", "text_to_video_median_rank",
           "verb_hit", "verb_uniform", "noun_hit", "noun_uniform")


def parse_args(argv=None):
    p = base_parser(__doc__, "docs/results/shenet", "runs/shenet_ablation", seeds=[0, 1], threads=1,
                    out_help="where results.json / results.md go")
    p.add_argument("--data", default="", help="MovingShapes folder (default <runs>/data)")
    p.add_argument("--recipes", default=str(ROOT / "recipes"))
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--frames", type=int, default=8, help="frames per generated video")
    p.add_argument("--num-frames", type=int, default=8, help="frames sampled per clip for training and eval")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--distractor-fraction", type=float, default=0.8)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="extra recipe override for every run (repeatable)")
    p.add_argument("--start", choices=("standin", "scratch"), default="standin",
                   help="standin: every run adapts the CLIP stand-in (benchmarks/common.py::clip_standin, the papers' "
                        "regime); scratch: random weights (the recipes' model section)")
    p.add_argument("--standin-runs", default="runs", help="where the CLIP stand-in is built and cached (<dir>/standin/<key>; "
                   "shared by every video benchmark)")
    p.add_argument("--fresh", action="store_true", help="retrain even when a finished identical run exists")
    p.add_argument("--variants", nargs="+", default=[v for v, _ in VARIANTS], choices=[v for v, _ in VARIANTS])
    p.add_argument("--quick", action="store_true",
                   help="tiny check: 96 train / 32 test videos, 4 frames, 60 steps, width-32 model")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.n_train, args.n_test, args.frames, args.num_frames = 96, 32, 8, 4
        args.steps, args.batch_size = 60, 16
        args.sets = ["model.overrides={}", "tokenizer.vocab_size=200", *args.sets]
        if args.runs == "runs/shenet_ablation":
            args.runs = "runs/shenet_ablation_quick"
    return args


def standin(args) -> Path:
    """The CLIP stand-in the runs adapt (`--quick`: a small one)."""
    small = {"n_train": 400, "steps": 40} if args.quick else {}
    return clip_standin(Path(args.standin_runs), args.threads or 1, image_size=args.image_size, num_frames=args.frames,
                        **small)


def world(args) -> Path:
    return moving_shapes_world(Path(args.data) if args.data else Path(args.runs) / "data", progress=not args.quiet,
                               n_train=args.n_train, n_test=args.n_test, num_frames=args.frames,
                               image_size=args.image_size, distractor_fraction=args.distractor_fraction)


def run(args) -> dict:
    from polymodal.hub import load_model
    from polymodal.eval.hierarchy_retrieval import shenet_retrieval_task
    from polymodal.train.reuse import train_or_reuse
    from polymodal.train.run import load_recipe
    set_threads(args.threads)
    start = time.time()
    data = world(args)
    start_from = ["model.path="] if args.start == "scratch" else [      # the recipes start from the stand-in
        f"model.path={standin(args)}"]
    rows = []
    for name in args.variants:
        recipe, extra = RECIPE.get(name, (name, []))
        for seed in args.seeds:
            cfg = load_recipe(Path(args.recipes) / f"shenet_{recipe}.yaml", [
                f"out_dir={Path(args.runs) / f'{name}_s{seed}'}", f"data.train={data / 'train.jsonl'}",
                f"data.num_frames={args.num_frames}", f"data.batch_size={args.batch_size}",
                f"train.steps={args.steps}", f"train.seed={seed}", f"train.ckpt_every={args.steps}",
                f"train.threads={args.threads}", f"train.progress={'false' if args.quiet else 'true'}",
                f"optim.warmup_steps={min(50, max(1, args.steps // 10))}", "eval={}", *start_from, *extra, *args.sets])
            model_dir, seconds, reused = train_or_reuse(cfg, fresh=args.fresh)
            model = load_model(model_dir).eval()                     # an SHE-Net model: it carries its hierarchy
            m = shenet_retrieval_task(model, data / "test.jsonl", num_frames=args.num_frames)
            rows.append({"variant": name, "seed": seed, "train_seconds": seconds, "reused": reused,
                         **{k: m[k] for k in METRICS}, "verb_videos": m["verb_videos"],
                         "noun_videos": m["noun_videos"]})
            print(f"[shenet] {name} seed {seed}: " + ", ".join(f"{k}={m[k]:.2f}" for k in METRICS), flush=True)
    result = {"command": command_line("shenet_ablation.py", __name__ == "__main__"),
              "settings": {k: v for k, v in vars(args).items() if k not in ("out", "runs", "data", "recipes")},
              "rows": rows, "means": {n: {k: _mean(rows, n, k) for k in METRICS} for n in args.variants}}
    result["claims"] = claims(rows)
    result["seconds"] = time.time() - start
    result["machine"] = machine_info()
    write_results(Path(args.out), result, markdown(result))
    print(f"[shenet] wrote {Path(args.out) / 'results.md'}", flush=True)
    return result


def _values(rows, name, key) -> list[float]:
    return [r[key] for r in rows if r["variant"] == name]


def _mean(rows, name, key) -> float:
    return seed_summary(_values(rows, name, key), drop_missing=True)["mean"]          # NaN-free


def claims(rows) -> list[dict]:
    """The claims of docs/methods.md, SHE-Net (and issue #31's normalisation), each a verdict over seeds of a paired
    per-seed difference; a claim whose variants were not run is left out."""
    have = {r["variant"] for r in rows}

    def paired(a: tuple[str, str], b: tuple[str, str]) -> dict:
        return paired_difference(_values(rows, *a), _values(rows, *b))

    def numbers(a, b, d, unit=""):
        return f"{pm_values(_values(rows, *a))}{unit} vs {pm_values(_values(rows, *b))}{unit}; paired {pm_diff(d)}"

    r1, r5 = "text_to_video_R@1", "text_to_video_R@5"
    out = []
    if "full" in have:
        for level in ("verb", "noun"):
            pair = (("full", f"{level}_hit"), ("full", f"{level}_uniform"))
            d = paired(*pair)
            what = "concentrates on action frames" if level == "verb" else "finds the object"
            out.append(claim(f"{level} attention {what} (full: hit > uniform)", numbers(*pair, d, "%"), verdict(d)))
    if {"full", "mean"} <= have:
        for key in (r1, r5):
            pair = (("full", key), ("mean", key))
            d = paired(*pair)
            out.append(claim(f"full beats mean pooling on {key[-3:]} with many distractor frames", numbers(*pair, d),
                             verdict(d)))
            out.append(claim(f"full stays at least level with mean pooling on {key[-3:]} (seed mean within one seed "
                             f"sd of mean pooling, or above)", numbers(*pair, d),
                             d["mean"] >= -max(1e-9, seed_summary(_values(rows, "mean", key))["std"])))
    if {"full", "full_sum"} <= have:
        for key in (r1, r5):
            pair = (("full", key), ("full_sum", key))
            d = paired(*pair)
            out.append(claim(f"the normalised total beats the unnormalised sum ({key[-3:]})", numbers(*pair, d),
                             verdict(d)))
    if {"verb", "noun", "mean"} <= have:
        d_v, d_n = paired(("verb", r1), ("mean", r1)), paired(("noun", r1), ("mean", r1))
        both = {"values": [min(a, b) for a, b in zip(d_v["values"], d_n["values"])]}     # > 0: both levels beat mean
        out.append(claim("each level ablates (verb > mean and noun > mean on R@1, both on a seed)",
                         f"verb - mean {pm_diff(d_v)}, noun - mean {pm_diff(d_n)}", verdict(both)))
    return out


def markdown(result) -> str:
    labels = dict(VARIANTS)
    rows = result["rows"]
    head = "| variant | R@1 | R@5 | R@10 | MdR | verb hit % (uniform) | noun hit % (uniform) |"
    lines = ["# SHE-Net ablation (MovingShapes, distractor segments)", "", f"`{result['command']}`", "",
             f"Mean ± sample sd over seeds {result['settings']['seeds']} (per-seed rows below); text->video on the "
             f"test split.", "", head, "|---|---|---|---|---|---|---|"]
    for name in result["means"]:
        v = {k: pm_values(_values(rows, name, k)) for k in METRICS}
        lines.append(f"| {labels[name]} | {v['text_to_video_R@1']} | {v['text_to_video_R@5']} | "
                     f"{v['text_to_video_R@10']} | {v['text_to_video_median_rank']} | "
                     f"{v['verb_hit']} ({v['verb_uniform']}) | {v['noun_hit']} ({v['noun_uniform']}) |")
    lines += ["", f"Claims ({VERDICT_RULE}):", ""] + claim_lines(result["claims"])
    lines += ["", "Per seed:", "", "| variant | seed | R@1 | R@5 | MdR | verb hit | noun hit | train s |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['seed']} | {r['text_to_video_R@1']:.1f} | {r['text_to_video_R@5']:.1f} | "
                     f"{r['text_to_video_median_rank']:.1f} | {r['verb_hit']:.1f} | {r['noun_hit']:.1f} | "
                     f"{r['train_seconds']:.0f} |")
    lines.append(f"\nTotal {result['seconds']:.0f} s. Machine: {machine_line(result['machine'])}.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run(parse_args())
