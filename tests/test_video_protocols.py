"""Video retrieval protocols of the field: paragraph-to-video (DiDeMo, ActivityNet), dual-softmax re-scoring
(labelled, off by default), videos named twice, texts cut to the context."""
import json

import pytest
import torch

from polymodal.data.text import train_tokenizer
from polymodal.eval.tasks import run_task
from polymodal.eval.video_retrieval import dual_softmax, retrieval_features
from polymodal.models.factory import create_model
from polymodal.models.video import VideoCLIP


@pytest.fixture(scope="module")
def world(moving_world):
    return moving_world(n_train=8, n_test=6, seed=31, num_frames=4)


@pytest.fixture(scope="module")
def model(world):
    texts = [json.loads(x)["caption"] for x in (world / "train.jsonl").read_text().splitlines()]
    torch.manual_seed(0)
    return VideoCLIP.from_image_model(create_model("tiny", tokenizer=train_tokenizer(texts * 3, kind="bpe",
                                                                                     vocab_size=150))).eval()


def _manifest(world, tmp_path, edit):
    rows = [json.loads(x) for x in (world / "test.jsonl").read_text().splitlines()]
    for r in rows:
        r["video"] = str(world / r["video"])
    rows = edit(rows)
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_paragraph_protocol_scores_one_joined_text_per_video(world, model, tmp_path):
    def sentences(rows):
        for r in rows:
            r["captions"] = [r["caption"], "then it stops", "the end"]
        return rows
    path = _manifest(world, tmp_path, sentences)
    feats = retrieval_features(model, path, num_frames=2, paragraph=True)
    assert feats.texts[0] == " ".join(feats.records[0]["captions"]) and feats.owner == list(range(len(feats.records)))
    out = run_task("video_retrieval", model, str(path), num_frames=2, paragraph=True)
    assert out["num_texts"] == out["num_videos"] == 6
    with_field = _manifest(world, tmp_path, lambda rows: [{**r, "paragraph": "a given paragraph"} for r in sentences(rows)])
    assert retrieval_features(model, with_field, num_frames=2, paragraph=True).texts[0] == "a given paragraph"


def test_dual_softmax_rescoring_follows_its_formula_and_is_labelled(world, model, tmp_path):
    s = torch.tensor([[0.9, 0.8], [0.85, 0.1]])                    # (texts, videos): video 0 attracts both texts
    want = s * torch.softmax(s * 10, dim=0)
    torch.testing.assert_close(dual_softmax(s, 10.0, 0), want)
    assert dual_softmax(s, 10.0, 0).argmax(1).tolist() == [1, 0]     # text 0 now prefers the video no one else wants
    path = _manifest(world, tmp_path, lambda rows: rows)
    plain = run_task("video_retrieval", model, str(path), num_frames=2)
    dsl = run_task("video_retrieval", model, str(path), num_frames=2, dsl=100.0)
    assert "dsl_inverse_temperature" not in plain and dsl["dsl_inverse_temperature"] == 100.0
    assert dsl["num_texts"] == plain["num_texts"]
    with pytest.raises(ValueError, match="dsl: -1"):
        run_task("video_retrieval", model, str(path), num_frames=2, dsl=-1.0)


def test_a_video_named_twice_is_one_item_and_long_texts_are_counted(world, model, tmp_path):
    def twice(rows):
        return rows + [{**rows[0], "caption": "x " * 200, "captions": ["x " * 200]}]
    path = _manifest(world, tmp_path, twice)
    with pytest.warns(UserWarning, match="7 records name 6 distinct videos"):
        out = run_task("video_retrieval", model, str(path), num_frames=2)
    feats = retrieval_features(model, path, num_frames=2)
    tok = model.tokenizer
    cut = sum(len(tok.encode(t)) > tok.context_length - 2 for t in feats.texts)      # counted independently
    assert out["num_videos"] == 6 and out["num_truncated_texts"] == cut >= 1


def test_decoding_in_worker_processes_gives_the_same_numbers(world, model, tmp_path):
    path = _manifest(world, tmp_path, lambda rows: rows)
    here = run_task("video_retrieval", model, str(path), num_frames=2)
    workers = run_task("video_retrieval", model, str(path), num_frames=2, decode_workers=2)
    assert workers == here
