"""`polymodal benchmark` runs every named video and preference protocol on fixtures in the datasets' own layouts
(the image protocols: tests/test_importers.py). Each row's numbers equal `polymodal eval` on the imported set."""
import json

import pytest
import torch

from polymodal.cli import main
from test_importers_preference import _hh, _ultrafeedback
from test_importers_video import _activitynet, _didemo, _msrvtt, _msvd


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from polymodal.data.text import train_tokenizer
    from polymodal.models.factory import create_model
    from polymodal.models.reward import TextRewardModel
    from polymodal.models.video import VideoCLIP
    root = tmp_path_factory.mktemp("models")
    tok = train_tokenizer(["a man is cooking", "two dogs run", "a woman sings", "a car drives", "hello"] * 3,
                          kind="bpe", vocab_size=120)
    torch.manual_seed(0)
    VideoCLIP.from_image_model(create_model("tiny", tokenizer=tok)).save_pretrained(root / "video")
    TextRewardModel.from_tokenizer(tok, {"width": 32, "layers": 1, "heads": 2}).save_pretrained(root / "reward")
    return root


@pytest.mark.parametrize("name,build,folder,model", [
    ("msrvtt-1ka", _msrvtt, "msrvtt", "video"), ("msvd", _msvd, "msvd", "video"),
    ("didemo", _didemo, "didemo", "video"), ("activitynet", _activitynet, "activitynet", "video"),
    ("hh-rlhf", _hh, "hh-rlhf", "reward"), ("ultrafeedback", _ultrafeedback, "ultrafeedback", "reward")])
def test_protocol_runs_from_the_shipped_layout(name, build, folder, model, models, tmp_path, capsys):
    from polymodal.eval.benchmark import PROTOCOLS
    build(tmp_path / "data" / folder)
    out = tmp_path / "table.md"
    assert main(["benchmark", str(models / model), "--dataset", name, "--root", str(tmp_path / "data"),
                 "--cache", str(tmp_path / "cache"), "--out", str(out), "--device", "cpu"]) == 0
    (row,) = json.loads(out.with_suffix(".json").read_text())["rows"]
    p = PROTOCOLS[name]
    assert row["task"] == p.task and all(k in row["metrics"] for k in p.headline)
    # The same numbers from `polymodal eval` on the imported manifest with the protocol's options.
    capsys.readouterr()
    argv = ["eval", str(models / model), "--task", p.task, "--data", row["manifest"]]
    for k, v in row["options"].items():
        argv += ["-o", f"{k}={json.dumps(v) if not isinstance(v, str) else v}"]
    assert main(argv) == 0
    again = json.loads(capsys.readouterr().out)
    assert again == pytest.approx(row["metrics"])
    if p.options.get("paragraph"):
        assert row["metrics"]["num_texts"] == row["metrics"]["num_videos"]       # one paragraph per video


def _imagenet(root):
    from test_importers_image import _image
    for k, wnid in enumerate(["n01440764", "n01443537"]):          # tench, goldfish
        for i in range(2):
            _image(root / "val" / wnid / f"ILSVRC2012_val_{k}{i}.JPEG", (120 * k, 40 * i, 90), fmt="JPEG")
    return root


def _urban1k(root):
    from test_importers_image import LONG, _image
    for n in (1, 2, 3):
        _image(root / "image" / f"{n}.jpg", (80 * n, 20, 20))
        (root / "caption").mkdir(parents=True, exist_ok=True)
        (root / "caption" / f"{n}.txt").write_text(f"Scene {n}. " + LONG + "\n")
    return root


def _sharegpt4v(root):
    from test_importers_image import _image
    entries = []
    for k in range(3):
        _image(root / "coco" / f"{k}.jpg", (70 * k, 10, 10))
        entries.append({"id": str(k), "image": f"coco/{k}.jpg", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image."},
            {"from": "gpt", "value": f"Picture {k} shows a bowl. It is on a table."}]})
    (root / "share-captioner_coco_lcs_sam_1246k_1107.json").write_text(json.dumps(entries))
    return root


def _iiw(root):
    from test_importers_image import _image
    (root / "IIW-400").mkdir(parents=True)
    (root / "IIW-400" / "data.jsonl").write_text("\n".join(json.dumps(
        {"IIW": f"A photo number {k}. It has a wall.", "image/key": f"aar_test_0460{k}"}) for k in range(2)) + "\n")
    for k in range(2):
        _image(root / "IIW-400" / "images" / f"aar_test_0460{k}.jpg", (100 * k, 5, 5))
    return root


def _chinese(root, split):
    from test_importers_image import _chinese_clip
    _chinese_clip(root)
    if split != "test":
        for f in ("imgs.tsv", "texts.jsonl"):
            (root / f"test_{f}").rename(root / f"{split}_{f}")
    return root


def _coco_cn(root):
    from test_importers_image import _coco_cn
    _coco_cn(root)
    return root


@pytest.mark.parametrize("name,build,folder", [
    ("imagenet-1k", _imagenet, "imagenet"), ("imagenet-cn", _imagenet, "imagenet"),
    ("urban1k", _urban1k, "Urban1k"), ("dci", lambda r: __import__("test_importers_image")._dci(r), "dci"),
    ("iiw", _iiw, "iiw"), ("sharegpt4v-1k", _sharegpt4v, "sharegpt4v"), ("sharegpt4v-10k", _sharegpt4v, "sharegpt4v"),
    ("flickr30k-cn", lambda r: _chinese(r, "test"), "Flickr30k-CN"), ("muge", lambda r: _chinese(r, "valid"), "MUGE"),
    ("coco-cn", _coco_cn, "coco-cn"),
    ("flickr30k-1k", lambda r: __import__("test_importers")._karpathy_coco(r), "flickr30k")])
def test_image_protocol_runs_from_the_shipped_layout(name, build, folder, tmp_path, capsys):
    from polymodal.eval.benchmark import PROTOCOLS
    from polymodal.data.text import train_tokenizer
    from polymodal.models.factory import create_model
    build(tmp_path / "data" / folder)
    torch.manual_seed(0)
    texts = ["a photo of a tench", "scene one", "高级感托特包斜挎", "红色的方块", "一个男人", "picture of a bowl"]
    create_model("tiny", tokenizer=train_tokenizer(texts * 3, kind="bpe", vocab_size=300)).save_pretrained(
        tmp_path / "clip")
    out = tmp_path / "table.md"
    assert main(["benchmark", str(tmp_path / "clip"), "--dataset", name, "--root", str(tmp_path / "data"),
                 "--cache", str(tmp_path / "cache"), "--out", str(out), "--device", "cpu"]) == 0, capsys.readouterr().err
    (row,) = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert all(k in row["metrics"] for k in PROTOCOLS[name].headline) and row["task"] == PROTOCOLS[name].task
    if name == "muge":                               # one text with two correct images is one query
        assert row["metrics"]["num_texts"] == 2 and row["metrics"]["num_images"] == 2


def test_a_benchmark_stopped_half_way_continues_from_its_cached_features(models, tmp_path, monkeypatch, capsys):
    """Killed while encoding the third of three videos (one video a chunk), the rerun encodes that video only and
    prints the same numbers as a run never stopped; the chunks are deleted once the numbers are written."""
    from polymodal import feature_cache
    from polymodal.eval import video_retrieval
    monkeypatch.setitem(feature_cache.CHUNK, "videos", 1)
    monkeypatch.setitem(feature_cache.CHUNK, "texts", 1)
    _msrvtt(tmp_path / "data" / "msrvtt")
    plain = video_retrieval.video_features
    encoded = []

    def stop_at_third(model, frames, valid, records):
        if len(encoded) == 2 and stop:
            raise KeyboardInterrupt("stopped")
        encoded.extend(r["video"] for r in records)
        return plain(model, frames, valid, records)
    monkeypatch.setattr(video_retrieval, "video_features", stop_at_third)
    argv = ["benchmark", str(models / "video"), "--dataset", "msrvtt-1ka", "--root", str(tmp_path / "data"),
            "--device", "cpu"]
    stop = True
    with pytest.raises(KeyboardInterrupt):
        main(argv + ["--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "a.md")])
    (features,) = (tmp_path / "cache" / "msrvtt-1ka").glob("*/features-*")
    assert len(list((features / "videos").glob("*.safetensors"))) == 2
    stop, first = False, list(encoded)
    encoded.clear()
    assert main(argv + ["--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "a.md")]) == 0
    assert len(encoded) == 1 and encoded[0] not in first                   # only the video not finished before
    assert "2 feature chunk(s) from the stopped run" in capsys.readouterr().out
    assert not features.exists()
    encoded.clear()
    assert main(argv + ["--cache", str(tmp_path / "fresh"), "--out", str(tmp_path / "b.md")]) == 0
    assert len(encoded) == 3
    resumed, fresh = (json.loads((tmp_path / f"{n}.json").read_text())["rows"][0]["metrics"] for n in "ab")
    assert resumed == pytest.approx(fresh) and resumed["num_videos"] == 3


def test_feature_chunks_are_read_back_whole_or_encoded_again(tmp_path):
    """Image and text chunks read back equal the encoded ones (the skip list too); a damaged chunk is encoded again."""
    from polymodal import feature_cache
    from polymodal.data.text import train_tokenizer
    from polymodal.encode import encode_image_files, encode_texts
    from polymodal.models.factory import create_model
    from test_importers_image import _image
    torch.manual_seed(0)
    model = create_model("tiny", tokenizer=train_tokenizer(["a red square", "a blue disc"] * 3, kind="bpe",
                                                           vocab_size=100)).eval()
    paths = [str(_image(tmp_path / f"{i}.png", (30 * i, 10, 10))) for i in range(5)]
    (tmp_path / "bad.png").write_bytes(b"not an image")
    paths.insert(2, str(tmp_path / "bad.png"))
    texts = ["a red square", "a blue disc", "a red disc"]
    want_img, want_kept = encode_image_files(model, paths, batch_size=2, skip_unreadable=True)
    want_txt = encode_texts(model, texts)
    for run in range(2):
        with feature_cache.caching(tmp_path / "cache", {"images": 2, "texts": 2}) as cache:
            img, kept = encode_image_files(model, paths, batch_size=2, skip_unreadable=True)
            txt = encode_texts(model, texts)
        assert kept == want_kept == [0, 1, 3, 4, 5]
        assert torch.allclose(img, want_img, atol=1e-6) and torch.allclose(txt, want_txt, atol=1e-6)
        assert (cache.loaded, cache.written) == ((0, 5) if run == 0 else (5, 0))
    damaged = sorted((tmp_path / "cache" / "images").glob("*.safetensors"))[0]
    damaged.write_bytes(damaged.read_bytes()[:40])
    with feature_cache.caching(tmp_path / "cache", {"images": 2, "texts": 2}) as cache:
        img, _ = encode_image_files(model, paths, batch_size=2, skip_unreadable=True)
    assert (cache.loaded, cache.written) == (2, 1) and torch.allclose(img, want_img, atol=1e-6)
