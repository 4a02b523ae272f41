"""The `mcq` eval task: MMBench's CircularEval over the importer's circular copies or passes made here (issue #34)."""
import base64
import io
import json

import pytest
import torch
from PIL import Image

from polymodal.cli import main
from polymodal.data.importers import import_dataset
from polymodal.data.importers.common import LayoutError
from polymodal.eval.mcq import build_passes, mcq_task, read_choice, shifted

HEADER = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source", "l2-category",
          "comment", "split"]


def _b64(level: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (level, 0, 0)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _tsv(path, rows):
    path.write_text("\n".join("\t".join(r) for r in [HEADER, *rows]) + "\n")
    return path


def _row(index, options, answer, image, category="colour", split="dev"):
    opts = list(options) + ["nan"] * (4 - len(options))
    return [str(index), "What colour is it?", "nan", *opts, answer, category, image, "x", "perception", "nan", split]


class _Talker:
    """A generator for the mcq task: `reply(prompt) -> text`."""

    def __init__(self, reply):
        self.reply = reply
        self.image_transform = lambda im: torch.zeros(3, 8, 8)
        self.prompts = []

    def parameters(self):
        return iter([torch.zeros(1)])

    def generate_text(self, pixels, prompts, method="greedy"):
        self.prompts += prompts
        return [self.reply(p) for p in prompts]


def _listed(prompt):
    """The options of a listed prompt, in order."""
    return [line[3:] for line in prompt.split("\n")[1:]]


def test_shifted_passes_move_the_correct_option():
    assert shifted(["a", "b", "c"], 0, 1) == (["b", "c", "a"], 2)
    assert shifted(["a", "b", "c"], 2, 2) == (["c", "a", "b"], 0)
    (q,) = build_passes([{"image": "x.png", "question": "q", "options": ["a", "b", "c"], "answer": "b"}], "m.jsonl")
    assert [p.options for p in q] == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    assert [p.options[p.correct] for p in q] == ["b", "b", "b"]
    (q,) = build_passes([{"image": "x.png", "question": "q", "options": ["a", "b", "c"], "answer": "b"}], "m.jsonl",
                        circular=False)
    assert len(q) == 1


@pytest.mark.parametrize("record,message", [
    ({"options": ["a"], "answer": "a"}, r"m.jsonl line 1: a multiple-choice record needs `options`"),
    ({"options": ["a", "b"], "answer": "c"}, r"m.jsonl line 1: answer 'c' is not one of its options"),
    ({"options": ["a", "b"]}, r"m.jsonl line 1: no `answer` \(a test split"),
    ({"options": ["a", "b"], "answer_letter": "C"}, r"answer_letter 'C' is not one of its 2 options"),
])
def test_bad_records_are_named(record, message):
    with pytest.raises(ValueError, match=message):
        build_passes([{"image": "x.png", "question": "q", **record}], "m.jsonl")


def test_two_records_of_one_pass_are_duplicates():
    rec = {"image": "x.png", "question": "q", "options": ["a", "b"], "answer": "a", "index": 4}
    with pytest.raises(ValueError, match=r"m.jsonl line 2: a second record for pass 0 of question 4 .* duplicate rows"):
        build_passes([rec, dict(rec)], "m.jsonl")


@pytest.mark.parametrize("text,want", [("B", 1), ("The answer is (C).", 2), ("A. red", 0), ("blue", 1),
                                       ("A cat sits on a mat", None), ("red or blue", None), ("B and C", None),
                                       ("I think C: green", 2)])
def test_an_option_is_read_from_free_text_only_when_unique(text, want):
    assert read_choice(text, ["red", "blue", "green"]) == want


def test_circular_eval_scores_a_question_only_when_every_pass_is_right(tmp_path):
    """Over questions with 2, 3 and 4 options: a model that always says "A" gets the vanilla share of questions
    whose answer is A and nothing circular; one that names the true option text gets everything."""
    for i, level in enumerate((10, 20, 30)):
        Image.new("RGB", (8, 8), (level, 0, 0)).save(tmp_path / f"{i}.png")
    recs = [{"image": "0.png", "question": "q0", "options": ["red", "blue"], "answer": "red", "question_type": "c"},
            {"image": "1.png", "question": "q1", "options": ["x", "y", "z"], "answer": "z", "question_type": "c"},
            {"image": "2.png", "question": "q2", "options": ["1", "2", "3", "4"], "answer": "1", "question_type": "n"}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    truth = {r["question"]: r["answer"] for r in recs}
    biased = _Talker(lambda p: "A")
    m = mcq_task(biased, tmp_path / "m.jsonl")
    assert m["num_questions"] == 3 and m["num_passes"] == 2 + 3 + 4 and len(biased.prompts) == 9
    assert m["vanilla_accuracy"] == pytest.approx(200 / 3) and m["circular_accuracy"] == 0.0
    assert m["chance_vanilla_accuracy"] == pytest.approx(100 * (1 / 2 + 1 / 3 + 1 / 4) / 3)
    assert m["chance_circular_accuracy"] == pytest.approx(100 * (1 / 4 + 1 / 27 + 1 / 256) / 3)
    assert m["category/c/vanilla_accuracy"] == 50.0 and m["category/n/num_questions"] == 1
    assert m["unparsed"] == 0
    letters = "ABCD"
    knows = _Talker(lambda p: letters[_listed(p).index(truth[p.split("\n")[0]])])
    m = mcq_task(knows, tmp_path / "m.jsonl")
    assert m["circular_accuracy"] == 100.0 and m["vanilla_accuracy"] == 100.0
    # a model that knows only the first position of each question: right once, wrong after the shift
    first = _Talker(lambda p: "B" if "red" in p and _listed(p)[1] == "red" else "A")
    m = mcq_task(first, tmp_path / "m.jsonl", circular=False)
    assert "circular_accuracy" not in m and m["num_passes"] == 3
    silent = _Talker(lambda p: "no idea")
    assert mcq_task(silent, tmp_path / "m.jsonl")["unparsed"] == 9


def test_mmbench_circular_copies_are_grouped_by_index_mod_a_million(tmp_path):
    """The released TSVs hold the circular copies (index + k x 10^6, options shifted, the answer letter moved):
    the importer marks them, the task groups them instead of making passes."""
    rows = [_row(7, ["red", "blue"], "A", _b64(200)), _row(1000007, ["blue", "red"], "B", "7"),
            _row(8, ["cat", "dog", "cow"], "A", _b64(50), category="animal"),
            _row(1000008, ["dog", "cow", "cat"], "C", "8", category="animal"),
            _row(2000008, ["cow", "cat", "dog"], "B", "8", category="animal")]
    tsv = _tsv(tmp_path / "MMBench_DEV_EN.tsv", rows)
    summary = import_dataset("mmbench", tsv, tmp_path / "m.jsonl", "dev")
    assert any("2 question(s) and 3 circular cop(ies)" in n for n in summary["notes"])
    got = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [(r["circular_of"], r["circular_pass"]) for r in got] == [(7, 0), (7, 1), (8, 0), (8, 1), (8, 2)]
    biased = _Talker(lambda p: "A")
    m = mcq_task(biased, tmp_path / "m.jsonl")
    assert m["num_questions"] == 2 and m["num_passes"] == 5 and len(biased.prompts) == 5   # no pass made here
    assert m["vanilla_accuracy"] == 100.0 and m["circular_accuracy"] == 0.0
    right = _Talker(lambda p: {"red": "red", "cat": "cat"}["red" if "red" in p else "cat"])
    m = mcq_task(right, tmp_path / "m.jsonl")
    assert m["circular_accuracy"] == 100.0 and m["category/animal/circular_accuracy"] == 100.0
    assert m["l2_category/perception/num_questions"] == 2
    # a pass repeated is a duplicate row; a pass past the options is not MMBench's numbering
    _tsv(tsv, rows + [_row(1000008, ["dog", "cow", "cat"], "C", "8")])
    with pytest.raises(LayoutError, match=r"line 7: index 1000008 repeats pass 1 of question 8 \(duplicate rows\)"):
        import_dataset("mmbench", tsv, tmp_path / "m.jsonl")
    _tsv(tsv, rows + [_row(2000007, ["blue", "red"], "B", "7")])
    with pytest.raises(LayoutError, match=r"line 7: index 2000007 is circular pass 2 of question 7, but the row has "
                                          r"only 2 options"):
        import_dataset("mmbench", tsv, tmp_path / "m.jsonl")


def test_a_folder_with_two_tsvs_must_name_one(tmp_path):
    _tsv(tmp_path / "MMBench_DEV_EN.tsv", [_row(1, ["red", "blue"], "A", _b64(9))])
    _tsv(tmp_path / "MMBench_DEV_CN.tsv", [_row(1, ["红", "蓝"], "A", _b64(9))])
    with pytest.raises(LayoutError, match=r"2 TSV files \(MMBench_DEV_CN.tsv, MMBench_DEV_EN.tsv\); name one with "
                                          r"-o tsv=NAME"):
        import_dataset("mmbench", tmp_path, tmp_path / "m.jsonl")
    import_dataset("mmbench", tmp_path, tmp_path / "m.jsonl", tsv="MMBench_DEV_EN.tsv")
    assert json.loads((tmp_path / "m.jsonl").read_text().splitlines()[0])["options"] == ["red", "blue"]


@pytest.fixture(scope="module")
def answerer(tmp_path_factory):
    """A tiny random VQA model over CoCa, saved: answers "red", "blue", "2"."""
    from polymodal.data.text import train_tokenizer
    from polymodal.models.factory import create_model
    from polymodal.models.vqa import VQAModel
    torch.manual_seed(0)
    tok = train_tokenizer(["what colour is it red blue how many 2 3"] * 5, vocab_size=200)
    out = tmp_path_factory.mktemp("mcq") / "vqa_model"
    VQAModel(create_model("coca-tiny", tokenizer=tok), ["red", "blue", "2"], [3, 2, 1]).save_pretrained(out)
    return out


def test_a_vqa_classifier_chooses_among_the_options_it_knows(answerer, tmp_path):
    from polymodal.hub import load_model
    model = load_model(answerer).eval()
    Image.new("RGB", (16, 16), (200, 0, 0)).save(tmp_path / "a.png")
    recs = [{"image": "a.png", "question": "what colour is it?", "options": ["Red", "blue"], "answer": "Red"},
            {"image": "a.png", "question": "what colour is it?", "options": ["green", "pink"], "answer": "pink"},
            {"image": "a.png", "question": "how many?", "options": ["3", "two"], "answer": "two"}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    m = mcq_task(model, tmp_path / "m.jsonl")
    assert m["options_outside_vocabulary"] == 1 and m["num_questions"] == 3
    ids = model.tokenizer(["what colour is it?"])
    with torch.no_grad():
        logits = model.answer_logits(model.image_transform(Image.open(tmp_path / "a.png"))[None], ids)[0]
    first = 100.0 * (float(logits[0]) > float(logits[1]))          # "Red" normalises to "red"; "two" to "2": right
    assert m["vanilla_accuracy"] == pytest.approx((first + 100.0) / 3)
    assert m["circular_accuracy"] == m["vanilla_accuracy"]          # it reads the question alone: passes agree


def test_an_mllm_scores_the_listed_options_by_likelihood(tmp_path, capsys):
    """`polymodal eval MLLM --task mcq`: the prompt lists the pass's options; the chosen option has the highest
    likelihood, so a rerun gives the same numbers, and generation can be asked for instead."""
    from polymodal.data.text import train_tokenizer
    from polymodal.models.mllm import create_mllm, mllm_config
    tok = train_tokenizer(["what colour is it red blue green A B C"] * 5, vocab_size=200)
    torch.manual_seed(0)
    create_mllm(mllm_config("mllm-tiny", {"lm.width": 32, "lm.heads": 2}, tok), tok).save_pretrained(tmp_path / "m")
    Image.new("RGB", (16, 16), (200, 0, 0)).save(tmp_path / "a.png")
    recs = [{"image": "a.png", "question": "what colour is it?", "options": ["red", "blue", "green"], "answer": "red"},
            {"image": "a.png", "question": "what colour?", "options": ["blue", "red"], "answer": "blue"}]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = []
    for k in range(2):
        assert main(["eval", str(tmp_path / "m"), "--task", "mcq", "--data", str(tmp_path / "q.jsonl"),
                     "--out", str(tmp_path / f"r{k}.json")]) == 0
        out.append(json.loads((tmp_path / f"r{k}.json").read_text()))
    assert out[0] == out[1] and out[0]["num_passes"] == 5 and out[0]["unparsed"] == 0
    assert 0.0 <= out[0]["circular_accuracy"] <= out[0]["vanilla_accuracy"] <= 100.0
    assert main(["eval", str(tmp_path / "m"), "--task", "mcq", "--data", str(tmp_path / "q.jsonl"),
                 "-o", "choice=generate", "--out", str(tmp_path / "g.json")]) == 0
    assert json.loads((tmp_path / "g.json").read_text())["num_passes"] == 5
    assert main(["eval", str(tmp_path / "m"), "--task", "mcq", "--data", str(tmp_path / "q.jsonl"),
                 "-o", "choice=classifier"]) != 0
    assert "mcq: -o choice=classifier needs a model with answer_logits; a MLLM has none" in capsys.readouterr().err


def test_the_mmbench_protocol_runs_from_the_released_tsv(answerer, tmp_path, capsys):
    root = tmp_path / "data" / "mmbench"
    root.mkdir(parents=True)
    _tsv(root / "MMBench_DEV_EN.tsv", [_row(3, ["red", "blue"], "A", _b64(200)), _row(1000003, ["blue", "red"], "B", "3"),
                                       _row(4, ["blue", "red"], "A", _b64(20), split="test")])
    out = tmp_path / "table.md"
    assert main(["benchmark", str(answerer), "--dataset", "mmbench-dev", "--root", str(tmp_path / "data"),
                 "--cache", str(tmp_path / "cache"), "--out", str(out), "--device", "cpu"]) == 0, capsys.readouterr().err
    (row,) = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert row["task"] == "mcq" and all(k in row["metrics"] for k in row["headline"])
    assert row["metrics"]["num_questions"] == 1 and row["metrics"]["num_passes"] == 2     # the dev split only
    assert row["metrics"]["circular_accuracy"] == row["metrics"]["vanilla_accuracy"]


@pytest.mark.parametrize("task,record,message", [
    ("vqa", {"image": "a.png", "question": "what?"}, r"bad.jsonl line 2: a QA record needs `answers`"),
    ("mcq", {"image": "a.png", "question": "what?", "options": ["x", "y"], "answer": "z"},
     r"bad.jsonl line 2: answer 'z' is not one of its options"),
])
def test_a_recipes_eval_data_is_checked_before_the_first_step(task, record, message, tmp_path):
    """A bad QA / MCQ record in `eval.tasks` stops the run at start-up, not at the first evaluation."""
    from polymodal.data.synthetic.shapes_qa import generate_shapes_qa
    from polymodal.train.run import load_recipe, run_recipe
    from pathlib import Path
    world = tmp_path / "qa"
    generate_shapes_qa(world, n_train=8, n_test=0, n_val=0, seed=1, progress=False, workers=1)
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    good = {"image": "a.png", "question": "what?", "options": ["x", "y"], "answer": "x", "answers": ["x"]}
    (tmp_path / "bad.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
    cfg = load_recipe(Path(__file__).parents[1] / "recipes/vqa_shapes.yaml", [
        f"out_dir={tmp_path / 'run'}", f"data.train={world / 'train.jsonl'}", "train.steps=2",
        "train.progress=false", "train.threads=1", f"eval.tasks=[{{task: {task}, data: {tmp_path / 'bad.jsonl'}}}]"])
    with pytest.raises(ValueError, match=message):
        run_recipe(cfg)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
