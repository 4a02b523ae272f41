"""Training throughput on a shared CPU: torch threads x OMP wait policy x an idle or a busy machine.

Each configuration trains the demo's model (`small` CLIP, ShapesWorld, batch 64) for a few steps in its
own process (thread settings and OMP_WAIT_POLICY only take effect at process start) and reads the
Trainer's own `samples_per_s` from `metrics.jsonl`, skipping the first log window (warm-up). The busy
machine has one competing process next to the run: a single-threaded matmul loop, standing in for
"other work" (another job, a test suite, a browser). Configurations run one after another, in an order
that alternates idle and busy, and the whole matrix is repeated `--repeats` times (medians reported).

    python benchmarks/threads.py --out docs/results/threads [--runs DIR] [--steps 60] [--repeats 2] [--threads 1 2 auto]

The `auto` row is `train.threads=auto` (polymodal's own choice, see `polymodal/train/threads.py`).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:          # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from benchmarks.common import base_parser, machine_info, machine_line, shapes_world, write_results  # noqa: E402

HOG = ("import numpy as np, time\n"
       "a = np.random.rand(384, 384).astype('float32')\n"
       "end = time.time() + {seconds}\n"
       "while time.time() < end:\n"
       "    a = (a @ a) / 384.0\n")


def make_data(folder: Path, n: int) -> Path:
    return shapes_world(folder, n, 16, 8, 4, seed=0) / "train.jsonl"


def run_one(train: Path, out: Path, threads: str, policy: str, steps: int, batch: int) -> float:
    """Median samples/s of one training process (first log window dropped)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("OMP_NUM_THREADS", None)
    env.pop("OMP_WAIT_POLICY", None)
    if policy != "default":
        env["OMP_WAIT_POLICY"] = policy
    run_dir = out / f"run_t{threads}_{policy}_{time.time_ns()}"
    cmd = [sys.executable, "-m", "polymodal.cli", "train", str(ROOT / "recipes/clip_shapes.yaml"),
           f"data.train={train}", f"data.batch_size={batch}", f"train.steps={steps}", "train.log_every=10",
           "train.progress=false", "train.ckpt_every=100000", "train.eval_every=0", f"train.threads={threads}",
           "eval.retrieval=", "eval.longtext=", "eval.zeroshot=", "eval.classes=", f"out_dir={run_dir}",
           "optim.warmup_steps=5", "train.report=false"]
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [r["samples_per_s"] for r in rows if "samples_per_s" in r][1:]
    return statistics.median(rates)


def main(argv=None) -> None:
    p = base_parser(__doc__, "runs/bench_threads", "runs/bench_threads/runs", threads=None,
                    out_help="where results.md / results.json go")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", nargs="+", default=["1", "2", "auto"],
                   help="train.threads values compared (each run in its own process)")
    p.add_argument("--policies", nargs="+", default=["default", "PASSIVE"])
    args = p.parse_args(argv)
    out, runs = Path(args.out), Path(args.runs)
    out.mkdir(parents=True, exist_ok=True)
    runs.mkdir(parents=True, exist_ok=True)
    train = make_data(runs / "data", max(512, args.batch * 8))
    configs = [(t, pol) for t in args.threads for pol in args.policies]
    results: dict = {}
    for rep in range(args.repeats):
        for i, (threads, policy) in enumerate(configs):
            for load in (("idle", "busy") if (i + rep) % 2 == 0 else ("busy", "idle")):
                hog = None
                if load == "busy":
                    hog = subprocess.Popen([sys.executable, "-c", HOG.format(seconds=3600)],
                                           env=dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1"))
                    time.sleep(1.0)
                try:
                    rate = run_one(train, runs, threads, policy, args.steps, args.batch)
                finally:
                    if hog is not None:
                        hog.kill()
                        hog.wait()
                results.setdefault(f"{threads}|{policy}|{load}", []).append(rate)
                print(f"threads={threads:<4} OMP_WAIT_POLICY={policy:<7} {load:<4} {rate:7.1f} samples/s", flush=True)
    table = {k: statistics.median(v) for k, v in results.items()}
    best_idle = max(v for k, v in table.items() if k.endswith("|idle"))
    best_busy = max(v for k, v in table.items() if k.endswith("|busy"))
    machine = machine_info()
    lines = [f"Machine: {machine_line(machine)}",
             f"Command: python benchmarks/threads.py --out {args.out} --steps {args.steps} "
             f"--repeats {args.repeats} --threads {' '.join(args.threads)}", "",
             "| train.threads | OMP_WAIT_POLICY | idle samples/s | vs best idle | busy samples/s | vs best busy |",
             "|---|---|---|---|---|---|"]
    for threads, policy in configs:
        idle, busy = table[f"{threads}|{policy}|idle"], table[f"{threads}|{policy}|busy"]
        lines.append(f"| {threads} | {policy} | {idle:.1f} | {idle / best_idle:.2f} | {busy:.1f} | {busy / best_busy:.2f} |")
    text = "\n".join(lines) + "\n"
    write_results(out, {"machine": machine, "samples_per_s": table, "runs": results, "steps": args.steps,
                        "batch": args.batch}, text)
    print(text)


if __name__ == "__main__":
    main()
