"""What every benchmark shares: the command line basics (`base_parser`: --out, --runs, --seeds, --threads),
threads (`set_threads`), the machine it ran on (`machine_info`, recorded beside every result), cached synthetic
worlds (`moving_shapes_world`, `shapes_world`), the CLIP stand-in every video benchmark adapts (`clip_standin`,
built once and cached by content), several seeds (`over_seeds`, `seed_summary`, `paired_difference`,
`verdict`: shown / not shown / mixed), mean ± sd text (`pm`, `pm_values`, `pm_diff`), claims as Markdown
(`claim_lines`), results written atomically (`write_results`, `finish`), and for the recipe comparisons
(`m2_bilingual.py`, `sycoca_ablation.py`, `pooler_init.py`, `lotlip_ablation.py`) their common options, data
preparation, training a recipe variant (reusing finished runs) and cached evaluation numbers.

Scripts put the repository root on `sys.path` and import it as `benchmarks.common`."""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
HIDDEN = argparse.SUPPRESS       # help= of an option kept out of --help


# ----------------------------------------------------------------------------- command line, threads, machine

def base_parser(doc: str, out: str | None = None, runs: str | None = None, seeds: list[int] | None = None,
                threads: int | None = 0, out_help: str = "where the results go") -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark spells the same way.

    Args:
        doc: the script's docstring (its first paragraph is the description).
        out: default of `--out` (None: `--out` is required).
        runs: default of `--runs` (training runs, generated data); None: no `--runs`.
        seeds: default of `--seeds` (training seeds, `--seeds 0 1 2`); None: no `--seeds`.
        threads: default of `--threads` (torch threads; 0 = torch's default); None: no `--threads` (a script
            whose `--threads` means something else).
        out_help: help text of `--out`.
    """
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    if out is None:
        p.add_argument("--out", required=True, help=out_help)
    else:
        p.add_argument("--out", default=out, help=out_help)
    if runs is not None:
        p.add_argument("--runs", default=runs, help="training runs and generated data")
    if seeds is not None:
        p.add_argument("--seeds", type=int, nargs="+", default=list(seeds), help="training seeds")
    if threads is not None:
        p.add_argument("--threads", type=int, default=threads,
                       help=f"torch threads (0 = torch's default; default {threads or 'torch'})")
    return p


def set_threads(threads: int) -> int:
    """`torch.set_num_threads(threads)` unless 0; returns the threads torch uses."""
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


VECTOR_FLAG_PREFIXES = ("avx2", "avx512", "amx", "fma", "bf16")   # the CPU flags that decide matmul speed


def machine_info() -> dict:
    """The machine a benchmark ran on, from lscpu (platform's guess where lscpu is missing).

    Returns:
        {"cpu": model name, "cores": logical CPUs, "flags": the vector flags (avx2, avx512*, amx*, fma, bf16),
        "torch": version, "torch_cpu_capability", "gpu": CUDA device name or None}.
    """
    import os
    import platform
    import subprocess

    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        text = ""
    fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in text.splitlines() if ":" in line)}
    flags = sorted(f for f in fields.get("Flags", "").split() if f.startswith(VECTOR_FLAG_PREFIXES))
    return {"cpu": fields.get("Model name", platform.processor() or platform.machine()), "cores": os.cpu_count(),
            "flags": flags, "torch": torch.__version__,
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def machine_line(info: dict) -> str:
    """One line for a report: "CPU model (N cores; flags), torch version[, GPU name]"."""
    gpu = f", GPU {info['gpu']}" if info.get("gpu") else ""
    return (f"{info['cpu']} ({info['cores']} cores; {' '.join(info['flags']) or 'no avx2'}), "
            f"torch {info['torch']}{gpu}")


# ----------------------------------------------------------------------------- cached synthetic worlds

WORLD_STAMP = "benchmark_world.json"      # the settings a benchmark generated a world folder with


def cached_world(data: Path, settings: dict, generate, needs: tuple[str, ...] = ("train.jsonl",)) -> Path:
    """Generate a world into `data` unless the same settings made what is there.

    Args:
        data: the world folder.
        settings: everything the world depends on (JSON-able); stored in `data/benchmark_world.json`.
        generate: `generate()` writes the world into `data`.
        needs: files that must exist for a stored world to be reused.
    Returns:
        `data`.
    """
    import json

    from polymodal.eval.report import write_json

    data = Path(data)
    stamp = data / WORLD_STAMP
    want = json.loads(json.dumps(settings))
    if stamp.is_file() and json.loads(stamp.read_text()) == want and all((data / f).is_file() for f in needs):
        return data
    generate()
    write_json(stamp, want)
    return data


def moving_shapes_world(data: Path, progress: bool = False, **settings) -> Path:
    """A MovingShapes world (`generate_moving_shapes(data, **settings)`, seed 0 unless given, one worker),
    reused when the same settings made it."""
    from polymodal.data.synthetic.moving_shapes import generate_moving_shapes

    settings = {"seed": 0, **settings}
    return cached_world(data, {"world": "moving_shapes", **settings},
                        lambda: generate_moving_shapes(data, workers=1, progress=progress, **settings),
                        needs=("train.jsonl", "test.jsonl"))


def shapes_world(data: Path, n_train: int, n_test: int, n_val: int, n_hard: int = 0, seed: int = 0) -> Path:
    """A ShapesWorld data set in `data` (`polymodal.demo.ensure_shapes`: reused when its meta.json has the
    same counts and seed)."""
    from polymodal.demo import ensure_shapes

    return ensure_shapes(Path(data), n_train, n_test, n_val, n_hard, seed)


STANDIN_RECIPE = ROOT / "recipes" / "clip_moving_standin.yaml"


def standin_key(data_settings: dict, recipe: Path, overrides: list[str]) -> str:
    """The content key of a stand-in build: a hash of the data settings, the recipe file's bytes and the
    overrides (16 hex digits)."""
    import hashlib
    import json

    h = hashlib.sha256(json.dumps(data_settings, sort_keys=True).encode())
    h.update(Path(recipe).read_bytes())
    h.update(json.dumps(list(overrides)).encode())
    return h.hexdigest()[:16]


def clip_standin(runs: Path, threads: int = 1, positions: bool = True, image_size: int = 32, num_frames: int = 8,
                 n_train: int = 8000, n_val: int = 200, steps: int | None = None, seed: int = 0,
                 recipe: Path = STANDIN_RECIPE, progress: bool = False) -> Path:
    """The CLIP stand-in every MovingShapes video benchmark adapts, built once and cached by content.

    Generates still MovingShapes frames (`polymodal.data.synthetic.moving_frames`) and trains
    `recipes/clip_moving_standin.yaml` on them (a normal `polymodal train` run). Both are kept under
    `<runs>/standin/<key>/`, where the key hashes the data settings, the recipe file and the overrides: a
    second call with the same inputs returns at once, a changed recipe or setting builds a new one.

    Args:
        runs: the benchmark's runs folder (several benchmarks may share one: pass the same folder).
        threads: torch threads for training.
        positions: captions name the actor's place (the default stand-in) or not.
        image_size, num_frames: the MovingShapes world the video runs use (frame size, frames per video).
        n_train, n_val: frames to train on and to report retrieval on.
        steps: training steps (None = the recipe's).
        seed: data and training seed.
        recipe: the recipe file.
        progress: show progress bars.
    Returns:
        The saved model folder (`model.path=` of a video recipe).
    """
    from polymodal.data.synthetic.moving_frames import MovingFramesConfig, generate_moving_frames
    from polymodal.train.reuse import train_or_reuse
    from polymodal.train.run import load_recipe

    data_settings = {"world": "moving_frames", "n_train": n_train, "n_val": n_val, "n_test": 0, "seed": seed,
                     "image_size": image_size, "num_frames": num_frames, "positions": positions}
    extra = [f"train.steps={steps}"] if steps else []
    extra += [f"train.seed={seed}", f"train.threads={threads or 1}", f"train.progress={str(progress).lower()}"]
    key = standin_key(data_settings, recipe, extra)
    folder = Path(runs) / "standin" / key
    model = folder / "run" / "model"
    if (model / "config.json").is_file() and (folder / "run" / "final_metrics.json").is_file():
        return model
    cfg = MovingFramesConfig(image_size=image_size, num_frames=num_frames, positions=positions)
    data = cached_world(folder / "data", data_settings,
                        lambda: generate_moving_frames(folder / "data", n_train, 0, n_val, seed, cfg, progress=progress),
                        needs=("train.jsonl", "val.jsonl", "classes.json"))
    run = load_recipe(recipe, [f"out_dir={folder / 'run'}", f"data.train={data / 'train.jsonl'}",
                               f"eval.retrieval={data / 'val.jsonl'}", f"eval.classes={data / 'classes.json'}", *extra])
    model_dir, _, _ = train_or_reuse(run)
    return model_dir


# ----------------------------------------------------------------------------- recipe comparisons

def experiment_parser(doc: str, out: str, runs: str, model_help: str, steps: int = 600) -> argparse.ArgumentParser:
    """An argument parser with the options every recipe comparison takes.

    Args:
        doc: the script's docstring (its first paragraph is the description).
        out, runs: default results folder and training-runs folder.
        model_help: help text of `--model` (names the recipes' default config).
        steps: default optimizer steps per run.
    """
    p = base_parser(doc, out, runs, out_help="where results.json / results.md go")
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
    p.add_argument("--fresh", action="store_true", help="retrain even when a finished run with the same config exists")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def prepare(args, n_hard: int = 0, data_seed: int | None = None) -> tuple[Path, Path, Path, float]:
    """Set threads, create the output folder and generate (or reuse) ShapesWorld (`n_hard` hard long-text
    images; seed `data_seed`, default `args.data_seed`).

    Returns:
        (out folder, runs folder, data folder, start time).
    """
    set_threads(args.threads)
    start = time.time()
    out, runs = Path(args.out), Path(args.runs)
    out.mkdir(parents=True, exist_ok=True)
    data = shapes_world(Path(args.data) if args.data else runs / "data", args.n_train, args.n_test, args.n_val,
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


def claim(text: str, numbers: str, outcome: str | bool | None) -> dict:
    """One claim for `claim_lines` and the JSON: {"claim", "numbers", "verdict", "shown"}.

    Args:
        outcome: a `verdict` ("shown" / "not shown" / "mixed"), a bool (a claim judged once, e.g. on the seed
            means), or None when the numbers cannot tell ("n/a").
    """
    v = "n/a" if outcome is None else ("shown" if outcome else "not shown") if isinstance(outcome, bool) else outcome
    return {"claim": text, "numbers": numbers, "verdict": v, "shown": v == "shown"}


def claim_lines(claims: list[dict]) -> list[str]:
    """Markdown bullets: each claim, whether it shows (its "verdict" when it has one: shown / not shown /
    mixed over seeds, n/a), and its numbers."""
    def word(c):
        v = c.get("verdict")
        return ("NOT shown" if v == "not shown" else v) if v else ("shown" if c["shown"] else "NOT shown")
    return [f"- {word(c)}: {c['claim']} ({c['numbers']})" for c in claims]


def write_results(out: Path, result: dict, markdown: str | None = None, name: str = "results") -> None:
    """Write `<out>/<name>.json` (with `machine_info()` added as "machine" unless there) and, given the text,
    `<out>/<name>.md`, each atomically."""
    from polymodal.eval.report import write_json
    from polymodal.fileio import atomic_open

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result.setdefault("machine", machine_info())
    write_json(out / f"{name}.json", result)
    if markdown is not None:
        with atomic_open(out / f"{name}.md", "w", encoding="utf-8") as f:
            f.write(markdown)


def finish(out: Path, result: dict, start: float, render_markdown, tag: str) -> dict:
    """Add the total time and the machine, write `results.json` and `results.md` (`render_markdown(result)`)
    atomically."""
    result["seconds"] = {"total": time.time() - start}
    result.setdefault("machine", machine_info())
    write_results(out, result, render_markdown(result))
    print(f"[{tag}] wrote {Path(out) / 'results.md'} and {Path(out) / 'results.json'}", flush=True)
    return result


# ----------------------------------------------------------------------------- several seeds

def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def seed_summary(values: list[float], drop_missing: bool = False) -> dict:
    """Mean and spread of one number over seeds.

    Args:
        values: the number, one per seed.
        drop_missing: leave out None and NaN (a metric some seeds cannot measure); when nothing is left the
            mean and std are NaN. Without it an empty list is an error.
    Returns:
        {"mean", "std" (sample standard deviation, n - 1 in the denominator; 0 for one seed), "n", "values"}.
    """
    import statistics

    if drop_missing:
        values = [v for v in values if not _missing(v)]
        if not values:
            return {"mean": math.nan, "std": math.nan, "n": 0, "values": []}
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


VERDICT_RULE = ("shown = every seed's paired difference has the claimed sign, not shown = none has, "
                "mixed = some do")


def verdict(diff: dict, direction: int = 1, margin: float = 0.0, ties_agree: bool = False) -> str:
    """"shown" when every seed's difference has the claimed sign, "not shown" when none has, else "mixed".

    Args:
        diff: a `paired_difference` (any {"values"}: the per-seed differences).
        direction: +1 when the claim says variant > reference, -1 when it says variant < reference.
        margin: with every seed agreeing, the mean difference must also exceed this (e.g. the seed std of
            either side) to count as "shown"; within it the claim is "not shown" (within noise).
        ties_agree: a zero difference agrees (claims of "at least as good").
    """
    values = list(diff["values"])
    agree = sum(d * direction > 0 or (ties_agree and d == 0) for d in values)
    if values and agree == len(values):
        mean = direction * sum(values) / len(values)
        return "shown" if mean > margin or (ties_agree and mean >= margin) else "not shown"
    return "not shown" if agree == 0 else "mixed"


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


def pm(mean: float, std: float, n: int = 2, digits: int = 1, sign: bool = False) -> str:
    """"mean ± std" (just the mean for a single seed, n < 2; "–" for a NaN mean); `sign`: "+" on positives."""
    if _missing(mean):
        return "–"
    m = f"{mean:+.{digits}f}" if sign else f"{mean:.{digits}f}"
    return f"{m} ± {std:.{digits}f}" if n > 1 else m


def pm_values(values: list[float], digits: int = 1, sign: bool = False) -> str:
    """`pm` of a number over seeds (None and NaN left out): "mean ± sample std"."""
    s = seed_summary(values, drop_missing=True)
    return pm(s["mean"], s["std"], s["n"], digits, sign)


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


def vqa_test_numbers(run_dir: Path, model_dir: Path, test: Path, tag: str, reused: bool, keys) -> dict:
    """The `vqa` task's numbers `keys` of a VQA run's saved model on `test`, cached in the run folder
    (`cached_metrics`, named `tag`)."""
    def measure() -> dict:
        from polymodal.eval.tasks import run_task
        from polymodal.hub import load_model
        m = run_task("vqa", load_model(model_dir).eval(), str(test))
        return {k: float(m[k]) for k in keys if k in m}
    return cached_metrics(run_dir, {"eval": tag, "test": str(test)}, measure, reused)


def above_majority_claims(variants: dict) -> list[dict]:
    """One claim per variant: its VQA accuracy is above the majority-answer baseline on every seed."""
    out = []
    for v in variants.values():
        above = [a - b for a, b in zip(v["values"]["vqa_accuracy"], v["values"]["majority_vqa_accuracy"])]
        out.append(claim(f"{v['label']} answers above the majority-answer baseline",
                         f"VQA accuracy - majority {sum(above) / len(above):+.1f}, {sum(d > 0 for d in above)}/"
                         f"{len(above)} seeds > 0", verdict({"values": above})))
    return out


def vqa_table(variants: dict, types, n: int) -> list[str]:
    """Markdown lines of the VQA benchmarks' table: accuracy, exact match, majority, per type, seconds."""
    f = lambda v, k: pm(v["mean"][k], v["std"][k], n) if k in v["mean"] else "n/a"     # noqa: E731
    lines = ["| variant | VQA accuracy | exact match | majority baseline | " + " | ".join(types) +
             " | pretrain s | VQA s |", "|---|---|---|---|" + "---|" * len(types) + "---|---|"]
    for v in variants.values():
        lines.append(f"| {v['label']} | {f(v, 'vqa_accuracy')} | {f(v, 'exact_match')} | "
                     f"{f(v, 'majority_vqa_accuracy')} | " + " | ".join(f(v, f'type/{t}/vqa_accuracy') for t in types)
                     + f" | {v['mean']['pretrain_s']:.0f} | {v['mean']['vqa_s']:.0f} |")
    return lines


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
