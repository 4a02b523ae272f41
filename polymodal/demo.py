"""`polymodal demo`: ShapesWorld -> small CLIP -> evaluation -> report, in a few minutes on 2 CPU cores."""
from __future__ import annotations

import json
import time
from pathlib import Path


def ensure_shapes(data_dir: Path, n_train: int, n_test: int, n_val: int, n_hard: int, seed: int) -> Path:
    """Generate ShapesWorld into `data_dir` unless a data set with the same settings is already there."""
    from .data.synthetic.shapes import generate_shapes
    meta = data_dir / "meta.json"
    want = {"n_train": n_train, "n_test": n_test, "n_val": n_val, "n_hard": n_hard, "seed": seed}
    if meta.is_file():
        have = json.loads(meta.read_text())
        if all(have.get(k) == v or have.get("counts", {}).get(k.removeprefix("n_")) == v for k, v in want.items()):
            return data_dir
    generate_shapes(data_dir, n_train=n_train, n_test=n_test, n_val=n_val, n_hard=n_hard, seed=seed)
    return data_dir


def chance_levels(metrics: dict, num_test: int, num_hard: int, num_classes: int) -> dict:
    """Chance value of each metric (random embeddings), for the report."""
    out = {}
    for k in metrics:
        if "R@" in k:
            kk = int(k.rsplit("@", 1)[1])
            n = num_hard if k.startswith("longtext") else num_test
            out[k] = 100.0 * min(kk, n) / n
        elif k.endswith("top1"):
            out[k] = 100.0 / num_classes
        elif k.endswith("top5"):
            out[k] = 100.0 * 5 / num_classes
    return out


def run_demo(args) -> Path:
    """Run the demo described by the CLI `args`; returns the report path."""
    from .eval.html_report import plot_curves, read_metrics, retrieval_gallery, write_report
    from .eval.suite import run_suite
    from .hub import load_model
    from .train.run import load_recipe, run_recipe

    out = Path(args.out)
    t0 = time.time()
    data = ensure_shapes(out / "data", args.n_train, n_test=500, n_val=200, n_hard=400, seed=args.seed)
    t_data = time.time() - t0
    base = {
        "method": "clip", "out_dir": str(out / "run"),
        "model": {"name": args.model},
        "tokenizer": {"kind": "bpe", "vocab_size": 2048},
        "data": {"train": str(data / "train.jsonl"), "batch_size": args.batch_size},
        "optim": {"lr": 1e-3, "warmup_steps": 50, "weight_decay": 0.1},
        "train": {"steps": args.steps, "seed": args.seed, "log_every": 10,
                  "eval_every": max(1, args.steps // 4), "ckpt_every": max(1, args.steps // 4)},
        "eval": {"retrieval": str(data / "val.jsonl"), "classes": str(data / "classes.json"), "limit": 200},
    }
    cfg = load_recipe(None, list(args.overrides), base=base)
    t1 = time.time()
    run_recipe(cfg)
    t_train = time.time() - t1
    model = load_model(Path(cfg.out_dir) / "model")
    final = run_suite(model, retrieval=str(data / "test.jsonl"), longtext=str(data / "hard.jsonl"),
                      classes=str(data / "classes.json"))
    keep = {k: v for k, v in final.items() if not k.endswith("num_images") and not k.endswith("num_texts")
            and not k.endswith("num_classes")}
    classes = json.loads((data / "classes.json").read_text())["classes"]
    chance = chance_levels(keep, final["retrieval/num_images"], final["longtext/num_images"], len(classes))
    run_dir = Path(cfg.out_dir)
    curves = run_dir / "curves.png"
    plot_curves(read_metrics(run_dir / "metrics.jsonl"), curves)
    gallery = run_dir / "gallery.png"
    retrieval_gallery(model, data / "test.jsonl", gallery)
    hard_gallery = run_dir / "gallery_long.png"
    retrieval_gallery(model, data / "hard.jsonl", hard_gallery, caption_key="long_caption", n_queries=3, pool=40)
    notes = [f"ShapesWorld: {args.n_train} training images (64 px), test 500, hard long-text set 400 "
             f"(groups of 4 images that differ in one non-salient object).",
             f"Model: `{args.model}` CLIP trained {cfg.train.steps} steps, batch {cfg.data.batch_size}, "
             f"on short captions only; data {t_data:.0f} s, training {t_train:.0f} s.",
             "Long-text retrieval on the hard set is where a short-caption model is weak by design: "
             "see LoTLIP (recipes/lotlip_*.yaml) for long-caption training."]
    from .eval.report import write_json
    write_json(run_dir / "demo_metrics.json", {"metrics": final, "chance": chance,
                                               "seconds": {"data": t_data, "train": t_train}})
    md, page = write_report(run_dir, "polymodal demo: CLIP on ShapesWorld", keep, chance,
                            {"Training curves": curves, "Text-to-image retrieval (short captions, test set)": gallery,
                             "Long-caption retrieval (hard set)": hard_gallery}, notes)
    print(f"\nReport: {page}\n        {md}")
    return page
