"""Memory per rank and step time of DDP and FSDP (`train.strategy`), at W ranks, beside the 1/W share (issue #35).

Every (strategy, W) runs the one Trainer on the same model (a ~100M-parameter CLIP: two 12-layer towers of width
576 and 512, a 32k vocabulary) for a few steps, one process per rank (gloo on the CPU, one torch thread each;
nccl on a GPU). Each rank reports:

- model + optimizer bytes: its parameters (an FSDP rank: its shards), their gradients and AdamW's moments, counted
  from the tensors it holds (local shards of DTensors);
- the planned bytes (`Trainer.memory_plan`, printed before step 1);
- peak memory during the steps: on the CPU the peak resident set (VmHWM, reset after start-up) minus the resident
  set before the model was built; on CUDA `torch.cuda.max_memory_allocated`;
- the step time (median of the steps after the first).

The ranks run with `MALLOC_MMAP_THRESHOLD_=65536` (unless set): without it glibc's heap fragments under FSDP's
per-step gathers on the CPU and the resident set grows step after step (see `main`).

The FSDP / DDP ratios are printed beside 1/W. The done-when of issue #35: FSDP's model + optimizer bytes per rank
within 15% of 1/W of DDP's.

    python benchmarks/fsdp_memory.py --world 2 4 --out benchmarks/results/fsdp_memory.json
    python benchmarks/fsdp_memory.py --device cuda --world 1 --offload    # the GPU check's row: bf16 policy, offload

With one GPU there is one rank: FSDP over a 1-rank group checks the CUDA-only paths (bf16 mixed-precision policy,
CPU offload) and their memory, not the sharding. `--size toy` is a smoke run (seconds; its numbers mean nothing).
"""
from __future__ import annotations

import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import base_parser, machine_info, machine_line  # noqa: E402

SIZES = {
    "100m": {"embed_dim": 512, "vision.width": 576, "vision.layers": 12, "vision.heads": 8, "text.width": 512,
             "text.layers": 12, "text.heads": 8, "text.vocab_size": 32000, "text.context_length": 16,
             "text.eot_token_id": 31999},
    "toy": {},
}


def _rss(field: str = "VmRSS") -> int:
    """This process's resident set (or its peak, VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak_rss() -> None:
    """Free what malloc keeps, then make VmHWM start again from the current resident set (Linux clear_refs 5)."""
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _task(size: str):
    from polymodal.methods.clip import ContrastiveTask, LossConfig
    from polymodal.models.clip import CLIP
    from polymodal.models.factory import build_config
    torch.manual_seed(0)
    return ContrastiveTask(CLIP(build_config("tiny", SIZES[size])), LossConfig(gather="global_with_grad",
                                                                              local_loss=True))


def _batches(size: str, batch: int, steps: int, rank: int):
    g = torch.Generator().manual_seed(100 + rank)
    vocab = SIZES[size].get("text.vocab_size", 1000)
    L = SIZES[size].get("text.context_length", 32)
    out = []
    for _ in range(steps):
        ids = torch.randint(1, vocab - 1, (batch, L), generator=g)
        ids[:, -1] = vocab - 1
        out.append({"pixels": torch.randn(batch, 3, 32, 32, generator=g), "input_ids": ids})
    return out


def _local_bytes(t: torch.Tensor) -> int:
    local = t.to_local() if type(t).__name__ == "DTensor" else t
    return local.numel() * local.element_size()


def _worker(rank: int, world: int, port: int, strategy: str, args, out_dir: str) -> None:
    """One rank: train `args.steps` steps and write its numbers to out_dir/rank{rank}.json."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import torch.distributed as dist

    from polymodal.train.distributed import cleanup
    from polymodal.train.loop import OptimConfig, TrainConfig, Trainer
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    if strategy.startswith("fsdp") and world == 1:       # a 1-rank group: FSDP's CUDA paths without sharding
        dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    base = _rss()
    task = _task(args.size)
    offload = strategy == "fsdp+offload"
    precision = "bf16" if cuda and args.bf16 else "fp32"
    trainer = Trainer(task, lambda e, s: _batches(args.size, args.batch, args.steps, rank)[s:],
                      OptimConfig(lr=1e-4, warmup_steps=0, clip_grad=1.0),
                      TrainConfig(steps=args.steps, log_every=1, ckpt_every=0, progress=False, threads=1,
                                  strategy="fsdp" if offload else strategy, fsdp_offload=offload, precision=precision),
                      out_dir)
    del task
    _reset_peak_rss()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        start_cuda = torch.cuda.memory_allocated()
    trainer.fit()
    peak = (torch.cuda.max_memory_allocated() - 0) if cuda else _rss("VmHWM") - base
    params = trained = 0
    seen = set()
    for p in trainer.task.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        params += _local_bytes(p)
        trained += _local_bytes(p) if p.requires_grad else 0
    optim = sum(_local_bytes(v) for st in trainer.optimizer.state.values() for v in st.values()
                if torch.is_tensor(v) and v.ndim > 0)
    lines = [json.loads(x) for x in open(Path(out_dir) / "metrics.jsonl") if '"samples_per_s"' in x]
    global_batch = args.batch * world
    step_s = [global_batch / r["samples_per_s"] for r in lines[1:]] or [global_batch / lines[0]["samples_per_s"]]
    result = {"rank": rank, "params_bytes": params, "grads_bytes": trained, "optimizer_bytes": optim,
              "model_optimizer_bytes": params + trained + optim, "planned_bytes": trainer.memory_plan.total,
              "peak_bytes": peak, "peak_kind": "cuda max_memory_allocated" if cuda else "VmHWM - RSS before build",
              "step_s": statistics.median(step_s), "loss": lines[-1]["loss"]}
    if cuda:
        result["cuda_bytes_after_start"] = start_cuda
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))
    cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(strategy: str, world: int, args) -> dict:
    """Spawn `world` ranks of `strategy`; the per-rank numbers (max over ranks for bytes and time)."""
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        mp.spawn(_worker, args=(world, _free_port(), strategy, args, tmp), nprocs=world, join=True)
        ranks = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(world)]
    keys = ("params_bytes", "grads_bytes", "optimizer_bytes", "model_optimizer_bytes", "planned_bytes", "peak_bytes",
            "step_s")
    row = {"strategy": strategy, "world": world, **{k: max(r[k] for r in ranks) for k in keys},
           "loss": ranks[0]["loss"], "peak_kind": ranks[0]["peak_kind"], "wall_s": time.perf_counter() - t0}
    print(f"  {strategy} W={world}: model+optimizer {row['model_optimizer_bytes'] / 2**20:.0f} MiB/rank (plan "
          f"{row['planned_bytes'] / 2**20:.0f}), peak {row['peak_bytes'] / 2**20:.0f} MiB/rank, step {row['step_s']:.2f} s",
          flush=True)
    return row


def main() -> None:
    p = base_parser(__doc__, out="benchmarks/results/fsdp_memory.json", threads=None)
    p.add_argument("--world", type=int, nargs="+", default=[2, 4], help="ranks per run (default 2 4)")
    p.add_argument("--size", choices=sorted(SIZES), default="100m")
    p.add_argument("--steps", type=int, default=4, help="training steps per run (the first is not timed)")
    p.add_argument("--batch", type=int, default=4, help="samples per rank per step")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--offload", action="store_true", help="also FSDP with train.fsdp_offload")
    p.add_argument("--bf16", action="store_true", help="CUDA: train.precision=bf16 (FSDP: the bf16 policy)")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("fsdp_memory.py: --device cuda, but torch sees no CUDA device")
    if args.device == "cuda" and max(args.world) > torch.cuda.device_count():
        sys.exit(f"fsdp_memory.py: --world {max(args.world)} needs as many GPUs; this machine has "
                 f"{torch.cuda.device_count()}")
    # glibc raises its mmap threshold after large frees, so the per-block gathers and gradients FSDP allocates and
    # frees every step end up in the heap, which fragments and keeps growing (measured here: +0.4 GiB RSS per rank
    # at step 2 of the 100M model). A fixed threshold gives freed blocks back to the OS at once. Set before the
    # ranks start (glibc reads it at start-up); the DDP runs get it too.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    info = machine_info()
    info["malloc_mmap_threshold"] = os.environ["MALLOC_MMAP_THRESHOLD_"]
    print(f"machine: {machine_line(info)}; MALLOC_MMAP_THRESHOLD_={info['malloc_mmap_threshold']}", flush=True)
    strategies = ["ddp", "fsdp"] + (["fsdp+offload"] if args.offload else [])
    rows = []
    for w in args.world:
        for s in strategies:
            rows.append(run(s, w, args))
    print()
    print("| W | strategy | model+optimizer MiB/rank | / DDP | 1/W | within 15% of 1/W | peak MiB/rank | / DDP | "
          "step s | / DDP |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for w in args.world:
        ddp = next(r for r in rows if r["world"] == w and r["strategy"] == "ddp")
        for r in (r for r in rows if r["world"] == w):
            mo = r["model_optimizer_bytes"] / ddp["model_optimizer_bytes"]
            r["model_optimizer_ratio"] = mo
            r["peak_ratio"] = r["peak_bytes"] / ddp["peak_bytes"]
            r["step_ratio"] = r["step_s"] / ddp["step_s"]
            r["within_15pct_of_1_over_w"] = abs(mo - 1 / w) <= 0.15 / w if r["strategy"] != "ddp" else None
            ok = {None: "-", True: "yes", False: "NO"}[r["within_15pct_of_1_over_w"]]
            print(f"| {w} | {r['strategy']} | {r['model_optimizer_bytes'] / 2**20:.0f} | {mo:.3f} | {1 / w:.3f} | {ok} | "
                  f"{r['peak_bytes'] / 2**20:.0f} | {r['peak_ratio']:.3f} | {r['step_s']:.2f} | {r['step_ratio']:.2f} |")
    params = sum(p.numel() for p in _task(args.size).parameters())
    result = {"machine": info, "command": " ".join(sys.argv), "size": args.size, "parameters": params,
              "batch_per_rank": args.batch, "steps": args.steps, "device": args.device, "rows": rows}
    from polymodal.eval.report import write_json
    write_json(Path(args.out), result)
    print(f"\n{params / 1e6:.1f}M parameters; written {args.out}")


if __name__ == "__main__":
    main()
