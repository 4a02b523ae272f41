"""`polymodal data import`: readers of public layouts, each on a small fixture built in its exact layout."""
import json
from pathlib import Path

import pytest
from PIL import Image

from polymodal.cli import main
from polymodal.data.importers import FORMATS, import_dataset
from polymodal.data.importers.common import LayoutError
from polymodal.data.manifests import read_manifest


def _image(path: Path, color=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), color).save(path)
    return path


def _karpathy_coco(root: Path) -> Path:
    """COCO root as shipped: train2014/, val2014/ and caption_datasets' dataset_coco.json (in a subfolder)."""
    images = []
    for k, (folder, split) in enumerate([("val2014", "test"), ("val2014", "test"), ("train2014", "train"),
                                         ("val2014", "restval")]):
        name = f"COCO_{folder}_{k:012d}.jpg"
        _image(root / folder / name, (40 * k, 10, 10))
        images.append({"filepath": folder, "filename": name, "imgid": k, "cocoid": k, "split": split,
                       "sentids": [2 * k, 2 * k + 1],
                       "sentences": [{"raw": f"image {k} caption a ", "tokens": ["image"], "imgid": k, "sentid": 2 * k},
                                     {"raw": f"image {k} caption b", "tokens": ["image"], "imgid": k,
                                      "sentid": 2 * k + 1}]})
    (root / "karpathy").mkdir(parents=True, exist_ok=True)
    (root / "karpathy" / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    return root


def test_karpathy_coco_groups_captions_per_image_and_keeps_splits(tmp_path):
    root = _karpathy_coco(tmp_path / "coco")
    summary = import_dataset("karpathy", root, tmp_path / "all.jsonl")
    assert summary["num_records"] == 4 and summary["num_texts"] == 8 and summary["splits"] == ["restval", "test", "train"]
    recs = read_manifest(tmp_path / "all.jsonl").records
    assert recs[2]["image"] == str((root / "train2014" / "COCO_train2014_000000000002.jpg").resolve())
    assert recs[0]["captions"] == ["image 0 caption a", "image 0 caption b"]
    test = import_dataset("karpathy", root / "karpathy" / "dataset_coco.json", tmp_path / "t.jsonl", split="test")
    assert test["num_records"] == 2
    with pytest.raises(LayoutError, match="no split 'dev'; it has restval, test, train"):
        import_dataset("karpathy", root, tmp_path / "x.jsonl", split="dev")


def test_karpathy_flickr_finds_its_image_folder_and_notes_missing_images(tmp_path):
    root = tmp_path / "flickr30k"
    _image(root / "flickr30k-images" / "1.jpg")
    images = [{"filename": "1.jpg", "split": "test", "sentences": [{"raw": "a dog"}]},
              {"filename": "2.jpg", "split": "test", "sentences": [{"raw": "a cat"}]}]
    (root / "dataset_flickr30k.json").write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    summary = import_dataset("karpathy", root, tmp_path / "f.jsonl", split="test")
    assert summary["num_records"] == 1 and "1 image(s) listed in dataset_flickr30k.json" in summary["notes"][0]


def test_data_import_command_prints_the_summary_and_errors_are_one_line(tmp_path, capsys):
    root = _karpathy_coco(tmp_path / "coco")
    assert main(["data", "import", "karpathy", str(root), "--out", str(tmp_path / "m.jsonl"), "--split", "test"]) == 0
    assert json.loads(capsys.readouterr().out)["num_records"] == 2
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "dataset_coco.json").write_text("{not json")
    assert main(["data", "import", "karpathy", str(tmp_path / "bad"), "--out", str(tmp_path / "b.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "dataset_coco.json: not valid JSON (line 1" in err


def test_every_format_has_a_reader_with_a_layout_docstring():
    from polymodal.data.importers import reader
    for fmt in FORMATS:
        fn = reader(fmt)
        doc = __import__(fn.__module__, fromlist=["x"]).__doc__
        assert doc and f"`{fmt}`" in doc, fmt


@pytest.fixture
def saved_clip(tmp_path):
    import torch

    from polymodal.data.text import train_tokenizer
    from polymodal.models.factory import create_model
    torch.manual_seed(0)
    texts = [f"image {k} caption {c}" for k in range(4) for c in "ab"]
    create_model("tiny", tokenizer=train_tokenizer(texts * 3, kind="bpe", vocab_size=100)).save_pretrained(
        tmp_path / "clip")
    return tmp_path / "clip"


def test_benchmark_runs_named_protocols_into_one_table_and_continues_from_its_cache(tmp_path, saved_clip, capsys):
    coco = _karpathy_coco(tmp_path / "data" / "coco")
    out = tmp_path / "bench" / "table.md"
    args = ["benchmark", str(saved_clip), "--dataset", "coco-5k", "--root", str(tmp_path / "data"),
            "--out", str(out), "--cache", str(tmp_path / "cache"), "--device", "cpu"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "| coco-5k | retrieval |" in first and "importing" in first
    table = json.loads(out.with_suffix(".json").read_text())
    row = table["rows"][0]
    assert row["metrics"]["num_images"] == 2 and row["metrics"]["num_texts"] == 4         # the test split only
    assert out.with_suffix(".csv").read_text().startswith("dataset,task,text_to_image_R@1")
    # The protocol's numbers equal `polymodal eval` on the same set written by hand as our manifest.
    hand = tmp_path / "hand.jsonl"
    hand.write_text("".join(json.dumps({"image": str(coco / "val2014" / f"COCO_val2014_{k:012d}.jpg"),
                                        "captions": [f"image {k} caption a", f"image {k} caption b"]}) + "\n"
                            for k in (0, 1)))
    assert main(["eval", str(saved_clip), "--task", "retrieval", "--data", str(hand)]) == 0
    by_hand = json.loads(capsys.readouterr().out)
    assert row["metrics"] == pytest.approx(by_hand)
    # Run again: the finished dataset comes from the cache.
    assert main(args) == 0
    assert "coco-5k: cached" in capsys.readouterr().out


def test_benchmark_errors_name_the_flag(tmp_path, saved_clip, capsys):
    assert main(["benchmark", str(saved_clip), "--dataset", "coco5k", "--root", str(tmp_path)]) == 2
    assert "unknown protocol 'coco5k' (did you mean 'coco-5k'?)" in capsys.readouterr().err
    assert main(["benchmark", str(saved_clip), "--dataset", "coco-5k", "--root", str(tmp_path / "nope")]) == 2
    assert "--root:" in capsys.readouterr().err


@pytest.mark.parametrize("content,hint", [
    (lambda p: __import__("gzip").open(p, "wt").write('{"chosen": "a"}\n'), "data import hh-rlhf"),
    (lambda p: __import__("pickle").dump({"v1": [["a", "dog"]]}, open(p, "wb")), "data import msvd"),
    (lambda p: p.write_text(json.dumps([{"image": "x.jpg", "caption": "a"}])), "data import lavis"),
    (lambda p: p.write_text(json.dumps({"images": [{"filename": "a.jpg", "sentences": [{"raw": "a"}]}]})),
     "data import karpathy"),
    (lambda p: p.write_text(json.dumps({"images": [{"id": 1}], "annotations": [{"image_id": 1, "caption": "a"}]})),
     "data import coco-captions"),
])
def test_a_file_of_another_layout_is_named_with_the_import_that_reads_it(tmp_path, content, hint):
    from polymodal.data.manifests import ManifestError
    path = tmp_path / "data.jsonl"
    content(path)
    with pytest.raises(ManifestError, match=hint):
        read_manifest(path)


def test_a_tar_and_an_openclip_csv_are_named_too(tmp_path):
    import io
    import tarfile

    from polymodal.data.sniff import sniff
    with tarfile.open(tmp_path / "x.tar", "w") as tar:
        info = tarfile.TarInfo("a.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"a"))
    assert "data.shards" in sniff(tmp_path / "x.tar")
    (tmp_path / "t.csv").write_text("filepath\ttitle\nimg/1.jpg\ta dog\n")
    assert "data import csv" in sniff(tmp_path / "t.csv")
    (tmp_path / "plain.jsonl").write_text('{"image": "a.jpg", "caption": "x"}\n')
    assert sniff(tmp_path / "plain.jsonl") == ""


def test_eval_hints_name_its_own_flags(tmp_path, saved_clip, capsys):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"image": "missing.png", "caption": "a"}\n')
    assert main(["eval", str(saved_clip), "--task", "retrieval", "--data", str(manifest)]) == 2
    err = capsys.readouterr().err
    assert "--on-bad-record skip" in err and "data.on_bad_record" not in err


def test_zeroshot_json_lists_the_class_names_and_templates_it_used(tmp_path, saved_clip, capsys):
    for k, name in enumerate(("cat", "dog")):
        _image(tmp_path / "photos" / name / "1.png", (100 * k, 50, 50))
    assert main(["eval", str(saved_clip), "--task", "zeroshot", "--data", str(tmp_path / "photos")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["class_names"] == ["cat", "dog"] and "a photo of a {}." in out["templates"]


def test_an_unknown_reader_option_is_one_line(tmp_path, capsys):
    root = _karpathy_coco(tmp_path / "coco")
    assert main(["data", "import", "karpathy", str(root), "--out", str(tmp_path / "m.jsonl"), "-o", "spilt=test"]) == 2
    assert "karpathy: unknown option 'spilt'" in capsys.readouterr().err
