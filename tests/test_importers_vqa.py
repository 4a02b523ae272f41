"""`polymodal data import` for the question-answering layouts (issue #34 item 4): VQAv2, TextVQA, MSRVTT-QA, MSVD-QA
and MMBench's TSV. Each fixture is built here in the layout's exact files and folders (see each reader's docstring for
the public code it was read from)."""
import base64
import io
import json
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from polymodal.cli import main
from polymodal.data.importers import import_dataset
from polymodal.data.importers.common import LayoutError
from polymodal.eval.vqa import record_answers


def _image(path: Path, level: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), (level, 50, 200)).save(path, format="JPEG")
    return path


def _video(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=3)
        s.width = s.height = 32
        s.pix_fmt = "yuv420p"
        for i in range(3):
            for p in s.encode(av.VideoFrame.from_ndarray(np.full((32, 32, 3), 40 * i, np.uint8), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def _rows(path):
    """The manifest's records, media paths resolved (the manifest writes them relative to its folder)."""
    rows = [json.loads(x) for x in Path(path).read_text().splitlines()]
    for r in rows:
        for key in ("image", "video"):
            if key in r:
                r[key] = str((Path(path).parent / r[key]).resolve())
    return rows


# ---- VQAv2 (GT-Vision-Lab/VQA layout) -------------------------------------------------------------------------
def _vqav2(root: Path) -> Path:
    answers = ["2", "2", "two", "2", "3", "2", "2", "2", "2", "2"]
    (root / "Questions").mkdir(parents=True)
    (root / "Annotations").mkdir()
    for sub, ids in (("train2014", [9, 25]), ("val2014", [42])):
        qs = [{"image_id": i, "question": f"How many dogs are in image {i}?", "question_id": i * 10} for i in ids]
        (root / "Questions" / f"v2_OpenEnded_mscoco_{sub}_questions.json").write_text(json.dumps(
            {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {}, "data_subtype": sub,
             "questions": qs}))
        anns = [{"question_type": "how many", "multiple_choice_answer": "2", "image_id": i, "answer_type": "number",
                 "question_id": i * 10, "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                                                    for k, a in enumerate(answers)]} for i in ids]
        (root / "Annotations" / f"v2_mscoco_{sub}_annotations.json").write_text(json.dumps(
            {"info": {}, "license": {}, "data_subtype": sub, "data_type": "mscoco", "annotations": anns}))
        for i in ids:
            _image(root / "Images" / sub / f"COCO_{sub}_{i:012d}.jpg")
    (root / "Questions" / "v2_OpenEnded_mscoco_test2015_questions.json").write_text(json.dumps(
        {"data_subtype": "test2015", "questions": [{"image_id": 7, "question": "Is it sunny?", "question_id": 70}]}))
    _image(root / "Images" / "test2015" / f"COCO_test2015_{7:012d}.jpg")
    return root


def test_vqav2_reads_questions_annotations_and_coco_images(tmp_path):
    root = _vqav2(tmp_path / "vqa")
    summary = import_dataset("vqav2", root, tmp_path / "all.jsonl")
    assert summary["kind"] == "vqa" and summary["splits"] == ["test2015", "train2014", "val2014"]
    rows = {r["question_id"]: r for r in _rows(tmp_path / "all.jsonl")}
    r = rows[90]
    assert r["image"].endswith("Images/train2014/COCO_train2014_000000000009.jpg") and Path(r["image"]).is_file()
    assert len(r["answers"]) == 10 and r["answers"][2] == "two" and r["answer"] == "2"
    assert (r["question_type"], r["answer_type"], r["split"]) == ("how many", "number", "train2014")
    assert record_answers(r, "x").count("2") == 9                 # "two" normalises to 2
    assert rows[70]["answers"] == [] and any("test2015" in n for n in summary["notes"])
    import_dataset("vqav2", root, tmp_path / "val.jsonl", split="val2014")
    assert [r["question_id"] for r in _rows(tmp_path / "val.jsonl")] == [420]


def test_vqav2_bad_layouts_name_the_file(tmp_path):
    root = _vqav2(tmp_path / "vqa")
    with pytest.raises(LayoutError, match=r"no split 'val2017'; it has test2015, train2014, val2014"):
        import_dataset("vqav2", root, tmp_path / "x.jsonl", split="val2017")
    (root / "Annotations" / "v2_mscoco_val2014_annotations.json").write_text(json.dumps({"questions": []}))
    with pytest.raises(LayoutError, match=r"v2_mscoco_val2014_annotations.json: not a VQA annotations file"):
        import_dataset("vqav2", root, tmp_path / "x.jsonl")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"no \*_questions.json found"):
        import_dataset("vqav2", empty, tmp_path / "x.jsonl")


def test_vqav2_imported_manifest_scores_with_the_vqa_task(tmp_path):
    """The imported records are what the vqa task reads: a model answering "2" scores the VQA accuracy by hand."""
    import torch

    from polymodal.eval.vqa import vqa_task
    root = _vqav2(tmp_path / "vqa")
    import_dataset("vqav2", root, tmp_path / "train.jsonl", split="train2014")

    class Always:
        answers = ["3", "2"]
        image_transform = staticmethod(lambda im: torch.zeros(3, 8, 8))
        tokenizer = staticmethod(lambda qs: torch.zeros(len(qs), 4, dtype=torch.long))

        def parameters(self):
            return iter([torch.zeros(1)])

        def answer_logits(self, pixels, ids):
            return torch.tensor([[0.0, 1.0]]).expand(len(ids), 2)

        def majority_answer(self, t=None):
            return "3"

    m = vqa_task(Always(), tmp_path / "train.jsonl")
    # 9 of 10 answers are "2": leaving a match out keeps 8 (>= 3), so every subset scores 1.
    assert m["vqa_accuracy"] == pytest.approx(100.0) and m["exact_match"] == 100.0
    assert m["majority_vqa_accuracy"] == pytest.approx(100 * 0.3) and m["type/how many/num_questions"] == 2


# ---- TextVQA ----------------------------------------------------------------------------------------------------
def test_textvqa_reads_its_json_and_train_images(tmp_path):
    root = tmp_path / "textvqa"
    for split, ids in (("train", ["a1", "b2"]), ("val", ["c3"])):
        data = [{"question": f"what is written on {i}?", "image_id": i, "image_classes": ["Sign"],
                 "flickr_original_url": "", "flickr_300k_url": "", "image_width": 16, "image_height": 16,
                 "answers": ["stop"] * 9 + ["Stop"], "question_tokens": ["what"], "question_id": k,
                 "set_name": split} for k, i in enumerate(ids)]
        root.mkdir(exist_ok=True)
        (root / f"TextVQA_0.5.1_{split}.json").write_text(json.dumps(
            {"dataset_type": split, "dataset_name": "textvqa", "dataset_version": "0.5.1", "data": data}))
        for i in ids:
            _image(root / "train_images" / f"{i}.jpg")
    summary = import_dataset("textvqa", root, tmp_path / "t.jsonl")
    rows = _rows(tmp_path / "t.jsonl")
    assert summary["splits"] == ["train", "val"] and len(rows) == 3
    assert rows[2]["image"].endswith("train_images/c3.jpg") and rows[2]["question_type"] == "what"
    assert record_answers(rows[0], "x") == ["stop"] * 10


# ---- MSRVTT-QA / MSVD-QA ------------------------------------------------------------------------------------------
def test_msrvtt_qa_maps_video_ids_to_msrvtt_videos(tmp_path):
    root = tmp_path / "msrvtt_qa"
    root.mkdir()
    rows = [{"answer": "dog", "category_id": 0, "id": 0, "question": "what is running?", "video_id": 7010},
            {"answer": "man", "category_id": 1, "id": 1, "question": "who is singing?", "video_id": 7011}]
    (root / "test_qa.json").write_text(json.dumps(rows))
    _video(root / "video" / "video7010.mp4")
    summary = import_dataset("msrvtt-qa", root, tmp_path / "q.jsonl")
    got = _rows(tmp_path / "q.jsonl")
    assert summary["kind"] == "videoqa" and len(got) == 1 and got[0]["video"].endswith("video7010.mp4")
    assert (got[0]["answers"], got[0]["question_type"], got[0]["split"]) == (["dog"], "what", "test")
    assert any("1 video(s) listed in test_qa.json were not found" in n for n in summary["notes"])


def test_msvd_qa_uses_the_youtube_mapping(tmp_path):
    root = tmp_path / "msvd_qa"
    root.mkdir()
    (root / "youtube_mapping.txt").write_text("-4wsuPCjDBc_5_15 vid1\nabc_1_2 vid2\n")
    (root / "train_qa.json").write_text(json.dumps(
        [{"answer": "cat", "id": 5, "question": "who plays?", "video_id": 2}]))
    _video(root / "YouTubeClips" / "abc_1_2.avi")
    import_dataset("msvd-qa", root, tmp_path / "q.jsonl")
    got = _rows(tmp_path / "q.jsonl")
    assert got[0]["video"].endswith("YouTubeClips/abc_1_2.avi") and got[0]["question_id"] == 5
    (root / "train_qa.json").write_text(json.dumps([{"answer": "cat", "question": "who?", "video_id": 9}]))
    with pytest.raises(LayoutError, match=r"train_qa.json: entry \[0\]: vid9 is not in youtube_mapping.txt"):
        import_dataset("msvd-qa", root, tmp_path / "q.jsonl")
    (root / "train_qa.json").write_text(json.dumps([{"question": "who?", "video_id": 2}]))
    with pytest.raises(LayoutError, match=r"entry \[0\] needs question, answer and video_id"):
        import_dataset("msvd-qa", root, tmp_path / "q.jsonl")


# ---- MMBench TSV --------------------------------------------------------------------------------------------------
def _b64(level: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (level, 0, 0)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_mmbench_tsv_decodes_images_and_reads_the_correct_option(tmp_path, capsys):
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source", "l2-category",
              "comment", "split"]
    rows = [["0", "What colour is it?", "nan", "red", "blue", "nan", "nan", "A", "attribute_recognition", _b64(200),
             "x", "finegrained_perception", "nan", "dev"],
            ["1", "Is it square?", "Look closely.", "yes", "no", "maybe", "nan", "B", "spatial", "0", "x", "l2",
             "nan", "dev"]]
    tsv = tmp_path / "MMBench_DEV_EN.tsv"
    tsv.write_text("\n".join("\t".join(r) for r in [header, *rows]) + "\n")
    assert main(["data", "import", "mmbench", str(tsv), "--out", str(tmp_path / "m.jsonl")]) in (0, None)
    got = _rows(tmp_path / "m.jsonl")
    assert got[0]["options"] == ["red", "blue"] and got[0]["answer"] == "red" and got[0]["answer_letter"] == "A"
    assert got[1]["options"] == ["yes", "no", "maybe"] and got[1]["answers"] == ["no"]
    assert got[1]["question"] == "Look closely.\nIs it square?" and got[1]["question_type"] == "spatial"
    assert got[1]["image"] == got[0]["image"]                     # the second row refers to row 0's image
    assert Image.open(got[0]["image"]).getpixel((0, 0)) == (200, 0, 0)
    rows[0][7] = "C"
    tsv.write_text("\n".join("\t".join(r) for r in [header, *rows]) + "\n")
    with pytest.raises(LayoutError, match=r"MMBench_DEV_EN.tsv line 2: answer 'C' is not one of its options A, B"):
        import_dataset("mmbench", tsv, tmp_path / "m.jsonl")


@pytest.mark.parametrize("name,folder", [("vqav2-val", "vqa"), ("textvqa-val", "textvqa")])
def test_vqa_protocols_run_from_the_shipped_layout(name, folder, tmp_path, capsys):
    import torch

    from polymodal.data.text import train_tokenizer
    from polymodal.eval.benchmark import PROTOCOLS
    from polymodal.models.factory import create_model
    from polymodal.models.vqa import VQAModel
    root = tmp_path / "data" / folder
    if name == "vqav2-val":
        _vqav2(root)
    else:
        root.mkdir(parents=True)
        (root / "TextVQA_0.5.1_val.json").write_text(json.dumps({"dataset_type": "val", "data": [
            {"question": "what is written?", "image_id": "x1", "question_id": 1, "answers": ["stop"] * 10}]}))
        _image(root / "train_images" / "x1.jpg")
    torch.manual_seed(0)
    tok = train_tokenizer(["how many dogs are in image", "what is written", "stop", "2"] * 5, vocab_size=200)
    VQAModel(create_model("coca-tiny", tokenizer=tok), ["2", "stop"], [3, 1]).save_pretrained(tmp_path / "vqa_model")
    out = tmp_path / "table.md"
    assert main(["benchmark", str(tmp_path / "vqa_model"), "--dataset", name, "--root", str(tmp_path / "data"),
                 "--cache", str(tmp_path / "cache"), "--out", str(out), "--device", "cpu"]) == 0, capsys.readouterr().err
    (row,) = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert all(k in row["metrics"] for k in PROTOCOLS[name].headline) and row["task"] == "vqa"
    assert row["metrics"]["num_questions"] == 1
    # the baseline is the model's stored majority ("2"): right on VQAv2's question, wrong on TextVQA's
    assert row["metrics"]["majority_vqa_accuracy"] == (100.0 if name == "vqav2-val" else 0.0)


@pytest.mark.parametrize("name", ["msrvtt-qa", "msvd-qa"])
def test_video_qa_protocols_run_from_the_shipped_layout(name, tmp_path, capsys):
    """`polymodal benchmark` on the released MSRVTT-QA / MSVD-QA layouts: the test split, one answer per question,
    scored by a video VQA model at its own frame count; the numbers equal `polymodal eval` on the imported set."""
    import torch

    from polymodal.data.text import train_tokenizer
    from polymodal.eval.benchmark import PROTOCOLS
    from polymodal.models.factory import create_model
    from polymodal.models.vqa import VQAModel
    root = tmp_path / "data" / name
    root.mkdir(parents=True)
    qa = [{"answer": "dog", "id": 0, "question": "what is running?", "video_id": 1},
          {"answer": "man", "id": 1, "question": "who is singing?", "video_id": 2}]
    (root / "test_qa.json").write_text(json.dumps(qa))
    (root / "train_qa.json").write_text(json.dumps([{**qa[0], "video_id": 3}]))     # not read by the protocol
    if name == "msrvtt-qa":
        for i in (1, 2):
            _video(root / "video" / f"video{i}.mp4")
    else:
        (root / "youtube_mapping.txt").write_text("clipA_1_5 vid1\nclipB_2_9 vid2\nclipC_0_3 vid3\n")
        for clip in ("clipA_1_5", "clipB_2_9"):
            _video(root / "YouTubeClips" / f"{clip}.avi")
    torch.manual_seed(0)
    tok = train_tokenizer(["what is running", "who is singing", "dog", "man"] * 5, vocab_size=200)
    VQAModel(create_model("coca-tiny", tokenizer=tok), ["dog", "man"], [3, 1], {"who": "man"},
             num_frames=2).save_pretrained(tmp_path / "vqa_model")
    out = tmp_path / "table.md"
    assert main(["benchmark", str(tmp_path / "vqa_model"), "--dataset", name, "--root", str(tmp_path / "data"),
                 "--cache", str(tmp_path / "cache"), "--out", str(out), "--device", "cpu"]) == 0, capsys.readouterr().err
    (row,) = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert row["task"] == "vqa" and all(k in row["metrics"] for k in PROTOCOLS[name].headline)
    assert row["metrics"]["num_questions"] == 2
    # the stored majority: "dog" overall, "man" for who-questions: right on both questions
    assert row["metrics"]["majority_vqa_accuracy"] == 100.0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "vqa_model"), "--task", "vqa", "--data", row["manifest"]]) == 0
    assert json.loads(capsys.readouterr().out) == pytest.approx(row["metrics"])
