"""`polymodal data import` for video layouts (MSR-VTT, MSVD, DiDeMo, ActivityNet Captions) and LLaVA conversations.

Each fixture is built here in the layout's exact files and folders (see each reader's docstring for the public code
it was read from); the videos are 3-frame 32 px clips written with PyAV in the container the layout names.
"""
import json
import os
import pickle
from pathlib import Path

import av
import numpy as np
import pytest

from polymodal.cli import main
from polymodal.data.importers import import_dataset
from polymodal.data.importers.common import LayoutError
from polymodal.data.manifests import read_manifest

CODECS = {".mp4": "mpeg4", ".avi": "mpeg4", ".mov": "mpeg4", ".mkv": "mpeg4", ".webm": "libvpx"}


def _video(path: Path, level: int = 0) -> Path:
    """A 3-frame 32x32 clip in the container of `path`'s suffix; frame i is a grey of level+40*i."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as c:
        s = c.add_stream(CODECS[path.suffix], rate=3)
        s.width = s.height = 32
        s.pix_fmt = "yuv420p"
        for i in range(3):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), level + 40 * i, np.uint8), format="rgb24")
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def _records(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# ---- MSR-VTT (CLIP4Clip's msrvtt_data.zip + MSRVTT_Videos/) -------------------------------------------------
def _msrvtt(root: Path, video_folder: str = "MSRVTT_Videos") -> Path:
    data = root / "msrvtt_data"
    data.mkdir(parents=True)
    (data / "MSRVTT_JSFUSION_test.csv").write_text(
        "key,vid_key,video_id,sentence\n"
        "ret0,msr7010,video7010,a man is cooking\n"
        "ret1,msr7011,video7011,\"two dogs run, then stop\"\n"
        "ret2,msr7012,video7012,a woman sings\n")
    (data / "MSRVTT_train.9k.csv").write_text("video_id\nvideo0\nvideo1\nvideo2\n")
    (data / "MSRVTT_train.7k.csv").write_text("video_id\nvideo0\nvideo1\n")
    sentences = [{"caption": c, "video_id": v, "sen_id": k} for k, (v, c) in enumerate([
        ("video1", "a car drives"), ("video0", "a cat sleeps"), ("video1", "a red car on a road "),
        ("video0", "a kitten naps"), ("video2", "people dance"), ("video7010", "cooking (test, not used)")])]
    videos = [{"video_id": f"video{i}", "url": f"https://www.youtube.com/watch?v=x{i}", "split": "train"}
              for i in range(3)]
    (data / "MSRVTT_data.json").write_text(json.dumps({"info": {}, "videos": videos, "sentences": sentences}))
    for i, vid in enumerate(["video0", "video1", "video2", "video7010", "video7011"]):
        _video(root / video_folder / f"{vid}.mp4", 10 * i)
    _video(root / video_folder / "video7012.webm", 60)          # CLIP4Clip falls back to .webm
    return root


def test_msrvtt_test_split_is_1k_a_with_one_caption_per_video(tmp_path):
    root = _msrvtt(tmp_path / "msrvtt")
    summary = import_dataset("msrvtt", root, tmp_path / "test.jsonl", split="test")
    assert summary["kind"] == "video" and summary["num_records"] == 3 and summary["num_texts"] == 3
    recs = read_manifest(tmp_path / "test.jsonl", media="video").records
    assert [r["captions"] for r in recs] == [["a man is cooking"], ["two dogs run, then stop"], ["a woman sings"]]
    assert recs[0]["video"] == str((root / "MSRVTT_Videos" / "video7010.mp4").resolve())
    assert recs[2]["video"] == str((root / "MSRVTT_Videos" / "video7012.webm").resolve())
    assert {r["split"] for r in recs} == {"test"} and recs[1]["id"] == "video7011"


def test_msrvtt_training_splits_group_every_caption_of_a_video_in_json_order(tmp_path):
    root = _msrvtt(tmp_path / "msrvtt")
    summary = import_dataset("msrvtt", root, tmp_path / "all.jsonl")
    assert summary["splits"] == ["test", "train7k", "train9k"] and summary["num_records"] == 3 + 3 + 2
    by_split = {}
    for r in _records(tmp_path / "all.jsonl"):
        by_split.setdefault(r["split"], []).append(r)
    assert [r["id"] for r in by_split["train9k"]] == ["video0", "video1", "video2"]
    assert by_split["train9k"][0]["captions"] == ["a cat sleeps", "a kitten naps"]
    assert by_split["train9k"][1]["captions"] == ["a car drives", "a red car on a road"]
    assert [r["id"] for r in by_split["train7k"]] == ["video0", "video1"]


def test_msrvtt_from_the_csv_file_finds_videos_all_and_notes_missing_videos(tmp_path):
    root = _msrvtt(tmp_path / "msrvtt", video_folder="videos/all")
    os.remove(root / "videos" / "all" / "video1.mp4")
    summary = import_dataset("msrvtt", root / "msrvtt_data" / "MSRVTT_train.9k.csv", tmp_path / "t.jsonl",
                             split="train9k")
    assert summary["num_records"] == 2
    assert summary["notes"] == ["1 video(s) listed in MSRVTT_train.9k.csv were not found and were left out "
                                "(first: video1.mp4)"]
    with pytest.raises(LayoutError, match="no split 'val'; it has test, train7k, train9k"):
        import_dataset("msrvtt", root, tmp_path / "x.jsonl", split="val")


def test_msrvtt_with_no_video_in_place_names_the_folders_and_the_option(tmp_path):
    root = _msrvtt(tmp_path / "msrvtt", video_folder="elsewhere")
    with pytest.raises(LayoutError, match=r"none of the 3 listed videos was found .*-o video_root=FOLDER"):
        import_dataset("msrvtt", root, tmp_path / "x.jsonl", split="test")
    summary = import_dataset("msrvtt", root, tmp_path / "t.jsonl", split="test", video_root=root / "elsewhere")
    assert summary["num_records"] == 3
    with pytest.raises(LayoutError, match="msrvtt: unknown option 'video_dir' \\(did you mean 'video_root'\\?\\)"):
        import_dataset("msrvtt", root, tmp_path / "x.jsonl", video_dir=root)


def test_msrvtt_training_splits_without_the_caption_json_are_named(tmp_path):
    root = _msrvtt(tmp_path / "msrvtt")
    os.remove(root / "msrvtt_data" / "MSRVTT_data.json")
    summary = import_dataset("msrvtt", root, tmp_path / "t.jsonl")
    assert summary["splits"] == ["test"]
    assert summary["notes"] == ["train9k, train7k left out: MSRVTT_data.json (their captions) not found"]
    with pytest.raises(FileNotFoundError, match="split train9k takes its captions from MSRVTT_data.json"):
        import_dataset("msrvtt", root, tmp_path / "x.jsonl", split="train9k")
    os.remove(root / "msrvtt_data" / "MSRVTT_JSFUSION_test.csv")
    with pytest.raises(FileNotFoundError, match="the training splits take their captions from MSRVTT_data.json"):
        import_dataset("msrvtt", root, tmp_path / "x.jsonl")


def test_an_imported_video_decodes(tmp_path):
    from polymodal.data.video import read_video
    root = _msrvtt(tmp_path / "msrvtt")
    import_dataset("msrvtt", root, tmp_path / "t.jsonl", split="test")
    rec = read_manifest(tmp_path / "t.jsonl", media="video").records[2]         # the .webm one
    clip = read_video(rec["video"], num_frames=3)
    assert len(clip.frames) == 3


# ---- MSVD (CLIP4Clip's msvd_data.zip: raw-captions.pkl + split lists; YouTubeClips/*.avi) ---------------------
MSVD_CAPTIONS = {"-4wsuPCjDBc_5_15": [["a", "squirrel", "eats"], ["a", "chipmunk", "is", "eating"]],
                 "-7KMZQEsJW4_205_208": [["a", "man", "plays", "a", "guitar"]],
                 "00jrXRMlZOY_0_10": [["a", "boy", "runs"]]}


def _msvd(root: Path, captions=MSVD_CAPTIONS, protocol: int = 4) -> Path:
    data = root / "msvd_data"
    data.mkdir(parents=True)
    (data / "raw-captions.pkl").write_bytes(pickle.dumps(captions, protocol=protocol))
    (data / "train_list.txt").write_text("-4wsuPCjDBc_5_15\n-7KMZQEsJW4_205_208\n")
    (data / "val_list.txt").write_text("00jrXRMlZOY_0_10\n")
    (data / "test_list.txt").write_text("00jrXRMlZOY_0_10\nnot_captioned\n")
    for i, vid in enumerate(captions):
        _video(root / "YouTubeClips" / f"{vid}.avi", 20 * i)
    return root


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_msvd_joins_token_lists_and_keeps_the_split_lists(tmp_path, monkeypatch, protocol):
    def no_general_unpickling(*a, **k):
        raise AssertionError("pickle.load must not be used")
    monkeypatch.setattr(pickle, "load", no_general_unpickling)
    monkeypatch.setattr(pickle, "loads", no_general_unpickling)
    root = _msvd(tmp_path / "msvd", protocol=protocol)
    summary = import_dataset("msvd", root, tmp_path / "m.jsonl")
    assert summary["splits"] == ["test", "train", "val"] and summary["num_records"] == 4
    assert summary["notes"] == ["1 listed video(s) have no caption in raw-captions.pkl and were left out "
                                "(first: not_captioned)"]
    recs = _records(tmp_path / "m.jsonl")
    assert recs[0] == {"video": "msvd/YouTubeClips/-4wsuPCjDBc_5_15.avi", "id": "-4wsuPCjDBc_5_15",
                       "captions": ["a squirrel eats", "a chipmunk is eating"], "split": "train"}
    test = import_dataset("msvd", root / "msvd_data" / "raw-captions.pkl", tmp_path / "t.jsonl", split="test")
    assert test["num_records"] == 1 and test["num_texts"] == 1


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("protocol", [0, 4])
def test_msvd_refuses_a_pickle_that_would_run_code_and_runs_none_of_it(tmp_path, capsys, protocol):
    marker = tmp_path / "ran"
    root = _msvd(tmp_path / "msvd", captions={"-4wsuPCjDBc_5_15": [["a"]], "x": _Payload(marker)},
                 protocol=protocol)
    assert b"system" in (root / "msvd_data" / "raw-captions.pkl").read_bytes()
    with pytest.raises(LayoutError, match=r"raw-captions.pkl: refused to unpickle: it names the global "
                                          r"(posix|os|nt)\.system; .*nothing from it was run"):
        import_dataset("msvd", root, tmp_path / "x.jsonl")
    assert main(["data", "import", "msvd", str(root), "--out", str(tmp_path / "x.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "refused to unpickle" in err
    assert not marker.exists() and not (tmp_path / "x.jsonl").exists()


def test_msvd_refuses_captions_of_another_shape(tmp_path):
    root = _msvd(tmp_path / "msvd", captions={"-4wsuPCjDBc_5_15": [("a", "tuple")]})
    with pytest.raises(LayoutError, match="refused to unpickle: it holds a tuple"):
        import_dataset("msvd", root, tmp_path / "x.jsonl")


# ---- DiDeMo (CLIP4Clip's layout: <split>_data.json (+ <split>_list.txt); mixed containers) ----------------------
def _didemo(root: Path) -> Path:
    moments = {"train": [
        {"video": "10015567@N08_3655084291_d8b58466fa.mov", "description": "a dog jumps ", "times": [[0, 0], [0, 1]],
         "annotation_id": 1},
        {"video": "10015567@N08_3655084291_d8b58466fa.mov", "description": "the dog lands", "times": [[2, 3]],
         "annotation_id": 2},
        {"video": "10038375@N00_4432218563_5c9d0ad5f5.avi", "description": "a car passes", "times": [[4, 5]],
         "annotation_id": 3}],
        "test": [
        {"video": "12090392@N02_13482799053_87ef417396.mp4", "description": "waves hit rocks", "times": [[1, 1]]},
        {"video": "unlisted@N00_1_a.3gp", "description": "not in the list", "times": [[0, 0]]}]}
    for split, ms in moments.items():
        (root / f"{split}_data.json").parent.mkdir(parents=True, exist_ok=True)
        (root / f"{split}_data.json").write_text(json.dumps(ms))
    (root / "test_list.txt").write_text("12090392@N02_13482799053_87ef417396.mp4\n")
    _video(root / "DiDeMo_Videos" / "10015567@N08_3655084291_d8b58466fa.mov", 0)
    _video(root / "DiDeMo_Videos" / "10038375@N00_4432218563_5c9d0ad5f5.mp4", 50)    # re-encoded .avi
    _video(root / "DiDeMo_Videos" / "12090392@N02_13482799053_87ef417396.mkv", 90)
    return root


def test_didemo_groups_sentences_into_a_paragraph_and_finds_videos_by_stem(tmp_path):
    root = _didemo(tmp_path / "didemo")
    summary = import_dataset("didemo", root, tmp_path / "d.jsonl")
    assert summary["splits"] == ["test", "train"] and summary["num_records"] == 3
    assert summary["notes"] == ["1 video(s) of test_data.json are not in test_list.txt and were left out"]
    recs = read_manifest(tmp_path / "d.jsonl", media="video").records
    assert recs[0]["captions"] == ["a dog jumps", "the dog lands"]
    assert recs[0]["paragraph"] == "a dog jumps the dog lands"
    assert recs[0]["segments"] == [[0.0, 7.5], [10.0, 20.0]]
    assert recs[1]["video"] == str((root / "DiDeMo_Videos" / "10038375@N00_4432218563_5c9d0ad5f5.mp4").resolve())
    assert recs[2]["video"].endswith("87ef417396.mkv") and recs[2]["split"] == "test"


# ---- ActivityNet Captions (train.json / val_1.json; v_<id> videos) ------------------------------------------
def _activitynet(root: Path) -> Path:
    train = {"v_QOlSCBRmfWY": {"duration": 82.73, "timestamps": [[0.83, 19.86], [17.37, 60.81]],
                               "sentences": ["A young woman is seen standing in a room.", " She then dances. "]}}
    val = {"v_ehGHCYKzyZ8": {"duration": 61.72, "timestamps": [[0, 13.3], [13.3, 61.7]],
                             "sentences": ["A man holds a ball.", "He throws it."]},
           "v_absent00000": {"duration": 10.0, "timestamps": [[0, 10]], "sentences": ["Nothing here."]}}
    root.mkdir(parents=True)
    (root / "train.json").write_text(json.dumps(train))
    (root / "val_1.json").write_text(json.dumps(val))
    _video(root / "Activity_Videos" / "v_QOlSCBRmfWY.mp4", 0)
    _video(root / "Activity_Videos" / "ehGHCYKzyZ8.mkv", 70)        # CLIP4Clip's naming, without v_
    return root


def test_activitynet_writes_sentences_paragraph_and_timestamps(tmp_path):
    root = _activitynet(tmp_path / "anet")
    summary = import_dataset("activitynet", root, tmp_path / "a.jsonl")
    assert summary["splits"] == ["train", "val_1"] and summary["num_records"] == 2 and summary["num_texts"] == 4
    assert summary["notes"] == ["1 video(s) listed in val_1.json were not found and were left out "
                                "(first: v_absent00000.mp4)"]
    recs = read_manifest(tmp_path / "a.jsonl", media="video").records
    assert recs[0]["paragraph"] == "A young woman is seen standing in a room. She then dances."
    assert recs[0]["captions"] == ["A young woman is seen standing in a room.", "She then dances."]
    assert recs[0]["segments"] == [[0.83, 19.86], [17.37, 60.81]] and recs[0]["duration"] == 82.73
    assert recs[1]["video"] == str((root / "Activity_Videos" / "ehGHCYKzyZ8.mkv").resolve())
    val = import_dataset("activitynet", root / "val_1.json", tmp_path / "v.jsonl", split="val_1")
    assert val["num_records"] == 1


# ---- LLaVA conversations (llava_v1_5_mix665k.json + the image folder it is relative to) -----------------------
def _image(path: Path, color=(200, 30, 30)) -> Path:
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), color).save(path)
    return path


def _llava(data: Path) -> Path:
    """playground/data as LLaVA's README lays it out: the JSON beside coco/, gqa/ ..."""
    _image(data / "coco" / "train2017" / "000000000009.jpg")
    _image(data / "gqa" / "images" / "2354786.jpg", (20, 200, 20))
    entries = [
        {"id": "000000000009", "image": "coco/train2017/000000000009.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the picture?"}, {"from": "gpt", "value": "A cat."},
            {"from": "human", "value": "What colour is it?"}, {"from": "gpt", "value": "Black."}]},
        {"id": "2354786", "image": "gqa/images/2354786.jpg", "conversations": [
            {"from": "gpt", "value": "(a first turn that is not the human's: skipped)"},
            {"from": "human", "value": "Is there a dog?\n<image>"}, {"from": "gpt", "value": "No."}]},
        {"id": "sharegpt_1", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]},
        {"id": "broken", "image": "coco/train2017/000000000009.jpg", "conversations": [
            {"from": "human", "value": "<image>\nOne?"}, {"from": "human", "value": "Two?"}]},
        {"id": "gone", "image": "vg/VG_100K/1.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhere?"}, {"from": "gpt", "value": "Here."}]}]
    data.mkdir(parents=True, exist_ok=True)
    (data / "llava_v1_5_mix665k.json").write_text(json.dumps(entries))
    return data / "llava_v1_5_mix665k.json"


def test_llava_writes_one_question_answer_record_per_turn_pair(tmp_path):
    path = _llava(tmp_path / "playground" / "data")
    summary = import_dataset("llava", path, tmp_path / "llava.jsonl")
    assert summary["kind"] == "mllm" and summary["num_records"] == 3
    assert summary["notes"] == [
        "1 conversation(s) whose turns do not alternate human / gpt (or whose image is not one path) were left out "
        "(first id: broken)",
        "1 text-only conversation(s) (no image) were left out: the MLLM reads an image for every record "
        "(-o text_only=keep writes them)",
        f"1 conversation(s) whose image is not under {path.parent} were left out (first: vg/VG_100K/1.jpg)"]
    recs = _records(tmp_path / "llava.jsonl")
    assert recs[0] == {"image": "playground/data/coco/train2017/000000000009.jpg", "prompt": "What is in the picture?",
                       "answer": "A cat.", "options": [], "kind": "instruction", "id": "000000000009", "turn": 0}
    assert [(r["prompt"], r["answer"], r["turn"]) for r in recs[1:]] == [
        ("What colour is it?", "Black.", 1), ("Is there a dog?", "No.", 0)]


def test_llava_options_history_text_only_and_image_root(tmp_path):
    path = _llava(tmp_path / "playground" / "data")
    elsewhere = tmp_path / "annotations" / "llava_v1_5_mix665k.json"
    elsewhere.parent.mkdir()
    elsewhere.write_text(path.read_text())
    with pytest.raises(LayoutError, match="none of the 3 images was found .* -o image_root=FOLDER"):
        import_dataset("llava", elsewhere, tmp_path / "x.jsonl")
    import_dataset("llava", elsewhere, tmp_path / "h.jsonl", image_root=path.parent, history=True, text_only="keep")
    recs = _records(tmp_path / "h.jsonl")
    assert recs[1]["prompt"] == "Human: What is in the picture?\nAssistant: A cat.\nHuman: What colour is it?"
    assert recs[3] == {"prompt": "Hi", "answer": "Hello!", "options": [], "kind": "instruction", "id": "sharegpt_1",
                       "turn": 0}
    with pytest.raises(LayoutError, match="llava: history must be true or false"):
        import_dataset("llava", path, tmp_path / "x.jsonl", history="yes")
    with pytest.raises(LayoutError, match="no split 'train'; it has none"):
        import_dataset("llava", path, tmp_path / "x.jsonl", split="train")


def test_llava_records_train_the_asd_method(tmp_path, monkeypatch):
    from polymodal import methods
    from polymodal.methods.asd import ASDMethod, training_records
    from polymodal.train.run import load_recipe, run_recipe
    path = _llava(tmp_path / "playground" / "data")
    import_dataset("llava", path, tmp_path / "llava.jsonl")
    recs = training_records(tmp_path / "llava.jsonl")
    assert [r["image"] for r in recs] == [str(path.parent / "coco" / "train2017" / "000000000009.jpg")] * 2 + [
        str(path.parent / "gqa" / "images" / "2354786.jpg")]
    monkeypatch.setitem(methods.METHODS, "asd", ASDMethod)
    recipe = load_recipe(None, ["method=asd", f"out_dir={tmp_path / 'run'}", "model.name=mllm-tiny",
                                f"data.train={tmp_path / 'llava.jsonl'}", "model.overrides={lm.width: 32, lm.heads: 2}",
                                "data.batch_size=3", "train.steps=2", "train.progress=false", "train.threads=1",
                                "optim.warmup_steps=1", "tokenizer.vocab_size=300", "train.ckpt_every=0"])
    result = run_recipe(recipe)
    assert result["step"] == 2 and np.isfinite(result["loss"])
    assert result["weight"] == 1.0               # no concept question: every Skew is 0, plain fine-tuning
