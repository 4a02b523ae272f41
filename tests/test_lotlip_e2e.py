"""LoTLIP end to end: the four recipes parse, and a tiny version of the ablation + context sweep
(benchmarks/lotlip_ablation.py) writes complete tables with finite numbers."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from polymodal.methods.lotlip import LoTLIPConfig
from polymodal.train.run import load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"short": (0, 0), "long_k0": (0, 1), "long_k2": (2, 1), "long_k4": (4, 1)}  # name -> (K, M)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipes_parse_and_differ_only_in_k_and_m(name):
    cfg = load_recipe(ROOT / "recipes" / f"lotlip_{name}.yaml")
    base = load_recipe(ROOT / "recipes" / "lotlip_long_k2.yaml")
    K, M = RECIPES[name]
    assert cfg.method == "lotlip" and isinstance(cfg.lotlip, LoTLIPConfig)
    assert (cfg.lotlip.num_corners, cfg.data.num_subcaptions) == (K, M)
    assert cfg.model.name == "small" and cfg.model.overrides["text.causal"] is False
    assert cfg.model.overrides["text.context_length"] >= 128
    for section in ("optim", "train", "loss", "tokenizer"):
        assert getattr(cfg, section) == getattr(base, section), section


def test_tiny_ablation_writes_complete_tables(tmp_path, load_benchmark):
    torch.set_num_threads(1)
    mod = load_benchmark("lotlip_ablation")
    contexts = [24, 32]
    args = mod.parse_args(["--out", str(tmp_path / "out"), "--runs", str(tmp_path / "runs"), "--n-train", "200",
                           "--n-test", "40", "--n-val", "8", "--n-hard", "40", "--steps", "3", "--batch-size", "16",
                           "--model", "tiny", "--context-length", "32", "--contexts", *map(str, contexts),
                           "--time-batch", "8", "--time-repeats", "1", "--threads", "1", "--quiet"])
    mod.run(args)
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(result["variants"]) == [name for name, _, _ in mod.VARIANTS]
    for name, row in result["variants"].items():
        for col in list(mod.METRICS) + ["train_s"]:
            assert math.isfinite(row[col]), (name, col)
        assert row["num_corners"] == RECIPES[name][0]
    assert [r["context_length"] for r in result["sweep"]] == contexts
    for row in result["sweep"]:
        assert set(mod.SWEEP_COLUMNS) <= set(row)
        assert all(math.isfinite(row[c]) for c in mod.SWEEP_COLUMNS)
        assert row["text_ms_with_corners"] > 0 and row["text_ms_without_corners"] > 0
    assert len(result["claims"]) == 5 and all(isinstance(c["shown"], bool) for c in result["claims"])
    md = (tmp_path / "out" / "results.md").read_text()
    for _, _, label in mod.VARIANTS:
        assert f"| {label} |" in md
    for ctx in contexts:
        assert f"\n| {ctx} |" in md
    # a second call reuses the finished runs instead of training again
    again = mod.run(args)
    assert all(v["reused"] for v in again["variants"].values())
