"""benchmarks/probe_sycoca.py: the linear probe of the CoCa / SyCoCa pretraining runs (tiny data, no training)."""
from __future__ import annotations

import pytest

from benchmarks.common import paired_difference


def test_probe_reads_shapesworld_salient_labels_and_reports_percentages(tmp_path):
    from benchmarks.common import shapes_world
    from benchmarks.probe_sycoca import probe, random_model
    data = shapes_world(tmp_path / "data", 48, 24, 24, seed=0)
    a = probe(random_model(0), data, max_iter=5)
    b = probe(random_model(0), data, max_iter=5)
    assert a == b                                              # seeded init, deterministic probe
    assert a["num_classes"] == 64 and a["chance"] == pytest.approx(100 / 64)
    assert (a["num_train"], a["num_val"], a["num_test"]) == (48, 24, 24)
    assert 0 <= a["top1"] <= a["top5"] <= 100 and a["weight_decay"] in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
    assert probe(random_model(1), data, max_iter=5) != a       # the seed is the random reference's init


def _variant(label, top1):
    return {"label": label, "mean": {"top1": sum(top1) / 3, "top5": 90.0, "mean_per_class_recall": 40.0,
                                     "val_top1": 40.0, "pretrain_s": 1.0, "chance": 100 / 64},
            "std": {"top1": 1.0, "top5": 1.0, "mean_per_class_recall": 1.0, "val_top1": 1.0, "pretrain_s": 0.0,
                    "chance": 0.0},
            "values": {"top1": top1, "top5": [90.0] * 3, "mean_per_class_recall": [40.0] * 3,
                       "weight_decay": [1e-6] * 3}}


def test_claims_follow_the_paired_differences():
    from benchmarks.probe_sycoca import PAIRS, claims, render_markdown
    variants = {"coca": _variant("CoCa", [40.0, 41.0, 42.0]), "sycoca": _variant("SyCoCa", [38.0, 42.0, 43.0]),
                "random": _variant("random", [18.0, 20.0, 15.0])}
    paired = {f"{a}-{b}": {k: paired_difference(variants[a]["values"][k], variants[b]["values"][k])
                           for k in ("top1", "top5", "mean_per_class_recall")} for a, b in PAIRS}
    got = {c["claim"].split(" gives")[0]: c["verdict"] for c in claims(variants, paired)}
    assert got == {"CoCa pretraining": "shown", "SyCoCa pretraining": "shown", "SyCoCa's TG-MIM pretraining": "mixed"}
    md = render_markdown({"settings": {"command": "x", "seeds": [0, 1, 2], "data_seed": 0, "n_train": 4, "n_val": 2,
                                       "n_test": 2, "steps": 1, "batch_size": 2, "max_iter": 5, "model": "m",
                                       "sets": [], "threads": 1},
                          "variants": variants, "paired": paired, "claims": claims(variants, paired),
                          "seconds": {"total": 1.0}})
    assert "| sycoca-coca | +0.0 ± 1.7 (-2.0..+1.0, 2/3 > 0)" in md and "- mixed: SyCoCa's TG-MIM" in md


def test_probe_benchmark_runs_end_to_end_and_reuses_its_pretraining(tmp_path):
    """Two pretraining steps per variant and seed; a second run reuses every run and gives the same numbers."""
    from benchmarks.probe_sycoca import parse_args, run
    argv = ["--out", str(tmp_path / "out"), "--runs", str(tmp_path / "runs"), "--seeds", "0", "1", "--steps", "2",
            "--n-train", "48", "--n-val", "16", "--n-test", "16", "--batch-size", "8", "--threads", "1", "--quiet",
            "--max-iter", "5"]
    first = run(parse_args(argv))
    assert set(first["variants"]) == {"coca", "sycoca", "random"}
    assert (tmp_path / "out" / "results.md").read_text().count("| sycoca-coca |") == 1
    again = run(parse_args(argv))
    for name, v in first["variants"].items():
        assert again["variants"][name]["values"]["top1"] == v["values"]["top1"], name
