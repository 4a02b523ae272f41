"""Preference data: the JSONL reader (TRL layout, key mapping, chat messages, folders, bad records), the
preference world generator and the dimension sampler."""
import argparse
import json
import os

import numpy as np
import pytest

from polymodal.data.manifests import ManifestError
from polymodal.data.preference import ULTRAFEEDBACK_KEYS, read_preferences, render_text
from polymodal.data.samplers import DimensionSampler, hybrid_weights

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _write(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def test_trl_layout_with_margin_dimension_and_subset(tmp_path):
    f = _write(tmp_path / "p.jsonl", [
        {"prompt": "q1", "chosen": "good", "rejected": "bad", "margin": 2, "dimension": "tone", "subset": "chat"},
        {"chosen": "a", "rejected": "b"},
    ])
    s = read_preferences(f)
    assert len(s) == 2
    p = s[0]
    assert (p.prompt, p.chosen, p.rejected, p.margin, p.dimension, p.subset) == ("q1", "good", "bad", 2.0, "tone",
                                                                               "chat")
    assert p.where.endswith("p.jsonl:1")
    assert (s[1].prompt, s[1].margin, s[1].dimension) == ("", None, "all")
    assert s.dimensions() == ["all", "tone"]


def test_ultrafeedback_style_record_through_the_key_mapping(tmp_path):
    record = {"prompt": "How do I boil an egg?", "prompt_id": "abc",
              "chosen": [{"role": "user", "content": "How do I boil an egg?"},
                         {"role": "assistant", "content": "Simmer it for 9 minutes."}],
              "rejected": [{"role": "user", "content": "How do I boil an egg?"},
                           {"role": "assistant", "content": "Eggs are round."}],
              "messages": [], "score_chosen": 8.0, "score_rejected": 5.5}
    s = read_preferences(_write(tmp_path / "uf.jsonl", [record]), keys=ULTRAFEEDBACK_KEYS, dimension="helpfulness")
    p = s[0]
    # the shared first message is the prompt; the responses keep only what differs
    assert p.prompt == [{"role": "user", "content": "How do I boil an egg?"}]
    assert p.chosen == [{"role": "assistant", "content": "Simmer it for 9 minutes."}]
    assert p.rejected == [{"role": "assistant", "content": "Eggs are round."}]
    assert p.margin == pytest.approx(2.5) and p.dimension == "helpfulness"
    assert render_text(p.prompt, p.chosen) == "user: How do I boil an egg?\nassistant: Simmer it for 9 minutes."


def test_dotted_paths_reach_nested_fields(tmp_path):
    record = {"instruction": "q", "completions": [{"response": "best"}, {"response": "worst"}], "aspect": "depth"}
    s = read_preferences(_write(tmp_path / "n.jsonl", [record]),
                         keys={"prompt": "instruction", "chosen": "completions.0.response",
                               "rejected": "completions.-1.response", "dimension": "aspect"})
    assert (s[0].prompt, s[0].chosen, s[0].rejected, s[0].dimension) == ("q", "best", "worst", "depth")
    with pytest.raises(ValueError, match="unknown field 'answer'"):
        read_preferences(tmp_path / "n.jsonl", keys={"answer": "x"})


def test_a_folder_per_dimension_takes_the_dimension_from_the_folder_name(tmp_path):
    _write(tmp_path / "d" / "tone" / "train.jsonl", [{"prompt": "p", "chosen": "thanks", "rejected": "go away"}])
    _write(tmp_path / "d" / "depth" / "train.jsonl", [{"prompt": "p", "chosen": "because x", "rejected": "x"},
                                                      {"prompt": "p", "chosen": "a", "rejected": "b",
                                                       "dimension": "own"}])
    _write(tmp_path / "d" / "depth" / "test.jsonl", [{"prompt": "p", "chosen": "t1", "rejected": "t2"}])
    s = read_preferences(tmp_path / "d")
    assert [p.dimension for p in s] == ["depth", "own", "tone"]     # a record's own field wins over the folder
    assert [p.chosen for p in read_preferences(tmp_path / "d", split="test")] == ["t1"]
    with pytest.raises(FileNotFoundError, match="<dimension>/valid.jsonl"):
        read_preferences(tmp_path / "d", split="valid")


BAD = [
    ({"prompt": "p", "chosen": "a"}, "missing_side"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "identical_pair"),
    ({"prompt": "p", "chosen": "  ", "rejected": "b"}, "empty_text"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}, "bad_field"),
    ({"prompt": "p", "chosen": 3, "rejected": "b"}, "bad_field"),
    ("{not json", "malformed_line"),
]


@pytest.mark.parametrize("record,reason", BAD)
def test_bad_records_raise_with_file_line_and_reason(tmp_path, record, reason):
    f = _write(tmp_path / "bad.jsonl", [{"chosen": "ok", "rejected": "no"}, record])
    with pytest.raises(ManifestError, match=rf"bad.jsonl line 2: .*\[{reason}\]; use data.on_bad_record=skip"):
        read_preferences(f)


def test_skip_policy_counts_bad_records_by_reason(tmp_path):
    f = _write(tmp_path / "bad.jsonl", [{"chosen": "ok", "rejected": "no"}] + [r for r, _ in BAD])
    s = read_preferences(f, on_bad_record="skip")
    assert len(s) == 1
    assert dict(s.skipped) == {"missing_side": 1, "identical_pair": 1, "empty_text": 1, "bad_field": 2,
                               "malformed_line": 1}
    assert "bad.jsonl:3" in s.report()
    f.write_bytes(b'{"chosen": "a", "rejected": "\xff"}\n')
    with pytest.raises(ManifestError, match="no usable preference pair"):
        read_preferences(f, on_bad_record="skip")


# ---- the preference world --------------------------------------------------------------------------------
def test_generator_cli_writes_the_layout_and_the_variants_differ_as_designed(tmp_path):
    from polymodal.data.synthetic import preferences as world
    parser = world.add_cli_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--out", str(tmp_path / "w"), "--n-train", "60", "--n-base", "5", "--n-val", "4",
                              "--n-test", "6", "--seed", "3"])
    summary = world.main_from_args(args)
    assert summary["counts"]["conflicting/train.jsonl"]["accuracy"] == 30       # imbalance x0.5
    assert len(read_preferences(tmp_path / "w" / "test.jsonl")) == 6 * 6
    folder = read_preferences(tmp_path / "w" / "conflicting")
    assert sorted(folder.dimensions()) == sorted(world.DIMENSIONS) and len(folder) == 30 + 45 + 4 * 60

    def has_depth(text):
        return any(d in text for d in world.DEPTH)

    # independent check on the texts: conciseness pairs flip their rival (depth) only in the conflicting set
    for variant, low, high in (("conflicting", 0.6, 1.0), ("low_conflict", 0.0, 0.0)):
        pairs = read_preferences(tmp_path / "w" / variant / "conciseness" / "train.jsonl")
        flipped = np.mean([has_depth(p.rejected) and not has_depth(p.chosen) for p in pairs])
        differ = np.mean([has_depth(p.rejected) != has_depth(p.chosen) for p in pairs])
        assert low <= flipped <= high and flipped == differ, (variant, flipped, differ)
    # held-out pairs are clean: besides the pair's dimension, the depth bit is shared
    for p in read_preferences(tmp_path / "w" / "test.jsonl"):
        if p.dimension != "depth":
            assert has_depth(p.chosen) == has_depth(p.rejected)
    again = world.generate_preferences(tmp_path / "w2", n_train=60, n_base=5, n_val=4, n_test=6, seed=3)
    assert again["counts"] == summary["counts"]
    assert (tmp_path / "w2" / "test.jsonl").read_bytes() == (tmp_path / "w" / "test.jsonl").read_bytes()


# ---- the dimension sampler ---------------------------------------------------------------------------------
def test_hybrid_weights_by_hand():
    acc = [0.9, 0.6, 0.75]
    e = np.exp(-4.0 * np.array(acc))
    expected = 0.7 / 3 + 0.3 * e / e.sum()
    assert np.allclose(hybrid_weights(acc, alpha=0.3, beta=4.0), expected)
    assert np.allclose(hybrid_weights(acc, alpha=0.0, beta=4.0), 1 / 3)


@pytest.mark.parametrize("mode", ["mix", "uniform", "hybrid"])
def test_long_run_frequencies_match_the_weights(mode):
    s = DimensionSampler(["a", "b", "c", "d"], [10, 30, 20, 40], mode=mode, alpha=0.8, beta=5.0, seed=1)
    s.update({"a": 0.9, "b": 0.5, "c": 0.7, "d": 0.95})
    w = s.weights()
    expected = {"mix": np.array([0.1, 0.3, 0.2, 0.4]), "uniform": np.full(4, 0.25),
                "hybrid": hybrid_weights([0.9, 0.5, 0.7, 0.95], 0.8, 5.0)}[mode]
    assert np.allclose(w, expected)
    n = 20000
    draws = [s.next() for _ in range(n)]
    freq = np.bincount([k for k, _ in draws], minlength=4) / n
    assert np.abs(freq - w).max() < 0.015, (freq, w)
    # within a dimension, pairs are uniform over its size
    inner = [j for k, j in draws if k == 3]
    assert max(inner) == 39 and min(inner) == 0
    keyed = np.bincount([s.draw(0, i)[0] for i in range(n)], minlength=4) / n
    assert np.abs(keyed - w).max() < 0.015


def test_sampler_resumes_exactly_from_its_state():
    a = DimensionSampler(["x", "y", "z"], [5, 6, 7], mode="hybrid", alpha=0.5, beta=8.0, seed=9)
    first = [a.next() for _ in range(50)]
    a.update([0.2, 0.9, 0.5])
    state = json.loads(json.dumps(a.state_dict()))             # survives JSON / a checkpoint
    rest = [a.next() for _ in range(100)]
    keyed = [a.draw(3, i) for i in range(40)]
    b = DimensionSampler(["x", "y", "z"], [5, 6, 7], mode="hybrid", alpha=0.5, beta=8.0, seed=9)
    b.load_state_dict(state)
    assert [b.next() for _ in range(100)] == rest
    assert [b.draw(3, i) for i in range(40)] == keyed
    fresh = DimensionSampler(["x", "y", "z"], [5, 6, 7], mode="hybrid", seed=9)
    assert [fresh.next() for _ in range(50)] == first            # the stream is a pure function of the seed
    with pytest.raises(ValueError, match="training data changed"):
        DimensionSampler(["x", "y"], [5, 6], seed=9).load_state_dict(state)


# ---- conversational records, near-identical pairs and record length (issue #30) ---------------------------
def _msgs(*turns):
    return [{"role": r, "content": c} for r, c in turns]


CONVERSATIONAL_BAD = [
    ({"chosen": _msgs(("user", "q"), ("banana", "a1")), "rejected": _msgs(("user", "q"), ("assistant", "a2"))},
     "bad_role", "chosen[1] has role 'banana'"),
    ({"chosen": _msgs(("", "q"), ("assistant", "a1")), "rejected": _msgs(("", "q"), ("assistant", "a2"))},
     "bad_role", "chosen[0] has role ''"),
    ({"chosen": [{"content": "q"}, {"role": "assistant", "content": "a"}], "rejected": _msgs(("assistant", "b"))},
     "bad_role", "chosen[0] has no role"),
    ({"chosen": _msgs(("user", "q"), ("user", "never mind")), "rejected": _msgs(("user", "q"), ("assistant", "a"))},
     "bad_role", "the response holds a 'user' turn"),
    ({"prompt": "q", "chosen": _msgs(("user", "tell me")), "rejected": _msgs(("assistant", "a"))},
     "bad_role", "the response holds a 'user' turn"),
    ({"chosen": _msgs(("user", "q"), ("assistant", "a"), ("tool", "42")),
      "rejected": _msgs(("user", "q"), ("assistant", "b"), ("tool", "42"))}, "bad_role", "ends with a 'tool' turn"),
    ({"prompt": "q", "chosen": _msgs(("assistant", "a")), "rejected": "b"}, "mixed_forms",
     "chosen is a message list but rejected is a string"),
    ({"prompt": "q", "chosen": "a", "rejected": _msgs(("assistant", "b"))}, "mixed_forms",
     "chosen is a string but rejected is a message list"),
    ({"prompt": "q", "chosen": "a  good\tanswer", "rejected": " a good answer\n"}, "identical_pair", "white space"),
    ({"chosen": _msgs(("user", "q"), ("assistant", "same  words")),
      "rejected": _msgs(("user", "q"), ("assistant", "same words "))}, "identical_pair", "white space"),
    ({"prompt": "q", "chosen": [], "rejected": _msgs(("assistant", "b"))}, "empty_text", "empty message list"),
]


@pytest.mark.parametrize("record,reason,words", CONVERSATIONAL_BAD)
def test_conversational_records_are_checked_for_roles_forms_and_near_identity(tmp_path, record, reason, words):
    f = _write(tmp_path / "chat.jsonl", [{"chosen": "ok", "rejected": "no"}, record])
    with pytest.raises(ManifestError, match=rf"chat.jsonl line 2: .*\[{reason}\]") as err:
        read_preferences(f)
    assert words in str(err.value) and "\n" not in str(err.value)
    s = read_preferences(f, on_bad_record="skip")
    assert len(s) == 1 and dict(s.skipped) == {reason: 1}


def test_good_conversations_still_read(tmp_path):
    f = _write(tmp_path / "chat.jsonl", [
        {"chosen": _msgs(("system", "be kind"), ("user", "q"), ("assistant", "a1")),
         "rejected": _msgs(("system", "be kind"), ("user", "q"), ("assistant", "a2"))},
        {"prompt": _msgs(("user", "q")), "chosen": _msgs(("assistant", "x")), "rejected": _msgs(("assistant", "y"))},
        {"prompt": "q", "chosen": "Good answer.", "rejected": "good answer"}])      # differs beyond white space
    s = read_preferences(f)
    assert [p.chosen for p in s] == [_msgs(("assistant", "a1")), _msgs(("assistant", "x")), "Good answer."]
    assert s[0].prompt == _msgs(("system", "be kind"), ("user", "q"))


def test_a_record_over_the_length_limit_is_refused_before_any_tokenizer_work(tmp_path):
    import time
    huge = "x" * 1_000_000                                          # one megabyte without a space
    f = _write(tmp_path / "long.jsonl", [{"prompt": "p", "chosen": "fine", "rejected": "also fine"},
                                         {"prompt": "p", "chosen": huge, "rejected": "short"}])
    start = time.perf_counter()
    with pytest.raises(ManifestError, match=r"long.jsonl line 2: chosen \(key 'chosen'\) is 1000000 characters; "
                                            r"the limit is 65536 .*\[too_long\]"):
        read_preferences(f)
    s = read_preferences(f, on_bad_record="skip")
    assert time.perf_counter() - start < 5
    assert len(s) == 1 and dict(s.skipped) == {"too_long": 1}
    assert len(read_preferences(f, max_chars=0)) == 2                 # 0 = no limit, asked for explicitly
    with pytest.raises(ValueError, match="max_chars"):
        read_preferences(f, max_chars=-1)


def test_reward_training_with_a_megabyte_record_stops_at_once_naming_the_line(tmp_path):
    """The reward method reads its pairs before training a tokenizer: the long record stops the run, instead of
    stalling tokenizer training for minutes (issue #30)."""
    import time
    from polymodal.train.run import load_recipe
    good = [{"prompt": f"q{i}", "chosen": f"kind answer {i}", "rejected": f"rude answer {i}"} for i in range(20)]
    f = _write(tmp_path / "train.jsonl", good + [{"prompt": "q", "chosen": "y" * 1_000_000, "rejected": "n"}])
    cfg = load_recipe(None, ["method=reward", f"data.train={f}", f"out_dir={tmp_path / 'run'}",
                             "reward.text.width=32", "reward.text.layers=1", "reward.text.heads=2",
                             "tokenizer.vocab_size=300"])
    start = time.perf_counter()
    with pytest.raises(ManifestError, match=r"train.jsonl line 21: .*\[too_long\]"):
        cfg.method_impl.build_tokenizer(tmp_path / "run")
    assert time.perf_counter() - start < 10
