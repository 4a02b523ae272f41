"""Hummer ablation on the preference world (docs/methods.md, Hummer; our synthetic claim, not a paper number).

1. ADC of the conflicting vs the low-conflict training set: a base reward model is trained on the clean,
   balanced `base/` pairs; one copy per dimension is fine-tuned on that dimension's pairs of each set; ADC
   (`polymodal.eval.conflict`, reading "all_pairs") from the held-out accuracy of every copy on every dimension.
   Claim: ADC(conflicting) > ADC(low-conflict).
2. Plain mixing vs hybrid sampling: the base model is trained further on the whole conflicting set (whose
   dimensions are imbalanced: accuracy x0.5, specificity x0.75) with `reward.sampling=mix`, `=uniform` (1/K per
   dimension) and `=hybrid` (valAcc on `val.jsonl`); per-dimension held-out accuracy and the worst-dimension drop
   max_k (Acc_k(base) - Acc_k(model)). Claim: hybrid sampling has the smaller worst-dimension drop.
3. The control: the same mix / hybrid runs on the low-conflict set, where no rival dimension is anti-correlated
   with a pair's own. If hybrid loses to mix only on the conflicting set, the conflict (not the sampler) is what
   hybrid's up-weighting feeds.

Every claim is a paired per-seed difference with `benchmarks.common.verdict`. Every training run goes through
`polymodal.train.run.run_recipe` with `recipes/reward_tiny.yaml` and overrides. Writes `results.json`,
`results.md` and the ADC heatmaps under `--out`.

    OMP_NUM_THREADS=1 python benchmarks/hummer.py --out docs/results/hummer        # 3 seeds, default size
    OMP_NUM_THREADS=1 python benchmarks/hummer.py --out /tmp/hummer --quick        # smoke run (~1 min)
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:          # run as a script from a checkout
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from benchmarks.common import (VERDICT_RULE, base_parser, claim, claim_lines, command_line,  # noqa: E402
                               machine_info, machine_line, paired_difference, pm_diff, pm_values, set_threads,
                               verdict, write_results)

# (training set, sampling mode) of the runs that continue the base model on a whole set; the key in the results
JOINT = {"mix": ("conflicting", "mix"), "uniform": ("conflicting", "uniform"), "hybrid": ("conflicting", "hybrid"),
         "low_conflict/mix": ("low_conflict", "mix"), "low_conflict/hybrid": ("low_conflict", "hybrid")}

SIZES = {
    # world: pairs per dimension; steps and learning rates of the three kinds of run
    "default": dict(n_train=400, n_base=200, n_val=48, n_test=120, base_steps=400, ft_steps=60, joint_steps=300,
                    seeds=[0, 1, 2], batch_size=32),
    "quick": dict(n_train=64, n_base=40, n_val=16, n_test=24, base_steps=40, ft_steps=8, joint_steps=30,
                  seeds=[0], batch_size=16),
}
COMMON = ["train.progress=false", "train.resume=never", "train.ckpt_every=0", "eval.tasks=[]",
          "reward.text={width: 32, layers: 2, heads: 2}", "reward.max_length=64", "train.log_every=1000"]


def train(out: Path, data: Path, steps: int, lr: float, seed: int, extra: list[str], batch_size: int = 32) -> Path:
    """One reward-model run through run_recipe (torch's current threads); returns the saved model folder."""
    from polymodal.train.run import load_recipe, run_recipe
    cfg = load_recipe(ROOT / "recipes" / "reward_tiny.yaml",
                      COMMON + [f"train.threads={torch.get_num_threads()}",
                                f"out_dir={out}", f"data.train={data}", f"train.steps={steps}", f"optim.lr={lr}",
                                f"train.seed={seed}", f"data.batch_size={batch_size}", *extra])
    run_recipe(cfg)
    return out / "model"


def accuracy(model_dir: Path, test: Path) -> dict:
    """Held-out accuracy per dimension of a saved reward model."""
    from polymodal.eval.preference import preference_eval_task
    from polymodal.hub import load_model
    m = preference_eval_task(load_model(model_dir), test, batch_size=128)
    return {k[len("accuracy_"):]: v for k, v in m.items() if k.startswith("accuracy_")}


def run_seed(out: Path, seed: int, size: dict, ft_lr: float, joint_lr: float, log, alpha: float = 0.5,
             beta: float = 10.0) -> dict:
    from polymodal.data.synthetic.preferences import DIMENSIONS, generate_preferences
    from polymodal.eval.conflict import measure_conflict, write_conflict_report
    world = out / "data"
    generate_preferences(world, n_train=size["n_train"], n_base=size["n_base"], n_val=size["n_val"],
                         n_test=size["n_test"], seed=seed)
    test = world / "test.jsonl"
    bs = size["batch_size"]
    t0 = time.perf_counter()
    base = train(out / "base", world / "base" / "train.jsonl", size["base_steps"], 2e-3, seed,
                 ["optim.warmup_steps=20"], bs)
    base_acc = accuracy(base, test)
    log(f"seed {seed}: base {time.perf_counter() - t0:.0f}s {_fmt(base_acc)}")
    result: dict = {"seed": seed, "base_acc": base_acc, "adc": {}, "sampling": {}}
    ft = ["optim.warmup_steps=0", "optim.schedule=constant", f"model.path={base}"]
    for variant in ("conflicting", "low_conflict"):
        def finetune(base_dir, k, variant=variant):
            return train(out / variant / k, world / variant / k / "train.jsonl", size["ft_steps"], ft_lr, seed,
                         ft + [f"reward.dimension={k}"], bs)
        t0 = time.perf_counter()
        res = measure_conflict(base, DIMENSIONS, finetune, lambda d: accuracy(d, test))
        write_conflict_report(res, out, f"adc_{variant}")
        result["adc"][variant] = res.to_dict()
        log(f"seed {seed}: {variant} ADC={res.adc:.4f} ({time.perf_counter() - t0:.0f}s)")
    for key, (train_set, sampling) in JOINT.items():
        t0 = time.perf_counter()
        extra = [f"model.path={base}", "optim.warmup_steps=10", f"reward.sampling={sampling}",
                 f"reward.val={world / 'val.jsonl'}", "reward.refresh_every=20", f"reward.alpha={alpha}",
                 f"reward.beta={beta}"]
        folder = f"joint_{sampling}" if train_set == "conflicting" else f"joint_{train_set}_{sampling}"
        model = train(out / folder, world / train_set / "train.jsonl", size["joint_steps"], joint_lr, seed, extra, bs)
        acc = accuracy(model, test)
        drops = {d: base_acc[d] - acc[d] for d in DIMENSIONS}
        result["sampling"][key] = {"acc": acc, "drop": drops, "worst_drop": max(drops.values()),
                                   "worst_acc": min(acc.values()), "mean_acc": statistics.fmean(acc.values())}
        log(f"seed {seed}: {key} worst drop {max(drops.values()):+.3f} {_fmt(acc)} "
            f"({time.perf_counter() - t0:.0f}s)")
    return result


def _fmt(acc: dict) -> str:
    return " ".join(f"{k[:4]}={v:.2f}" for k, v in acc.items())


def _mean_sd(values: list[float]) -> str:
    return pm_values(values, digits=3)


def _off_diagonal(a: dict) -> tuple[float, float]:
    """Mean and worst (lowest) off-diagonal deviation of an ADC result."""
    D = torch.tensor(a["deviations"])
    off = ~torch.eye(len(D), dtype=torch.bool)
    return float(D[off].mean()), float(D[off].min())


def claims_of(results: list[dict]) -> list[dict]:
    """Each claim as a paired per-seed difference and its `verdict`."""
    def paired(fn_a, fn_b):
        return paired_difference([fn_a(r) for r in results], [fn_b(r) for r in results])

    def drop(key, dim=None):
        return (lambda r: r["sampling"][key]["worst_drop"]) if dim is None else (lambda r: r["sampling"][key]["drop"][dim])

    out = []
    d = paired(lambda r: r["adc"]["conflicting"]["adc"], lambda r: r["adc"]["low_conflict"]["adc"])
    out.append(claim("ADC of the conflicting set exceeds that of the low-conflict set",
                     f"paired ADC difference {pm_diff(d, 4)}", verdict(d, +1)))
    for a, b, text in (("hybrid", "mix", "hybrid sampling has a smaller worst-dimension drop than plain mixing "
                                         "(conflicting set)"),
                       ("hybrid", "uniform", "hybrid sampling has a smaller worst-dimension drop than uniform "
                                             "sampling over dimensions (conflicting set)"),
                       ("uniform", "mix", "uniform sampling over dimensions has a smaller worst-dimension drop than "
                                          "plain mixing (conflicting set)"),
                       ("low_conflict/hybrid", "low_conflict/mix", "control: on the low-conflict set, hybrid sampling "
                                                                   "has a smaller worst-dimension drop than mixing")):
        if all(a in r["sampling"] and b in r["sampling"] for r in results):
            d = paired(drop(a), drop(b))
            out.append(claim(text, f"{a} {_mean_sd([drop(a)(r) for r in results])} vs {b} "
                                   f"{_mean_sd([drop(b)(r) for r in results])}; paired difference {pm_diff(d, 3)}",
                             verdict(d, -1)))
    for train_set, a, b in (("conflicting", "hybrid", "mix"), ("low-conflict", "low_conflict/hybrid",
                                                                 "low_conflict/mix")):
        if all(a in r["sampling"] and b in r["sampling"] for r in results):
            worst = [(lambda r, k=k: r["sampling"][k]["worst_acc"]) for k in (a, b)]
            d = paired(*worst)
            out.append(claim(f"on the {train_set} set hybrid sampling raises the worst dimension's accuracy over "
                             f"mixing (what it up-weights for)",
                             f"worst accuracy {a} {_mean_sd([worst[0](r) for r in results])} vs {b} "
                             f"{_mean_sd([worst[1](r) for r in results])}; paired difference {pm_diff(d, 3)}",
                             verdict(d, +1)))
            d = paired(drop(a, "tone"), drop(b, "tone"))
            out.append(claim(f"cause: on the {train_set} set hybrid sampling drops tone more than mixing",
                             f"tone drop {a} {_mean_sd([drop(a, 'tone')(r) for r in results])} vs {b} "
                             f"{_mean_sd([drop(b, 'tone')(r) for r in results])}; paired difference {pm_diff(d, 3)}",
                             verdict(d, +1)))
    return out


def summarise(results: list[dict]) -> str:
    from polymodal.data.synthetic.preferences import DIMENSIONS
    seeds = ", ".join(str(r["seed"]) for r in results)
    lines = [f"Seeds: {seeds} (mean ± sample sd over seeds).", "",
             "| training set | ADC (all_pairs) | mean off-diagonal deviation | worst off-diagonal deviation |",
             "|---|---|---|---|"]
    for variant in ("conflicting", "low_conflict"):
        adcs = [r["adc"][variant]["adc"] for r in results]
        offs = [_off_diagonal(r["adc"][variant]) for r in results]
        lines.append(f"| {variant} | {pm_values(adcs, 4)} | {_mean_sd([m for m, _ in offs])} | "
                     f"{_mean_sd([w for _, w in offs])} |")
    lines += ["", "Held-out accuracy per dimension after training the base model further on a whole set "
                  "(mean over seeds; the last three columns mean ± sd):", "",
              "| training set / sampling | " + " | ".join(DIMENSIONS) + " | mean | worst | worst-dimension drop vs base |",
              "|---|" + "---|" * (len(DIMENSIONS) + 3)]
    base = [statistics.fmean(r["base_acc"][d] for r in results) for d in DIMENSIONS]
    lines.append("| (base) | " + " | ".join(f"{v:.3f}" for v in base) + f" | {statistics.fmean(base):.3f} | "
                 f"{min(base):.3f} | - |")
    for key, (train_set, sampling) in JOINT.items():
        if not all(key in r["sampling"] for r in results):
            continue
        per = [statistics.fmean(r["sampling"][key]["acc"][d] for r in results) for d in DIMENSIONS]
        lines.append(f"| {train_set} / {sampling} | " + " | ".join(f"{v:.3f}" for v in per)
                     + f" | {_mean_sd([r['sampling'][key]['mean_acc'] for r in results])}"
                     + f" | {_mean_sd([r['sampling'][key]['worst_acc'] for r in results])}"
                     + f" | {_mean_sd([r['sampling'][key]['worst_drop'] for r in results])} |")
    lines += ["", f"Claims ({VERDICT_RULE}; paired differences are mean ± sd (min..max, seeds > 0)):", "",
              *claim_lines(claims_of(results))]
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = base_parser(__doc__, None, seeds=[], threads=1,
                    out_help="output folder (results.md, results.json, heatmaps, runs)")
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny data, few steps, one seed")
    p.add_argument("--ft-lr", type=float, default=3e-4, help="per-dimension fine-tune learning rate")
    p.add_argument("--joint-lr", type=float, default=5e-4, help="mix/hybrid training learning rate")
    p.add_argument("--alpha", type=float, default=0.5, help="hybrid sampling: adaptive share")
    p.add_argument("--beta", type=float, default=10.0, help="hybrid sampling: softmax(-beta * valAcc) sharpness")
    p.epilog = "--seeds: default 0 1 2 (0 with --quick)"
    p.add_argument("--summarise", default="", metavar="RESULTS_JSON",
                   help="rewrite the tables and claims of a finished run's results.json into --out (no training)")
    args = p.parse_args(argv)
    if args.summarise:
        saved = json.loads(Path(args.summarise).read_text())
        table = summarise(saved["results"])
        text = Path(args.summarise).with_suffix(".md").read_text()
        header = text[:text.index("Seeds: ")] if "Seeds: " in text else ""
        saved["claims"] = claims_of(saved["results"])
        write_results(Path(args.out), saved, header + table + "\n")
        print(table)
        return {"results": saved["results"], "table": table}
    threads = set_threads(args.threads)
    size = dict(SIZES["quick" if args.quick else "default"])
    if args.seeds:
        size["seeds"] = args.seeds
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0, cpu0 = time.perf_counter(), time.process_time()

    def log(msg):
        print(f"[{time.perf_counter() - t0:6.0f}s] {msg}", flush=True)

    results = [run_seed(out / f"seed{s}", s, size, args.ft_lr, args.joint_lr, log, args.alpha, args.beta)
               for s in size["seeds"]]
    table = summarise(results)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    settings = {k: v for k, v in size.items()}
    settings.update(ft_lr=args.ft_lr, joint_lr=args.joint_lr, alpha=args.alpha, beta=args.beta, quick=args.quick,
                    threads=threads)
    machine = machine_info()
    header = (f"# Hummer ablation ({'quick smoke run' if args.quick else 'default size'})\n\n"
              f"Synthetic preference world, text-tower reward model (width 32, 2 layers); "
              f"{wall:.0f} s wall, {cpu:.0f} s CPU, {threads} thread(s) on {machine_line(machine)}. "
              f"Settings: {json.dumps(settings)}\n\n")
    write_results(out, {"command": command_line("hummer.py", __name__ == "__main__"), "settings": settings,
                        "results": results, "claims": claims_of(results), "wall_s": wall, "cpu_s": cpu,
                        "machine": machine}, header + table + "\n")
    print(table)
    return {"results": results, "table": table}


if __name__ == "__main__":
    main()
