"""LoTLIP ablation on ShapesWorld: short captions vs long captions without / with corner tokens, and a
context-length sweep. One command, measured in one run:

    python benchmarks/lotlip_ablation.py --out docs/results/lotlip

1. Generates ShapesWorld once (`--data`, default runs/lotlip_ablation/data; reused when the settings match).
2. Trains recipes/lotlip_{short,long_k0,long_k2,long_k4}.yaml (same data, steps, seed) through
   `polymodal.train.run.load_recipe` / `run_recipe`; a finished run with the same config is reused.
3. Evaluates each with `run_suite`: long-caption retrieval R@1 (I2T, T2I) on hard.jsonl (groups of 4
   images differing in one non-salient object), short-caption retrieval R@1 and zero-shot top-1 (64
   colour+shape classes) on test.jsonl. Nothing is tuned on these sets.
4. Context-length sweep: the K=2 recipe trained at each `--contexts` length (the main length reuses
   the long_k2 run); long-text R@1 and the text tower's forward time for a batch of hard-set long
   captions with the K corners and without them (the same tower with K=0, the same ids): corner
   overhead = time(K) / time(0) - 1.
5. Over `--seeds` (default: `--seed`): every number of steps 2-3 as mean ± std and the paired per-seed
   differences each claim rests on, with a verdict (shown: every seed agrees; not shown: none; mixed).
   The context sweep runs at the first seed only.
6. Sweep (`--subcaptions` M values and/or `--long-weights` w_long values, for the corner counts
   `--grid-corners`, default 0 and 2): each grid point trained over the seeds and evaluated on the test
   sets and on the validation split (zero-shot top-1, long-caption retrieval). Claim (c1) is checked at
   every grid point (K=2 vs K=0 at the same M and w) and at the settings chosen on validation (for each K,
   the (M, w) with the highest mean validation zero-shot top-1); the test sets choose nothing.
   The zero-shot evaluation reads only the CLS feature (`CLIP.encode_text`), never the corners.
7. Writes `<out>/results.json` and `<out>/results.md` (tables + which claims show at this scale).
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:          # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from benchmarks.common import (VERDICT_RULE, base_parser, cached_metrics, claim, claim_lines,  # noqa: E402
                               command_line, machine_info, over_seeds, paired_difference, pm, pm_diff, prepare,
                               verdict)

VARIANTS = (  # name, recipe, label
    ("short", "lotlip_short.yaml", "short only (K=0, M=0)"),
    ("long_k0", "lotlip_long_k0.yaml", "short + long, no corners (K=0)"),
    ("long_k2", "lotlip_long_k2.yaml", "short + long, K=2 corners"),
    ("long_k4", "lotlip_long_k4.yaml", "short + long, K=4 corners"),
)
SWEEP_VARIANT = "long_k2"
METRICS = {  # column -> run_suite key
    "long_i2t_R1": "longtext/image_to_text_R@1",
    "long_t2i_R1": "longtext/text_to_image_R@1",
    "zeroshot_top1": "zeroshot/top1",
    "short_i2t_R1": "retrieval/image_to_text_R@1",
    "short_t2i_R1": "retrieval/text_to_image_R@1",
}
SWEEP_COLUMNS = ("context_length", "long_i2t_R1", "long_t2i_R1", "zeroshot_top1", "text_ms_with_corners",
                 "text_ms_without_corners", "corner_overhead_pct", "train_s")


def parse_args(argv=None):
    p = base_parser(__doc__, "docs/results/lotlip", "runs/lotlip_ablation",
                    out_help="where results.json / results.md go")
    p.add_argument("--data", default="", help="ShapesWorld folder (default <runs>/data)")
    p.add_argument("--recipes", default=str(ROOT / "recipes"), help="folder holding lotlip_*.yaml")
    p.add_argument("--n-train", type=int, default=8000)
    p.add_argument("--n-test", type=int, default=500)
    p.add_argument("--n-val", type=int, default=200)
    p.add_argument("--n-hard", type=int, default=400)
    p.add_argument("--steps", type=int, default=500, help="optimizer steps per run")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-subcaptions", type=int, default=0, help="M for the long variants (0 = the recipes' value)")
    p.add_argument("--model", default="", help="model config name (default: the recipes' `small`)")
    p.add_argument("--context-length", type=int, default=192, help="text context of the four main runs")
    p.add_argument("--contexts", type=int, nargs="+", default=[32, 64, 128, 192], help="context-length sweep")
    p.add_argument("--time-batch", type=int, default=64, help="long captions per timed text-tower batch")
    p.add_argument("--time-repeats", type=int, default=7)
    p.add_argument("--seed", type=int, default=0, help="training seed (when --seeds is not given) and data seed")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default: --seed)")
    p.add_argument("--data-seed", type=int, default=None, help="ShapesWorld seed (default: --seed)")
    p.add_argument("--subcaptions", type=int, nargs="+", default=[], help="sweep axis: sub-captions M per image")
    p.add_argument("--long-weights", type=float, nargs="+", default=[], help="sweep axis: lotlip.w_long")
    p.add_argument("--grid-corners", type=int, nargs="+", default=[0, 2], help="corner counts K of the sweep grid")
    p.add_argument("--variants", nargs="+", default=[n for n, _, _ in VARIANTS], choices=[n for n, _, _ in VARIANTS],
                   help="main-table variants to train (short, long_k0 and long_k2 are needed for the claims)")
    p.add_argument("--fresh", action="store_true", help="retrain even when a finished run with the same config exists")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- training and evaluation

def _recipe_for(recipes: Path, K: int, M: int) -> tuple[Path, list[str]]:
    """The recipe of (K, M) and the overrides that make it: the four recipes differ only in K and M."""
    if M == 0:
        return recipes / "lotlip_short.yaml", []
    named = recipes / f"lotlip_long_k{K}.yaml"
    if named.is_file():
        return named, []
    return recipes / "lotlip_long_k2.yaml", [f"lotlip.num_corners={K}"]


def run_name(K: int, M: int, w: float | None, ctx: int, seed: int, main_ctx: int) -> str:
    """Folder of one run, named by what it trains, so the main table, the sweep and a rerun share runs."""
    base = "short" if M == 0 else f"k{K}_m{M}_w{w:g}"
    return base + (f"_ctx{ctx}" if ctx != main_ctx else "") + f"_s{seed}"


def _train(recipes: Path, out_dir: Path, data: Path, args, K: int, M: int, w: float | None, context_length: int,
           seed: int) -> tuple[Path, float, bool]:
    """Train LoTLIP with K corners, M sub-captions and long weight `w` into `out_dir`, reusing a finished run
    with the same config.

    Returns:
        (model directory, training seconds, whether the run was reused).
    """
    from polymodal.train.reuse import train_or_reuse
    from polymodal.train.run import load_recipe

    recipe, extra = _recipe_for(recipes, K, M)
    overrides = [f"out_dir={out_dir}", f"data.train={data / 'train.jsonl'}", f"data.batch_size={args.batch_size}",
                 f"train.steps={args.steps}", f"train.seed={seed}", f"train.ckpt_every={args.steps}",
                 f"train.progress={'false' if args.quiet else 'true'}", "eval.retrieval=", "eval.longtext=",
                 "eval.zeroshot=", "eval.classes=",
                 f"optim.warmup_steps={min(50, max(1, args.steps // 10))}", *extra]
    if M:
        overrides += [f"data.num_subcaptions={M}", f"lotlip.w_long={w}"]
    if args.model:
        overrides.append(f"model.name={args.model}")
    cfg = load_recipe(recipe, overrides)
    cfg.model.overrides = dict(cfg.model.overrides, **{"text.context_length": context_length})
    return train_or_reuse(cfg, fresh=args.fresh)


def _evaluate(model, data: Path) -> dict:
    """Test numbers (METRICS) and validation numbers (`val_*`, what the sweep chooses on)."""
    from polymodal.eval.tasks import run_suite
    m = run_suite(model, retrieval=str(data / "test.jsonl"), longtext=str(data / "hard.jsonl"),
                  classes=str(data / "classes.json"))
    out = {col: float(m[key]) for col, key in METRICS.items()}
    v = run_suite(model, retrieval=str(data / "val.jsonl"), longtext=str(data / "val.jsonl"),
                  classes=str(data / "classes.json"))
    out.update({f"val_{col}": float(v[key]) for col, key in METRICS.items()})
    return out


def _measure(args, recipes: Path, runs: Path, data: Path, K: int, M: int, w: float | None, ctx: int,
             seed: int) -> dict:
    """Train (or reuse) one run and evaluate it (numbers cached in the run folder)."""
    from polymodal.hub import load_model

    run_dir = runs / run_name(K, M, w, ctx, seed, args.context_length)
    print(f"[lotlip] {run_dir.name}: training", flush=True)
    model_dir, secs, reused = _train(recipes, run_dir, data, args, K, M, w, ctx, seed)
    key = {"eval": "lotlip_ablation", "test": str(data / "test.jsonl"), "hard": str(data / "hard.jsonl"),
           "val": str(data / "val.jsonl"), "metrics": sorted(METRICS)}
    out = {**cached_metrics(run_dir, key, lambda: _evaluate(load_model(model_dir), data), reused),
           "long_R1": 0.0, "val_long_R1": 0.0, "train_s": secs, "reused": reused, "num_corners": K}
    out["long_R1"] = _mean(out["long_i2t_R1"], out["long_t2i_R1"])
    out["val_long_R1"] = _mean(out["val_long_i2t_R1"], out["val_long_t2i_R1"])
    print(f"[lotlip] {run_dir.name}: " + ", ".join(f"{k} {v:.4g}" for k, v in out.items()
                                                   if isinstance(v, float)), flush=True)
    return out


def _time_text(model, texts: list[str], repeats: int) -> tuple[float, float]:
    """Median forward ms of the text tower on `texts` with its K corners and of the same tower without them."""
    from polymodal.methods.clip import trim_padding
    from polymodal.models.text import TextTower

    tower = model.text.eval()
    cfg = tower.config
    plain = TextTower(dataclasses.replace(cfg, num_readout_tokens=0)).eval()
    ids = trim_padding(model.tokenizer(texts), cfg.pad_token_id)     # the same ids for both
    times = {"with": [], "without": []}
    with torch.no_grad():
        tower(ids), plain(ids)                                       # warm-up
        for _ in range(repeats):                                     # interleaved: both see the same load
            for name, t in (("with", tower), ("without", plain)):
                t0 = time.perf_counter()
                t(ids)
                times[name].append(1000 * (time.perf_counter() - t0))
    return statistics.median(times["with"]), statistics.median(times["without"])


# ----------------------------------------------------------------------------- report

def _mean(a: float, b: float) -> float:
    return (a + b) / 2


def _seeds_of(v: dict, key) -> list[float]:
    return [key(r) if callable(key) else r[key] for r in v["per_seed"]]


def _keeps_gain(k2: dict, k0: dict, short: dict) -> str:
    """(c2) per seed: K=2 keeps >= 50% of the long-text gain K=0 has over short-only training (a seed without a
    gain does not agree)."""
    margins = [(g2 - 0.5 * g0) if g0 > 0 else -1.0 for g0, g2 in
               ((a - s, b - s) for a, b, s in zip(_seeds_of(k0, "long_R1"), _seeds_of(k2, "long_R1"),
                                                  _seeds_of(short, "long_R1")))]
    return verdict({"values": margins}, ties_agree=True)


def claims(variants: dict, sweep: list[dict]) -> list[dict]:
    """The synthetic claims of docs/methods.md, LoTLIP, each with the numbers it rests on (means over seeds and the
    paired per-seed difference) and a verdict over seeds (shown / not shown / mixed)."""

    s, k0, k2 = variants["short"], variants["long_k0"], variants["long_k2"]
    d = lambda a, b, key: paired_difference(_seeds_of(a, key), _seeds_of(b, key))
    gain, zs_drop, zs_rec = d(k0, s, "long_R1"), d(k0, s, "zeroshot_top1"), d(k2, k0, "zeroshot_top1")
    out = [
        claim("(a)+(b1) long captions raise long-text R@1 (mean I2T/T2I) over short-only training",
               f"short {s['long_R1']:.1f} -> long K=0 {k0['long_R1']:.1f}; paired {pm_diff(gain)}", verdict(gain)),
        claim("(b2) long captions lower short-text zero-shot top-1",
               f"short {s['zeroshot_top1']:.1f} -> long K=0 {k0['zeroshot_top1']:.1f}; paired {pm_diff(zs_drop)}",
               verdict(zs_drop, direction=-1)),
        claim("(c1) corner tokens (K=2) recover zero-shot top-1 against long K=0",
               f"long K=0 {k0['zeroshot_top1']:.1f} -> K=2 {k2['zeroshot_top1']:.1f}; paired {pm_diff(zs_rec)}",
               verdict(zs_rec)),
        claim("(c2) K=2 keeps most (>= 50%) of the long-text gain",
               f"gain K=0 {k0['long_R1'] - s['long_R1']:.1f}, K=2 {k2['long_R1'] - s['long_R1']:.1f}",
               _keeps_gain(k2, k0, s)),
    ]
    if len(sweep) >= 2:
        first, last = sweep[0], sweep[-1]
        r_first = _mean(first["long_i2t_R1"], first["long_t2i_R1"])
        r_last = _mean(last["long_i2t_R1"], last["long_t2i_R1"])
        ms_first, ms_last = first["text_ms_with_corners"], last["text_ms_with_corners"]
        shown = r_last > r_first and ms_last > ms_first
        out.append(claim("(d) longer training context raises long-text R@1 at a higher text cost (first seed)",
                          f"ctx {first['context_length']}: R@1 {r_first:.1f}, {ms_first:.0f} ms; "
                          f"ctx {last['context_length']}: R@1 {r_last:.1f}, {ms_last:.0f} ms",
                          "shown" if shown else "not shown"))
    return out


def grid_key(K: int, M: int, w: float) -> str:
    return f"K{K}_M{M}_w{w:g}"


def grid_analysis(grid: dict, short: dict, Ks: list[int], Ms: list[int], ws: list[float]) -> dict:
    """Claim (c) over the sweep: K=2 (the largest K of the grid) vs K=0 at every (M, w), and at the (M, w)
    each K reaches its best mean validation zero-shot top-1 (chosen on validation, never on test).

    Returns:
        {"points": [{M, w, zeroshot/val_zeroshot/long diffs, verdict}], "chosen": {K: key}, "chosen_claims": [...]}
    """

    out: dict = {"points": [], "chosen": {}, "claims": []}
    if 0 not in Ks or len(Ks) < 2:
        return out
    kc = max(Ks)
    d = lambda a, b, key: paired_difference(_seeds_of(a, key), _seeds_of(b, key))
    for M in Ms:
        for w in ws:
            a, b = grid[grid_key(kc, M, w)], grid[grid_key(0, M, w)]
            zs = d(a, b, "zeroshot_top1")
            out["points"].append({"M": M, "w": w, "K": kc, "zeroshot": zs, "val_zeroshot": d(a, b, "val_zeroshot_top1"),
                                  "long_R1": d(a, b, "long_R1"), "verdict": verdict(zs)})
    for K in (0, kc):
        keys = [grid_key(K, M, w) for M in Ms for w in ws]
        out["chosen"][K] = max(keys, key=lambda k: grid[k]["val_zeroshot_top1"])
    a, b = grid[out["chosen"][kc]], grid[out["chosen"][0]]
    zs = d(a, b, "zeroshot_top1")
    anywhere = [p for p in out["points"] if p["verdict"] == "shown"]
    out["claims"] = [
        claim(f"(c1, chosen on validation) K={kc} at its best validation setting ({out['chosen'][kc]}) has a higher "
               f"test zero-shot top-1 than K=0 at its best ({out['chosen'][0]})",
               f"K={kc} {a['zeroshot_top1']:.1f} vs K=0 {b['zeroshot_top1']:.1f}; paired {pm_diff(zs)}", verdict(zs)),
        claim(f"(c2, chosen on validation) K={kc} keeps >= 50% of the long-text gain of K=0 over short-only",
               f"long R@1 short {short['long_R1']:.1f}, K=0 {b['long_R1']:.1f}, K={kc} {a['long_R1']:.1f}",
               _keeps_gain(a, b, short)),
        claim(f"(c1, anywhere in the sweep, test) some (M, w) where K={kc} beats K=0 on zero-shot in every seed",
               ", ".join(f"M={p['M']} w={p['w']:g}: {pm_diff(p['zeroshot'])}" for p in out["points"]),
               "shown" if anywhere else "not shown"),
    ]
    return out


def write_markdown(path: Path, result: dict) -> None:

    st, variants, sweep = result["settings"], result["variants"], result["sweep"]
    n = len(st["seeds"])
    f = lambda v, k, d=1: pm(v[k], v["std"][k], n, d)
    lines = [
        "# LoTLIP ablation on ShapesWorld",
        "",
        f"Command: `{st['command']}`  ",
        f"Data: ShapesWorld seed {st['data_seed']}, {st['n_train']} training images, test {st['n_test']}, validation "
        f"{st['n_val']}, hard set {st['n_hard']} (groups of 4 that differ in one non-salient object). Model "
        f"`{st['model']}` with a bidirectional text tower, {st['steps']} steps of batch {st['batch_size']}, M = "
        f"{st['num_subcaptions']} long sub-caption(s) per image for the long variants, context "
        f"{st['context_length']} tokens (corners included). Seeds {st['seeds']} (mean ± sample std). Torch "
        f"threads: {st['threads']}. Total wall time {result['seconds']['total']:.0f} s.",
        "",
        "| variant | long I2T R@1 | long T2I R@1 | zero-shot top-1 | short I2T R@1 | short T2I R@1 | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, v in variants.items():
        lines.append(f"| {v['label']} | {f(v, 'long_i2t_R1')} | {f(v, 'long_t2i_R1')} | {f(v, 'zeroshot_top1')} | "
                     f"{f(v, 'short_i2t_R1')} | {f(v, 'short_t2i_R1')} | {v['train_s']:.0f} |")
    ch = result["chance"]
    lines += ["", f"Chance: long R@1 {ch['long_R1']:.2f}, zero-shot top-1 {ch['zeroshot_top1']:.2f} (64 classes), "
              f"short R@1 {ch['short_R1']:.2f}. On the hard set a model that finds the right group of 4 but "
              "cannot read the differing object scores about 25. Zero-shot top-1 uses the CLS feature only "
              "(`CLIP.encode_text`; the corners are in the sequence but never read out at inference).", ""]
    grid = result.get("grid") or {}
    if grid:
        lines += [f"## Sweep: sub-captions M x long-loss weight w_long x corners K (seeds {st['seeds']})", "",
                  "Validation = the val split (zero-shot top-1, retrieval with the long captions); test = the test "
                  "split (zero-shot) and the hard set (long R@1, mean of I2T and T2I). Choices use validation only.", "",
                  "| K | M | w_long | val zero-shot top-1 | val long R@1 | test zero-shot top-1 | test long R@1 | "
                  "train s |", "|---|---|---|---|---|---|---|---|"]
        for key, v in grid.items():
            lines.append(f"| {v['K']} | {v['M']} | {v['w']:g} | {f(v, 'val_zeroshot_top1')} | {f(v, 'val_long_R1')} | "
                         f"{f(v, 'zeroshot_top1')} | {f(v, 'long_R1')} | {v['train_s']:.0f} |")
        ga = result["grid_analysis"]
        if ga["points"]:
            lines += ["", f"Paired difference K={ga['points'][0]['K']} - K=0 at the same M and w_long (same seed), "
                      "mean ± std (min..max, seeds > 0):", "",
                      "| M | w_long | test zero-shot top-1 | val zero-shot top-1 | test long R@1 |", "|---|---|---|---|---|"]
            for p in ga["points"]:
                lines.append(f"| {p['M']} | {p['w']:g} | {pm_diff(p['zeroshot'])} | {pm_diff(p['val_zeroshot'])} | "
                             f"{pm_diff(p['long_R1'])} |")
            lines += ["", "Chosen on validation (best mean val zero-shot top-1): "
                      + ", ".join(f"K={K}: {k}" for K, k in ga["chosen"].items()) + "."]
        lines.append("")
    lines += [f"## Context-length sweep (K = 2, the `{SWEEP_VARIANT}` recipe trained at each length, seed "
              f"{st['seeds'][0]})", "",
              "| context | long I2T R@1 | long T2I R@1 | zero-shot top-1 | text ms/batch (K corners) | "
              "text ms/batch (no corners) | corner overhead % | train s |",
              "|---|---|---|---|---|---|---|---|"]
    for r in sweep:
        lines.append(f"| {r['context_length']} | {r['long_i2t_R1']:.1f} | {r['long_t2i_R1']:.1f} | "
                     f"{r['zeroshot_top1']:.1f} | {r['text_ms_with_corners']:.1f} | "
                     f"{r['text_ms_without_corners']:.1f} | "
                     f"{r['corner_overhead_pct']:+.1f} | {r['train_s']:.0f} |")
    lines += ["", f"Text time: forward of the text tower on {st['time_batch']} hard-set long captions tokenized at "
              "context - K and trimmed to the longest; the same ids through the same tower without corners; median "
              f"of {st['time_repeats']} interleaved runs. The CPU was shared with other work, so times are indicative.",
              "", "## Claims (docs/methods.md, LoTLIP) at this scale", "",
              f"Verdict over seeds: {VERDICT_RULE}.", ""]
    lines += claim_lines(result["claims"] + result.get("grid_claims", []))
    from polymodal.fileio import atomic_open
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- main

def run(args) -> dict:
    from polymodal.eval.report import write_json
    from polymodal.hub import load_model

    data_seed = args.seed if args.data_seed is None else args.data_seed
    seeds = list(args.seeds) if args.seeds else [args.seed]
    out, runs, data, t_start = prepare(args, n_hard=args.n_hard, data_seed=data_seed)
    recipes = Path(args.recipes)
    hard = [json.loads(line) for line in (data / "hard.jsonl").read_text().splitlines() if line.strip()]
    time_texts = [r["long_caption"] for r in hard[: args.time_batch]]
    from polymodal.train.run import load_recipe
    recipe_m = load_recipe(recipes / "lotlip_long_k2.yaml").data.num_subcaptions
    m_main = args.num_subcaptions or recipe_m
    w_main = 1.0

    def variant_km(name: str, recipe: str) -> tuple[int, int]:
        cfg = load_recipe(recipes / recipe)
        return cfg.lotlip.num_corners, (m_main if cfg.data.num_subcaptions else 0)

    def measure(K, M, w, ctx):
        return lambda seed: _measure(args, recipes, runs, data, K, M, w if M else None, ctx, seed)

    def summarise(res: dict, **extra) -> dict:
        per_seed = res["per_seed"]
        return {**extra, **res["mean"], "std": res["std"], "seeds": res["seeds"], "per_seed": per_seed,
                "reused": all(r["reused"] for r in per_seed), "num_corners": per_seed[0]["num_corners"]}

    main = [(name, label, *variant_km(name, recipe)) for name, recipe, label in VARIANTS if name in args.variants]
    Ms, ws = list(args.subcaptions) or [m_main], list(args.long_weights) or [w_main]
    with_grid = bool(args.subcaptions or args.long_weights)
    grid_points = [(K, M, w) for M in Ms for w in ws for K in args.grid_corners] if with_grid else []
    # Seed-major first pass: an interrupted run (rerun it: finished runs are reused) still covers every
    # variant and grid point with the first seeds.
    for seed in seeds:
        for _, _, K, M in main:
            measure(K, M, w_main, args.context_length)(seed)
        for K, M, w in grid_points:
            measure(K, M, w, args.context_length)(seed)
    variants: dict = {}
    for name, label, K, M in main:
        variants[name] = summarise(over_seeds(seeds, measure(K, M, w_main, args.context_length)), label=label)

    grid: dict = {}
    if with_grid:
        for M in Ms:
            for w in ws:
                for K in args.grid_corners:
                    grid[grid_key(K, M, w)] = summarise(over_seeds(seeds, measure(K, M, w, args.context_length)),
                                                        K=K, M=M, w=w)
    grid_result = (grid_analysis(grid, variants["short"], list(args.grid_corners), Ms, ws)
                   if grid and "short" in variants else {})

    sweep = []
    K2, M2 = variant_km(SWEEP_VARIANT, dict((n, r) for n, r, _ in VARIANTS)[SWEEP_VARIANT])
    for ctx in sorted(set(args.contexts)):
        print(f"[lotlip] sweep: context {ctx}", flush=True)
        metrics = _measure(args, recipes, runs, data, K2, M2, w_main, ctx, seeds[0])
        model = load_model(runs / run_name(K2, M2, w_main, ctx, seeds[0], args.context_length) / "model")
        with_ms, without_ms = _time_text(model, time_texts, args.time_repeats)
        sweep.append({"context_length": ctx, **{k: metrics[k] for k in METRICS}, "text_ms_with_corners": with_ms,
                      "text_ms_without_corners": without_ms,
                      "corner_overhead_pct": 100.0 * (with_ms / without_ms - 1.0), "train_s": metrics["train_s"]})
        print(f"[lotlip] sweep: {sweep[-1]}", flush=True)

    n_classes = len(json.loads((data / "classes.json").read_text())["classes"])
    result = {
        "settings": {"command": command_line("lotlip_ablation.py", __name__ == "__main__"),
                     "seed": seeds[0], "seeds": seeds, "data_seed": data_seed, "n_train": args.n_train,
                     "n_test": args.n_test, "n_val": args.n_val, "n_hard": args.n_hard,
                     "steps": args.steps, "batch_size": args.batch_size, "model": args.model or "small (recipes)",
                     "num_subcaptions": m_main, "long_weight": w_main,
                     "context_length": args.context_length, "subcaptions": Ms if grid else [],
                     "long_weights": ws if grid else [], "grid_corners": list(args.grid_corners) if grid else [],
                     "contexts": sorted(set(args.contexts)), "time_batch": len(time_texts),
                     "time_repeats": args.time_repeats, "threads": torch.get_num_threads()},
        "chance": {"long_R1": 100.0 / args.n_hard, "short_R1": 100.0 / args.n_test, "zeroshot_top1": 100.0 / n_classes},
        "variants": variants,
        "grid": grid,
        "grid_analysis": grid_result,
        "sweep": sweep,
    }
    need = {"short", "long_k0", "long_k2"}
    result["claims"] = claims(variants, sweep) if need <= set(variants) else []
    result["grid_claims"] = grid_result.get("claims", [])
    result["seconds"] = {"total": time.time() - t_start}
    result["machine"] = machine_info()
    write_json(out / "results.json", result)
    write_markdown(out / "results.md", result)
    print(f"[lotlip] wrote {out / 'results.md'} and {out / 'results.json'}", flush=True)
    return result


if __name__ == "__main__":
    run(parse_args())
