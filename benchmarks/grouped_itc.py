"""Grouped ITC (M2-Encoder) against the global gather-with-grad loss: bytes, logits memory, time.

Run on CPU with gloo (or GPUs with nccl):
    torchrun --nproc_per_node=4 benchmarks/grouped_itc.py --batch 64 --dim 256 --steps 20

For every group size G dividing W (G = W is the standard global loss: OpenCLIP
local_loss + gather_with_grad) each rank times forward + backward of `clip_loss(...,
gather="grouped", local_loss=True, group_size=G)` on random features and counts the bytes its
forward all-gathers receive. Rank 0 prints a table with ratios against G = W and writes JSON.

Formulas, per rank and step, with B rows per rank, D dims, 4-byte floats:
    gathered bytes = (G - 1) * B * D * 4 * 2          (image + text)
    logits bytes   = B * (G * B) * 4 * 2              (image->text and text->image logits)
The backward all-reduce payload is G * B * D * 4 * 2; a ring all-reduce moves about
2 (G - 1) / G of it per rank, so it falls with G - 1 as the gather does.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:          # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from benchmarks.common import base_parser, machine_info  # noqa: E402
from polymodal import distributed as pdist  # noqa: E402
from polymodal.losses.contrastive import clip_loss  # noqa: E402
from polymodal.train import distributed as train_dist  # noqa: E402

BYTES_PER_FLOAT = 4


def parse_args(argv=None):
    p = base_parser(__doc__, "benchmarks/results/grouped_itc.json", threads=None,
                    out_help="JSON results file (threads: OMP_NUM_THREADS, as torchrun sets it)")
    p.add_argument("--batch", type=int, default=64, help="rows per rank (B)")
    p.add_argument("--dim", type=int, default=256, help="embedding width (D)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per group size")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per group size")
    p.add_argument("--project-world", type=int, default=64, help="GPUs for the formula projection")
    p.add_argument("--project-per-node", type=int, default=8, help="GPUs per machine for the projection")
    args = p.parse_args(argv)
    args.out = Path(args.out)
    return args


def formula_bytes(g: int, b: int, d: int) -> int:
    return (g - 1) * b * d * BYTES_PER_FLOAT * 2


def formula_logits(g: int, b: int) -> int:
    return b * g * b * BYTES_PER_FLOAT * 2


def measure(g: int, args) -> dict:
    """Time and count one group size; collective over all ranks."""
    pdist.make_contiguous_groups(g)  # create the groups outside the timed region
    gen = torch.Generator().manual_seed(1000 + pdist.rank())
    scale = torch.tensor(1 / 0.07)
    times, received, backward = [], [], []
    for step in range(args.warmup + args.steps):
        img = torch.randn(args.batch, args.dim, generator=gen, requires_grad=True)
        txt = torch.randn(args.batch, args.dim, generator=gen, requires_grad=True)
        pdist.barrier()  # start every step together so the time is the step, not the skew
        start = time.perf_counter()
        with pdist.count_collective_bytes() as counted:
            loss = clip_loss(F.normalize(img, dim=-1), F.normalize(txt, dim=-1), scale, "grouped", True, g)
            loss.backward()
        elapsed = time.perf_counter() - start
        if step >= args.warmup:
            times.append(elapsed)
            received.append(counted.bytes_received)
            backward.append(counted.backward_bytes)
    # A step is as slow as its slowest rank.
    t = torch.tensor(times, dtype=torch.float64)
    if pdist.is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return {
        "group_size": g,
        "groups": pdist.world_size() // g,
        "bytes_received_measured": int(statistics.median(received)),
        "bytes_received_formula": formula_bytes(g, args.batch, args.dim),
        "backward_allreduce_payload": int(statistics.median(backward)),
        "logits_bytes": formula_logits(g, args.batch),
        "time_ms_median": 1000 * statistics.median(t.tolist()),
    }


def check_equal_to_global(args) -> float:
    """|grouped(G=W) - global_with_grad| loss and gradient difference on the same data."""
    gen = torch.Generator().manual_seed(7 + pdist.rank())
    img = torch.randn(args.batch, args.dim, generator=gen, requires_grad=True)
    txt = torch.randn(args.batch, args.dim, generator=gen)
    out = []
    for mode in ("grouped", "global_with_grad"):
        img.grad = None
        loss = clip_loss(F.normalize(img, dim=-1), F.normalize(txt, dim=-1), torch.tensor(10.0), mode, True, -1)
        loss.backward()
        out.append((loss.detach(), img.grad.clone()))
    diff = max((out[0][0] - out[1][0]).abs().item(), (out[0][1] - out[1][1]).abs().max().item())
    d = torch.tensor(diff)
    if pdist.is_dist():
        dist.all_reduce(d, op=dist.ReduceOp.MAX)
    return d.item()


def projection(args) -> dict:
    """Formula ratios for one machine per group against all ranks, at --project-world GPUs."""
    w, g = args.project_world, args.project_per_node
    return {
        "world_size": w,
        "group_size": g,
        "bytes_group": formula_bytes(g, args.batch, args.dim),
        "bytes_global": formula_bytes(w, args.batch, args.dim),
        "bytes_ratio": (g - 1) / (w - 1),
        "logits_group": formula_logits(g, args.batch),
        "logits_global": formula_logits(w, args.batch),
        "logits_ratio": g / w,
    }


def _mb(n: float) -> str:
    return f"{n / 2**20:9.3f}"


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    info = train_dist.init_distributed()
    w = info.world_size
    sizes = [g for g in (1, 2, 4, 8, 16, 32, 64) if g <= w and w % g == 0]
    rows = [measure(g, args) for g in sizes]
    max_diff = check_equal_to_global(args)
    if info.is_main:
        full = rows[-1]  # G = W
        print(f"grouped ITC, W={w} ({info.backend or 'single process'}), B={args.batch}/rank, "
              f"D={args.dim}, fp32, {args.steps} steps (median)")
        print(f"{'G':>3} {'groups':>6} | {'recv MB meas':>12} {'recv MB form':>12} {'ratio':>6} | "
              f"{'logits MB':>9} {'ratio':>6} | {'fwd+bwd ms':>10} {'ratio':>6}")
        for r in rows:
            b_ratio = r["bytes_received_measured"] / full["bytes_received_measured"] if full["bytes_received_measured"] else 1.0
            r["bytes_ratio_vs_global"] = b_ratio
            r["logits_ratio_vs_global"] = r["logits_bytes"] / full["logits_bytes"]
            r["time_ratio_vs_global"] = r["time_ms_median"] / full["time_ms_median"]
            print(f"{r['group_size']:>3} {r['groups']:>6} | {_mb(r['bytes_received_measured']):>12} "
                  f"{_mb(r['bytes_received_formula']):>12} {b_ratio:6.3f} | {_mb(r['logits_bytes'])} "
                  f"{r['logits_ratio_vs_global']:6.3f} | {r['time_ms_median']:10.3f} {r['time_ratio_vs_global']:6.3f}")
        print(f"G=W vs global_with_grad (local loss): max |loss or grad difference| = {max_diff:.2e}")
        proj = projection(args)
        print(f"projection (formula) W={proj['world_size']}, G={proj['group_size']} (one machine) vs "
              f"G={proj['world_size']}: received {_mb(proj['bytes_group']).strip()} vs "
              f"{_mb(proj['bytes_global']).strip()} MB (x{proj['bytes_ratio']:.3f}), logits "
              f"{_mb(proj['logits_group']).strip()} vs {_mb(proj['logits_global']).strip()} MB "
              f"(x{proj['logits_ratio']:.3f})")
        result = {
            "world_size": w,
            "backend": info.backend,
            "local_world_size": info.local_world_size,
            "batch_per_rank": args.batch,
            "dim": args.dim,
            "steps": args.steps,
            "dtype": "float32",
            "rows": rows,
            "grouped_full_vs_global_max_diff": max_diff,
            "projection": proj,
            "command": " ".join(["torchrun", f"--nproc_per_node={w}", *sys.argv]),
            "machine": machine_info(),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    train_dist.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
