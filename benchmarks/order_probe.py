"""Order probe: can a temporal module leave the mean-pooling saddle when the order loss is not drowned?

A diagnostic for docs/results.md (temporal modelling), not a recipe run. Starting from the CLIP stand-in, a fresh
temporal module (and, with `--train-tower`, the image tower) is trained on batches of *paired* MovingShapes training
videos only (every row has its time-reversed partner in the manifest), with the text tower frozen at the stand-in's
weights: loss = InfoNCE(video, caption) + `--order-weight` x `video_clip.order_loss` at a fixed logit scale, AdamW at a
constant learning rate without weight decay. Printed every 50 steps: the loss, the batch's order accuracy (caption
prefers its video over the reversal), the gradient norm and the batch's video-vs-reversal cosine; at the end the same
on the order-sensitive *test* pairs (held out). Usage:
`python benchmarks/order_probe.py --videos 64 --steps 150 --time-init 1.0 --train-tower` (minutes on one core).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:          # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import (base_parser, clip_standin, command_line, moving_shapes_world, set_threads,  # noqa: E402
                               write_results)


def _clips(model, records, frames: int):
    from polymodal.encode import clip_batches
    out, valid = [], []
    for _, f, v, _ in clip_batches(model, records, num_frames=frames):
        out.append(f)
        valid.append(v)
    return torch.cat(out), torch.cat(valid)


def main(argv=None) -> dict:
    p = base_parser(__doc__, "runs/order_probe/out", "runs/order_probe", seeds=[0], threads=1,
                    out_help="where results.json goes")
    p.add_argument("--data", default="", help="MovingShapes folder (default <runs>/data: 1000 train / 200 test)")
    p.add_argument("--standin-runs", default="runs")
    p.add_argument("--kind", default="transformer", choices=("transformer", "stan"))
    p.add_argument("--videos", type=int, default=64, help="paired training videos to draw batches from")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--time-init", type=float, default=1.0)
    p.add_argument("--order-weight", type=float, default=1.0)
    p.add_argument("--scale", type=float, default=25.0, help="fixed logit scale")
    p.add_argument("--train-tower", action="store_true", help="also train the image tower")
    a = p.parse_args(argv)
    set_threads(a.threads)
    from polymodal.data.manifests import read_manifest
    from polymodal.eval.order import partners
    from polymodal.hub import load_model
    from polymodal.methods.video_clip import order_loss
    from polymodal.models.video import VideoCLIP
    torch.manual_seed(a.seeds[0])
    data = moving_shapes_world(Path(a.data) if a.data else Path(a.runs) / "data", n_train=1000, n_test=200,
                               num_frames=8, image_size=32)
    clip = load_model(clip_standin(Path(a.standin_runs), a.threads or 1))
    model = VideoCLIP.from_image_model(clip, {"kind": a.kind, "layers": 2, "stan_layers": 1,
                                              "time_init": a.time_init}).train()
    train = [r for r in read_manifest(data / "train.jsonl", media="video").records if r.get("pair_id") is not None]
    train = train[:a.videos]
    frames, valid = _clips(model, train, 8)
    with torch.no_grad():                                                  # the frozen text tower
        text = model.encode_text(model.tokenizer([r["caption"] for r in train]))
    opposite = text[partners([r["pair_id"] for r in train]).clamp_min(0)]
    has = partners([r["pair_id"] for r in train]) >= 0
    params = [q for n, q in model.named_parameters()
              if n.startswith("temporal.") or (a.train_tower and n.startswith("base.visual"))]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    scale = torch.tensor(a.scale)
    log = []
    for step in range(a.steps + 1):
        idx = torch.randperm(len(train))[:a.batch]
        fwd, rev = model.encode_video_and_reversal(frames[idx], valid[idx])                   # (B, E) x 2
        order, acc = order_loss(fwd, rev, text[idx], opposite[idx], has[idx], scale)
        logits = scale * text[idx] @ fwd.T                                                     # (B, B)
        labels = torch.arange(len(idx))
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2 + a.order_weight * order
        opt.zero_grad()
        loss.backward()
        grad = sum(float(q.grad.norm() ** 2) for q in params if q.grad is not None) ** 0.5
        opt.step()
        if step % 50 == 0:
            row = {"step": step, "loss": float(loss), "order_acc": float(acc), "grad_norm": grad,
                   "reversal_cos": float((fwd * rev).sum(-1).mean())}
            log.append(row)
            print(json.dumps(row), flush=True)
    test = [r for r in read_manifest(data / "test.jsonl", media="video").records if r.get("pair_id") is not None]
    tf, tv = _clips(model, test, 8)
    model.eval()
    with torch.no_grad():
        fwd, rev = model.encode_video_and_reversal(tf, tv)
        tt = model.encode_text(model.tokenizer([r["caption"] for r in test]))
    held = {"test_prefers_own": 100 * float(((tt * fwd).sum(-1) > (tt * rev).sum(-1)).float().mean()),
            "test_reversal_cos": float((fwd * rev).sum(-1).mean()), "test_captions": len(test)}
    print(json.dumps(held), flush=True)
    result = {"log": log, "held_out": held, "args": vars(a),
              "command": command_line("order_probe.py", __name__ == "__main__")}
    write_results(Path(a.out), result)
    return result


if __name__ == "__main__":
    main()
