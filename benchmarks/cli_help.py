"""How long `polymodal --help` takes, against the interpreter alone and against importing torch (what the old
parser did), in the same run.

    python benchmarks/cli_help.py [--repeats 7] [--out benchmarks/results/cli_help.json]

Each command runs in a fresh process; medians of `--repeats` interleaved runs are reported. Goal: under 0.5 s.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "python -c pass (interpreter start)": [sys.executable, "-c", "pass"],
    "polymodal --help": [sys.executable, "-m", "polymodal.cli", "--help"],
    "polymodal eval --help": [sys.executable, "-m", "polymodal.cli", "eval", "--help"],
    "python -c 'import torch' (the old parser's floor)": [sys.executable, "-c", "import torch"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/cli_help.json"))
    args = p.parse_args()
    times: dict[str, list[float]] = {name: [] for name in CASES}
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    for _ in range(args.repeats):
        for name, cmd in CASES.items():
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env, cwd=ROOT)
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(v) for name, v in times.items()}
    base = med["polymodal --help"]
    print("| command | median s | vs polymodal --help |\n|---|---|---|")
    for name, t in med.items():
        print(f"| {name} | {t:.3f} | {t / base:.2f}x |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"median_s": med, "runs": times}, indent=2))


if __name__ == "__main__":
    main()
