"""Benchmark helpers: seeds, verdicts, mean ± sd, parser, worlds and machine info (common.py), pooler
re-initialisation, the captioning work count, the train-step profile, and the GPU check's own plumbing (its CPU
smoke mode)."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_common():
    """benchmarks/common.py as `benchmarks.common` (the name the scripts import it by)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import benchmarks.common
    return benchmarks.common


def test_paired_difference_and_verdict(load_benchmark):
    common = load_benchmark("common")
    d = common.paired_difference([3.0, 5.0, 4.0], [1.0, 6.0, 2.0])
    assert d["values"] == [2.0, -1.0, 2.0]
    assert d["mean"] == pytest.approx(1.0) and d["std"] == pytest.approx(math.sqrt(3.0))
    assert d["n_positive"] == 2 and d["min"] == -1.0 and d["max"] == 2.0
    assert common.verdict(d) == "mixed"
    assert common.verdict(common.paired_difference([2.0, 3.0], [1.0, 1.0])) == "shown"
    assert common.verdict(common.paired_difference([0.0, 0.0], [1.0, 1.0])) == "not shown"
    assert common.verdict(common.paired_difference([0.0, 0.0], [1.0, 1.0]), direction=-1) == "shown"
    one = common.seed_summary([4.0])
    assert one["mean"] == 4.0 and one["std"] == 0.0 and one["n"] == 1


def test_verdict_margin_and_ties():
    common = load_common()
    d = common.paired_difference([3.0, 3.5], [2.0, 2.0])           # +1.0, +1.5: every seed agrees
    assert common.verdict(d, margin=1.0) == "shown" and common.verdict(d, margin=2.0) == "not shown"
    tie = common.paired_difference([1.0, 2.0], [1.0, 1.0])         # 0, +1
    assert common.verdict(tie) == "mixed" and common.verdict(tie, ties_agree=True) == "shown"
    assert common.verdict({"values": [0.0, 0.0]}, ties_agree=True) == "shown"


def test_seed_summary_drops_missing_values_on_request():
    common = load_common()
    s = common.seed_summary([1.0, float("nan"), None, 3.0], drop_missing=True)
    assert s["values"] == [1.0, 3.0] and s["mean"] == 2.0 and s["std"] == pytest.approx(math.sqrt(2.0))
    empty = common.seed_summary([float("nan")], drop_missing=True)
    assert empty["n"] == 0 and math.isnan(empty["mean"])
    with pytest.raises(ValueError, match="no values"):
        common.seed_summary([])


def test_mean_sd_text():
    common = load_common()
    assert common.pm_values([1.0, 2.0, 3.0]) == "2.0 ± 1.0"                     # sample std (n - 1)
    assert common.pm_values([0.25], digits=3, sign=True) == "+0.250"             # one seed: the value alone
    assert common.pm_values([float("nan"), None]) == "–"
    assert common.pm(-0.5, 0.25, 3, 2, sign=True) == "-0.50 ± 0.25"


def test_claim_records_its_outcome():
    common = load_common()
    assert common.claim("c", "1 vs 2", True) == {"claim": "c", "numbers": "1 vs 2", "verdict": "shown", "shown": True}
    assert common.claim("c", "", "mixed")["shown"] is False
    lines = common.claim_lines([common.claim("a", "x", False), common.claim("b", "y", None)])
    assert lines == ["- NOT shown: a (x)", "- n/a: b (y)"]


def test_base_parser_options():
    common = load_common()
    p = common.base_parser("Title.\n\nMore.", "out/x", runs="runs/x", seeds=[0, 1], threads=1)
    a = p.parse_args([])
    assert (a.out, a.runs, a.seeds, a.threads) == ("out/x", "runs/x", [0, 1], 1)
    assert p.parse_args(["--seeds", "3", "4", "--threads", "2"]).seeds == [3, 4]
    assert p.description == "Title."
    bare = common.base_parser("T", None, threads=None)
    with pytest.raises(SystemExit):
        bare.parse_args([])                                   # --out is required
    assert not hasattr(bare.parse_args(["--out", "o"]), "threads")


def test_cached_world_regenerates_only_when_the_settings_change(tmp_path):
    common = load_common()
    made = []

    def generate(tag):
        (tmp_path / "train.jsonl").write_text(tag)
        made.append(tag)

    common.cached_world(tmp_path, {"n": 1}, lambda: generate("a"))
    common.cached_world(tmp_path, {"n": 1}, lambda: generate("b"))          # same settings: reused
    common.cached_world(tmp_path, {"n": 2}, lambda: generate("c"))          # other settings: generated again
    (tmp_path / "train.jsonl").unlink()
    common.cached_world(tmp_path, {"n": 2}, lambda: generate("d"))          # a needed file is missing
    assert made == ["a", "c", "d"]


def test_machine_info_names_the_cpu_and_only_vector_flags():
    common = load_common()
    info = common.machine_info()
    assert info["cpu"] and info["cores"] >= 1 and info["torch"] == torch.__version__
    assert all(f.startswith(common.VECTOR_FLAG_PREFIXES) for f in info["flags"])
    assert info["cpu"] in common.machine_line(info)


def test_write_results_adds_the_machine(tmp_path):
    import json
    common = load_common()
    common.write_results(tmp_path / "o", {"x": float("nan")}, "# t\n", name="r")
    saved = json.loads((tmp_path / "o" / "r.json").read_text())
    assert saved["x"] is None and saved["machine"]["cpu"] and (tmp_path / "o" / "r.md").read_text() == "# t\n"


def test_no_benchmark_patches_the_method_or_task_tables():
    """The rows live in polymodal.methods.METHODS / polymodal.eval.tasks.TASKS; a benchmark only reads them."""
    for path in sorted((ROOT / "benchmarks").rglob("*.py")):
        text = path.read_text()
        for table in ("METHODS", "TASKS"):
            assert f"{table}.setdefault" not in text and f"{table}[" not in text, (path.name, table)


def test_pooler_reinit_touches_only_the_poolers(load_benchmark):
    pooler_init = load_benchmark("pooler_init")
    from polymodal.models.factory import create_model
    torch.manual_seed(0)
    model = create_model("coca-tiny")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pooler_init.reinit_poolers_(model, generator=torch.Generator().manual_seed(1))
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all("pooler" in k for k in changed)
    queries = [v for k, v in model.state_dict().items() if "pooler" in k and "quer" in k]
    assert queries and all(abs(float(q.std()) - 1.0) < 0.35 for q in queries if q.numel() > 16)


@pytest.mark.parametrize("use_cache", [True, False])
def test_caption_cache_mac_count_matches_torch_flop_counter(load_benchmark, use_cache):
    """The work ratio the captioning benchmark prints rests on decode_macs: it must count what runs."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    from polymodal.models.factory import create_model
    caption_cache = load_benchmark("caption_cache")
    torch.manual_seed(0)
    model = create_model("coca-tiny").eval()
    model.config.text.eot_token_id = -1                 # exactly `tokens` new tokens
    size = model.config.vision.image_size
    px = torch.randn(2, 3, size, size)
    tokens = 5
    # Grad mode on, no generate(): the counter's module hooks need autograd (inference/no_grad break them).
    # torch's table lacks the CPU flash-attention kernel; it gets the generic attention formula.
    cpu_flash = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
                 lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v)}
    with FlopCounterMode(display=False, custom_mapping=cpu_flash) as vision:
        model.image_context(model.visual(px).tokens)
    with FlopCounterMode(display=False, custom_mapping=cpu_flash) as total:
        model._generate(px, "greedy", tokens + 1, 1, 1.0, 1.0, 1.0, None, use_cache)
    counted = (total.get_total_flops() - vision.get_total_flops()) // 2 // len(px)   # MACs per caption
    assert counted == caption_cache.decode_macs(model, tokens, cached=use_cache)


def test_train_step_profile_reports_matmul_shapes_and_share(load_benchmark):
    train_step = load_benchmark("train_step")
    a, b, w = torch.randn(64, 96), torch.randn(96, 128), torch.randn(40, 96)

    def step():
        torch.mm(a, b)
        torch.nn.functional.linear(a, w, torch.zeros(40))                # addmm 64x96 @ 96x40
        torch.randn(256, 256).exp()                                      # some non-matmul work

    prof = train_step.matmul_profile(step, top=5)
    assert 0 < prof["matmul_share"] < 1
    shapes = {(r["op"], tuple(r["a"]), tuple(r["b"])) for r in prof["shapes"]}
    assert ("aten::mm", (64, 96), (96, 128)) in shapes
    assert ("aten::addmm", (64, 96), (96, 40)) in shapes
    assert all(r["calls"] == 1 and r["gflops"] > 0 for r in prof["shapes"])


def test_gpu_check_script_runs_end_to_end_in_its_cpu_smoke_mode(tmp_path):
    """The GPU check has never had a GPU here; its smoke mode runs every step's real command line at toy
    sizes on the CPU, so a renamed option or JSON key breaks this test instead of the one GPU run."""
    env = {**os.environ, "GPU_CHECK_SMOKE": "1", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    for row in ("| CUDA tests | ok |", "| train step fp32 | ok |", "| retrieval 100k x 500k | ok |",
                "| captioning (KV cache) | ok |", "| precision fp32 vs bf16 | ok |",
                "| train step fp32, full text (batch 2) | ours", "| retrieval 300 x 1500 (ours on cpu) |",
                "| captions/s ours greedy (batch 2, 3 tokens) |", "| captions/s GPT-2 generate | cached",
                "| CLIP small step fp32 / bf16 |", "| fsdp (1 rank) | ok |", "| fsdp step, 1 rank (",
                "| fsdp+offload step, 1 rank ("):
        assert row in done.stdout, row


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_check_script_refuses_without_cuda(tmp_path):
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path)],
                          env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "no CUDA device" in done.stderr
