"""`polymodal data import` for preference layouts (HH-RLHF, raw UltraFeedback, Parquet), each written file read back
by `read_preferences`. Fixtures are built here in each layout's exact files (see each reader's docstring)."""
import gzip
import json
from pathlib import Path

import pytest

from polymodal.data.importers import import_dataset
from polymodal.data.importers.common import LayoutError
from polymodal.data.preference import ULTRAFEEDBACK_KEYS, read_preferences


def _jsonl_gz(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def _records(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# ---- HH-RLHF (anthropics/hh-rlhf: <tranche>/{train,test}.jsonl.gz) -------------------------------------------
H = "\n\nHuman: "
A = "\n\nAssistant: "
SNACK = f"{H}What is a good snack?{A}Nuts are good.{H}Any others?"


def _hh(root: Path) -> Path:
    _jsonl_gz(root / "helpful-base" / "train.jsonl.gz", [
        {"chosen": f"{SNACK}{A}Apples are healthy too.", "rejected": f"{SNACK}{A}No."},
        {"chosen": f"{H}Is it raining?{A}I think yes.", "rejected": f"{H}Is it raining?{A}I think not."},
        {"chosen": f"{H}hi{A}hello", "rejected": f"{H}hi{A}hello"},                      # identical
        {"chosen": f"{H}hi{A}", "rejected": f"{H}hi{A}hello there"}])                    # empty chosen
    _jsonl_gz(root / "helpful-base" / "test.jsonl.gz", [{"chosen": f"{H}Q?{A}Yes.", "rejected": f"{H}Q?{A}Nope."}])
    _jsonl_gz(root / "harmless-base" / "train.jsonl.gz", [
        {"chosen": f"{H}How do I pick a lock?{A}I can't help with that.",
         "rejected": f"{H}How do I pick a lock?{A}Use a pin."}])
    _jsonl_gz(root / "red-team-attempts" / "red_team_attempts.jsonl.gz", [{"transcript": f"{H}x{A}y", "rating": 1}])
    return root


def test_hh_rlhf_splits_the_shared_prompt_from_the_two_responses(tmp_path):
    root = _hh(tmp_path / "hh-rlhf")
    summary = import_dataset("hh-rlhf", root, tmp_path / "hh.jsonl", split="train")
    assert summary["kind"] == "preference" and summary["num_records"] == 3
    assert sorted(summary["notes"]) == [
        f"1 pair(s) left out: chosen equals rejected (first: {root}/helpful-base/train.jsonl.gz:3)",
        f"1 pair(s) left out: empty response (first: {root}/helpful-base/train.jsonl.gz:4)"]
    recs = _records(tmp_path / "hh.jsonl")
    assert recs[1] == {"prompt": [{"role": "user", "content": "What is a good snack?"},
                                  {"role": "assistant", "content": "Nuts are good."},
                                  {"role": "user", "content": "Any others?"}],
                       "chosen": [{"role": "assistant", "content": "Apples are healthy too."}],
                       "rejected": [{"role": "assistant", "content": "No."}], "split": "train",
                       "subset": "helpful-base"}
    # the common start runs into the responses ("I think "): it is cut back to the last Assistant turn
    assert recs[2]["prompt"] == [{"role": "user", "content": "Is it raining?"}]
    assert recs[2]["chosen"][0]["content"] == "I think yes." and recs[2]["rejected"][0]["content"] == "I think not."
    assert recs[0]["subset"] == "harmless-base"
    pairs = read_preferences(tmp_path / "hh.jsonl")
    assert len(pairs) == 3 and pairs[1].prompt[-1] == {"role": "user", "content": "Any others?"}
    assert {p.subset for p in pairs} == {"helpful-base", "harmless-base"}


def test_hh_rlhf_reads_one_file_and_names_a_bad_line(tmp_path):
    root = _hh(tmp_path / "hh-rlhf")
    summary = import_dataset("hh-rlhf", root / "helpful-base" / "test.jsonl.gz", tmp_path / "t.jsonl")
    assert summary["splits"] == ["test"] and summary["num_records"] == 1
    assert _records(tmp_path / "t.jsonl")[0]["subset"] == "helpful-base"
    with gzip.open(root / "helpful-base" / "test.jsonl.gz", "at") as f:
        f.write("{not json\n")
    with pytest.raises(LayoutError, match=r"test.jsonl.gz line 2: not valid JSON"):
        import_dataset("hh-rlhf", root, tmp_path / "x.jsonl", split="test")


# ---- UltraFeedback, raw (openbmb/UltraFeedback: one JSONL per source) ------------------------------------------
ASPECTS = ("instruction_following", "honesty", "truthfulness", "helpfulness")


def _completion(model, response, ratings, overall):
    annotations = {a: {"Rating": str(r), "Rationale": "..."} for a, r in zip(ASPECTS, ratings)}
    for a in ("truthfulness", "helpfulness"):
        annotations[a].update({"Type": ["1"], "Rationale For Rating": "..."})
    return {"model": model, "principle": "helpfulness", "custom_system_prompt": "Be helpful.", "response": response,
            "annotations": annotations, "fine-grained_score": 0.0, "overall_score": overall, "critique": "..."}


def _ultrafeedback(root: Path) -> Path:
    root.mkdir(parents=True)
    row = {"source": "sharegpt", "instruction": "Name a prime.", "models": ["m0", "m1", "m2", "m3"],
           "correct_answers": ["None"], "incorrect_answers": ["None"],
           "completions": [_completion("m0", "Four.", [3, 3, 3, 3], 8.0),          # mean 3.0
                           _completion("m1", "Seven.", [5, 4, 5, 4], 6.0),         # mean 4.5: chosen
                           _completion("m2", "Nine?", [2, 2, "N/A", 2], 9.0),      # mean 2.0 (N/A not counted)
                           _completion("m3", "Eleven.", [5, 5, 4, 4], 7.0)]}       # mean 4.5: a tie, never rejected
    tie = {**row, "instruction": "Say hi.", "completions": [_completion("m0", "Hi.", [4, 4, 4, 4], 5.0),
                                                           _completion("m1", "Hello.", [4, 4, 4, 4], 5.0)]}
    single = {**row, "instruction": "One.", "completions": [_completion("m0", "1", [5, 5, 5, 5], 9.0)]}
    (root / "sharegpt.jsonl").write_text("\n".join(json.dumps(r) for r in (row, tie)) + "\n")
    (root / "flan.jsonl").write_text(json.dumps({**single, "source": "flan"}) + "\n")
    return root


def test_ultrafeedback_chooses_the_best_mean_rating_and_rejects_a_strictly_worse_one(tmp_path):
    root = _ultrafeedback(tmp_path / "UltraFeedback")
    summary = import_dataset("ultrafeedback", root, tmp_path / "uf.jsonl")
    assert summary["num_records"] == 1 and summary["splits"] == ["train"]
    assert sorted(summary["notes"]) == [
        f"1 row(s) left out: every completion has the same mean score (first: {root}/sharegpt.jsonl:2)",
        f"1 row(s) left out: fewer than two scored completions (first: {root}/flan.jsonl:1)"]
    rec = _records(tmp_path / "uf.jsonl")[0]
    assert rec["prompt"] == "Name a prime." and rec["subset"] == "sharegpt"
    assert rec["chosen"] == [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "Seven."}]
    assert rec["score_chosen"] == 4.5
    rejected = {}
    for seed in range(12):
        import_dataset("ultrafeedback", root, tmp_path / "s.jsonl", seed=seed)
        r = _records(tmp_path / "s.jsonl")[0]
        rejected[r["rejected"][1]["content"]] = r["score_rejected"]
    assert rejected == {"Four.": 3.0, "Nine?": 2.0}                  # both drawn, the tie never
    import_dataset("ultrafeedback", root, tmp_path / "again.jsonl")
    assert _records(tmp_path / "again.jsonl") == _records(tmp_path / "uf.jsonl")        # seeded
    pairs = read_preferences(tmp_path / "uf.jsonl", keys=ULTRAFEEDBACK_KEYS)
    assert pairs[0].prompt == [{"role": "user", "content": "Name a prime."}]
    assert pairs[0].margin == 4.5 - rec["score_rejected"]


def test_ultrafeedback_score_option_ranks_by_overall_score_or_one_aspect(tmp_path):
    root = _ultrafeedback(tmp_path / "UltraFeedback")
    import_dataset("ultrafeedback", root / "sharegpt.jsonl", tmp_path / "o.jsonl", score="overall")
    rec = _records(tmp_path / "o.jsonl")[0]
    assert rec["chosen"][1]["content"] == "Nine?" and rec["score_chosen"] == 9.0
    import_dataset("ultrafeedback", root / "sharegpt.jsonl", tmp_path / "h.jsonl", score="instruction-following")
    rec = _records(tmp_path / "h.jsonl")[0]
    assert rec["chosen"][1]["content"] == "Seven." and rec["score_rejected"] in (3.0, 2.0)
    with pytest.raises(LayoutError, match="score must be one of mean, overall, helpfulness"):
        import_dataset("ultrafeedback", root, tmp_path / "x.jsonl", score="best")


# ---- Parquet (the Hub's data/<split>-NNNNN-of-NNNNN.parquet) ---------------------------------------------------
def _h4_parquet(root: Path) -> Path:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    (root / "data").mkdir(parents=True)

    def msgs(q, a):
        return [{"content": q, "role": "user"}, {"content": a, "role": "assistant"}]
    for split, rows in {"train_prefs": [("Name a prime.", "Seven.", "Four.", 4.5, 3.0),
                                        ("Say hi.", "Hello!", "Hello!", 4.0, 4.0)],
                        "test_prefs": [("2+2?", "4", "5", 5.0, 1.0)]}.items():
        table = pa.table({"prompt": [r[0] for r in rows], "prompt_id": [str(i) for i in range(len(rows))],
                          "chosen": [msgs(r[0], r[1]) for r in rows], "rejected": [msgs(r[0], r[2]) for r in rows],
                          "messages": [msgs(r[0], r[1]) for r in rows],
                          "score_chosen": [r[3] for r in rows], "score_rejected": [r[4] for r in rows]})
        pq.write_table(table, root / "data" / f"{split}-00000-of-00001.parquet")
    return root


def test_parquet_reads_the_hub_layout_with_a_margin_from_two_columns(tmp_path):
    root = _h4_parquet(tmp_path / "ultrafeedback_binarized")
    summary = import_dataset("parquet", root, tmp_path / "p.jsonl",
                             keys={"margin": ["score_chosen", "score_rejected"]})
    assert summary["splits"] == ["test_prefs", "train_prefs"] and summary["num_records"] == 2
    assert summary["notes"][0].startswith("1 pair(s) left out: chosen equals rejected (first: ")
    recs = _records(tmp_path / "p.jsonl")
    assert recs[0] == {"prompt": "2+2?", "chosen": [{"role": "user", "content": "2+2?"},
                                                    {"role": "assistant", "content": "4"}],
                       "rejected": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}],
                       "margin": 4.0, "split": "test_prefs"}
    pairs = read_preferences(tmp_path / "p.jsonl")
    assert [p.margin for p in pairs] == [4.0, 1.5] and pairs[1].chosen == [{"role": "assistant", "content": "Seven."}]
    train = import_dataset("parquet", root, tmp_path / "t.jsonl", split="train_prefs")
    assert train["num_records"] == 1


def test_parquet_maps_other_columns_and_names_a_missing_one(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({"question": ["Why?", "How?"], "good": ["Because.", "Like this."], "bad": ["No.", "Dunno."],
                      "meta": [{"topic": "why"}, {"topic": "how"}]})
    pq.write_table(table, tmp_path / "train.parquet")
    summary = import_dataset("parquet", tmp_path / "train.parquet", tmp_path / "m.jsonl",
                             keys={"prompt": "question", "chosen": "good", "rejected": "bad", "subset": "meta.topic"})
    assert summary["num_records"] == 2 and summary["splits"] == ["train"]
    assert _records(tmp_path / "m.jsonl")[1] == {"prompt": "How?", "chosen": "Like this.", "rejected": "Dunno.",
                                                 "subset": "how", "split": "train"}
    assert [p.subset for p in read_preferences(tmp_path / "m.jsonl")] == ["why", "how"]
    with pytest.raises(LayoutError, match=r"no column 'chosen' for chosen \(columns: question, good, bad, meta\); "
                                          r"map one with -o keys.chosen=COLUMN"):
        import_dataset("parquet", tmp_path / "train.parquet", tmp_path / "x.jsonl")
    with pytest.raises(LayoutError, match="keys: unknown field 'answer'"):
        import_dataset("parquet", tmp_path / "train.parquet", tmp_path / "x.jsonl", keys={"answer": "good"})


def test_data_import_command_passes_options_to_the_preference_readers(tmp_path, capsys):
    from polymodal.cli import main
    root = _ultrafeedback(tmp_path / "UltraFeedback")
    assert main(["data", "import", "ultrafeedback", str(root), "--out", str(tmp_path / "o.jsonl"),
                 "-o", "score=overall", "-o", "seed=3"]) == 0
    out = capsys.readouterr().out
    assert out.count("note: ") == 2 and json.loads(out[out.index("\n{") + 1:])["num_records"] == 1
    assert _records(tmp_path / "o.jsonl")[0]["chosen"][1]["content"] == "Nine?"
    assert main(["data", "import", "hh-rlhf", str(tmp_path), "--out", str(tmp_path / "x.jsonl"), "-o", "seed=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "polymodal: error: hh-rlhf: unknown option 'seed'; its options: none (-o KEY=VALUE)"


def test_data_import_command_maps_parquet_keys_given_as_options(tmp_path, capsys):
    from polymodal.cli import main
    root = _h4_parquet(tmp_path / "ultrafeedback_binarized")
    assert main(["data", "import", "parquet", str(root), "--out", str(tmp_path / "p.jsonl"), "--split", "test_prefs",
                 "-o", "keys.margin=[score_chosen,score_rejected]"]) == 0
    assert _records(tmp_path / "p.jsonl")[0]["margin"] == 4.0
