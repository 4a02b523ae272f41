"""Visual question answering (issue #34 items 2-3): the VQAv2 answer normalisation and accuracy, the ShapesWorld QA
world, the answer vocabulary and loss, and `method: vqa` end to end (training beats the majority baseline and its
numbers come back from the saved model)."""
import json
from pathlib import Path

import pytest
import torch

import polymodal
from polymodal.cli import main
from polymodal.data.synthetic.shapes_qa import QUESTION_TYPES, ShapesQAConfig, generate_shapes_qa
from polymodal.eval.vqa import normalize_answer, qa_metrics, record_answers, vqa_score
from polymodal.methods.vqa import build_vocabulary, soft_targets, vqa_loss
from reproduce import assert_eval_reproduces

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("raw, norm", [
    ("Two.", "2"), ("a Red star", "red star"), ("The  CAT", "cat"), ("none", "0"), ("ten", "10"),
    ("yes.", "yes"), ("3.5", "3.5"), ("1,000", "1000"), ("hello-world", "hello world"), ("hello - world", "hello world"),
    ("dont", "don't"), ("isnt it", "isn't it"), ("couldnt've", "couldn't've"), ("its", "its"), ("(left)", "left"),
    ("what?!", "what"), ("  bottom\tleft\n", "bottom left"), ("an apple", "apple"), ("eleven", "eleven")])
def test_answer_normalisation_follows_the_vqa_rules(raw, norm):
    assert normalize_answer(raw) == norm


def test_vqa_accuracy_is_the_ten_choose_nine_average():
    # 10 answers, m of them match: leaving a match out leaves m - 1, leaving another out leaves m.
    assert vqa_score("2", ["2"] * 10) == 1.0
    assert vqa_score("2", ["2"] * 3 + ["3"] * 7) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)      # 0.9
    assert vqa_score("2", ["2"] * 2 + ["3"] * 8) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)  # 0.6
    assert vqa_score("2", ["2"] + ["3"] * 9) == pytest.approx(9 * (1 / 3) / 10)                 # 0.3
    assert vqa_score("4", ["2"] * 10) == 0.0
    assert vqa_score("2", ["2"]) == 1.0 and vqa_score("2", ["3"]) == 0.0          # one answer: exact match
    with pytest.raises(ValueError, match="no answers"):
        vqa_score("2", [])


def test_metrics_report_per_type_and_the_baseline_beside_every_number():
    preds, answers = ["red", "2", "no"], [["red"] * 10, ["2"] * 3 + ["3"] * 7, ["yes"] * 10]
    m = qa_metrics(preds, answers, ["color", "count", "exists"], ["red", "3", "yes"], ["blue", "3", "yes"],
                   ["other", "number", "yes/no"])
    assert m["answer_type/yes/no/vqa_accuracy"] == 0.0 and m["answer_type/number/majority_vqa_accuracy"] == 100.0
    assert m["vqa_accuracy"] == pytest.approx(100 * (1 + 0.9 + 0) / 3)
    assert m["exact_match"] == pytest.approx(100 / 3)
    assert m["majority_vqa_accuracy"] == pytest.approx(100 * (0 + 1 + 1) / 3)
    assert m["type/count/vqa_accuracy"] == pytest.approx(90.0) and m["type/count/majority_exact_match"] == 100.0
    for key in [k for k in m if k.endswith("vqa_accuracy") or k.endswith("exact_match")]:
        base = key.replace("vqa_accuracy", "majority_vqa_accuracy") if "majority" not in key else key
        assert base in m


def test_record_answers_reads_lists_dicts_and_single_answers():
    assert record_answers({"answers": ["Two", "2."]}, "x") == ["2", "2"]
    assert record_answers({"answers": [{"answer": "Yes", "answer_id": 1}]}, "x") == ["yes"]
    assert record_answers({"answer": "A dog"}, "x") == ["dog"]
    with pytest.raises(ValueError, match=r"m.jsonl record 3: a QA record needs `answers`"):
        record_answers({"question": "q"}, "m.jsonl record 3")


@pytest.fixture(scope="module")
def qa_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes_qa")
    generate_shapes_qa(root, n_train=160, n_test=40, n_val=40, seed=3, progress=False, workers=1)
    return root


def _rows(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


def test_shapes_qa_world_is_deterministic_and_its_answers_are_true(qa_world, tmp_path):
    again = tmp_path / "again"
    generate_shapes_qa(again, n_train=160, n_test=40, n_val=40, seed=3, progress=False, workers=2)
    assert (qa_world / "train.jsonl").read_text() == (again / "train.jsonl").read_text()
    assert (qa_world / "images/train_000007.png").read_bytes() == (again / "images/train_000007.png").read_bytes()
    rows = _rows(qa_world / "train.jsonl")
    assert len(rows) == 160 * 3 and {r["question_type"] for r in rows} == set(QUESTION_TYPES)
    # The same scenes as `polymodal data shapes` with the seed: check answers against its objects.
    from polymodal.data.synthetic.shapes import generate_shapes
    shapes = tmp_path / "shapes"
    generate_shapes(shapes, n_train=160, n_test=0, n_val=0, n_hard=0, seed=3, progress=False, workers=1)
    scenes = {r["image"]: r for r in _rows(shapes / "train.jsonl")}
    assert (shapes / "images/train_000007.png").read_bytes() == (qa_world / "images/train_000007.png").read_bytes()
    checked = 0
    for r in rows:
        objs = scenes[r["image"]]["objects"]
        q, a = r["question"], r["answer"]
        assert len(r["answers"]) == 10
        # The ten surface forms normalise back to the truth (up to the noisy annotators, never a majority).
        normed = [normalize_answer(x) for x in r["answers"]]
        assert normed.count(a) >= 5, r
        if q == "how many objects are there?":
            assert a == str(len(objs))
            checked += 1
        elif r["question_type"] == "exists":
            colour, shape = q[len("is there a "):-1].split(" ")
            assert a == ("yes" if any(o["color"] == colour and o["shape"] == shape for o in objs) else "no")
            checked += 1
        elif r["question_type"] in ("color", "shape"):
            assert a not in q.split()                    # never named by the attribute asked about
        elif r["question_type"] == "which":
            assert any(f"{o['color']} {o['shape']}" == a for o in objs)
    assert checked > 20


def test_shapes_qa_bad_settings_are_one_line_errors():
    with pytest.raises(ValueError, match="answer_noise must be in"):
        ShapesQAConfig(answer_noise=0.9)
    with pytest.raises(ValueError, match="types must be a non-empty subset of color"):
        ShapesQAConfig(types=("colour",))


def test_vocabulary_targets_and_loss():
    recs = [{"answers": ["Red"] * 9 + ["blue"], "question_type": "color"},
            {"answers": ["red"] * 10, "question_type": "color"},
            {"answers": ["two"] * 10, "question_type": "count"},
            {"answer": "blue", "question_type": "color"}]
    v = build_vocabulary(recs)
    assert v.answers == ["red", "2", "blue"] and v.counts == [2, 1, 1]
    assert v.type_majority == {"color": "red", "count": "2"}
    assert build_vocabulary(recs, min_count=2).answers == ["red"]
    with pytest.raises(ValueError, match="lower vqa.min_answer_count"):
        build_vocabulary(recs, min_count=5)
    t = soft_targets([normalize_answer(a) for a in recs[0]["answers"]], {a: i for i, a in enumerate(v.answers)})
    assert t.tolist() == pytest.approx([1.0, 0.0, 0.3])
    logits = torch.tensor([[5.0, 0.0, 0.0], [0.0, 0.0, 5.0]], requires_grad=True)
    targets = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    loss = vqa_loss(logits, targets)              # the second question has no vocabulary answer: left out
    assert loss.item() == pytest.approx(-torch.log_softmax(torch.tensor([5.0, 0, 0]), 0)[0].item())
    loss.backward()
    assert logits.grad[1].abs().sum() == 0
    assert vqa_loss(logits, targets, "bce").item() > 0


def _recipe_overrides(world, out, steps):
    return [f"out_dir={out}", f"data.train={world / 'train.jsonl'}",
            f"eval.tasks=[{{task: vqa, data: {world / 'val.jsonl'}}}]", "data.batch_size=32",
            f"train.steps={steps}", "train.eval_every=0", "train.ckpt_every=0", "train.progress=false",
            "train.threads=1", "train.report=false", "optim.warmup_steps=20"]


@pytest.fixture(scope="module")
def trained(qa_world, tmp_path_factory):
    from polymodal.train.run import load_recipe, run_recipe
    out = tmp_path_factory.mktemp("vqa_run") / "run"
    final = run_recipe(load_recipe(REPO / "recipes/vqa_shapes.yaml", _recipe_overrides(qa_world, out, 150)))
    return out, final


def test_vqa_recipe_trains_and_the_saved_model_reproduces_its_numbers(trained, qa_world, tmp_path):
    out, final = trained
    assert final["eval/vqa/num_questions"] == 120 and final["eval/vqa/answer_coverage"] > 90
    pairs = [("vqa_accuracy", "majority_vqa_accuracy"), ("exact_match", "majority_exact_match"),
             ("type/count/vqa_accuracy", "type/count/majority_vqa_accuracy"),
             ("type/where/exact_match", "type/where/majority_exact_match")]
    for key, baseline in pairs:                                   # every number has its baseline beside it
        assert f"eval/vqa/{key}" in final and f"eval/vqa/{baseline}" in final
    saved = polymodal.load_model(out / "model")
    assert type(saved).__name__ == "VQAModel" and saved.config.model_type == "vqa"
    assert saved.majority_answer("exists") in ("yes", "no") and len(saved.answers) == final["eval/vqa/num_answers"]
    assert_eval_reproduces(final, out / "model", "vqa", qa_world / "val.jsonl", tmp_path / "m.json")


@pytest.mark.slow
def test_vqa_recipe_beats_the_majority_baseline(tmp_path_factory, tmp_path):
    """1,200 images (3,600 questions) and 800 steps of the recipe: above the majority answer of each type, overall
    and on colour questions (what the model learns first)."""
    from polymodal.train.run import load_recipe, run_recipe
    world = tmp_path_factory.mktemp("qa_large")
    generate_shapes_qa(world, n_train=1200, n_test=0, n_val=200, seed=11, progress=False, workers=1)
    overrides = _recipe_overrides(world, tmp_path / "run", 800) + ["data.batch_size=64"]
    final = run_recipe(load_recipe(REPO / "recipes/vqa_shapes.yaml", overrides))
    assert final["eval/vqa/vqa_accuracy"] > final["eval/vqa/majority_vqa_accuracy"] + 2
    assert final["eval/vqa/type/color/vqa_accuracy"] > final["eval/vqa/type/color/majority_vqa_accuracy"] + 10


def test_vqa_needs_a_coca_and_a_qa_model(qa_world, tmp_path):
    from polymodal.eval.tasks import check_model
    from polymodal.models.vqa import VQAModel
    from polymodal.train.run import load_recipe, run_recipe
    with pytest.raises(ValueError, match="eval task 'vqa' needs a model with answer_logits"):
        check_model("vqa", torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="neither a multimodal decoder nor a cross encoder"):
        VQAModel(polymodal.create_model("tiny"), ["yes"])
    with pytest.raises(ValueError, match="vqa needs a CoCa"):
        run_recipe(load_recipe(REPO / "recipes/vqa_shapes.yaml",
                               _recipe_overrides(qa_world, tmp_path / "r", 1) + ["model.name=tiny",
                                                                                 "model.overrides={}"]))


def test_moving_qa_answers_are_the_videos_truth(moving_world, tmp_path):
    """Questions on a MovingShapes world: the answers follow each record's action (reversed copies and compounds
    included), "first"/"last" are asked only of compounds, and the video paths resolve from the QA manifest."""
    from polymodal.data.synthetic.moving_qa import generate_moving_qa
    from polymodal.data.synthetic.moving_shapes import COMPOUNDS, action_class
    world = moving_world(n_train=24, n_test=6, seed=5, num_frames=4, compound_fraction=0.4, mismatch_fraction=0.3)
    out = tmp_path / "mqa"
    summary = generate_moving_qa(world, out, seed=0)
    videos = {str((world / r["video"]).resolve()): r for r in _rows(world / "train.jsonl")}
    rows = _rows(out / "train.jsonl")
    assert summary["counts"]["train"] == len(rows) and generate_moving_qa(world, tmp_path / "again")["counts"] == \
        summary["counts"]
    assert (tmp_path / "again" / "train.jsonl").read_text() == (out / "train.jsonl").read_text()
    kinds = {r["question_type"] for r in rows}
    assert {"what", "moves", "action", "first", "last"} <= kinds
    for r in rows:
        src = videos[str((out / r["video"]).resolve())]
        assert r["video_id"] == Path(src["video"]).stem and r["question_id"].startswith(r["video_id"] + "_")
        assert normalize_answer(r["answer"]) in [normalize_answer(a) for a in r["answers"]]
        if r["question_type"] == "moves":
            moving = src["action"].startswith("move")
            assert r["answer"] == ("yes" if moving else "no")
        if r["question_type"] == "first":
            assert r["answer"] == action_class(COMPOUNDS[src["action"]][0])      # e.g. "shrinks" of shrink_grow
        if r["question_type"] == "last":
            assert r["answer"] == action_class(COMPOUNDS[src["action"]][1])
        if r["question_type"] == "direction":
            assert src["action"] == f"move_{r['answer']}"
    with pytest.raises(FileNotFoundError, match="polymodal data moving-shapes --out"):
        generate_moving_qa(tmp_path / "nothing", tmp_path / "x")


class _Talker:
    """A generative model seen by the vqa task: answers every question with the next of `replies`."""

    def __init__(self, replies):
        self.replies = list(replies)
        self.image_transform = lambda im: torch.zeros(3, 8, 8)

    def parameters(self):
        return iter([torch.zeros(1)])

    def generate_text(self, pixels, questions, method="greedy"):
        out, self.replies = self.replies[:len(questions)], self.replies[len(questions):]
        return out


def test_generative_answers_are_normalised_and_need_a_training_manifest(qa_world, tmp_path):
    from polymodal.eval.vqa import vqa_task
    rows = _rows(qa_world / "val.jsonl")[:6]
    (tmp_path / "few.jsonl").write_text("".join(json.dumps({**r, "image": str(qa_world / r["image"])}) + "\n"
                                                for r in rows))
    # the truth with an article, capitals and a full stop: normalised, it matches; then wrong answers
    replies = [f"The {r['answer'].upper()}." for r in rows[:3]] + ["purple"] * 3
    m = vqa_task(_Talker(replies), tmp_path / "few.jsonl", majority_from=str(qa_world / "train.jsonl"))
    want = [vqa_score(r["answer"], [normalize_answer(a) for a in r["answers"]]) for r in rows[:3]]
    want += [vqa_score("purple", [normalize_answer(a) for a in r["answers"]]) for r in rows[3:]]
    assert m["generative"] == 1 and m["vqa_accuracy"] == pytest.approx(100 * sum(want) / 6)
    assert m["exact_match"] == pytest.approx(100 * (3 + sum(r["answer"] == "purple" for r in rows[3:])) / 6)
    assert "majority_vqa_accuracy" in m and "num_answers" not in m
    with pytest.raises(ValueError, match="answers in free text .* -o majority_from=TRAIN.jsonl"):
        vqa_task(_Talker(replies), tmp_path / "few.jsonl")
    with pytest.raises(FileNotFoundError, match="majority_from manifest .*nope.jsonl does not exist"):
        vqa_task(_Talker(replies), tmp_path / "few.jsonl", majority_from=str(tmp_path / "nope.jsonl"))


def test_an_mllm_answers_vqa_by_generation(qa_world, tmp_path):
    """A (random) MLLM of the mllm family goes through the same task: every answer is generated text."""
    from polymodal.data.text import train_tokenizer
    from polymodal.models.mllm import create_mllm, mllm_config
    rows = _rows(qa_world / "val.jsonl")
    tok = train_tokenizer([r["question"] + " " + r["answer"] for r in rows] * 2, vocab_size=200)
    torch.manual_seed(0)
    model = create_mllm(mllm_config("mllm-tiny", {"lm.width": 32, "lm.heads": 2}, tok), tok).eval()
    from polymodal.eval.tasks import run_task
    m = run_task("vqa", model, str(qa_world / "val.jsonl"), limit=8, majority_from=str(qa_world / "train.jsonl"))
    assert m["generative"] == 1 and m["num_questions"] == 8 and 0 <= m["vqa_accuracy"] <= 100


def test_video_vqa_trains_on_moving_qa_and_the_saved_model_reproduces_it(moving_world, tmp_path):
    """`vqa.media: video`: the frames' contexts, each with its frame embedding, reach the decoder, so the answer
    depends on frame order; the saved model (num_frames in its config) gives the training numbers back."""
    from polymodal.data.synthetic.moving_qa import generate_moving_qa
    from polymodal.train.run import load_recipe, run_recipe
    world = moving_world(n_train=24, n_test=6, seed=5, num_frames=4, compound_fraction=0.4, mismatch_fraction=0.3)
    qa = tmp_path / "mqa"
    generate_moving_qa(world, qa)
    out = tmp_path / "run"
    overrides = [f"out_dir={out}", f"data.train={qa / 'train.jsonl'}", "data.batch_size=8", "train.steps=6",
                 f"eval.tasks=[{{task: vqa, data: {qa / 'test.jsonl'}}}]", "train.eval_every=0", "train.ckpt_every=0",
                 "train.progress=false", "train.threads=1", "train.report=false", "optim.warmup_steps=1"]
    final = run_recipe(load_recipe(REPO / "recipes/vqa_moving.yaml", overrides))
    saved = polymodal.load_model(out / "model").eval()
    assert saved.config.num_frames == 4 and saved.frame_embed.shape == (4, saved.config.text.width)
    args = ["eval", str(out / "model"), "--task", "vqa", "--data", str(qa / "test.jsonl"), "--out", str(tmp_path / "m.json")]
    assert main(args) in (0, None)
    got = json.loads((tmp_path / "m.json").read_text())
    for k, v in final.items():
        if k.startswith("eval/vqa/"):
            assert got[k[len("eval/vqa/"):]] == pytest.approx(v, abs=1e-6), k
    torch.manual_seed(0)
    frames, ids = torch.randn(2, 4, 3, 32, 32), saved.tokenizer(["what happens first?"] * 2)
    with torch.no_grad():
        assert not torch.allclose(saved.answer_logits(frames, ids), saved.answer_logits(frames.flip(1), ids))
        with pytest.raises(ValueError, match="a video model .* got images"):
            saved.answer_logits(frames[:, 0], ids)


def test_video_vqa_motion_encodes_frame_differences(moving_world, tmp_path):
    """`vqa.motion`: the frame-to-frame difference images are encoded too and appended to the decoder's context,
    so two static videos of different scenes share their motion tokens while a moving one does not; the saved
    model keeps the setting; bad settings are one-line errors naming the key."""
    from polymodal.config import ConfigError
    from polymodal.data.synthetic.moving_qa import generate_moving_qa
    from polymodal.methods.vqa import VQASection
    from polymodal.models.vqa import VQAConfig
    from polymodal.train.run import load_recipe, run_recipe
    world = moving_world(n_train=16, n_test=4, seed=3, num_frames=4)
    qa = tmp_path / "mqa"
    generate_moving_qa(world, qa)
    out = tmp_path / "run"
    overrides = [f"out_dir={out}", f"data.train={qa / 'train.jsonl'}", "data.batch_size=8", "train.steps=2",
                 f"eval.tasks=[{{task: vqa, data: {qa / 'test.jsonl'}}}]", "train.eval_every=0", "train.ckpt_every=0",
                 "train.progress=false", "train.threads=1", "train.report=false", "optim.warmup_steps=1",
                 "vqa.motion=true"]
    run_recipe(load_recipe(REPO / "recipes/vqa_moving.yaml", overrides))
    saved = polymodal.load_model(out / "model").eval()
    assert saved.config.motion and saved.motion_embed.shape == (3, saved.config.text.width)
    assert "motion_embed" in saved.no_weight_decay()
    torch.manual_seed(0)
    a, b = torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32)
    static = torch.stack([a.expand(4, -1, -1, -1), b.expand(4, -1, -1, -1)])          # (2, 4, 3, H, W)
    moving = torch.randn(1, 4, 3, 32, 32)
    with torch.no_grad():
        ctx = saved.context(torch.cat([static, moving]))
        n = ctx.shape[1] // 7                                                          # 4 frames + 3 differences
        assert ctx.shape[1] == 7 * n
        assert not torch.allclose(ctx[0, :4 * n], ctx[1, :4 * n])                      # the scenes differ
        assert torch.allclose(ctx[0, 4 * n:], ctx[1, 4 * n:], atol=1e-6)                # no motion in either
        assert not torch.allclose(ctx[0, 4 * n:], ctx[2, 4 * n:], atol=1e-3)
    with pytest.raises(ConfigError, match="vqa.motion needs vqa.media: video"):
        VQASection(motion=True)
    with pytest.raises(ValueError, match="motion needs videos of >= 2 frames"):
        VQAConfig(num_frames=1, motion=True)


def test_a_video_vqa_model_is_scored_on_frames_picked_as_in_training(moving_world, tmp_path, monkeypatch):
    """The training run's data.frame_strategy is saved with the model and used by the vqa task (it read uniform
    frames whatever the model trained on)."""
    import polymodal.data.video as video
    from polymodal.data.synthetic.moving_qa import generate_moving_qa
    from polymodal.data.text import train_tokenizer
    from polymodal.eval.vqa import vqa_task
    from polymodal.models.vqa import VQAModel
    world = moving_world(n_train=4, n_test=2, seed=5, num_frames=4)
    qa = tmp_path / "mqa"
    generate_moving_qa(world, qa)
    tok = train_tokenizer(["does anything move what moves yes no"] * 5, vocab_size=120)
    torch.manual_seed(0)
    VQAModel(polymodal.create_model("coca-tiny", tokenizer=tok), ["yes", "no"], num_frames=4,
             frame_strategy="keyframes").save_pretrained(tmp_path / "m")
    model = polymodal.load_model(tmp_path / "m").eval()
    assert model.config.frame_strategy == "keyframes"
    seen, read = [], video.read_video

    def spy(path, num_frames=8, strategy="uniform", **kw):
        seen.append(strategy)
        return read(path, num_frames=num_frames, strategy=strategy, **kw)
    monkeypatch.setattr(video, "read_video", spy)
    vqa_task(model, qa / "test.jsonl", limit=2)
    assert seen and set(seen) == {"keyframes"}
