"""Shared parts of the recipe-comparison benchmarks (`m2_bilingual.py`, `sycoca_ablation.py`, `pooler_init.py`;
`prepare` and the seed helpers also for `lotlip_ablation.py`): common command-line options, data preparation,
training a recipe variant (reusing finished runs), several seeds (mean ± std, paired differences, a verdict
per claim), cached evaluation numbers and writing results atomically. Imported by those scripts after they
put the repository root on `sys.path`."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def experiment_parser(doc: str, out: str, runs: str, model_help: str, steps: int = 600) -> argparse.ArgumentParser:
    """An argument parser with the options every recipe comparison takes.

    Args:
        doc: the script's docstring (its first paragraph is the description).
        out, runs: default results folder and training-runs folder.
        model_help: help text of `--model` (names the recipes' default config).
        steps: default optimizer steps per run.
    """
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=out, help="where results.json / results.md go")
    p.add_argument("--runs", default=runs, help="training runs (checkpoints, models)")
    p.add_argument("--data", default="", help="ShapesWorld folder (default <runs>/data)")
    p.add_argument("--recipes", default=str(ROOT / "recipes"), help="folder holding the recipes")
    p.add_argument("--n-train", type=int, default=8000)
    p.add_argument("--n-test", type=int, default=500)
    p.add_argument("--n-val", type=int, default=200)
    p.add_argument("--data-seed", type=int, default=0, help="ShapesWorld seed")
    p.add_argument("--steps", type=int, default=steps, help="optimizer steps per run")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--model", default="", help=model_help)
    p.add_argument("--vocab-size", type=int, default=0, help="tokenizer vocabulary (0 = the recipes' value)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="extra recipe override for the compared runs, e.g. 'optim.lr=5e-4' (repeatable)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--fresh", action="store_true", help="retrain even when a finished run with the same config exists")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def prepare(args, n_hard: int = 0, data_seed: int | None = None) -> tuple[Path, Path, Path, float]:
    """Set threads, create the output folder and generate (or reuse) ShapesWorld (`n_hard` hard long-text
    images; seed `data_seed`, default `args.data_seed`).

    Returns:
        (out folder, runs folder, data folder, start time).
    """
    from polymodal.demo import ensure_shapes

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    out, runs = Path(args.out), Path(args.runs)
    out.mkdir(parents=True, exist_ok=True)
    data = ensure_shapes(Path(args.data) if args.data else runs / "data", args.n_train, args.n_test, args.n_val,
                         n_hard, args.data_seed if data_seed is None else data_seed)
    return out, runs, data, start


def variant_config(recipe: Path, out_dir: Path, data: Path, args, seed: int, extra: list[str] = ()):
    """The RunConfig of `recipe` with the comparison's shared settings (what `train_variant` trains)."""
    from polymodal.train.run import load_recipe

    overrides = [f"out_dir={out_dir}", f"data.train={data / 'train.jsonl'}", f"data.batch_size={args.batch_size}",
                 f"train.steps={args.steps}", f"train.seed={seed}", f"train.ckpt_every={args.steps}",
                 f"train.progress={'false' if args.quiet else 'true'}", f"eval.retrieval={data / 'val.jsonl'}",
                 f"eval.classes={data / 'classes.json'}", f"optim.warmup_steps={min(50, max(1, args.steps // 10))}"]
    if args.model:
        overrides.append(f"model.name={args.model}")
    if args.vocab_size:
        overrides.append(f"tokenizer.vocab_size={args.vocab_size}")
    return load_recipe(recipe, overrides + list(extra))


def train_variant(recipe: Path, out_dir: Path, data: Path, args, seed: int, extra: list[str] = ()):
    """Train `recipe` on `data` with the comparison's shared settings, reusing a finished identical run.

    Returns:
        (model directory, training seconds, the run's RunConfig).
    """
    from polymodal.train.reuse import train_or_reuse

    cfg = variant_config(recipe, out_dir, data, args, seed, extra)
    model_dir, seconds, _ = train_or_reuse(cfg, fresh=args.fresh)
    return model_dir, seconds, cfg


def command_line(script: str, is_main: bool) -> str:
    """How the results were made, for the report."""
    return f"python benchmarks/{script} " + " ".join(sys.argv[1:]) if is_main else "run(parse_args(...))"


def claim_lines(claims: list[dict]) -> list[str]:
    """Markdown bullets: each claim, whether it shows (its "verdict" when it has one: shown / not shown /
    mixed over seeds), and its numbers."""
    def word(c):
        v = c.get("verdict")
        return ("NOT shown" if v == "not shown" else v) if v else ("shown" if c["shown"] else "NOT shown")
    return [f"- {word(c)}: {c['claim']} ({c['numbers']})" for c in claims]


def finish(out: Path, result: dict, start: float, render_markdown, tag: str) -> dict:
    """Add the total time, write `results.json` and `results.md` (`render_markdown(result)`) atomically."""
    from polymodal.eval.report import write_json
    from polymodal.fileio import atomic_open

    result["seconds"] = {"total": time.time() - start}
    write_json(out / "results.json", result)
    with atomic_open(out / "results.md", "w", encoding="utf-8") as f:
        f.write(render_markdown(result))
    print(f"[{tag}] wrote {out / 'results.md'} and {out / 'results.json'}", flush=True)
    return result


# ----------------------------------------------------------------------------- several seeds

def seed_summary(values: list[float]) -> dict:
    """Mean and spread of one number over seeds.

    Args:
        values: the number, one per seed.
    Returns:
        {"mean", "std" (sample standard deviation, n - 1 in the denominator; 0 for one seed), "n", "values"}.
    """
    import statistics

    values = [float(v) for v in values]
    if not values:
        raise ValueError("seed_summary: no values (did every seed fail?)")
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "n": len(values), "values": values}


def paired_difference(variant: list[float], reference: list[float]) -> dict:
    """Per-seed difference variant - reference (same seed = same data order and initialisation draw).

    Args:
        variant, reference: the number for each seed, in the same seed order.
    Returns:
        `seed_summary` of the differences plus "min", "max" and "n_positive" (seeds where variant > reference).
    """
    if len(variant) != len(reference):
        raise ValueError(f"paired_difference: {len(variant)} variant seeds vs {len(reference)} reference seeds; "
                         "run both over the same --seeds")
    diffs = [float(a) - float(b) for a, b in zip(variant, reference)]
    return {**seed_summary(diffs), "min": min(diffs), "max": max(diffs), "n_positive": sum(d > 0 for d in diffs)}


def verdict(diff: dict, direction: int = 1) -> str:
    """"shown" when every seed's difference has the claimed sign, "not shown" when none has, else "mixed".

    Args:
        diff: a `paired_difference`.
        direction: +1 when the claim says variant > reference, -1 when it says variant < reference.
    """
    agree = sum(d * direction > 0 for d in diff["values"])
    return "shown" if agree == diff["n"] else "not shown" if agree == 0 else "mixed"


def over_seeds(seeds: list[int], run_one) -> dict:
    """Run one variant for every seed and summarise each number it returns.

    Args:
        seeds: training seeds.
        run_one: `run_one(seed) -> {name: float | other}`; floats are summarised, the rest kept per seed.
    Returns:
        {"seeds", "per_seed": [metrics of each seed], "mean": {name: mean}, "std": {name: std}}.
    """
    per_seed = [run_one(seed) for seed in seeds]
    keys = [k for k, v in per_seed[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    stats = {k: seed_summary([m[k] for m in per_seed]) for k in keys}
    return {"seeds": list(seeds), "per_seed": per_seed, "mean": {k: s["mean"] for k, s in stats.items()},
            "std": {k: s["std"] for k, s in stats.items()}}


def paired_over_seeds(variant: dict, reference: dict, keys) -> dict:
    """`paired_difference` of `over_seeds` results for each of `keys`: {key: difference summary}."""
    if variant["seeds"] != reference["seeds"]:
        raise ValueError(f"paired_over_seeds: seeds {variant['seeds']} vs {reference['seeds']}; pair the same seeds")
    return {k: paired_difference([m[k] for m in variant["per_seed"]], [m[k] for m in reference["per_seed"]])
            for k in keys}


def pm(mean: float, std: float, n: int = 2, digits: int = 1) -> str:
    """"mean ± std" (just the mean for a single seed, n < 2)."""
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


def pm_diff(diff: dict, digits: int = 1) -> str:
    """A paired difference as "+mean ± std (min..max, k/n > 0)"."""
    return (f"{diff['mean']:+.{digits}f} ± {diff['std']:.{digits}f} ({diff['min']:+.{digits}f}..{diff['max']:+.{digits}f}, "
            f"{diff['n_positive']}/{diff['n']} > 0)")


def cached_metrics(run_dir: Path, key: dict, compute, reused: bool) -> dict:
    """Evaluation numbers of a finished run, reused on rerun when the run and the evaluation are unchanged.

    The cache lives in the run folder, which `train_or_reuse` deletes when the run is retrained, so numbers
    never outlive the model they were measured on.

    Args:
        run_dir: the run's `out_dir`.
        key: what the numbers depend on besides the model (evaluation sets, options); JSON-able. Its
            "eval" entry (a benchmark name) names the cache file, so benchmarks sharing a run keep theirs.
        compute: `compute() -> dict` of numbers.
        reused: whether the training run was reused (a fresh run always recomputes).
    Returns:
        The numbers.
    """
    import json

    from polymodal.eval.report import write_json

    path = Path(run_dir) / f"bench_eval_{key.get('eval', 'metrics')}.json"
    want = json.loads(json.dumps(key, default=str))
    if reused and path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == want:
            return saved["metrics"]
    metrics = compute()
    write_json(path, {"key": want, "metrics": metrics})
    return metrics


def leave_plateau_step(metrics_file: Path, key: str, threshold: float) -> int | None:
    """First logged step whose `key` loss is below `threshold` (None if it never is).

    Args:
        metrics_file: a run's metrics.jsonl.
        key: the logged loss, e.g. "itc".
        threshold: e.g. ln(B) - 0.5 for an InfoNCE that starts at ln(B).
    """
    import json

    for line in Path(metrics_file).read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if key in row and "step" in row and row[key] is not None and float(row[key]) < threshold:
            return int(row["step"])
    return None
