"""MSSM vs MLM on video QA for SNP-S3, on MovingShapes QA (issue #34 items 2 and 5). One command:

    python benchmarks/snps3_vqa.py --out docs/results/snps3_vqa --seeds 0 1 2

1. Generates a MovingShapes world (with compound order actions, as recipes/vqa_moving.yaml's header) and MovingShapes
   QA on it, so the QA training videos are the pretraining videos and the QA test videos are unseen.
2. Per seed, pretrains recipes/snps3_full.yaml (MSSM) and recipes/snps3_mlm.yaml (plain MLM; otherwise identical)
   on the world's captions for `--steps` steps; finished runs with the same config are reused.
3. Per seed, fine-tunes recipes/vqa_snps3.yaml from each pretrained model (`model.path`) with the same training
   seed, for `--vqa-steps` steps (0 = the recipe's).
4. Scores each VQA model on the QA test split (nothing is tuned on it): VQA accuracy, exact match, per question
   type, and the majority-answer baseline stored in each model (the same for both: same training answers).
5. Over `--seeds`: mean ± sample std, the paired difference MSSM - MLM per seed, and a verdict per claim (shown:
   every seed agrees; not shown: none does; mixed).
6. Writes `<out>/results.json` and `<out>/results.md`.

`--quick`: a tiny world, a few steps (the smoke test's setting; numbers mean nothing).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:          # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from benchmarks.common import (VERDICT_RULE, above_majority_claims, base_parser, cached_world, claim,  # noqa: E402
                               claim_lines, command_line, finish, machine_line, moving_shapes_world,
                               over_seeds, paired_difference, pm_diff, set_threads, verdict, vqa_table,
                               vqa_test_numbers)

VARIANTS = (("mssm", "snps3_full.yaml", "SNP-S3 with MSSM -> VQA"),
            ("mlm", "snps3_mlm.yaml", "SNP-S3 with plain MLM -> VQA"))
TYPES = ("what", "moves", "direction", "action", "first", "last")
NUMBERS = ("vqa_accuracy", "exact_match", "majority_vqa_accuracy",
           *(f"type/{t}/{k}" for t in TYPES for k in ("vqa_accuracy", "majority_vqa_accuracy")))


def parse_args(argv=None):
    p = base_parser(__doc__, "docs/results/snps3_vqa", "runs/snps3_vqa", seeds=[0, 1, 2], threads=1,
                    out_help="where results.json / results.md go")
    p.add_argument("--recipes", default=str(ROOT / "recipes"), help="folder holding the recipes")
    p.add_argument("--n-train", type=int, default=2000, help="training videos (pretraining and QA)")
    p.add_argument("--n-test", type=int, default=200, help="test videos (QA test split)")
    p.add_argument("--frames", type=int, default=8, help="frames per generated video")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--compound-fraction", type=float, default=0.3, help="videos with compound order actions")
    p.add_argument("--data-seed", type=int, default=0, help="MovingShapes / QA seed")
    p.add_argument("--steps", type=int, default=0, help="pretraining steps (0 = the SNP-S3 recipes')")
    p.add_argument("--vqa-steps", type=int, default=0, help="VQA fine-tuning steps (0 = vqa_snps3.yaml's)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="extra override of both pretraining runs (repeatable)")
    p.add_argument("--vqa-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra override of the VQA runs only, e.g. 'vqa.motion=false' (repeatable)")
    p.add_argument("--fresh", action="store_true", help="retrain even when a finished identical run exists")
    p.add_argument("--quick", action="store_true", help="tiny world and few steps (a smoke run)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.quick:
        args.n_train, args.n_test, args.frames = 48, 12, 4
        args.steps, args.vqa_steps = args.steps or 4, args.vqa_steps or 4
    return args


def recipe(name: str, recipes: Path | str = ROOT / "recipes") -> dict:
    """A recipe's YAML as a dict."""
    return yaml.safe_load((Path(recipes) / name).read_text())


def worlds(args) -> tuple[Path, Path]:
    """The MovingShapes world and its QA (each generated once per settings). Returns (world, qa) folders."""
    from polymodal.data.synthetic.moving_qa import generate_moving_qa
    runs = Path(args.runs)
    data = moving_shapes_world(runs / "data", n_train=args.n_train, n_test=args.n_test, n_val=0,
                               num_frames=args.frames, image_size=args.image_size,
                               compound_fraction=args.compound_fraction, seed=args.data_seed)
    qa = runs / "qa"
    settings = {"world": "moving_qa", "of": str(data), "n_train": args.n_train, "n_test": args.n_test,
                "frames": args.frames, "image_size": args.image_size, "compound_fraction": args.compound_fraction,
                "seed": args.data_seed}
    cached_world(qa, settings, lambda: generate_moving_qa(data, qa, seed=args.data_seed),
                 needs=("train.jsonl", "test.jsonl"))
    return data, qa


def pretrain(args, data: Path, name: str, recipe_file: str, seed: int) -> tuple[Path, float]:
    """Pretrain one SNP-S3 variant at one seed on the world's captions (reused when identical).

    Returns:
        (model directory, training seconds).
    """
    from polymodal.train.reuse import train_or_reuse
    from polymodal.train.run import load_recipe
    overrides = [f"out_dir={Path(args.runs) / f'pre_{name}_s{seed}'}", f"data.train={data / 'train.jsonl'}",
                 f"train.seed={seed}", f"train.threads={args.threads}", "train.progress=false",
                 "train.ckpt_every=0", "eval.tasks=[]"]
    if args.steps:
        overrides.append(f"train.steps={args.steps}")
    model_dir, seconds, _ = train_or_reuse(load_recipe(Path(args.recipes) / recipe_file,
                                                       overrides + list(args.sets)), fresh=args.fresh)
    return model_dir, seconds


def train_vqa(args, qa: Path, run_dir: Path, seed: int, start: Path) -> tuple[Path, float, bool]:
    """Fine-tune recipes/vqa_snps3.yaml from `start`; returns (model dir, seconds, reused)."""
    from polymodal.train.reuse import train_or_reuse
    from polymodal.train.run import load_recipe
    overrides = [f"out_dir={run_dir}", f"model.path={start}", f"data.train={qa / 'train.jsonl'}",
                 f"train.seed={seed}", f"train.threads={args.threads}", "train.ckpt_every=0", "train.eval_every=0",
                 f"train.progress={'false' if args.quiet else 'true'}", "eval.tasks=[]"]
    if args.vqa_steps:
        overrides.append(f"train.steps={args.vqa_steps}")
    cfg = load_recipe(Path(args.recipes) / "vqa_snps3.yaml", overrides + list(args.vqa_set))
    return train_or_reuse(cfg, fresh=args.fresh)


def run_variant(args, data: Path, qa: Path, name: str, recipe_file: str, seed: int) -> dict:
    """Pretrain and fine-tune one variant at one seed; its test numbers (cached in the VQA run folder)."""
    print(f"[snps3_vqa] {name} seed {seed}: pretraining", flush=True)
    start, pre_s = pretrain(args, data, name, recipe_file, seed)
    print(f"[snps3_vqa] {name} seed {seed}: VQA fine-tuning", flush=True)
    run_dir = Path(args.runs) / f"vqa_{name}_s{seed}"
    model_dir, vqa_s, reused = train_vqa(args, qa, run_dir, seed, start)
    out = {**vqa_test_numbers(run_dir, model_dir, qa / "test.jsonl", "snps3_vqa", reused, NUMBERS),
           "pretrain_s": pre_s, "vqa_s": vqa_s}
    print(f"[snps3_vqa] {name} seed {seed}: VQA accuracy {out['vqa_accuracy']:.2f} (majority "
          f"{out['majority_vqa_accuracy']:.2f})", flush=True)
    return out


def claims(variants: dict, paired: dict) -> list[dict]:
    """The claims this benchmark judges, each with its numbers and verdict."""
    out = above_majority_claims(variants)
    d = paired["mssm-mlm"]["vqa_accuracy"]
    out.append(claim("MSSM pretraining gives higher video-QA accuracy than plain MLM (SNP-S3's ablation)",
                     f"VQA accuracy {pm_diff(d)}", verdict(d)))
    return out


def render_markdown(result: dict) -> str:
    """results.md: settings, the table (mean ± sample std over seeds), per-seed rows, paired differences, claims."""
    st, variants, paired = result["settings"], result["variants"], result["paired"]
    n = len(st["seeds"])
    lines = [
        "# MSSM vs MLM on video QA for SNP-S3 (MovingShapes QA)", "",
        f"Command: `{st['command']}`  ",
        f"Machine: {machine_line(result['machine'])}  ",
        f"Data: MovingShapes seed {st['data_seed']} ({st['n_train']} training / {st['n_test']} test videos, "
        f"{st['frames']} frames of {st['image_size']} px, compound fraction {st['compound_fraction']}) and "
        f"MovingShapes QA on it (test {st['num_questions']} questions). Pretraining: recipes/snps3_full.yaml vs snps3_mlm.yaml, "
        f"{st['steps']} steps; VQA: recipes/vqa_snps3.yaml, {st['vqa_steps']} steps"
        f"{''.join(f' {s}' for s in st['vqa_sets'])}. Seeds {st['seeds']} (mean ± sample std). Torch threads "
        f"{st['threads']}. Total wall time {result['seconds']['total']:.0f} s.", "",
        *vqa_table(variants, TYPES, n)]
    any_v = next(iter(variants.values()))
    lines.append("| majority baseline per type | | | | " + " | ".join(
        f"{any_v['mean'].get(f'type/{t}/majority_vqa_accuracy', float('nan')):.1f}" for t in TYPES) + " | | |")
    lines += ["", "Per-type columns are VQA accuracy. Per seed (VQA accuracy):", "",
              "| variant | " + " | ".join(f"seed {s}" for s in st["seeds"]) + " |", "|---|" + "---|" * n]
    for v in variants.values():
        lines.append(f"| {v['label']} | " + " | ".join(f"{x:.2f}" for x in v["values"]["vqa_accuracy"]) + " |")
    lines += ["", "Paired difference MSSM - MLM (same seed), mean ± std (min..max, seeds > 0):", "",
              "| number | difference |", "|---|---|"]
    for k in ("vqa_accuracy", "exact_match", *(f"type/{t}/vqa_accuracy" for t in TYPES)):
        if k in paired["mssm-mlm"]:
            lines.append(f"| {k} | {pm_diff(paired['mssm-mlm'][k])} |")
    lines += ["", "## Claims at this scale", "", f"Verdict over seeds: {VERDICT_RULE}.", ""]
    return "\n".join(lines + claim_lines(result["claims"])) + "\n"


def run(args) -> dict:
    """The whole benchmark (see the module docstring); returns the result written to `<out>/results.json`."""
    import time
    set_threads(args.threads)
    start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data, qa = worlds(args)
    seeds = list(args.seeds)
    variants = {}
    for name, recipe_file, label in VARIANTS:
        res = over_seeds(seeds, lambda seed, name=name, recipe_file=recipe_file: run_variant(
            args, data, qa, name, recipe_file, seed))
        variants[name] = {"label": label, "mean": res["mean"], "std": res["std"], "per_seed": res["per_seed"],
                          "values": {k: [r[k] for r in res["per_seed"]] for k in res["mean"]}}
    paired = {"mssm-mlm": {k: paired_difference(variants["mssm"]["values"][k], variants["mlm"]["values"][k])
                           for k in NUMBERS if k in variants["mssm"]["values"]}}
    with open(qa / "test.jsonl", encoding="utf-8") as fh:
        num_questions = sum(1 for line in fh if line.strip())
    result = {"settings": {"command": command_line("snps3_vqa.py", __name__ == "__main__"), "seeds": seeds,
                           "data_seed": args.data_seed, "n_train": args.n_train, "n_test": args.n_test,
                           "frames": args.frames, "image_size": args.image_size,
                           "compound_fraction": args.compound_fraction, "num_questions": num_questions,
                           "steps": args.steps or recipe("snps3_full.yaml", args.recipes)["train"]["steps"],
                           "vqa_steps": args.vqa_steps or recipe("vqa_snps3.yaml", args.recipes)["train"]["steps"],
                           "sets": args.sets, "vqa_sets": args.vqa_set, "threads": torch.get_num_threads(),
                           "quick": args.quick},
              "variants": variants, "paired": paired}
    result["claims"] = claims(variants, paired)
    return finish(out, result, start, render_markdown, "snps3_vqa")


if __name__ == "__main__":
    run(parse_args())
