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

import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:          # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from benchmarks.common import base_parser, machine_info, set_threads  # noqa: E402
from polymodal.config import ConfigError  # noqa: E402
from polymodal.losses.contrastive import clip_loss  # noqa: E402
from polymodal.models.factory import create_model  # noqa: E402
from polymodal.precision import autocast, check_precision, cpu_has_native_bf16  # noqa: E402


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
    ap = base_parser(__doc__, str(Path(__file__).parent / "results" / "precision.json"), threads=1,
                     out_help="JSON results file")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("precision.py: --device cuda but torch sees no CUDA device; use --device cpu")
    set_threads(args.threads)
    try:
        check_precision("bf16", args.device, where="benchmark")
        verdict = "accepted"
    except ConfigError as e:
        verdict = f"refused: {e}"
    fp32 = step_seconds("fp32", args)
    bf16 = step_seconds("bf16", args)
    info = machine_info()
    if args.device == "cuda":
        where = info["gpu"]
    else:
        where = f"{info['cpu']} ({', '.join(info['flags'])}; native bf16: {cpu_has_native_bf16()})"
    print(f"{where}; CLIP small, batch {args.batch}, {args.threads} thread(s)")
    print("\n| device | fp32 step ms | bf16 step ms | bf16/fp32 | check_precision('bf16') |")
    print("|---|---|---|---|---|")
    print(f"| {where} | {fp32 * 1000:.0f} | {bf16 * 1000:.0f} | {bf16 / fp32:.1f}x | {verdict.split(':')[0]} |")
    print(f"\ncheck_precision says: {verdict}")
    row = {"device": where, "fp32_s": fp32, "bf16_s": bf16, "ratio": bf16 / fp32, "check": verdict,
           "threads": args.threads, "batch": args.batch,
           "bf16_flags": [f for f in info["flags"] if "bf16" in f], "machine": info}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row, indent=2))
    return row


if __name__ == "__main__":
    main()
