"""Generative answers from a captioner (issue #34 item 2): `vqa.answer: generate` trains a CoCa's decoder to write
the answer after the question; the `vqa` task scores its greedy answers like an MLLM's."""
import json
from pathlib import Path

import pytest
import torch

from polymodal.config import ConfigError
from polymodal.models.coca import prompt_answer_ids
from reproduce import assert_eval_reproduces

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def qa_world(tmp_path_factory):
    from polymodal.data.synthetic.shapes_qa import generate_shapes_qa
    root = tmp_path_factory.mktemp("gen_qa")
    generate_shapes_qa(root, n_train=8, n_test=0, n_val=4, seed=2, progress=False, workers=1)
    return root


def _overrides(world, out, steps):
    return [f"out_dir={out}", "vqa.answer=generate", f"data.train={world / 'train.jsonl'}", "data.batch_size=8",
            f"train.steps={steps}", "train.eval_every=0", "train.ckpt_every=0", "train.progress=false",
            "train.threads=1", "train.report=false", "optim.warmup_steps=5", "optim.weight_decay=0",
            "tokenizer.vocab_size=1024",
            f"eval.tasks=[{{task: vqa, data: {world / 'val.jsonl'}, majority_from: {world / 'train.jsonl'}}}]"]


def test_rows_hold_the_question_then_the_answer_and_mark_only_the_answer():
    from polymodal.data.text import train_tokenizer
    tok = train_tokenizer(["what colour is the star red blue"] * 5, vocab_size=120)
    q, a = tok.encode("what colour is the star?"), tok.encode("red")
    ids, mark = prompt_answer_ids(tok, ["what colour is the star?", "what?"], ["red", "blue"], 1, 2, 0, 64, 8)
    assert ids[0, :len(q) + len(a) + 2].tolist() == [1, *q, *a, 2]
    assert mark[0].tolist() == [False] * (len(q) + 1) + [True] * (len(a) + 1) + [False] * (ids.shape[1] - len(q) - len(a) - 2)
    # the question keeps its last limit - 1 - answer_tokens tokens, with or without its answer
    cut, _ = prompt_answer_ids(tok, ["what colour is the star?"], ["red"], 1, 2, 0, len(a) + 4, len(a) + 1)
    assert cut[0].tolist() == [1, *q[-2:], *a, 2]
    alone, none = prompt_answer_ids(tok, ["what colour is the star?"], None, 1, 2, 0, len(a) + 4, len(a) + 1)
    assert alone[0].tolist() == [1, *q[-2:]] and not none.any()
    with pytest.raises(ValueError, match=r"answer 'red' takes .* over max_answer_tokens 1; raise model.overrides"):
        prompt_answer_ids(tok, ["what?"], ["red"], 1, 2, 0, 32, 1)
    with pytest.raises(ValueError, match=r"max_answer_tokens 31 leaves no room for the question"):
        prompt_answer_ids(tok, ["what?"], ["red"], 1, 2, 0, 32, 31)


def test_a_coca_learns_to_write_the_answers_and_the_saved_model_reproduces_them(qa_world, tmp_path):
    """200 steps on 24 questions: the decoder writes the consensus answer of (nearly) every training question, so
    the loss reaches the answer tokens and nothing else; the saved CoCa's `polymodal eval` gives the run's numbers."""
    from polymodal.eval.vqa import consensus, record_answers
    from polymodal.hub import load_model
    from polymodal.train.run import load_recipe, run_recipe
    out = tmp_path / "run"
    final = run_recipe(load_recipe(REPO / "recipes/vqa_shapes.yaml", _overrides(qa_world, out, 200)))
    assert final["eval/vqa/generative"] == 1 and "eval/vqa/majority_vqa_accuracy" in final
    model = load_model(out / "model").eval()
    assert model.config.model_type == "coca"
    rows = [json.loads(x) for x in (qa_world / "train.jsonl").read_text().splitlines()]
    pixels = torch.stack([model.image_transform(__import__("PIL.Image", fromlist=["Image"]).open(qa_world / r["image"])
                                                .convert("RGB")) for r in rows])
    said = model.generate_text(pixels, [r["question"] for r in rows])
    right = sum(s == consensus(record_answers(r, "x")) for s, r in zip(said, rows))
    assert right >= 0.8 * len(rows), list(zip(said, [r["answer"] for r in rows]))
    assert_eval_reproduces(final, out / "model", "vqa", qa_world / "val.jsonl", tmp_path / "m.json",
                           options=(f"majority_from={qa_world / 'train.jsonl'}",))


def test_generative_answers_need_a_captioner_on_images(qa_world, tmp_path):
    from polymodal.train.run import load_recipe, run_recipe
    with pytest.raises(ConfigError, match="vqa.answer: generate .* needs vqa.media: image"):
        load_recipe(REPO / "recipes/vqa_shapes.yaml", _overrides(qa_world, tmp_path / "r", 1) + ["vqa.media=video"])
    with pytest.raises(ConfigError, match=r"the answer .* takes \d+ tokens with its EOS, over the CoCa's "
                                          r"max_answer_tokens 2; set model.overrides.max_answer_tokens"):
        run_recipe(load_recipe(REPO / "recipes/vqa_shapes.yaml", _overrides(qa_world, tmp_path / "r", 1) +
                               ["model.overrides.max_answer_tokens=2"]))
    with pytest.raises(ValueError, match="vqa.answer: generate needs a captioner .* gives a M2Encoder"):
        run_recipe(load_recipe(REPO / "recipes/vqa_shapes.yaml", _overrides(qa_world, tmp_path / "r", 1) +
                               ["model.name=m2-tiny", "model.overrides={}"]))
    from polymodal.data.text import train_tokenizer
    from polymodal.models.factory import create_model
    tok = train_tokenizer(["what is it red"] * 5, vocab_size=100)
    coca = create_model("coca-tiny", tokenizer=tok).eval()
    with pytest.raises(ValueError, match="only greedy decoding answers prompts"):
        coca.generate_text(torch.zeros(1, 3, 32, 32), ["what is it?"], method="beam")
