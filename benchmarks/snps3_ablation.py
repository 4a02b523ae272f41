"""SNP-S3 on MovingShapes: does it learn retrieval, against the mean-pooled video CLIP from the same start at equal
steps, and the ablation (MLM vs MSSM, with and without LVWM, shared network vs three encoders).

Parts (`--parts`, default all):
- `scratch`: `recipes/snps3_full.yaml` as its header runs it (from random weights, so level 1 is in-batch
  MIL-NCE) against `recipes/video_mean.yaml` from random weights, same data, frames, batch and steps.
- `standin`: `recipes/snps3_moco.yaml` (MoCo level 1, as the authors) from the caption-MLM stand-in
  (`caption_mlm_standin`: `recipes/snps3_pretrain_mlm.yaml`, its ViT from the CLIP stand-in) against
  `recipes/video_mean.yaml` from the CLIP stand-in (`benchmarks/common.py::clip_standin`): the same ViT start.
  Both stand-ins are normal `polymodal train` runs, built once and cached by content.
- `scratch_cls`: `recipes/snps3_full.yaml` with the authors' CLS poolers (`snps3.pool=cls`): whether the recipe's
  mean pooling from random weights is needed.
- `level1_only`: `recipes/snps3_full.yaml` from scratch with every loss but level 1 at weight 0 (no LVWM, no cross
  pass): whether the other losses, which share the network, hold level 1 back against the video CLIP.
- `level1_clip4`: the same with `snps3.frames_per_clip` = `--num-frames` (4: one clip = the mean of all frames, as
  the video CLIP pools): whether scoring single frames as clips holds level 1 back (a caption like "changes colour from red to
  orange" describes no single frame).
- `level1_t07`: level 1 alone with temperature 0.07 (the video CLIP's learned logit scale ends near 13.5, T 0.074;
  SNP-S3's is fixed at 0.05).
- `standin_level1`: `recipes/snps3_moco.yaml` from the caption-MLM stand-in with every loss but level 1 at weight 0.
- `ablation`: `recipes/snps3_{full,mlm,no_lvwm,three_encoder}.yaml` (identical but for one `snps3` switch each).

Every run is evaluated on the test split (200 videos: chance T2V R@5 = 2.5): text->video R@1/5/10 (the dual
encoder; SNP-S3 also re-ranked by the cross encoder), for SNP-S3 masked-token accuracy on significant and other
words and word-level retrieval with the LVWM score (P@1, mAP, chance), and the end of the cross-encoder losses
(level 2 at ln(2B) and ITM at ln 2 mean "not learned"). Writes `<out>/results.json` and `<out>/results.md`
(mean ± sample sd over seeds, per-seed rows, paired differences, which claims show).

Claims (docs/methods.md, SNP-S3): MSSM raises masked-token accuracy on significant words over plain MLM; LVWM gives
above-chance word-level retrieval (judge it by word-level retrieval and R@5/10, not R@1); sharing saves parameters
with equal-or-better retrieval. Synthetic numbers, never a reproduction of the paper's.
Usage: `python benchmarks/snps3_ablation.py --out docs/results/snps3 --seeds 0 1 2` (`--quick`: a tiny check).
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:          # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from benchmarks.common import (VERDICT_RULE, WORLD_STAMP, base_parser, claim, claim_lines,  # noqa: E402
                               command_line, leave_plateau_step, moving_shapes_world, paired_difference, pm_diff, pm_values,
                               seed_summary, set_threads, standin_key, verdict, write_results)

VARIANTS = (  # name, label
    ("mlm", "MLM + LVWM (plain masking)"),
    ("no_lvwm", "MSSM, no LVWM"),
    ("full", "MSSM + LVWM (shared network)"),
    ("three_encoder", "MSSM + LVWM, three encoders"),
)
PARTS = ("scratch", "scratch_cls", "level1_only", "level1_clip4", "level1_t07", "standin", "standin_level1", "ablation")
METRICS = ("text_to_video_R@1", "text_to_video_R@5", "text_to_video_R@10", "rerank_text_to_video_R@1",
           "masked_acc_significant", "masked_acc_other", "word_P@1", "word_mAP", "word_chance",
           "level1_end", "level2_end", "itm_end", "level2_leaves", "itm_leaves")


def parse_args(argv=None):
    p = base_parser(__doc__, "docs/results/snps3", "runs/snps3", seeds=[0, 1, 2], threads=1,
                    out_help="where results.json / results.md go")
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    p.add_argument("--variants", nargs="+", default=[v for v, _ in VARIANTS], choices=[v for v, _ in VARIANTS],
                   help="the ablation's variants (e.g. to split them over processes; the table needs all)")
    p.add_argument("--data", default="", help="MovingShapes folder (default <runs>/data)")
    p.add_argument("--recipes", default=str(ROOT / "recipes"))
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--frames", type=int, default=8, help="frames per generated video")
    p.add_argument("--num-frames", type=int, default=4, help="frames sampled per video for training and eval")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="extra recipe override for every SNP-S3 run (repeatable)")
    p.add_argument("--fresh", action="store_true", help="retrain even when a finished identical run exists")
    p.add_argument("--quick", action="store_true", help="a tiny world and a few steps (a smoke check, minutes)")
    args = p.parse_args(argv)
    if args.quick:
        args.n_train, args.n_test, args.frames, args.num_frames = 96, 24, 4, 2
        args.steps, args.batch_size = 20, 8
        args.sets = ["snps3.queue_size=64", "optim.warmup_steps=3", *args.sets]
    return args


def world(args) -> Path:
    return moving_shapes_world(Path(args.data or Path(args.runs) / "data"), n_train=args.n_train,
                               n_test=args.n_test, n_val=0, num_frames=args.frames, image_size=args.image_size)


MLM_STANDIN_RECIPE = ROOT / "recipes" / "snps3_pretrain_mlm.yaml"


def caption_mlm_standin(runs: Path, data: Path, clip: Path, threads: int = 1, steps: int | None = None,
                        seed: int = 0, recipe: Path = MLM_STANDIN_RECIPE) -> Path:
    """The caption-MLM stand-in SNP-S3's MoCo recipe starts from, built once and cached by content.

    Trains `recipes/snps3_pretrain_mlm.yaml` (MLM on the training captions over the text pass; the ViT copied from
    the CLIP stand-in `clip`) as a normal recipe run under `<runs>/standin_mlm/<key>/run`, where the key hashes the
    world's settings (its `benchmark_world.json`), the recipe file, the CLIP stand-in's folder and the overrides:
    the same inputs return the saved model at once.

    Args:
        runs: the benchmark's runs folder.
        data: the MovingShapes world (made by `moving_shapes_world`, so it carries its settings).
        clip: the CLIP stand-in's saved model (`clip_standin`).
        threads: torch threads; steps: training steps (None = the recipe's); seed: training seed.
        recipe: the recipe file.
    Returns:
        The saved model folder (`model.path` of `recipes/snps3_moco.yaml`).
    """
    from polymodal.train.reuse import train_or_reuse
    from polymodal.train.run import load_recipe
    world = json.loads((Path(data) / WORLD_STAMP).read_text())
    extra = [f"train.steps={steps}"] if steps else []
    extra += [f"train.seed={seed}", f"train.threads={threads or 1}", "train.progress=false"]
    key = standin_key({"world": world, "clip": str(Path(clip).resolve())}, recipe, extra)
    folder = Path(runs) / "standin_mlm" / key
    if (folder / "run" / "model" / "config.json").is_file() and (folder / "run" / "final_metrics.json").is_file():
        return folder / "run" / "model"
    cfg = load_recipe(recipe, [f"out_dir={folder / 'run'}", f"data.train={data}/train.jsonl",
                               f"snps3.vision_init={clip}",
                               f"eval={{tasks: [{{task: snps3_retrieval, data: {data}/test.jsonl, num_frames: 4, "
                               f"rerank_top_k: 0}}]}}", *extra])
    model_dir, _, _ = train_or_reuse(cfg)
    return model_dir


def key_cosines(model, manifest: Path, limit: int = 64, num_frames: int = 4) -> dict:
    """How much a model's level-1 features (MoCo's keys) differ between samples: the mean pairwise cosine of the
    text features of the first `limit` test captions and of their videos' clip features (1.0 = one constant key).

    Args:
        model: an `SNPS3Model` (eval mode is set here).
        manifest: a video manifest; limit: its first records; num_frames: frames per video.
    Returns:
        {"text_key_cosine", "clip_key_cosine"}.
    """
    from polymodal.eval.video_retrieval import retrieval_features
    model.eval()
    feats = retrieval_features(model, manifest, "caption", limit, num_frames)

    def mean_cos(x):
        s = x @ x.T
        n = len(x)
        return float((s.sum() - s.diag().sum()) / (n * (n - 1)))
    clips = feats.video.clips[feats.video.valid]                                         # (M, W) real clips
    return {"text_key_cosine": mean_cos(feats.text.feature), "clip_key_cosine": mean_cos(clips)}


def start_recall(clip: Path, mlm: Path, manifest: Path, num_frames: int) -> dict:
    """T2V R@5 of the two starts before any video training: the CLIP stand-in zero-shot (frame mean) and the
    caption-MLM stand-in's level 1 (its own run's evaluation)."""
    from polymodal.eval.video_retrieval import video_retrieval_eval
    from polymodal.hub import load_model
    zero_shot = video_retrieval_eval(load_model(clip).eval(), manifest, num_frames=num_frames)
    mlm_final = json.loads((Path(mlm).parent / "final_metrics.json").read_text())
    return {"clip_standin_zero_shot": zero_shot["text_to_video_R@5"],
            "caption_mlm_standin": mlm_final["eval/snps3_retrieval/text_to_video_R@5"]}


def _train(recipe: Path, out: Path, overrides: list[str], args) -> dict:
    """Train (or reuse an identical finished run of) `recipe` and return its final metrics plus the end of the
    logged SNP-S3 losses (the mean of the last 5 logged values)."""
    from polymodal.train.reuse import train_or_reuse
    from polymodal.train.run import load_recipe
    cfg = load_recipe(recipe, [f"out_dir={out}", *overrides])
    _, seconds, _ = train_or_reuse(cfg, fresh=args.fresh)
    final = json.loads((out / "final_metrics.json").read_text())
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    ends = {}
    for k in ("level1", "level2", "itm"):
        vals = [r[k] for r in logged if r.get(k) is not None]
        if vals:
            ends[f"{k}_end"] = sum(vals[-5:]) / len(vals[-5:])
    if any("level2" in r for r in logged):       # first logged step below chance by a margin (None: never)
        B = cfg.data.batch_size
        ends["level2_leaves"] = leave_plateau_step(out / "metrics.jsonl", "level2", math.log(2 * B) - 0.1)
        ends["itm_leaves"] = leave_plateau_step(out / "metrics.jsonl", "itm", math.log(2) - 0.05)
    return {**final, **ends, "train_seconds": seconds}


def _row(part: str, name: str, label: str, seed: int, final: dict, task: str) -> dict:
    row = {"part": part, "variant": name, "label": label, "seed": seed, "seconds": round(final["train_seconds"], 1)}
    row.update({k: final.get(f"eval/{task}/{k}") for k in METRICS if not k.endswith(("_end", "_leaves"))})
    row.update({k: final.get(k) for k in METRICS if k.endswith(("_end", "_leaves"))})
    return row


def run(args) -> dict:
    from polymodal.hub import load_model
    from benchmarks.common import clip_standin
    set_threads(args.threads)
    data = world(args)
    runs = Path(args.runs)
    nf = args.num_frames
    shared = [f"data.train={data}/train.jsonl", f"data.batch_size={args.batch_size}", f"data.num_frames={nf}",
              f"train.steps={args.steps}", f"train.threads={args.threads}", "train.progress=false",
              "train.ckpt_every=0"]
    snps3_eval = (f"eval={{tasks: [{{task: snps3_retrieval, data: {data}/test.jsonl, num_frames: {nf}, "
                  f"rerank_top_k: 10}}]}}")
    clip_eval = f"eval={{tasks: [{{task: video_retrieval, data: {data}/test.jsonl, num_frames: {nf}}}]}}"
    recipes = Path(args.recipes)
    plan = []                         # (part, name, label, recipe, overrides, eval task)
    if "scratch" in args.parts:
        plan += [("scratch", "snps3_full", "SNP-S3 (snps3_full.yaml, in-batch level 1)", recipes / "snps3_full.yaml",
                  [snps3_eval, *args.sets], "snps3_retrieval"),
                 ("scratch", "video_mean", "video CLIP, mean pooling (video_mean.yaml)", recipes / "video_mean.yaml",
                  ["model.path=", clip_eval], "video_retrieval")]
    if "scratch_cls" in args.parts:
        plan += [("scratch_cls", "snps3_full_cls", "SNP-S3 (snps3_full.yaml) with CLS poolers", recipes / "snps3_full.yaml",
                  [snps3_eval, "snps3.pool=cls", *args.sets], "snps3_retrieval")]
    if "level1_only" in args.parts:
        plan += [("level1_only", "snps3_level1", "SNP-S3 (snps3_full.yaml), level 1 alone",
                  recipes / "snps3_full.yaml",
                  [snps3_eval, "snps3.weights={lvwm: 0, level2: 0, itm: 0, mlm: 0}", *args.sets], "snps3_retrieval")]
    if "level1_clip4" in args.parts:
        plan += [("level1_clip4", "snps3_level1_clip4", f"SNP-S3 (snps3_full.yaml), level 1 alone, one clip of all {nf} frames",
                  recipes / "snps3_full.yaml",
                  [snps3_eval, "snps3.weights={lvwm: 0, level2: 0, itm: 0, mlm: 0}", f"snps3.frames_per_clip={nf}",
                   *args.sets], "snps3_retrieval")]
    if "level1_t07" in args.parts:
        plan += [("level1_t07", "snps3_level1_t07", "SNP-S3 (snps3_full.yaml), level 1 alone, T 0.07",
                  recipes / "snps3_full.yaml",
                  [snps3_eval, "snps3.weights={lvwm: 0, level2: 0, itm: 0, mlm: 0}", "snps3.temperature=0.07",
                   *args.sets], "snps3_retrieval")]
    standins = {}
    if "standin" in args.parts or "standin_level1" in args.parts:
        clip = clip_standin(runs, args.threads, image_size=args.image_size, num_frames=args.frames,
                            **({"n_train": 256, "n_val": 16, "steps": 20} if args.quick else {}))
        mlm = caption_mlm_standin(runs, data, clip, args.threads, steps=20 if args.quick else None)
        from polymodal.methods.snps3 import SNPS3Config
        from polymodal.models.fusion import create_snps3_model
        start = load_model(mlm)
        torch.manual_seed(0)       # the same network from random weights (its tokenizer), as a from-scratch run starts
        random = create_snps3_model(SNPS3Config(pool="cls").model_config(), start.tokenizer)
        standins = {"clip": str(clip), "caption_mlm": str(mlm),
                    "keys": {"caption_mlm_standin": key_cosines(start, data / "test.jsonl", num_frames=nf),
                             "random_init": key_cosines(random, data / "test.jsonl", num_frames=nf)},
                    "start_t2v_R@5": start_recall(clip, mlm, data / "test.jsonl", nf)}
        if "standin" in args.parts:
            plan += [("standin", "snps3_moco", "SNP-S3 (snps3_moco.yaml, MoCo level 1) from the caption-MLM stand-in",
                      recipes / "snps3_moco.yaml", [f"model.path={mlm}", snps3_eval, *args.sets], "snps3_retrieval"),
                     ("standin", "video_mean", "video CLIP, mean pooling, from the CLIP stand-in",
                      recipes / "video_mean.yaml", [f"model.path={clip}", clip_eval], "video_retrieval")]
        if "standin_level1" in args.parts:
            plan += [("standin_level1", "snps3_moco_level1", "SNP-S3 (snps3_moco.yaml), MoCo level 1 alone, from the "
                      "caption-MLM stand-in", recipes / "snps3_moco.yaml",
                      [f"model.path={mlm}", snps3_eval, "snps3.weights={lvwm: 0, level2: 0, itm: 0, mlm: 0}",
                       *args.sets], "snps3_retrieval")]
    if "ablation" in args.parts:
        plan += [("ablation", name, label, recipes / f"snps3_{name}.yaml", [snps3_eval, *args.sets], "snps3_retrieval")
                 for name, label in VARIANTS if name in args.variants]
    rows, params = [], {}
    for part, name, label, recipe, extra, task in plan:
        for seed in args.seeds:
            # The ablation's "full" is the scratch part's snps3_full run (the same recipe and overrides: reused).
            out = runs / "scratch" / f"snps3_full_s{seed}" if (part, name) == ("ablation", "full") else \
                runs / part / f"{name}_s{seed}"
            final = _train(recipe, out, [*shared, f"train.seed={seed}", *extra], args)
            if task == "snps3_retrieval" and name not in params:
                params[name] = load_model(out / "model").parameter_counts()
            rows.append(_row(part, name, label, seed, final, task))
            print(json.dumps(rows[-1]), flush=True)
    return {"command": command_line("snps3_ablation.py", __name__ == "__main__"),
            "settings": {k: v for k, v in vars(args).items()}, "standins": standins, "rows": rows,
            "params": params, "claims": claims(rows, params, args)}


def _values(rows, part, name, key) -> list[float]:
    return [r.get(key) for r in rows if r["part"] == part and r["variant"] == name]


def _mean(rows, part, name, key) -> float:
    return seed_summary(_values(rows, part, name, key), drop_missing=True)["mean"]


def claims(rows, params, args) -> list[dict]:
    """The issue's bar and the synthetic claims of docs/methods.md, SNP-S3, judged over seeds (`verdict`: every
    seed's paired difference has the claimed sign)."""
    chance5 = 100.0 * 5 / args.n_test
    r5 = "text_to_video_R@5"
    f = lambda part, name, key: pm_values(_values(rows, part, name, key))          # noqa: E731
    out = []
    for part, snps3 in (("scratch", "snps3_full"), ("standin", "snps3_moco")):
        if not _values(rows, part, snps3, r5):
            continue
        v = _values(rows, part, snps3, r5)
        out.append(claim(f"{part}: SNP-S3 learns retrieval (T2V R@5 >= 3x chance = {3 * chance5:.1f} on every seed)",
                         f"R@5 {f(part, snps3, r5)} (seeds {', '.join(f'{x:.1f}' for x in v)})",
                         verdict({"values": [x - 3 * chance5 for x in v]}, ties_agree=True)))
        diff = paired_difference(v, _values(rows, part, "video_mean", r5))
        out.append(claim(f"{part}: SNP-S3 at least matches the mean-pooled video CLIP from the same start at equal "
                         f"steps (R@5)", f"{f(part, snps3, r5)} vs {f(part, 'video_mean', r5)}; paired {pm_diff(diff)}",
                         verdict(diff, ties_agree=True)))
    # Causes of a gap to the video CLIP from scratch (each a paired difference over the same seeds).
    causes = (("scratch", "snps3_full", "scratch_cls", "snps3_full_cls",
               "reading the mean of the tokens beats the authors' CLS from random weights"),
              ("level1_only", "snps3_level1", "scratch", "snps3_full",
               "the other losses (LVWM, level 2, ITM, MLM) hold level 1 back: level 1 alone retrieves better"),
              ("level1_clip4", "snps3_level1_clip4", "level1_only", "snps3_level1",
               "single-frame clips hold level 1 back: 4-frame clips (the video CLIP's mean) retrieve better"),
              ("level1_t07", "snps3_level1_t07", "level1_only", "snps3_level1",
               "the fixed temperature holds level 1 back: T 0.07 (the video CLIP's learned scale) retrieves better"),
              ("level1_clip4", "snps3_level1_clip4", "scratch", "video_mean",
               "level 1 alone with 4-frame clips at least matches the video CLIP"))
    for part_a, a, part_b, b, text in causes:
        va, vb = _values(rows, part_a, a, r5), _values(rows, part_b, b, r5)
        if va and vb and len(va) == len(vb):
            d = paired_difference(va, vb)
            out.append(claim(f"scratch: {text} (R@5)", f"{f(part_a, a, r5)} vs {f(part_b, b, r5)}; paired {pm_diff(d)}",
                             verdict(d, ties_agree="at least" in text)))
    va, vb = _values(rows, "standin_level1", "snps3_moco_level1", r5), _values(rows, "standin", "snps3_moco", r5)
    if va and vb and len(va) == len(vb):
        d = paired_difference(va, vb)
        out.append(claim("standin: the other losses hold MoCo level 1 back: level 1 alone retrieves better (R@5)",
                         f"{f('standin_level1', 'snps3_moco_level1', r5)} vs {f('standin', 'snps3_moco', r5)}; "
                         f"paired {pm_diff(d)}", verdict(d)))
    if _values(rows, "ablation", "full", r5):
        sig = "masked_acc_significant"
        out.append(claim("MSSM raises masked-token accuracy on significant words over plain MLM",
                         f"{f('ablation', 'full', sig)} vs {f('ablation', 'mlm', sig)}",
                         verdict(paired_difference(_values(rows, "ablation", "full", sig),
                                                   _values(rows, "ablation", "mlm", sig)))))
        out.append(claim("LVWM gives above-chance word-level retrieval (mAP)",
                         f"{f('ablation', 'full', 'word_mAP')} vs chance {_mean(rows, 'ablation', 'full', 'word_chance'):.1f}"
                         f" (no LVWM: {f('ablation', 'no_lvwm', 'word_mAP')})",
                         verdict({"values": [a - b for a, b in zip(_values(rows, "ablation", "full", "word_mAP"),
                                                                   _values(rows, "ablation", "full", "word_chance"))]})))
        r10 = "text_to_video_R@10"
        both = lambda name: [a + b for a, b in zip(_values(rows, "ablation", name, r5),               # noqa: E731
                                                   _values(rows, "ablation", name, r10))]
        out.append(claim("LVWM helps R@5/10 (not judged by R@1)",
                         f"R@5/10 {f('ablation', 'full', r5)} / {f('ablation', 'full', r10)} vs "
                         f"{f('ablation', 'no_lvwm', r5)} / {f('ablation', 'no_lvwm', r10)}",
                         verdict(paired_difference(both("full"), both("no_lvwm")), ties_agree=True)))
        fewer = params.get("full", {}).get("shared", math.nan) < params.get("three_encoder", {}).get("three_encoder", math.nan)
        d = paired_difference(_values(rows, "ablation", "full", r5), _values(rows, "ablation", "three_encoder", r5))
        out.append(claim("sharing saves parameters with equal-or-better retrieval",
                         f"{params.get('full', {}).get('shared', 0):,} vs "
                         f"{params.get('three_encoder', {}).get('three_encoder', 0):,} params; R@5 "
                         f"{f('ablation', 'full', r5)} vs {f('ablation', 'three_encoder', r5)}; paired {pm_diff(d)}",
                         verdict(d, ties_agree=True) if fewer else "not shown"))
    return out


COLS = ("text_to_video_R@1", "text_to_video_R@5", "text_to_video_R@10", "rerank_text_to_video_R@1",
        "masked_acc_significant", "word_mAP", "word_chance", "level1_end", "level2_end", "itm_end")


def markdown(result) -> str:
    s = result["settings"]
    rows = result["rows"]
    lines = [f"SNP-S3 on MovingShapes ({s['n_train']} train / {s['n_test']} test videos, {s['steps']} steps, batch "
             f"{s['batch_size']}, {s['num_frames']} frames, seeds {s['seeds']}{', quick' if s['quick'] else ''}; "
             f"mean ± sample sd over seeds; chance T2V R@5 {500 / s['n_test']:.1f}). Synthetic numbers; not a "
             "reproduction of the paper's.", "", f"Command: `{result['command']}`", ""]
    if result.get("standins"):
        st = result["standins"]
        lines += [f"Stand-ins: CLIP `{st['clip']}`, caption MLM `{st['caption_mlm']}`. MoCo keys at the start (mean "
                  "pairwise cosine over 64 test captions / their clips; 1 = a constant key): " +
                  "; ".join(f"{k}: text {v['text_key_cosine']:.3f}, clips {v['clip_key_cosine']:.3f}"
                            for k, v in st["keys"].items()) +
                  ". T2V R@5 of the starts before video training: " +
                  ", ".join(f"{k} {v:.1f}" for k, v in st["start_t2v_R@5"].items()) + ".", ""]
    for part in PARTS:
        names = list(dict.fromkeys(r["variant"] for r in rows if r["part"] == part))
        if not names:
            continue
        lines += [f"**{part}**", "", "| variant | " + " | ".join(COLS) + " |", "|---" * (len(COLS) + 1) + "|"]
        for name in names:
            label = next(r["label"] for r in rows if r["part"] == part and r["variant"] == name)
            lines.append(f"| {label} | " + " | ".join(pm_values(_values(rows, part, name, c), digits=2 if c.endswith("_end") else 1)
                                                    for c in COLS) + " |")
        lines.append("")
        leaves = [(name, seed_row) for name in names for seed_row in rows
                  if seed_row["part"] == part and seed_row["variant"] == name
                  and seed_row.get("level2_end") is not None]
        if leaves:
            lines += ["Step at which level 2 falls below ln(2B) - 0.1 / ITM below ln 2 - 0.05 (per seed; never = stays on "
                      "the plateau): " + "; ".join(f"{n} s{r['seed']} {r['level2_leaves'] or 'never'} / "
                                                 f"{r['itm_leaves'] or 'never'}" for n, r in leaves), ""]
    if result.get("params"):
        p = next(iter(result["params"].values()))
        lines += [f"Parameters: {p['shared']:,} with the shared network, {p['three_encoder']:,} with three encoders "
                  f"({100 * (1 - p['shared'] / p['three_encoder']):.1f}% fewer shared).", ""]
    lines += ["Claims (" + VERDICT_RULE + "):", ""] + claim_lines(result["claims"])
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    result = run(args)
    write_results(Path(args.out), result, markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
