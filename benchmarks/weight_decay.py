"""Weight decay by declaration vs the old name rule: the demo's CLIP trained twice, same seed and data.

Before issue #29 the trainer skipped weight decay for every parameter whose name contained one of
``embed, pos, cls, readout, logit_scale, logit_bias, mask_token, query``; now it skips 1-d tensors and what the
modules declare with ``no_weight_decay()``. For the CLIP family the only parameter that changes group is the
patch convolution ``visual.patch_embed.weight`` (now decayed). This script trains the demo's recipe (``clip``,
``small`` model, lr 1e-3, weight decay 0.1) once with each rule and prints the validation loss, test retrieval
and zero-shot numbers, and the patch conv's weight norm. The old rule exists only here.

    OMP_NUM_THREADS=1 python benchmarks/weight_decay.py --steps 300 --out benchmarks/results/weight_decay.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import polymodal.train.loop as loop  # noqa: E402

OLD_HINTS = ("embed", "pos", "cls", "readout", "logit_scale", "logit_bias", "mask_token", "query")


def old_no_decay_names(module: nn.Module) -> set[str]:
    """The rule before issue #29: 1-d tensors, leaves named ``bias`` and any name containing a hint."""
    return {n for n, p in module.named_parameters()
            if p.ndim < 2 or n.split(".")[-1] == "bias" or any(h in n for h in OLD_HINTS)}


def train_once(rule: str, data: Path, out: Path, args) -> dict:
    """Train the demo recipe under `rule` ("old" | "new") and evaluate on the test set."""
    from polymodal.eval.tasks import run_suite
    from polymodal.hub import load_model
    from polymodal.train.run import load_recipe, run_recipe

    base = {
        "method": "clip", "out_dir": str(out / rule),
        "model": {"name": "small"},
        "tokenizer": {"kind": "bpe", "vocab_size": 2048},
        "data": {"train": str(data / "train.jsonl"), "batch_size": args.batch_size, "num_workers": 0},
        "optim": {"lr": 1e-3, "warmup_steps": 50, "weight_decay": 0.1},
        "train": {"steps": args.steps, "seed": args.seed, "log_every": 50, "ckpt_every": 0, "report": False,
                  "val_data": str(data / "val.jsonl"), "val_loss_every": args.steps, "threads": 1},
    }
    original = loop.no_decay_names
    if rule == "old":
        loop.no_decay_names = old_no_decay_names
    try:
        cfg = load_recipe(None, [], base=base)
        t0 = time.time()
        run_recipe(cfg)
        seconds = time.time() - t0
    finally:
        loop.no_decay_names = original
    lines = (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()
    val = [r["val/loss"] for r in map(json.loads, lines) if "val/loss" in r]
    model = load_model(Path(cfg.out_dir) / "model").eval()
    metrics = run_suite(model, retrieval=str(data / "test.jsonl"), classes=str(data / "classes.json"))
    return {"val_loss": val[-1], "seconds": round(seconds, 1),
            "patch_embed_norm": float(model.visual.patch_embed.weight.detach().norm()),
            **{k: metrics[k] for k in sorted(metrics) if k.endswith(("R@1", "R@5", "top1", "top5"))}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/weight_decay.json", help="the JSON results")
    p.add_argument("--work", default="/tmp/polymodal_weight_decay", help="scratch folder: data and the two runs")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--n-train", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    from polymodal.demo import ensure_shapes
    out = Path(args.work)
    data = ensure_shapes(out / "data", args.n_train, n_test=500, n_val=200, n_hard=0, seed=args.seed)
    rows = {rule: train_once(rule, data, out, args) for rule in ("old", "new")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1) + "\n")
    keys = list(rows["new"])
    print("| metric | old name rule | declared (new) |\n|---|---|---|")
    for k in keys:
        a, b = rows["old"][k], rows["new"][k]
        print(f"| {k} | {a:.4g} | {b:.4g} |" if isinstance(a, float) else f"| {k} | {a} | {b} |")


if __name__ == "__main__":
    main()
