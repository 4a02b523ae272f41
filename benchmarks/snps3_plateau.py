"""Where SNP-S3's cross-encoder plateau comes from: level 2 and ITM trained alone from random weights, with the
real visual tokens (clip means of the ViT) or with oracle visual tokens that carry the paired caption (the word
embeddings of its significant tokens), over seeds.

If the oracle run leaves ln(2B) / ln 2 within the steps and the real one does not, the cross encoder, its pooler
and the losses can learn matching and the plateau is in the visual tokens (a ViT from random weights gives the cross
pass nothing to match); if neither leaves it, the cause is in the cross encoder. `benchmarks/snps3_ablation.py`
reports where the full recipes' level 2 / ITM end (from scratch, and from the stand-ins' pretrained ViT).

Everything but level 2 and ITM is off (`snps3.weights`), level 1 in-batch (unused), the recipe is
`recipes/snps3_full.yaml` with its optimiser (AdamW at its lr, linear warm-up, gradient clipping); batches are drawn
at random from the MovingShapes world of `snps3_ablation.py`.
Usage: `python benchmarks/snps3_plateau.py --out docs/results/snps3_plateau --seeds 0 1 2`.
"""
from __future__ import annotations

import itertools
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:          # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from benchmarks.common import (base_parser, command_line, moving_shapes_world, pm_values,  # noqa: E402
                               set_threads, write_results)

CONDITIONS = ("real", "oracle")


def parse_args(argv=None):
    p = base_parser(__doc__, "docs/results/snps3_plateau", "runs/snps3", seeds=[0, 1, 2], threads=1)
    p.add_argument("--recipe", default=str(ROOT / "recipes" / "snps3_full.yaml"))
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-frames", type=int, default=4)
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-test", type=int, default=200)
    return p.parse_args(argv)


def oracle_tokens(model, batch):
    """(B, n, W) visual tokens carrying the caption: the word embeddings of its K significant tokens (`sig_pos`),
    the first repeated to fill n clips, scaled to the size of ViT means (the embedding LayerNorm normalises both)."""
    import torch
    words = torch.gather(batch["input_ids"], 1, batch["sig_pos"])                      # (B, K)
    emb = model.text_encoder.embeddings.word(words)                                     # (B, K, W)
    n = batch["frames"].shape[1] // model.config.frames_per_clip
    reps = math.ceil(n / emb.shape[1])
    return emb.repeat(1, reps, 1)[:, :n] * 10


def train_one(args, data: Path, seed: int, condition: str) -> list[dict]:
    """Level 2 + ITM alone for `args.steps` steps; returns the logged rows (every 10 steps: mean of the last 10)."""
    import torch

    from polymodal.models.fusion import VideoPass
    from polymodal.train.loop import param_groups
    from polymodal.train.run import load_recipe
    out = Path(args.runs) / "plateau" / f"{condition}_s{seed}"
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_recipe(args.recipe, [f"out_dir={out}", f"data.train={data}/train.jsonl", f"data.num_frames={args.num_frames}",
                                    f"train.seed={seed}", "snps3.level1=in_batch",
                                    "snps3.weights={level1: 0, lvwm: 0, mlm: 0, level2: 1, itm: 1}"])
    method = cfg.method_impl
    torch.manual_seed(seed)
    tok = method.build_tokenizer(out)
    model = method.build_model(tok)
    dataset, _ = method.build_dataset(model, 0, 1)
    task = method.build_task(model)
    state = {}
    if condition == "oracle":
        real_pass = model.video_pass

        def video_pass(frames, valid=None):
            vp = real_pass(frames, valid)
            return VideoPass(means=oracle_tokens(model, state["batch"]), valid=vp.valid, clips=vp.clips, video=vp.video)
        model.video_pass = video_pass
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         collate_fn=method.collate(model),
                                         generator=torch.Generator().manual_seed(seed))
    o = cfg.optim
    opt = torch.optim.AdamW(param_groups(task, o.weight_decay), lr=o.lr, betas=tuple(o.betas))
    batches = itertools.chain.from_iterable(itertools.repeat(loader))
    rows, acc = [], {"level2": [], "itm": []}
    for step in range(1, args.steps + 1):
        for g in opt.param_groups:
            g["lr"] = o.lr * min(1.0, step / max(1, o.warmup_steps))
        state["batch"] = batch = next(batches)
        losses = task(batch)
        opt.zero_grad()
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(task.parameters(), o.clip_grad or 1e9)
        opt.step()
        for k in acc:
            acc[k].append(float(losses[k]))
        if step % 10 == 0:
            rows.append({"step": step, **{k: sum(v[-10:]) / 10 for k, v in acc.items()}})
            print(json.dumps({"seed": seed, "condition": condition, **rows[-1]}), flush=True)
    return rows


def run(args) -> dict:
    set_threads(args.threads)
    data = moving_shapes_world(Path(args.runs) / "data", n_train=args.n_train, n_test=args.n_test, n_val=0,
                               num_frames=8, image_size=32)
    curves = {c: {s: train_one(args, data, s, c) for s in args.seeds} for c in CONDITIONS}
    return {"command": command_line("snps3_plateau.py", __name__ == "__main__"), "settings": vars(args),
            "curves": {c: {str(s): v for s, v in d.items()} for c, d in curves.items()},
            "chance": {"level2": math.log(2 * args.batch_size), "itm": math.log(2)}}


def markdown(result) -> str:
    s, curves = result["settings"], result["curves"]
    steps = [r["step"] for r in next(iter(curves["real"].values()))]
    show = [x for x in steps if x in (10, 30, 60, 90) or x == steps[-1]]
    lines = [f"Level 2 + ITM alone from random weights, {s['steps']} steps, batch {s['batch_size']}, seeds {s['seeds']} "
             f"(mean ± sample sd of each seed's mean over the last 10 steps; chance level 2 ln {2 * s['batch_size']} = "
             f"{result['chance']['level2']:.3f}, ITM ln 2 = {result['chance']['itm']:.3f}).", "",
             f"Command: `{result['command']}`", "",
             "| visual tokens | loss | " + " | ".join(f"step {x}" for x in show) + " |", "|---" * (len(show) + 2) + "|"]
    for c in CONDITIONS:
        for k in ("level2", "itm"):
            cells = [pm_values([next(r[k] for r in curves[c][seed] if r["step"] == x) for seed in curves[c]], digits=3)
                     for x in show]
            lines.append(f"| {c} | {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    result = run(args)
    write_results(Path(args.out), result, markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
