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


def run_demo(args) -> Path:
    """Run the demo described by the CLI `args`; returns the report path."""
    from .eval.tasks import run_suite
    from .hub import load_model
    from .run_report import GALLERY_NOTE, write_run_report
    from .eval.html_report import gallery_rows
    from .train.run import load_recipe, run_recipe

    out = Path(args.out)
    t0 = time.time()
    data = ensure_shapes(out / "data", args.n_train, n_test=500, n_val=200, n_hard=400, seed=args.seed)
    t_data = time.time() - t0
    every = max(1, args.steps // 4)
    # The demo writes its own report (test and hard-set numbers), so run_recipe's end-of-run one is switched off.
    train = {"steps": args.steps, "seed": args.seed, "log_every": 10, "eval_every": every, "ckpt_every": every,
             "report": False, "val_data": str(data / "val.jsonl"), "val_loss_every": every,
             "threads": "auto"}     # the idle cores: never much slower idle, no collapse beside other work
    base = {
        "method": "clip", "out_dir": str(out / "run"),
        "model": {"name": args.model},
        "tokenizer": {"kind": "bpe", "vocab_size": 2048},
        "data": {"train": str(data / "train.jsonl"), "batch_size": args.batch_size},
        "optim": {"lr": 1e-3, "warmup_steps": 50, "weight_decay": 0.1},
        "train": train,
        "eval": {"retrieval": str(data / "val.jsonl"), "classes": str(data / "classes.json"), "limit": 200},
    }
    cfg = load_recipe(None, list(args.overrides), base=base)
    t1 = time.time()
    run_recipe(cfg)
    t_train = time.time() - t1
    run_dir = Path(cfg.out_dir)
    model = load_model(run_dir / "model")
    model.eval()
    final = run_suite(model, retrieval=str(data / "test.jsonl"), longtext=str(data / "hard.jsonl"),
                      classes=str(data / "classes.json"))
    galleries = [
        ("Text-to-image retrieval (short captions, test set)",
         gallery_rows(model, data / "test.jsonl", n_queries=4, pool=200, seed=args.seed), GALLERY_NOTE),
        ("Long-caption retrieval (hard set: groups of 4 images that differ in one object)",
         gallery_rows(model, data / "hard.jsonl", caption_key="long_caption", n_queries=4, pool=40, seed=args.seed),
         GALLERY_NOTE),
    ]
    notes = [f"ShapesWorld: {args.n_train} training images (64 px), test 500, hard long-text set 400 "
             f"(groups of 4 images that differ in one non-salient object).",
             f"Model: `{args.model}` CLIP trained {cfg.train.steps} steps, batch {cfg.data.batch_size}, "
             f"on short captions only; data {t_data:.0f} s, training {t_train:.0f} s. Metrics below are on the "
             f"test and hard sets (the curves' evaluation is on the validation set).",
             "Long-text retrieval on the hard set is where a short-caption model is weak by design: "
             "see LoTLIP (recipes/lotlip_*.yaml) for long-caption training."]
    from .eval.html_report import chance_levels
    from .eval.report import write_json
    write_json(run_dir / "demo_metrics.json", {"metrics": final, "chance": chance_levels(final),
                                               "seconds": {"data": t_data, "train": t_train}})
    page = write_run_report(run_dir, title="polymodal demo: CLIP on ShapesWorld", metrics=final,
                            galleries=galleries, notes=notes, model=model)
    print(f"\nReport: {page}\n        {page.with_suffix('.md')}")
    return page
