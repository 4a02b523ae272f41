"""Shared parts of the recipe-comparison benchmarks (`m2_bilingual.py`, `sycoca_ablation.py`; `prepare` also
for `lotlip_ablation.py`): common command-line options, data preparation, training a recipe variant (reusing
finished runs) and writing results. Imported by those scripts after they put the repository root on
`sys.path`."""
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


def train_variant(recipe: Path, out_dir: Path, data: Path, args, seed: int, extra: list[str] = ()):
    """Train `recipe` on `data` with the comparison's shared settings, reusing a finished identical run.

    Returns:
        (model directory, training seconds, the run's RunConfig).
    """
    from polymodal.train.reuse import train_or_reuse
    from polymodal.train.run import load_recipe

    overrides = [f"out_dir={out_dir}", f"data.train={data / 'train.jsonl'}", f"data.batch_size={args.batch_size}",
                 f"train.steps={args.steps}", f"train.seed={seed}", f"train.ckpt_every={args.steps}",
                 f"train.progress={'false' if args.quiet else 'true'}", f"eval.retrieval={data / 'val.jsonl'}",
                 f"eval.classes={data / 'classes.json'}", f"optim.warmup_steps={min(50, max(1, args.steps // 10))}"]
    if args.model:
        overrides.append(f"model.name={args.model}")
    if args.vocab_size:
        overrides.append(f"tokenizer.vocab_size={args.vocab_size}")
    cfg = load_recipe(recipe, overrides + list(extra))
    model_dir, seconds, _ = train_or_reuse(cfg, fresh=args.fresh)
    return model_dir, seconds, cfg


def command_line(script: str, is_main: bool) -> str:
    """How the results were made, for the report."""
    return f"python benchmarks/{script} " + " ".join(sys.argv[1:]) if is_main else "run(parse_args(...))"


def claim_lines(claims: list[dict]) -> list[str]:
    """Markdown bullets: each claim, whether it shows, and its numbers."""
    return [f"- {'shown' if c['shown'] else 'NOT shown'}: {c['claim']} ({c['numbers']})" for c in claims]


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
