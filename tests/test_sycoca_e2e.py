"""SyCoCa ablation end to end: benchmarks/sycoca_ablation.py at a tiny size (CoCa, random, attentive)."""
import json
import math


def test_sycoca_ablation_tiny(tmp_path, load_benchmark):
    bench = load_benchmark("sycoca_ablation")
    args = bench.parse_args([
        "--out", str(tmp_path / "out"), "--runs", str(tmp_path / "runs"), "--n-train", "1000", "--n-test", "100",
        "--n-val", "20", "--steps", "250", "--batch-size", "40", "--model", "coca-tiny", "--vocab-size", "400",
        "--analysis-images", "100", "--caption-images", "30", "--quiet", "--threads", "1",
        "--set", "sycoca.decoder_width=32", "--set", "sycoca.decoder_heads=2"])
    result = bench.run(args)
    v = result["variants"]
    assert list(v) == ["coca", "random", "attentive"]
    for name, row in v.items():
        # 100 test images: chance T2I R@1 is 1%. Templated captions are learned quickly (CIDEr-D x 100).
        assert row["t2i_R1"] > 3, name
        assert row["CIDEr-D"] > 60, name
        assert 0 < row["hit_random"] < 1 and abs(row["hit_random"] - row["object_share"]) < 0.05
    assert "mim_true" not in v["coca"]                     # CoCa has no TG-MIM head
    for name in ("random", "attentive"):
        assert math.isfinite(v[name]["mim_true"]) and math.isfinite(v[name]["mim_shuffled"])
        assert v[name]["mim_true"] != v[name]["mim_shuffled"]          # the decoder does read the caption
    # Half of the attentive mask follows text relevance: it lands on the named object more often than chance.
    assert v["attentive"]["hit_training_rule"] > v["attentive"]["hit_random"]
    assert abs(v["random"]["hit_training_rule"] - v["random"]["object_share"]) < 0.05
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [c["shown"] for c in saved["claims"]] == [c["shown"] for c in result["claims"]]
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| SyCoCa, attentive masking |" in table and "n/a" in table
