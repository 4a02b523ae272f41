"""How long `polymodal --help` takes, against the interpreter alone and against importing torch (what the old
parser did), in the same run.

    python benchmarks/cli_help.py [--repeats 7] [--out benchmarks/results/cli_help.json]

Each command runs in a fresh process; medians of `--repeats` interleaved runs are reported. Goal: under 0.5 s.
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

from benchmarks.common import base_parser, machine_info  # noqa: E402

CASES = {
    "python -c pass (interpreter start)": [sys.executable, "-c", "pass"],
    "polymodal --help": [sys.executable, "-m", "polymodal.cli", "--help"],
    "polymodal eval --help": [sys.executable, "-m", "polymodal.cli", "eval", "--help"],
    "python -c 'import torch' (the old parser's floor)": [sys.executable, "-c", "import torch"],
}


def main() -> None:
    p = base_parser(__doc__, str(ROOT / "benchmarks/results/cli_help.json"), threads=None, out_help="JSON results file")
    p.add_argument("--repeats", type=int, default=7)
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
    Path(args.out).write_text(json.dumps({"machine": machine_info(), "median_s": med, "runs": times}, indent=2))


if __name__ == "__main__":
    main()
