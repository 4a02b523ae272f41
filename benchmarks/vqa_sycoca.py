"""VQA from a pretrained CoCa vs SyCoCa vs from scratch, on ShapesWorld QA (issue #34 item 5). One command:

    python benchmarks/vqa_sycoca.py --out docs/results/vqa_sycoca --seeds 0 1 2

1. Generates ShapesWorld (captions, for pretraining) and ShapesWorld QA with the same seed and counts, so the QA
   training images are the pretraining images and the QA test images are ShapesWorld's unseen test images.
2. Per seed, pretrains recipes/sycoca_coca.yaml (CoCa: ITC + captioning) and recipes/sycoca_attentive.yaml (SyCoCa:
   + TG-MIM with attentive masks) for `--steps` steps, on the model of recipes/vqa_shapes.yaml (its `model` section,
   so all three variants share one architecture); finished runs with the same config are reused.
3. Per seed, fine-tunes recipes/vqa_shapes.yaml for `--vqa-steps` steps from each pretrained model
   (`model.path`) and from scratch (the recipe as written), with the same training seed.
4. Scores each VQA model on the QA test split (nothing is tuned on it): VQA accuracy, exact match, per question
   type, and the majority-answer baseline stored in each model (the same for all variants: same training answers).
5. Over `--seeds`: mean ± sample std, the paired difference per seed (SyCoCa - CoCa, CoCa - scratch), and a verdict
   per claim (shown: every seed agrees; not shown: none does; mixed).
6. Writes `<out>/results.json` and `<out>/results.md`.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:          # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from benchmarks.common import (VERDICT_RULE, above_majority_claims, cached_world, claim, claim_lines,  # noqa: E402
                               command_line, experiment_parser, finish, over_seeds, paired_difference, pm_diff,
                               prepare, train_variant, verdict, vqa_table,
                               vqa_test_numbers)

PRETRAINED = (("coca", "sycoca_coca.yaml", "CoCa (ITC + IC) -> VQA"),
              ("sycoca", "sycoca_attentive.yaml", "SyCoCa (attentive TG-MIM) -> VQA"))
SCRATCH = ("scratch", "VQA from scratch (no pretraining)")
TYPES = ("color", "shape", "size", "count", "exists", "where", "which")
NUMBERS = ("vqa_accuracy", "exact_match", "majority_vqa_accuracy", *(f"type/{t}/vqa_accuracy" for t in TYPES))


def parse_args(argv=None):
    p = experiment_parser(__doc__, "docs/results/vqa_sycoca", "runs/vqa_sycoca",
                          "unused: the model is recipes/vqa_shapes.yaml's (change it with --set on both stages)")
    p.set_defaults(n_train=4000, n_test=500, n_val=100, steps=600)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    p.add_argument("--vqa-steps", type=int, default=0, help="VQA fine-tuning steps (0 = the recipe's)")
    p.add_argument("--vqa-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra override of the VQA runs only, e.g. 'optim.lr=1e-3' (repeatable)")
    return p.parse_args(argv)


def vqa_recipe() -> dict:
    return yaml.safe_load((ROOT / "recipes" / "vqa_shapes.yaml").read_text())


def model_overrides() -> list[str]:
    """The VQA recipe's model, as overrides of the pretraining recipes (one architecture for every variant)."""
    m = vqa_recipe()["model"]
    inner = ", ".join(f"{k}: {v}" for k, v in (m.get("overrides") or {}).items())
    return [f"model.name={m['name']}", f"model.overrides={{{inner}}}"]


def qa_world(runs: Path, args) -> Path:
    from polymodal.data.synthetic.shapes_qa import generate_shapes_qa
    data = runs / "qa"
    settings = {"world": "shapes_qa", "n_train": args.n_train, "n_test": args.n_test, "n_val": args.n_val,
                "seed": args.data_seed}
    return cached_world(data, settings, lambda: generate_shapes_qa(data, args.n_train, args.n_test, args.n_val,
                                                                   args.data_seed, progress=not args.quiet,
                                                                   workers=1),
                        needs=("train.jsonl", "test.jsonl"))


def train_vqa(args, qa: Path, run_dir: Path, seed: int, start: Path | None):
    """Fine-tune the VQA recipe (from `start`, else from scratch); returns (model dir, seconds, reused)."""
    from polymodal.train.reuse import train_or_reuse
    from polymodal.train.run import load_recipe
    steps = args.vqa_steps or vqa_recipe()["train"]["steps"]
    overrides = [f"out_dir={run_dir}", f"data.train={qa / 'train.jsonl'}", f"train.seed={seed}",
                 f"train.steps={steps}", f"train.ckpt_every={steps}", "train.eval_every=0",
                 f"train.progress={'false' if args.quiet else 'true'}",
                 f"eval.tasks=[{{task: vqa, data: {qa / 'val.jsonl'}}}]", *args.sets, *args.vqa_set]
    if args.threads:
        overrides.append(f"train.threads={args.threads}")
    if start is not None:
        overrides.append(f"model.path={start}")
    return train_or_reuse(load_recipe(ROOT / "recipes" / "vqa_shapes.yaml", overrides), fresh=args.fresh)


def run_variant(args, data: Path, qa: Path, runs: Path, name: str, recipe: str | None, seed: int) -> dict:
    """Pretrain (unless from scratch) and fine-tune one variant at one seed; its test numbers (cached)."""
    start, pre_s = None, 0.0
    if recipe is not None:
        print(f"[vqa_sycoca] {name} seed {seed}: pretraining", flush=True)
        start, pre_s, _ = train_variant(Path(args.recipes) / recipe, runs / f"pre_{name}_s{seed}", data, args, seed,
                                        model_overrides() + list(args.sets))
    print(f"[vqa_sycoca] {name} seed {seed}: VQA fine-tuning", flush=True)
    run_dir = runs / f"vqa_{name}_s{seed}"
    model_dir, vqa_s, reused = train_vqa(args, qa, run_dir, seed, start)
    out = {**vqa_test_numbers(run_dir, model_dir, qa / "test.jsonl", "vqa_sycoca", reused, NUMBERS),
           "pretrain_s": pre_s, "vqa_s": vqa_s}
    print(f"[vqa_sycoca] {name} seed {seed}: VQA accuracy {out['vqa_accuracy']:.2f} (majority "
          f"{out['majority_vqa_accuracy']:.2f})", flush=True)
    return out


def claims(variants: dict, paired: dict) -> list[dict]:
    out = above_majority_claims(variants)
    for key, text in (("coca-scratch", "pretraining CoCa on the captions helps VQA over training from scratch"),
                      ("sycoca-coca", "SyCoCa's TG-MIM pretraining helps VQA over CoCa's (the paper's claim for "
                                      "VQA)")):
        d = paired[key]["vqa_accuracy"]
        out.append(claim(text, f"VQA accuracy {pm_diff(d)}", verdict(d)))
    d = paired["sycoca-coca"]["type/where/vqa_accuracy"]
    out.append(claim("SyCoCa helps most where the image must be read locally (where questions)",
                     f"where-question VQA accuracy {pm_diff(d)}", verdict(d)))
    return out


def render_markdown(result: dict) -> str:
    st, variants, paired = result["settings"], result["variants"], result["paired"]
    n = len(st["seeds"])
    lines = [
        "# VQA from CoCa vs SyCoCa pretraining on ShapesWorld QA", "",
        f"Command: `{st['command']}`  ",
        f"Data: ShapesWorld and ShapesWorld QA, seed {st['data_seed']}, {st['n_train']} training images (3 questions "
        f"each, ten answers per question), test {st['n_test']} images. Model: recipes/vqa_shapes.yaml's "
        f"(`{st['model']}`{''.join(f' {s}' for s in st['sets'])}). Pretraining {st['steps']} steps of batch "
        f"{st['batch_size']}; VQA fine-tuning {st['vqa_steps']} steps. Seeds {st['seeds']} (mean ± sample std). "
        f"Torch threads {st['threads']}. Total wall time {result['seconds']['total']:.0f} s.", "",
        *vqa_table(variants, TYPES, n)]
    lines += ["", "Per-type columns are VQA accuracy. Paired differences (same seed), mean ± std (min..max, seeds > 0):",
              "", "| difference | VQA accuracy | exact match | where | which | shape |", "|---|---|---|---|---|---|"]
    for key, d in paired.items():
        lines.append(f"| {key} | {pm_diff(d['vqa_accuracy'])} | {pm_diff(d['exact_match'])} | "
                     f"{pm_diff(d['type/where/vqa_accuracy'])} | {pm_diff(d['type/which/vqa_accuracy'])} | "
                     f"{pm_diff(d['type/shape/vqa_accuracy'])} |")
    lines += ["", "## Claims at this scale", "", f"Verdict over seeds: {VERDICT_RULE}.", ""]
    return "\n".join(lines + claim_lines(result["claims"])) + "\n"


def run(args) -> dict:
    out, runs, data, start = prepare(args)
    qa = qa_world(runs, args)
    seeds = list(args.seeds)
    variants = {}
    for name, recipe, label in (*PRETRAINED, (SCRATCH[0], None, SCRATCH[1])):
        res = over_seeds(seeds, lambda seed, name=name, recipe=recipe: run_variant(args, data, qa, runs, name, recipe,
                                                                                 seed))
        variants[name] = {"label": label, "mean": res["mean"], "std": res["std"], "per_seed": res["per_seed"],
                          "values": {k: [r[k] for r in res["per_seed"]] for k in res["mean"]}}
    paired = {f"{a}-{b}": {k: paired_difference(variants[a]["values"][k], variants[b]["values"][k])
                           for k in NUMBERS if k in variants[a]["values"]}
              for a, b in (("sycoca", "coca"), ("coca", "scratch"), ("sycoca", "scratch"))}
    result = {"settings": {"command": command_line("vqa_sycoca.py", __name__ == "__main__"), "seeds": seeds,
                           "data_seed": args.data_seed, "n_train": args.n_train, "n_test": args.n_test,
                           "steps": args.steps, "vqa_steps": args.vqa_steps or vqa_recipe()["train"]["steps"],
                           "batch_size": args.batch_size, "model": " ".join(model_overrides()), "sets": args.sets,
                           "vqa_sets": args.vqa_set, "threads": torch.get_num_threads()},
              "variants": variants, "paired": paired}
    result["claims"] = claims(variants, paired)
    return finish(out, result, start, render_markdown, "vqa_sycoca")


if __name__ == "__main__":
    run(parse_args())
