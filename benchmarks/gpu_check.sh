#!/usr/bin/env bash
# The GPU check (issue #22): on a CUDA machine, in under 10 minutes, run
#   1. the tests that need CUDA (retrieval on the GPU, cached captioning on the GPU, the bf16 check),
#   2. the train-step comparison against transformers in fp32 and bf16 (benchmarks/train_step.py),
#   3. exact retrieval at 100k images x 500k texts on the GPU vs FAISS flat top-10 (CPU, all cores),
#   4. captioning with and without the KV cache on the GPU (benchmarks/caption_cache.py),
#   5. fp32 vs bf16 autocast on the GPU (benchmarks/precision.py),
#   6. FSDP on the GPU (benchmarks/fsdp_memory.py): the ~100M CLIP under train.strategy=ddp, fsdp (bf16 policy)
#      and fsdp with CPU offload over a 1-rank nccl group (the CUDA-only paths; sharding itself is tested on gloo),
# and print one table. Stops at once, with an error, when torch sees no CUDA device.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        (default OUT_DIR: benchmarks/results/gpu_check)
#
# GPU_CHECK_SMOKE=1 runs the same five steps on the CPU at toy sizes (the tests are only collected): it checks
# the script's own plumbing (every command line, every JSON the table reads) where no GPU is, in about a
# minute (tests/test_benchmark_common.py runs it). Its numbers mean nothing.
#
# Every step has its own time limit (see LIMIT_*); a step that fails or runs out of time is marked in
# the table and the others still run. Exit status: 0 when every step passed, 1 otherwise.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
OUT=${1:-benchmarks/results/gpu_check}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1
SMOKE=${GPU_CHECK_SMOKE:-0}

if [ "$SMOKE" = 1 ]; then
    DEV=cpu
    echo "gpu_check.sh: SMOKE run on the CPU at toy sizes (checks the script, not the GPU)"
elif ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh: ERROR: torch sees no CUDA device (torch.cuda.is_available() is False); run this on a GPU machine" >&2
    exit 2
else
    DEV=cuda
    "$PY" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}; torch {torch.__version__}, CUDA {torch.version.cuda}')"
fi
CORES=$(nproc)

LIMIT_TESTS=120 LIMIT_TRAIN=150 LIMIT_RETRIEVAL=240 LIMIT_CAPTION=90 LIMIT_PRECISION=60 LIMIT_FSDP=120
declare -a ROWS
FAILED=0

run_step() {   # run_step NAME LIMIT_S LOG COMMAND...
    local name=$1 limit=$2 log=$3; shift 3
    local t0=$SECONDS rc
    echo "== $name (limit ${limit}s): $*"
    timeout "$limit" "$@" > "$log" 2>&1
    rc=$?
    tail -n 15 "$log"
    local status=ok
    if [ $rc -eq 124 ]; then status="TIMEOUT"; FAILED=1
    elif [ $rc -ne 0 ]; then status="FAILED (rc $rc)"; FAILED=1; fi
    ROWS+=("$name|$status|$((SECONDS - t0))|$log")
}

# 1. Tests that need CUDA: the GPU tests of every file that has any, plus the three files of issue #22 whole.
CUDA_FILES=$(grep -l "cuda.is_available" tests/*.py | tr '\n' ' ')
[ "$SMOKE" = 1 ] && COLLECT=--collect-only || COLLECT=
run_step "CUDA tests" $LIMIT_TESTS "$OUT/tests.log" \
    "$PY" -m pytest -q -rs -p no:cacheprovider $COLLECT tests/test_retrieval_onepass.py tests/test_kv_cache.py \
    tests/test_precision.py $CUDA_FILES

# Sizes: the real ones, or toy ones for the smoke run.
if [ "$SMOKE" = 1 ]; then
    TRAIN_SIZE="--arch toy --steps 1 --forward-runs 1 --batch 2 --scenarios full" TRAIN_PRECISIONS=fp32
    RETRIEVAL_SIZES=300x1500 CAPTION_SIZE="--batch 2 --tokens 3 --beams 2 --repeats 1" PRECISION_SIZE="--batch 2 --steps 1"
    FSDP_SIZE="--size toy --steps 2 --batch 2"
else
    TRAIN_SIZE="--steps 10 --batch 64" TRAIN_PRECISIONS="fp32 bf16"
    RETRIEVAL_SIZES=10000x50000,100000x500000 CAPTION_SIZE="--batch 64 --tokens 20" PRECISION_SIZE="--batch 128 --steps 5"
    FSDP_SIZE="--size 100m --steps 6 --batch 64 --bf16"
fi

# 2. Train step vs transformers, fp32 and bf16 (the smoke run skips bf16: most CPUs only emulate it).
for p in $TRAIN_PRECISIONS; do
    # shellcheck disable=SC2086  # the size options are meant to split into words
    run_step "train step $p" $((LIMIT_TRAIN / 2)) "$OUT/train_step_$p.log" \
        "$PY" benchmarks/train_step.py --device $DEV --precision $p $TRAIN_SIZE --out "$OUT/train_step_$p.json"
done

# 3. Retrieval at 100k x 500k: ours on the GPU, FAISS flat top-10 on all CPU cores.
run_step "retrieval 100k x 500k" $LIMIT_RETRIEVAL "$OUT/retrieval.log" \
    "$PY" benchmarks/retrieval_scale.py --device $DEV --sizes $RETRIEVAL_SIZES --threads "$CORES" \
    --out "$OUT/retrieval_scale.json"

# 4. Captioning with the KV cache (greedy and beam, cached vs uncached, GPT-2 generate).
# shellcheck disable=SC2086
run_step "captioning (KV cache)" $LIMIT_CAPTION "$OUT/caption.log" \
    "$PY" benchmarks/caption_cache.py --device $DEV $CAPTION_SIZE --out "$OUT/caption_cache.json"

# 5. fp32 vs bf16.
# shellcheck disable=SC2086
run_step "precision fp32 vs bf16" $LIMIT_PRECISION "$OUT/precision.log" \
    "$PY" benchmarks/precision.py --device $DEV $PRECISION_SIZE --out "$OUT/precision.json"

# 6. FSDP on the GPU: ddp vs fsdp (bf16 policy) vs fsdp + CPU offload, one rank.
# shellcheck disable=SC2086
run_step "fsdp (1 rank)" $LIMIT_FSDP "$OUT/fsdp.log" \
    "$PY" benchmarks/fsdp_memory.py --device $DEV --world 1 --offload $FSDP_SIZE --out "$OUT/fsdp_memory.json"

echo
echo "| step | status | seconds | log |"
echo "|---|---|---|---|"
for r in "${ROWS[@]}"; do IFS='|' read -r a b c d <<< "$r"; echo "| $a | $b | $c | $d |"; done
echo
"$PY" - "$OUT" "$DEV" <<'EOF'
import json, sys
from pathlib import Path
out, dev = Path(sys.argv[1]), sys.argv[2]
def load(name):
    p = out / name
    return json.loads(p.read_text()) if p.exists() else None
print("| measurement | value |")
print("|---|---|")
for p in ("fp32", "bf16"):
    r = load(f"train_step_{p}.json")
    for name, sc in ((r or {}).get("scenarios") or {}).items():
        step, mem = sc["train_step_s"], sc["peak_memory_mb"]
        print(f"| train step {p}, {name} text (batch {r['batch']}) | ours {step['ours']:.3f} s, HF {step['hf']:.3f} s "
              f"(ours/HF {sc['train_step_ratio_ours_over_hf']:.2f}); MFU {sc['mfu']:.0%}; peak MB ours {mem['ours']:.0f}, "
              f"HF {mem['hf']:.0f} |")
r = load("retrieval_scale.json")
for row in (r or {}).get("rows", []):
    faiss = f"{row['faiss_s']:.1f} s (ours/FAISS {row['time_ratio']:.2f})" if "faiss_s" in row else "-"
    print(f"| retrieval {row['images']} x {row['texts']} (ours on {dev}) | ours {row['ours_s']:.1f} s, +{row['ours_extra_mb']:.0f} MB; FAISS CPU {faiss} |")
r = load("caption_cache.json")
for row in (r or {}).get("rows", []):
    print(f"| captions/s {row['what']} (batch {r['batch']}, {r['tokens']} tokens) | cached {row['cached_caps_per_s']:.0f}, "
          f"uncached {row['uncached_caps_per_s']:.0f} ({row['speedup']:.1f}x) |")
if r:
    print(f"| captions/s GPT-2 generate | cached {r['gpt2_caps_per_s']:.0f}, uncached {r['gpt2_uncached_caps_per_s']:.0f} "
          f"({r['gpt2_speedup']:.1f}x); our work ratio {r['mac_ratio']:.1f}x, bound {r['speedup_bound']:.1f}x |")
r = load("precision.json")
if r:
    print(f"| CLIP small step fp32 / bf16 | {r['fp32_s'] * 1000:.1f} ms / {r['bf16_s'] * 1000:.1f} ms ({r['ratio']:.2f}x); check: {r['check'][:60]} |")
r = load("fsdp_memory.json")
for row in (r or {}).get("rows", []):
    print(f"| {row['strategy']} step, 1 rank ({r['parameters'] / 1e6:.0f}M params, batch {r['batch_per_rank']}) | "
          f"{row['step_s']:.3f} s; peak {row['peak_bytes'] / 2**20:.0f} MiB ({row['peak_kind']}); "
          f"model+optimizer on device {row['model_optimizer_bytes'] / 2**20:.0f} MiB |")
EOF
exit $FAILED
