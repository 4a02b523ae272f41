"""Linear probe of CoCa vs SyCoCa pretraining on ShapesWorld classification (issue #34's claims table). One command:

    python benchmarks/probe_sycoca.py --out docs/results/probe_sycoca --runs runs/vqa_sycoca --seeds 0 1 2

The sibling of benchmarks/vqa_sycoca.py: the same ShapesWorld data, the same pretraining recipes, model and
settings, and the same run folders (`--runs`), so the pretrained models of a finished `vqa_sycoca.py` run are reused
(`train_or_reuse` matches the whole config) and only missing ones are trained.

1. Generates (or reuses) ShapesWorld with `--n-train` / `--n-val` / `--n-test` images (seed `--data-seed`).
2. Per seed, pretrains (or reuses) recipes/sycoca_coca.yaml (CoCa: ITC + captioning) and
   recipes/sycoca_attentive.yaml (SyCoCa: + TG-MIM with attentive masks) on recipes/vqa_shapes.yaml's model.
3. Scores each image encoder with the `linear_probe` eval: L2-normalised image embeddings, multinomial logistic
   regression fitted on train.jsonl, its L2 penalty chosen on val.jsonl, refitted on train + val, scored once on
   test.jsonl. The label is ShapesWorld's `label` field: the salient object's colour + shape, 64 classes
   (classes.json). A randomly initialised encoder of the same architecture (seeded per seed) is the reference.
4. Over `--seeds`: mean ± sample std, paired differences per seed (SyCoCa - CoCa, CoCa - random, SyCoCa - random)
   and a verdict per claim (benchmarks/common.py's rule).
5. Writes `<out>/results.json` and `<out>/results.md`.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:          # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from benchmarks.common import (VERDICT_RULE, cached_metrics, claim, claim_lines, command_line,  # noqa: E402
                               experiment_parser, finish, over_seeds, paired_difference, pm, pm_diff, prepare,
                               train_variant, verdict)
from benchmarks.vqa_sycoca import PRETRAINED, model_overrides, vqa_recipe  # noqa: E402

RANDOM = ("random", "random init (same architecture, no training)")
LABELS = {"coca": "CoCa (ITC + IC)", "sycoca": "SyCoCa (attentive TG-MIM)"}
NUMBERS = ("top1", "top5", "mean_per_class_recall", "val_top1", "weight_decay")
PAIRS = (("sycoca", "coca"), ("coca", "random"), ("sycoca", "random"))


def parse_args(argv=None):
    p = experiment_parser(__doc__, "docs/results/probe_sycoca", "runs/vqa_sycoca",
                          "unused: the model is recipes/vqa_shapes.yaml's (change it with --set)")
    p.set_defaults(n_train=4000, n_test=500, n_val=100, steps=600)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    p.add_argument("--max-iter", type=int, default=100, help="L-BFGS iterations per probe fit")
    p.add_argument("--weight-decays", default="", metavar="A,B,...",
                   help="the probe's L2 penalty grid (default: linear_probe's, 1e-6..1e-1)")
    return p.parse_args(argv)


def probe(model, data: Path, max_iter: int, weight_decays: str = "") -> dict:
    """The `linear_probe` eval of `model` on ShapesWorld's train / val / test manifests (64 salient classes);
    `weight_decays`: the penalty grid ("" = the eval's default)."""
    from polymodal.eval.tasks import run_task
    grid = {"weight_decays": weight_decays} if weight_decays else {}
    m = run_task("linear_probe", model.eval(), str(data / "train.jsonl"), val=str(data / "val.jsonl"),
                 test=str(data / "test.jsonl"), classes=str(data / "classes.json"), max_iter=max_iter, **grid)
    pct = ("top1", "top5", "mean_per_class_recall", "val_top1", "chance")      # as percentages
    return {k: float(m[k]) * (100 if k in pct else 1)
            for k in (*NUMBERS, "chance", "num_classes", "num_train", "num_val", "num_test") if k in m}


def random_model(seed: int):
    """recipes/vqa_shapes.yaml's CoCa, randomly initialised with `seed` (what pretraining starts from)."""
    from polymodal.hub import named_model
    m = vqa_recipe()["model"]
    torch.manual_seed(seed)
    return named_model(m["name"], dict(m.get("overrides") or {}))


def run_variant(args, data: Path, runs: Path, name: str, recipe: str | None, seed: int) -> dict:
    """Pretrain (or reuse) one variant at one seed and probe it; its numbers (cached beside the run)."""
    from polymodal.hub import load_model
    settings = {"eval": "probe_sycoca", "data": str(data), "max_iter": args.max_iter}
    if args.weight_decays:                  # the default grid keeps the cache key of runs made before the option
        settings["weight_decays"] = args.weight_decays
    if recipe is None:
        print(f"[probe_sycoca] {name} seed {seed}: probing", flush=True)
        run_dir = runs / f"probe_{name}_s{seed}"
        run_dir.mkdir(parents=True, exist_ok=True)
        out = {**cached_metrics(run_dir, {**settings, "seed": seed}, lambda: probe(random_model(seed), data,
                                                                                  args.max_iter, args.weight_decays),
                                True),
               "pretrain_s": 0.0}
    else:
        print(f"[probe_sycoca] {name} seed {seed}: pretraining (reused when finished)", flush=True)
        model_dir, pre_s, _ = train_variant(Path(args.recipes) / recipe, runs / f"pre_{name}_s{seed}", data, args,
                                            seed, model_overrides() + list(args.sets))
        out = {**cached_metrics(Path(model_dir).parent, settings,
                                lambda: probe(load_model(model_dir), data, args.max_iter,
                                              args.weight_decays), True),
               "pretrain_s": pre_s}
    print(f"[probe_sycoca] {name} seed {seed}: linear-probe top-1 {out['top1']:.2f} (chance "
          f"{out['chance']:.2f}, penalty {out['weight_decay']:g})", flush=True)
    return out


def claims(variants: dict, paired: dict) -> list[dict]:
    out = []
    for key, text in (("coca-random", "CoCa pretraining gives better linear-probe features than a random encoder"),
                      ("sycoca-random", "SyCoCa pretraining gives better linear-probe features than a random "
                                        "encoder"),
                      ("sycoca-coca", "SyCoCa's TG-MIM pretraining gives better linear-probe features than CoCa's "
                                      "(the paper's claim for linear probing)")):
        d = paired[key]["top1"]
        out.append(claim(text, f"test top-1 {pm_diff(d)}", verdict(d)))
    return out


def render_markdown(result: dict) -> str:
    st, variants, paired = result["settings"], result["variants"], result["paired"]
    n = len(st["seeds"])
    f = lambda v, k: pm(v["mean"][k], v["std"][k], n) if k in v["mean"] else "n/a"     # noqa: E731
    chance = next(iter(variants.values()))["mean"]["chance"]
    lines = [
        "# Linear probe of CoCa vs SyCoCa pretraining on ShapesWorld", "",
        f"Command: `{st['command']}`  ",
        f"Data: ShapesWorld, seed {st['data_seed']}: probe fitted on {st['n_train']} training images, penalty chosen "
        f"on {st['n_val']} validation images, scored on {st['n_test']} test images; label = the salient object's "
        f"colour + shape (64 classes, chance {chance:.1f}). Model: recipes/vqa_shapes.yaml's (`{st['model']}`"
        f"{''.join(f' {s}' for s in st['sets'])}), pretrained {st['steps']} steps of batch {st['batch_size']} "
        f"(the pretraining runs of benchmarks/vqa_sycoca.py). Probe: `linear_probe` eval (L-BFGS, {st['max_iter']} "
        f"iterations, penalty grid {st.get('weight_decays') or '1e-6..1e-1'}). Seeds {st['seeds']} (mean ± sample "
        f"std). Torch threads {st['threads']}. Total wall time {result['seconds']['total']:.0f} s.", "",
        "| encoder | test top-1 | test top-5 | mean per-class recall | val top-1 (chosen penalty) | pretrain s |",
        "|---|---|---|---|---|---|"]
    for v in variants.values():
        lines.append(f"| {v['label']} | {f(v, 'top1')} | {f(v, 'top5')} | {f(v, 'mean_per_class_recall')} | "
                     f"{f(v, 'val_top1')} | {v['mean']['pretrain_s']:.0f} |")
    lines += ["", "Chosen penalties per seed: " + "; ".join(
        f"{v['label'].split(' (')[0]} {', '.join(f'{w:g}' for w in v['values']['weight_decay'])}"
        for v in variants.values()) + ".", "",
        "Paired differences (same seed), mean ± std (min..max, seeds > 0):", "",
        "| difference | test top-1 | test top-5 | mean per-class recall |", "|---|---|---|---|"]
    for key, d in paired.items():
        lines.append(f"| {key} | {pm_diff(d['top1'])} | {pm_diff(d['top5'])} | {pm_diff(d['mean_per_class_recall'])} |")
    lines += ["", "## Claims at this scale", "", f"Verdict over seeds: {VERDICT_RULE}.", ""]
    return "\n".join(lines + claim_lines(result["claims"])) + "\n"


def run(args) -> dict:
    out, runs, data, start = prepare(args)
    seeds = list(args.seeds)
    variants = {}
    for name, recipe, label in (*((n, r, LABELS[n]) for n, r, _ in PRETRAINED), (RANDOM[0], None, RANDOM[1])):
        res = over_seeds(seeds, lambda seed, name=name, recipe=recipe: run_variant(args, data, runs, name, recipe,
                                                                                 seed))
        variants[name] = {"label": label, "mean": res["mean"], "std": res["std"], "per_seed": res["per_seed"],
                          "values": {k: [r[k] for r in res["per_seed"]] for k in res["mean"]}}
    paired = {f"{a}-{b}": {k: paired_difference(variants[a]["values"][k], variants[b]["values"][k])
                           for k in ("top1", "top5", "mean_per_class_recall")} for a, b in PAIRS}
    result = {"settings": {"command": command_line("probe_sycoca.py", __name__ == "__main__"), "seeds": seeds,
                           "data_seed": args.data_seed, "n_train": args.n_train, "n_val": args.n_val,
                           "n_test": args.n_test, "steps": args.steps, "batch_size": args.batch_size,
                           "max_iter": args.max_iter, "weight_decays": args.weight_decays,
                           "model": " ".join(model_overrides()), "sets": args.sets,
                           "threads": torch.get_num_threads()},
              "variants": variants, "paired": paired}
    result["claims"] = claims(variants, paired)
    return finish(out, result, start, render_markdown, "probe_sycoca")


if __name__ == "__main__":
    run(parse_args())
