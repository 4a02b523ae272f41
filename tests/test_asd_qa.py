"""ASD with visual-QA records mixed in (`asd.qa_train`): QA trains the MLLM, QA samples have Skew 0 and are never
resampled away, bad QA manifests fail before the first step, and the benchmark's quick mode emits the QA claim."""
import json
import math

import numpy as np
import pytest
import torch

from polymodal import methods
from polymodal.config import ConfigError
from polymodal.eval import tasks
from polymodal.eval.fairness import fairness_task
from polymodal.eval.vqa import vqa_task
from polymodal.methods.asd import ASDConfig, ASDMethod, ASDTask, qa_records
from polymodal.train.run import load_recipe, run_recipe

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    """A tiny counterfactual world (32 px) and a tiny ShapesWorld QA world (64 px: a different size)."""
    from polymodal.data.synthetic.counterfactual import CounterfactualConfig, generate_counterfactual
    from polymodal.data.synthetic.shapes import ShapesConfig
    from polymodal.data.synthetic.shapes_qa import ShapesQAConfig, generate_shapes_qa
    cf, qa = tmp_path_factory.mktemp("cf"), tmp_path_factory.mktemp("qa")
    generate_counterfactual(cf, n_train_sets=12, n_eval_sets=6, seed=0,
                            cfg=CounterfactualConfig(bias=0.8, biased_attributes=["race"]))
    generate_shapes_qa(qa, n_train=20, n_test=8, n_val=0, seed=0, cfg=ShapesQAConfig(types=("color", "exists")),
                       shapes_cfg=ShapesConfig(image_size=64), progress=False, workers=1)
    return cf, qa


@pytest.fixture(scope="module")
def registered():
    mp = pytest.MonkeyPatch()
    mp.setitem(methods.METHODS, "asd", ASDMethod)                      # table entries made in the test
    mp.setitem(tasks.TASKS, "fairness", fairness_task)
    mp.setitem(tasks.TASKS, "vqa", vqa_task)
    yield
    mp.undo()


def recipe(worlds, out, *extra):
    cf, qa = worlds
    return load_recipe(None, ["method=asd", f"out_dir={out}", "model.name=mllm-tiny", f"data.train={cf}/train.jsonl",
                              "model.overrides={lm.width: 32, lm.heads: 2, max_prompt_tokens: 48}", "data.batch_size=32",
                              "train.log_every=10", "train.progress=false", "train.threads=1", "optim.warmup_steps=5",
                              "optim.lr=6e-3", "tokenizer.vocab_size=300", "train.ckpt_every=0",
                              "asd={loss: false, resample: false}",
                              f"eval.tasks=[{{task: vqa, data: {qa}/test.jsonl, majority_from: {qa}/train.jsonl}}]",
                              *extra])


@pytest.fixture(scope="module")
def trained(worlds, registered, tmp_path_factory):
    """Two tiny base models trained alike, one with the QA questions mixed in and one without."""
    root = tmp_path_factory.mktemp("runs")
    qa = worlds[1]
    with_qa = run_recipe(recipe(worlds, root / "qa", "train.steps=60", f"asd.qa_train={qa}/train.jsonl"))
    # Same tokenizer texts (QA included) so the two differ only in what they train on.
    without = run_recipe(recipe(worlds, root / "noqa", "train.steps=60", f"tokenizer.path={root}/qa/tokenizer"))
    return {"root": root, "with": with_qa, "without": without}


def qa_nll(model_dir, manifest) -> float:
    """Mean answer NLL of the consensus answers of a QA manifest under a saved MLLM."""
    from polymodal.hub import load_model
    from polymodal.methods.asd import QACollate
    model = load_model(model_dir).eval()
    recs = qa_records(manifest)
    from PIL import Image
    samples = []
    for i, r in enumerate(recs):
        with Image.open(r["image"]) as im:
            samples.append({"pixels": model.image_transform(im.convert("RGB")), "prompt": r["prompt"],
                            "answer": r["answer"], "index": i})
    b = QACollate(model)(samples)
    with torch.no_grad():
        out = model(b["pixels"], b["prompt_ids"], b["prompt_mask"], b["answer_ids"], b["answer_mask"])
    return float(out.nll.mean())


def test_qa_records_train_the_mllm(trained, worlds):
    qa = worlds[1]
    root = trained["root"]
    with_qa, without = qa_nll(root / "qa" / "model", qa / "train.jsonl"), qa_nll(root / "noqa" / "model",
                                                                                  qa / "train.jsonl")
    # Trained on the QA questions, the model answers them far more likely than one trained without them.
    assert with_qa < 0.5 * without, (with_qa, without)
    assert "eval/vqa/vqa_accuracy" in trained["with"] and "eval/vqa/majority_vqa_accuracy" in trained["with"]
    logged = [json.loads(x) for x in (root / "qa" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    losses = [r["loss"] for r in logged if "loss" in r]
    assert losses[-1] < 0.6 * losses[0], losses


def test_the_training_vqa_number_is_what_polymodal_eval_gives(trained, worlds):
    qa = worlds[1]
    model_dir = trained["root"] / "qa" / "model"
    from polymodal.hub import load_model
    again = vqa_task(load_model(model_dir).eval(), qa / "test.jsonl", majority_from=str(qa / "train.jsonl"))
    assert again["vqa_accuracy"] == pytest.approx(trained["with"]["eval/vqa/vqa_accuracy"])
    commands = json.loads((trained["root"] / "qa" / "eval_commands.json").read_text())
    assert "--task" in json.dumps(commands["vqa"]) and "majority_from" in json.dumps(commands["vqa"])


def test_both_image_sizes_reach_the_tower_at_its_size(trained, worlds):
    from polymodal.hub import load_model
    from polymodal.methods.asd import CounterfactualQADataset, training_records
    cf, qa = worlds
    model = load_model(trained["root"] / "qa" / "model")
    records = training_records(cf / "train.jsonl") + qa_records(qa / "train.jsonl")
    task = ASDTask(model, ASDConfig(loss=False, resample=False), records)
    data = CounterfactualQADataset(task, model.image_transform)
    data.set_epoch(0)
    sizes = {}
    for i in range(len(data)):
        item = data[i]
        sizes.setdefault(records[item["index"]]["kind"], set()).add(tuple(item["pixels"].shape))
    side = model.config.vision.image_size
    assert sizes["qa"] == {(3, side, side)} and sizes["concept"] == {(3, side, side)}, sizes


def _task_with_skewed_concepts(monkeypatch, qa_manifest, resample=True):
    """An ASDTask over biased concept records (every red figure a leader) plus QA records, with the model's option
    probabilities replaced by a strongly biased table."""
    import polymodal.methods.asd as asd_mod

    def rec(race, answer):
        return {"kind": "concept", "attributes": {"race": race}, "options": ["leader", "helper"], "answer": answer}
    concept = [rec("red", "leader")] * 20 + [rec("blue", "leader")] * 4 + [rec("blue", "helper")] * 20
    probs = torch.tensor([[0.95, 0.05]] * 20 + [[0.05, 0.95]] * 24)                  # (44 concept records, 2)
    monkeypatch.setattr(asd_mod, "option_probabilities", lambda model, recs, bs: probs)
    qa = qa_records(qa_manifest)
    model = torch.nn.Module()
    model.visual = torch.nn.Linear(1, 1)
    return ASDTask(model, ASDConfig(resample=resample), concept + qa, seed=0), len(concept), len(qa)


def test_qa_samples_have_skew_zero_and_are_never_resampled_away(monkeypatch, worlds):
    task, n_concept, n_qa = _task_with_skewed_concepts(monkeypatch, worlds[1] / "train.jsonl")
    qa_at = np.arange(n_concept, n_concept + n_qa)
    for epoch in range(6):
        task.refresh(epoch)
        assert torch.all(task.skews[qa_at] == 0)
        assert task.skews[:n_concept].abs().max() > 0.5                           # the concepts are skewed
        order = task.epoch_order()
        assert len(order) == n_concept + n_qa
        counts = np.bincount(order, minlength=n_concept + n_qa)
        assert np.all(counts[qa_at] == 1), counts[qa_at]                           # each QA sample once per epoch
        assert counts[:n_concept].sum() == n_concept                               # the resampler drew concepts only
    assert (counts[:n_concept] == 0).any() and (counts[:n_concept] > 1).any()     # ... and it did act on them
    from polymodal.losses.fairness import fairness_weights
    assert torch.all(fairness_weights(task.skews[qa_at], 20.0) == 1)
    # A checkpointed resampler restores the QA samples' zero skews.
    state = task.get_extra_state()
    again, _, _ = _task_with_skewed_concepts(monkeypatch, worlds[1] / "train.jsonl")
    again.set_extra_state(state)
    torch.testing.assert_close(again.skews, task.skews)


@pytest.mark.parametrize("line, says", [
    ("not json", "line 1: not JSON"),
    ('{"image": "images/train_000000.png", "answers": ["red"]}', "line 1: key 'question'"),
    ('{"image": "images/train_000000.png", "question": "what color?"}', "answers"),
    ('{"image": "images/nope.png", "question": "what color?", "answers": ["red"]}', "line 1: key 'image'"),
    ('{"image": "images/train_000000.png", "question": "q", "prompt": "q", "kind": "task", "options": [], '
     '"answer": "x"}', "counterfactual record"),
])
def test_a_bad_qa_manifest_fails_before_training_naming_file_line_and_key(registered, worlds, tmp_path, line, says):
    bad = worlds[1] / f"bad_{abs(hash(line))}.jsonl"                # beside the QA world's images/
    bad.write_text(line + "\n")
    cfg = recipe(worlds, tmp_path / "run", "train.steps=5", f"asd.qa_train={bad}")
    with pytest.raises(ConfigError) as e:
        run_recipe(cfg)
    msg = str(e.value)
    assert "asd.qa_train" in msg and str(bad) in msg and says in msg, msg
    assert "\n" not in msg
    assert not (tmp_path / "run" / "metrics.jsonl").exists()                      # no step was taken


def test_a_missing_qa_manifest_and_a_qa_manifest_as_data_train_fail_before_training(registered, worlds, tmp_path):
    with pytest.raises(ConfigError, match=r"asd.qa_train: .*missing.jsonl does not exist; .*shapes-qa"):
        run_recipe(recipe(worlds, tmp_path / "a", "train.steps=5", f"asd.qa_train={tmp_path}/missing.jsonl"))
    with pytest.raises(ConfigError, match=r"data.train: .*line 1 is a QA record.*asd.qa_train="):
        run_recipe(recipe(worlds, tmp_path / "b", "train.steps=5", f"data.train={worlds[1]}/train.jsonl"))
    assert not (tmp_path / "a" / "metrics.jsonl").exists() and not (tmp_path / "b" / "metrics.jsonl").exists()


def test_the_benchmark_quick_mode_emits_the_qa_claim(tmp_path):
    from benchmarks.cmsc_asd import KEPT_RULE, main
    result = main(["--quick", "--out", str(tmp_path / "out"), "--runs", str(tmp_path / "runs"), "--seeds", "0", "1",
                   "--no-qa-replay"])
    names = [c["claim"] for c in result["qa_claims"]]
    assert "ASD keeps the MLLM's QA accuracy" in names and any(n.startswith("fine-tune keeps") for n in names)
    first = result["qa_claims"][0]
    assert first["verdict"] in ("kept", "not kept")
    base = [r["qa_accuracy"] for r in result["rows"]["base"]]
    asd = [r["qa_accuracy"] for r in result["rows"]["ASD"]]
    d = result["paired_differences"]["ASD - base: qa_accuracy"]
    assert d["values"] == pytest.approx([a - b for a, b in zip(asd, base)])
    spread = float(np.std(base, ddof=1))
    assert first["verdict"] == ("kept" if abs(d["mean"]) <= spread else "not kept")
    text = (tmp_path / "out" / "results.md").read_text()
    assert "ASD keeps the MLLM's QA accuracy" in text and KEPT_RULE in text and "qa_accuracy" in text
    assert all(math.isfinite(r["qa_majority"]) for r in result["rows"]["base"])


def test_a_question_longer_than_the_prompt_limit_fails_before_training(registered, worlds, tmp_path):
    """The MLLM cuts a prompt to its last max_prompt_tokens tokens: a longer question is refused at start-up instead
    of being trained on cut."""
    cf, qa = worlds
    long = qa / "long.jsonl"
    rec = json.loads((qa / "train.jsonl").read_text().splitlines()[0])
    long.write_text(json.dumps({**rec, "question": "what color is the " + "very " * 60 + "small object?"}) + "\n")
    with pytest.raises(ConfigError, match=r"asd.qa_train: the prompt 'what color is the very .* takes \d+ tokens, over "
                                          r"the MLLM's max_prompt_tokens 48 .* model.overrides.max_prompt_tokens="):
        run_recipe(recipe(worlds, tmp_path / "run", "train.steps=5", f"asd.qa_train={long}"))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
