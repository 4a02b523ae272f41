"""CMSC/ASD ablation on the counterfactual ShapesWorld proxy: base, plain fine-tune, resample only, loss only,
ASD; MinSkew/MaxSkew on the balanced set and task accuracy, before and after; two seeds; a learning-rate row.

    python benchmarks/cmsc_asd.py --out docs/results/cmsc_asd          # default size (<= 20 min on one core)
    python benchmarks/cmsc_asd.py --quick --out /tmp/cmsc_quick          # smoke run (~2 min)

1. Generates the counterfactual world once (`polymodal.data.synthetic.counterfactual`; training answers
   biased towards the stereotype table with strength `--bias` on `--biased-attributes`).
2. Per seed: trains recipes/asd_base.yaml (plain NLL on the biased set: the biased "pretrained" MLLM), then
   fine-tunes it with recipes/asd_{finetune,resample,loss,full}.yaml (same data, steps, seed, LR; only
   `asd.loss` / `asd.resample` differ), and full ASD and plain fine-tuning again at `--lr-high` (the LR row).
3. Evaluates every model on the balanced eval set (nothing is tuned on it): MinSkew@C / MaxSkew@C over the
   concepts (overall and per attribute) and accuracy on the non-social task questions.
4. Writes `<out>/results.json` and `<out>/results.md` (mean ± std over seeds, and the claim's verdict).
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:          # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from benchmarks.common import (base_parser, cached_world, claim, claim_lines, command_line,  # noqa: E402
                               machine_info, machine_line, pm_values, set_threads, write_results)

VARIANTS = [("fine-tune", "finetune"), ("resample only", "resample"), ("loss only", "loss"), ("ASD", "full")]
KEYS = ["min_skew", "max_skew", "task_accuracy"]


def train(recipe: str, out: Path, overrides: list[str]) -> dict:
    """Run (or reuse a finished) recipe; returns its final fairness numbers (unprefixed)."""
    from polymodal.train.run import load_recipe, run_recipe
    done = out / "final_metrics.json"
    if done.is_file():
        final = json.loads(done.read_text())
    else:
        final = run_recipe(load_recipe(ROOT / "recipes" / recipe, [f"out_dir={out}", *overrides]))
    return {k.split("/", 2)[-1]: v for k, v in final.items() if k.startswith("eval/fairness/")}


def fmt(values: list[float]) -> str:
    return pm_values(values, digits=3, sign=True)


def main(argv=None) -> dict:
    p = base_parser(__doc__, str(ROOT / "benchmarks" / "results" / "cmsc_asd"), str(ROOT / "runs" / "cmsc_asd"),
                    seeds=[0, 1], threads=1, out_help="where results.json / results.md go")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny data and few steps")
    p.add_argument("--bias", type=float, default=0.8)
    p.add_argument("--biased-attributes", default="race")
    p.add_argument("--n-train-sets", type=int, default=150)
    p.add_argument("--n-eval-sets", type=int, default=60)
    p.add_argument("--base-steps", type=int, default=300)
    p.add_argument("--ft-steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=2e-3, help="fine-tuning learning rate")
    p.add_argument("--lr-high", type=float, default=1e-2, help="the learning-rate row")
    args = p.parse_args(argv)
    if args.quick:
        args.n_train_sets, args.n_eval_sets, args.base_steps, args.ft_steps = 36, 12, 60, 15
    set_threads(args.threads)
    from polymodal.data.synthetic.counterfactual import CounterfactualConfig, generate_counterfactual
    start = time.time()
    runs, out = Path(args.runs) / ("quick" if args.quick else "default"), Path(args.out)
    data = runs / "data"
    world = {"world": "counterfactual", "n_train_sets": args.n_train_sets, "n_eval_sets": args.n_eval_sets, "seed": 0,
             "bias": args.bias, "biased_attributes": args.biased_attributes.split(",")}
    cached_world(data, world, lambda: generate_counterfactual(
        data, args.n_train_sets, args.n_eval_sets, seed=0,
        cfg=CounterfactualConfig(bias=args.bias, biased_attributes=world["biased_attributes"])),
        needs=("train.jsonl", "eval.jsonl"))
    common = [f"data.train={data}/train.jsonl", f"eval.tasks=[{{task: fairness, data: {data}/eval.jsonl}}]",
              "train.progress=false", f"train.threads={args.threads}"]
    rows: dict[str, list[dict]] = {}
    for seed in args.seeds:
        base_dir = runs / f"seed{seed}" / "base"
        rows.setdefault("base", []).append(train("asd_base.yaml", base_dir, [*common, f"train.seed={seed}",
                                                                              f"train.steps={args.base_steps}"]))
        tune = [*common, f"model.path={base_dir}/model", f"train.seed={seed}", f"train.steps={args.ft_steps}"]
        for name, recipe in VARIANTS:
            rows.setdefault(name, []).append(train(f"asd_{recipe}.yaml", runs / f"seed{seed}" / recipe,
                                                   [*tune, f"optim.lr={args.lr}"]))
        for name, recipe in (("fine-tune", "finetune"), ("ASD", "full")):
            rows.setdefault(f"{name} @ lr {args.lr_high:g}", []).append(
                train(f"asd_{recipe}.yaml", runs / f"seed{seed}" / f"{recipe}_lrhigh",
                      [*tune, f"optim.lr={args.lr_high}"]))
        print(f"seed {seed} done ({time.time() - start:.0f} s)", flush=True)

    attrs = sorted({k.split("/")[1] for r in rows["base"] for k in r if k.startswith("min_skew/")})
    cols = KEYS + [f"min_skew/{a}" for a in attrs]
    summary = {name: {k: [r[k] for r in rs] for k in cols} for name, rs in rows.items()}
    mean = {name: {k: statistics.mean(v) for k, v in s.items()} for name, s in summary.items()}
    order = ["fine-tune", "resample only", "loss only", "ASD"]
    ab = [abs(mean[n]["min_skew"]) for n in order]
    mx = [mean[n]["max_skew"] for n in order]
    claims = [
        claim("|MinSkew|: fine-tune > resample only, loss only > ASD (seed means)",
              ", ".join(f"{n} {fmt(summary[n]['min_skew'])}" for n in order),
              ab[0] > max(ab[1], ab[2]) and min(ab[1], ab[2]) > ab[3]),
        claim("MaxSkew: fine-tune > resample only, loss only > ASD (seed means)",
              ", ".join(f"{n} {fmt(summary[n]['max_skew'])}" for n in order),
              mx[0] > max(mx[1], mx[2]) and min(mx[1], mx[2]) > mx[3]),
        claim("ASD task accuracy within 0.05 of fine-tune (seed means)",
              f"ASD {fmt(summary['ASD']['task_accuracy'])} vs fine-tune {fmt(summary['fine-tune']['task_accuracy'])}",
              abs(mean["ASD"]["task_accuracy"] - mean["fine-tune"]["task_accuracy"]) <= 0.05),
    ]
    machine = machine_info()
    result = {"command": command_line("cmsc_asd.py", __name__ == "__main__"), "args": vars(args), "rows": rows,
              "mean": mean, "claims": claims, "seconds": time.time() - start, "machine": machine}
    lines = ["# CMSC/ASD ablation (counterfactual ShapesWorld proxy)", "",
             f"Biased training set: bias {args.bias} on {args.biased_attributes}; {args.n_train_sets} training / "
             f"{args.n_eval_sets} balanced eval sets; base {args.base_steps} steps, fine-tuning {args.ft_steps} steps "
             f"at lr {args.lr:g}; seeds {args.seeds} (mean ± sample std). Skews on the balanced eval set (0 = fair).",
             "", "| model | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for name, s in summary.items():
        lines.append(f"| {name} | " + " | ".join(fmt(s[k]) for k in cols) + " |")
    lines += ["", "Claims:", "", *claim_lines(claims),
              "", f"Wall time {result['seconds']:.0f} s, {args.threads} thread(s) on {machine_line(machine)}."]
    write_results(out, result, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
