"""Scene recognition ablation (METHODS.md section 8): which stream learns which labels, and what distillation and
parent refinement add.

Variants (all `method: scene` on one MovingShapes world, same model size, steps and seeds):
  temporal        temporal stream only
  frame           frame-level stream only
  both            both streams, no distillation
  both_distill    both streams + self-distillation
  both_distill_norefine   the same without parent-score refinement

Per variant and seed it reports test mAP, mAP on the order-dependent labels (`temporal` group), on the
single-frame labels (`frame_level` group), F1 at the validation-chosen threshold, hit@1 and hierarchy
consistency; then the mean over seeds. Writes `results.json` and `results.md` into `--out`.

    python benchmarks/scene_ablation.py --out docs/results/scene_ablation            # full
    python benchmarks/scene_ablation.py --out /tmp/scene_ablation --quick            # smoke (minutes, 1 thread)
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

VARIANTS = {
    "temporal": {"model": {"streams": "temporal"}, "distill_weight": 0.0},
    "frame": {"model": {"streams": "frame"}, "distill_weight": 0.0},
    "both": {"model": {"streams": "both"}, "distill_weight": 0.0},
    "both_distill": {"model": {"streams": "both"}, "distill_weight": 1.0},
    "both_distill_norefine": {"model": {"streams": "both", "refine": False}, "distill_weight": 1.0},
}
KEYS = ("mAP", "mAP_temporal", "mAP_frame_level", "f1_micro", "f1_macro", "hit@1", "consistency")


def _register() -> None:
    """Use the scene rows of the method and eval tables, adding them for this process if the tree lacks them."""
    import polymodal.eval.tasks as tasks
    import polymodal.methods as methods
    methods.METHODS.setdefault("scene", "polymodal.methods.scene:SceneMethod")
    tasks.TASKS.setdefault("scene", tasks._lazy("scene", "scene_eval_task"))


def _yaml_flow(obj) -> str:
    return json.dumps(obj)          # JSON is YAML flow syntax


def run(out: Path, quick: bool, seeds: list[int], steps: int | None) -> dict:
    from polymodal.data.synthetic.moving_shapes import generate_moving_shapes
    from polymodal.train.run import load_recipe, run_recipe
    _register()
    torch.set_num_threads(1)
    data = out / "data"
    sizes = dict(n_train=96, n_val=24, n_test=24, num_frames=4) if quick else \
        dict(n_train=2000, n_val=200, n_test=200, num_frames=8)
    if not (data / "test.jsonl").is_file():
        generate_moving_shapes(data, seed=0, image_size=32, workers=1, progress=not quick, **sizes)
    T = sizes["num_frames"]
    steps = steps or (40 if quick else 2000)
    model = ["model.name=tiny"] if quick else [
        "model.name=tiny", "model.overrides={vision.width: 64, vision.heads: 4, text.width: 64, text.heads: 4, "
                           "embed_dim: 64}"]
    results: dict = {}
    for name, section in VARIANTS.items():
        for seed in seeds:
            run_dir = out / "runs" / f"{name}_s{seed}"
            scene = {"classes": str(data / "classes.json"), "model": {"layers": 1 if quick else 2, **section["model"]},
                     "distill_weight": section["distill_weight"]}
            ev = {"tasks": [{"task": "scene", "data": str(data / "test.jsonl"), "val": str(data / "val.jsonl"),
                             "num_frames": T}]}
            cfg = load_recipe(None, model + [
                "method=scene", f"out_dir={run_dir}", f"data.train={data / 'train.jsonl'}",
                f"data.batch_size={16 if quick else 32}", f"data.num_frames={T}", f"train.steps={steps}",
                f"train.log_every={max(1, steps // 10)}", "train.ckpt_every=0", "train.progress=false",
                "train.threads=1", f"train.seed={seed}", f"optim.lr={3e-3 if quick else 1e-3}",
                "optim.warmup_steps=5", f"tokenizer.vocab_size={200 if quick else 512}",
                "tokenizer.corpus_keys=[caption, scene_labels]", f"scene={_yaml_flow(scene)}",
                f"eval={_yaml_flow(ev)}"])
            start = time.perf_counter()
            final = run_recipe(cfg)
            row = {k: final.get(f"eval/scene/{k}", math.nan) for k in KEYS}
            row["seconds"] = time.perf_counter() - start
            results.setdefault(name, {})[seed] = row
            print(name, seed, {k: round(v, 2) for k, v in row.items()}, flush=True)
    return {"sizes": sizes, "steps": steps, "seeds": seeds, "quick": quick, "runs": results}


def _mean(rows: dict, key: str) -> float:
    vals = [r[key] for r in rows.values() if r[key] == r[key]]
    return sum(vals) / len(vals) if vals else math.nan


def write_table(res: dict, out: Path) -> str:
    lines = [f"Scene ablation ({'quick' if res['quick'] else 'full'}: {res['sizes']}, {res['steps']} steps, "
             f"seeds {res['seeds']}; test split, threshold chosen on val; mean over seeds)", "",
             "| variant | " + " | ".join(KEYS) + " |", "|---" * (len(KEYS) + 1) + "|"]
    for name, rows in res["runs"].items():
        lines.append(f"| {name} | " + " | ".join(f"{_mean(rows, k):.1f}" for k in KEYS) + " |")
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (data, runs, results.json, results.md)")
    p.add_argument("--quick", action="store_true", help="tiny world and few steps: a smoke run, not a result")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=None, help="override the training steps")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(write_table(run(out, args.quick, args.seeds, args.steps), out))


if __name__ == "__main__":
    main()
