"""fp32 vs bf16 autocast on the machine it runs on: a small CLIP training step, and what the check says.

A random CLIP `small` (ViT 4 layers width 128 on 64x64 images, text 4 layers width 128), batch
`--batch`, one training step = encode both sides, `clip_loss`, backward, AdamW step; the median of
`--steps` steps after one warm-up, in fp32 and under bf16 autocast, on `--device`. Also printed:
the CPU model, its bf16-relevant flags, and whether `polymodal.precision.check_precision` accepts
bf16 here (it refuses emulated bf16 unless forced). Timings are process CPU time on CPU (see
benchmarks/caption_cache.py), wall time on CUDA.

    python benchmarks/precision.py [--batch 16] [--steps 3] [--threads 1] [--device cpu|cuda] [--out PATH]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from polymodal.config import ConfigError  # noqa: E402
from polymodal.losses.contrastive import clip_loss  # noqa: E402
from polymodal.models.factory import create_model  # noqa: E402
from polymodal.precision import autocast, check_precision, cpu_flags, cpu_has_native_bf16  # noqa: E402


def step_seconds(precision: str, args) -> float:
    torch.manual_seed(0)
    model = create_model("small").to(args.device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    size = model.config.vision.image_size
    px = torch.randn(args.batch, 3, size, size, device=args.device)
    ids = torch.randint(1, 4000, (args.batch, 24), device=args.device)
    ids[:, -1] = model.config.text.eot_token_id
    clock = time.perf_counter if args.device == "cuda" else time.process_time

    def one():
        opt.zero_grad(set_to_none=True)
        with autocast(precision, args.device):
            loss = clip_loss(model.encode_image(px), model.encode_text(ids), model.scale())
        loss.float().backward()
        opt.step()

    one()
    times = []
    for _ in range(args.steps):
        if args.device == "cuda":
            torch.cuda.synchronize()
        t = clock()
        one()
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append(clock() - t)
    return statistics.median(times)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "precision.json"))
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("precision.py: --device cuda but torch sees no CUDA device; use --device cpu")
    torch.set_num_threads(args.threads)
    try:
        check_precision("bf16", args.device, where="benchmark")
        verdict = "accepted"
    except ConfigError as e:
        verdict = f"refused: {e}"
    fp32 = step_seconds("fp32", args)
    bf16 = step_seconds("bf16", args)
    if args.device == "cuda":
        where = torch.cuda.get_device_name()
    else:
        from retrieval_scale import cpu_info
        info = cpu_info()
        where = f"{info['model']} ({', '.join(info['flags'])}; native bf16: {cpu_has_native_bf16()})"
    print(f"{where}; CLIP small, batch {args.batch}, {args.threads} thread(s)")
    print("\n| device | fp32 step ms | bf16 step ms | bf16/fp32 | check_precision('bf16') |")
    print("|---|---|---|---|---|")
    print(f"| {where} | {fp32 * 1000:.0f} | {bf16 * 1000:.0f} | {bf16 / fp32:.1f}x | {verdict.split(':')[0]} |")
    print(f"\ncheck_precision says: {verdict}")
    row = {"device": where, "fp32_s": fp32, "bf16_s": bf16, "ratio": bf16 / fp32, "check": verdict,
           "threads": args.threads, "batch": args.batch,
           "bf16_flags": sorted(f for f in cpu_flags() if "bf16" in f)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row, indent=2))
    return row


if __name__ == "__main__":
    main()
