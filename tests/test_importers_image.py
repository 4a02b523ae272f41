"""`polymodal data import`: image-text, classification and long-text readers, each on a tiny fixture built in
the exact layout its public code reads (see each reader's docstring), and the image-folder guards."""
import base64
import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from polymodal.cli import main
from polymodal.data.importers import FORMATS, import_dataset, reader
from polymodal.data.importers.common import LayoutError
from polymodal.data.manifests import ManifestError, read_image_folder, read_manifest

MY_FORMATS = ["lavis", "coco-captions", "csv", "chinese-clip", "coco-cn", "imagenet", "clip-benchmark-wds",
              "urban1k", "dci", "iiw", "sharegpt4v"]


def _image(path: Path, color=(200, 30, 30), fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), color).save(path, format=fmt)
    return path


def _image_bytes(color, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buf, format=fmt)
    return buf.getvalue()


def _read(out: Path) -> list:
    return read_manifest(out, required=("image",)).records


def _resolved(p: Path) -> str:
    return str(p.resolve())


def test_every_reader_docstring_names_its_source_layout_and_options():
    for fmt in MY_FORMATS:
        assert fmt in FORMATS
        doc = __import__(reader(fmt).__module__, fromlist=["x"]).__doc__
        assert doc.startswith(f"`{fmt}`"), fmt
        assert "Layout (" in doc and "/" in doc.split("Layout (", 1)[1].split(")")[0], fmt   # a repo + path
        assert "Options:" in doc and "`--split`" in doc, fmt


# ---- lavis -----------------------------------------------------------------------------------------------------
def _lavis_coco(root: Path) -> Path:
    """~/.cache/lavis/coco as LAVIS stores it: annotations/coco_karpathy_*.json beside images/{train,val}2014."""
    for k, folder in enumerate(["val2014", "val2014", "train2014", "val2014"]):
        _image(root / "images" / folder / f"COCO_{folder}_{k:012d}.jpg", (50 * k, 10, 10))
    ann = root / "annotations"
    ann.mkdir(parents=True)
    train = [{"caption": "a man rides a moped ", "image": "val2014/COCO_val2014_000000000000.jpg",
              "image_id": "coco_0"},
             {"caption": "a dirt road", "image": "val2014/COCO_val2014_000000000001.jpg", "image_id": "coco_1"},
             {"caption": "a motorcycle on a hill", "image": "val2014/COCO_val2014_000000000000.jpg",
              "image_id": "coco_0"}]
    test = [{"image": "train2014/COCO_train2014_000000000002.jpg", "caption": ["two dogs", "dogs on grass"]},
            {"image": "val2014/COCO_val2014_000000000003.jpg", "caption": ["a cake"]}]
    (ann / "coco_karpathy_train.json").write_text(json.dumps(train))
    (ann / "coco_karpathy_test.json").write_text(json.dumps(test))
    return root


def test_lavis_groups_train_captions_per_image_id_and_keeps_eval_lists(tmp_path):
    root = _lavis_coco(tmp_path / "coco")
    summary = import_dataset("lavis", root, tmp_path / "all.jsonl")
    assert summary["num_records"] == 4 and summary["num_texts"] == 6 and summary["splits"] == ["test", "train"]
    assert any("3 caption entries grouped into 2 images" in n for n in summary["notes"])
    recs = _read(tmp_path / "all.jsonl")
    by_image = {Path(r["image"]).name: r for r in recs}
    assert by_image["COCO_val2014_000000000000.jpg"]["captions"] == ["a man rides a moped", "a motorcycle on a hill"]
    assert recs[0] == {"image": _resolved(root / "images" / "train2014" / "COCO_train2014_000000000002.jpg"),
                       "captions": ["two dogs", "dogs on grass"], "split": "test", "_line": 1}   # test file first
    test = import_dataset("lavis", root / "annotations" / "coco_karpathy_test.json", tmp_path / "t.jsonl")
    assert test["num_records"] == 2 and test["splits"] == ["test"]
    with pytest.raises(LayoutError, match="no split 'val'; it has test, train"):
        import_dataset("lavis", root, tmp_path / "x.jsonl", split="val")


def test_lavis_flickr_layout_and_image_root_option(tmp_path):
    root = tmp_path / "flickr30k"
    _image(root / "images" / "flickr30k-images" / "1007129816.jpg")
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "test.json").write_text(json.dumps(
        [{"image": "flickr30k-images/1007129816.jpg", "caption": ["a man in an orange hat", "a man wears glasses"]},
         {"image": "flickr30k-images/missing.jpg", "caption": ["gone"]}]))
    summary = import_dataset("lavis", root, tmp_path / "f.jsonl", split="test")
    assert summary["num_records"] == 1 and "1 image(s) listed in the annotations were not found" in summary["notes"][-1]
    other = tmp_path / "elsewhere"
    _image(other / "flickr30k-images" / "1007129816.jpg")
    import_dataset("lavis", root, tmp_path / "g.jsonl", image_root=str(other))
    assert _read(tmp_path / "g.jsonl")[0]["image"] == _resolved(other / "flickr30k-images" / "1007129816.jpg")
    with pytest.raises(LayoutError, match="none of the images was found"):
        import_dataset("lavis", root, tmp_path / "h.jsonl", image_root=str(tmp_path / "nothing"))


# ---- coco-captions ---------------------------------------------------------------------------------------------
def test_coco_captions_groups_annotations_per_image_in_file_order(tmp_path):
    root = tmp_path / "mscoco_captions"                  # CLIP_benchmark: coco_test_karpathy.json beside val2014/
    names = [f"COCO_val2014_{i:012d}.jpg" for i in (391895, 522418, 184613)]
    for k, n in enumerate(names):
        _image(root / "val2014" / n, (10, 60 * k, 10))
    data = {"images": [{"id": 391895, "file_name": names[0]}, {"id": 522418, "file_name": names[1]},
                       {"id": 184613, "file_name": names[2]}],
            "annotations": [{"image_id": 522418, "id": 1, "caption": "a woman cutting a cake"},
                            {"image_id": 391895, "id": 2, "caption": "a man on a moped"},
                            {"image_id": 522418, "id": 3, "caption": "a cake on a table "}]}
    (root / "coco_test_karpathy.json").write_text(json.dumps(data))
    summary = import_dataset("coco-captions", root, tmp_path / "c.jsonl")
    assert summary["num_records"] == 2 and summary["num_texts"] == 3 and summary["splits"] == ["test"]
    assert "1 image(s) have no caption" in summary["notes"][0]
    recs = _read(tmp_path / "c.jsonl")
    assert recs[0]["image"] == _resolved(root / "val2014" / names[0]) and recs[0]["captions"] == ["a man on a moped"]
    assert recs[1]["captions"] == ["a woman cutting a cake", "a cake on a table"]


def test_coco_captions_official_annotation_file_split_from_its_name(tmp_path):
    root = tmp_path / "coco"
    _image(root / "val2014" / "COCO_val2014_000000000042.jpg")
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "captions_val2014.json").write_text(json.dumps(
        {"images": [{"id": 42, "file_name": "COCO_val2014_000000000042.jpg"}],
         "annotations": [{"image_id": 42, "id": 7, "caption": "a red square"}]}))
    summary = import_dataset("coco-captions", root / "annotations" / "captions_val2014.json", tmp_path / "v.jsonl")
    assert summary["splits"] == ["val"] and summary["num_records"] == 1
    (root / "annotations" / "bad").mkdir()
    (root / "annotations" / "bad" / "captions_val2014.json").write_text(json.dumps({"images": []}))
    with pytest.raises(LayoutError, match="not a COCO caption file"):
        import_dataset("coco-captions", root / "annotations" / "bad", tmp_path / "b.jsonl")


# ---- csv -------------------------------------------------------------------------------------------------------
def test_csv_rows_of_one_image_become_one_record_with_all_captions(tmp_path):
    """The silent misread: one row per caption read as one image per row. Here 5 rows name 2 images."""
    for name in ("a.jpg", "b.jpg"):
        _image(tmp_path / "imgs" / name)
    rows = ["filepath\ttitle"] + [f"imgs/a.jpg\tcaption a{i}" for i in range(3)] + \
        [f"imgs/b.jpg\tcaption b{i}" for i in range(2)]
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    summary = import_dataset("csv", tmp_path / "pairs.csv", tmp_path / "m.jsonl")
    assert summary["num_records"] == 2 and summary["num_texts"] == 5
    assert "5 rows name 2 images" in summary["notes"][0]
    recs = _read(tmp_path / "m.jsonl")
    assert recs[0]["captions"] == ["caption a0", "caption a1", "caption a2"]
    assert recs[1]["image"] == _resolved(tmp_path / "imgs" / "b.jpg")


def test_csv_clip_benchmark_flickr_file_with_commas_inside_captions(tmp_path):
    root = tmp_path / "flickr30k"
    for name in ("1000092795.jpg", "10002456.jpg"):
        _image(root / "flickr30k-images" / name)
    (root / "flickr30k_test_karpathy.txt").write_text(
        "image,caption\n1000092795.jpg,Two young guys with shaggy hair look at their hands.\n"
        "1000092795.jpg,Two men, one in a green shirt, are in a yard.\n10002456.jpg,Four men on a tall structure.\n")
    with pytest.raises(LayoutError, match="no column 'filepath'.*needs -o sep=comma"):
        import_dataset("csv", root / "flickr30k_test_karpathy.txt", tmp_path / "x.jsonl")
    summary = import_dataset("csv", root / "flickr30k_test_karpathy.txt", tmp_path / "f.jsonl", sep="comma",
                             image_key="image", caption_key="caption")
    assert summary["num_records"] == 2 and summary["num_texts"] == 3
    assert any("1 row(s) had more fields than the header" in n for n in summary["notes"])
    assert _read(tmp_path / "f.jsonl")[0]["captions"][1] == "Two men, one in a green shirt, are in a yard."


def test_csv_options_through_the_command_line(tmp_path, capsys):
    _image(tmp_path / "x.png")
    (tmp_path / "t.tsv").write_text("path\ttext\nx.png\ta red square\n")
    code = main(["data", "import", "csv", str(tmp_path / "t.tsv"), "--out", str(tmp_path / "o.jsonl"),
                 "-o", "image_key=path", "-o", "caption_key=text", "-o", "sep=tab"])
    assert code == 0 and json.loads(capsys.readouterr().out)["num_records"] == 1
    with pytest.raises(LayoutError, match="it has none"):
        import_dataset("csv", tmp_path / "t.tsv", tmp_path / "o.jsonl", split="test", image_key="path",
                       caption_key="text")
    assert main(["data", "import", "csv", str(tmp_path / "t.tsv"), "--out", str(tmp_path / "o.jsonl"),
                 "-o", "img_key=path"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "csv: unknown option 'img_key' (did you mean 'image_key'?); its options: image_key, " \
                                "caption_key" in err
    with pytest.raises(ValueError, match="urban1k: unknown option 'first_n'; its options: none"):
        import_dataset("urban1k", tmp_path, tmp_path / "u.jsonl", first_n=3)


# ---- chinese-clip ----------------------------------------------------------------------------------------------
def _chinese_clip(root: Path) -> dict:
    """A Chinese-CLIP dataset folder: {split}_imgs.tsv (id<TAB>base64) and {split}_texts.jsonl."""
    root.mkdir(parents=True)
    images = {"1000002": _image_bytes((255, 0, 0)), "1000003": _image_bytes((0, 255, 0), "JPEG"),
              "1000004": _image_bytes((0, 0, 255))}
    lines = [f"{i}\t{base64.b64encode(b).decode()}" for i, b in images.items()]
    lines[1] = lines[1].replace("+", "-").replace("/", "_")                   # URL-safe base64 is read too
    (root / "test_imgs.tsv").write_text("\n".join(lines) + "\n")
    texts = [{"text_id": 8428, "text": "高级感托特包斜挎", "image_ids": [1000002, 1000003]},
             {"text_id": 8429, "text": "红色的方块", "image_ids": [1000003]},
             {"text_id": 8430, "text": "没有图片的文本", "image_ids": []}]
    (root / "test_texts.jsonl").write_text("\n".join(json.dumps(t, ensure_ascii=False) for t in texts) + "\n")
    return images


def test_chinese_clip_decodes_images_and_keeps_a_texts_several_images(tmp_path):
    root = tmp_path / "MUGE"
    images = _chinese_clip(root)
    summary = import_dataset("chinese-clip", root, tmp_path / "m.jsonl")
    recs = _read(tmp_path / "m.jsonl")
    assert summary["num_records"] == 2 and summary["splits"] == ["test"]
    assert [r["captions_zh"] for r in recs] == [["高级感托特包斜挎"],
                                                ["高级感托特包斜挎", "红色的方块"]]
    assert [r["text_ids"] for r in recs] == [[8428], [8428, 8429]]          # parallel to captions_zh
    assert Path(recs[0]["image"]) == (root / "images_decoded" / "test" / "1000002.png").resolve()
    assert Path(recs[1]["image"]).read_bytes() == images["1000003"] and recs[1]["image"].endswith(".jpg")
    notes = " | ".join(summary["notes"])
    assert "1 of 3 texts match several images" in notes and "1 text(s) list no image" in notes
    assert "1 image(s) in test_imgs.tsv match no text" in notes
    import_dataset("chinese-clip", root, tmp_path / "n.jsonl", split="test", image_dir=str(tmp_path / "dec"))
    assert (tmp_path / "dec" / "test" / "1000003.jpg").is_file()


def test_chinese_clip_refuses_an_image_id_that_is_a_path(tmp_path):
    root = tmp_path / "evil"
    root.mkdir()
    (root / "test_imgs.tsv").write_text(f"../../x\t{base64.b64encode(_image_bytes((1, 2, 3))).decode()}\n")
    (root / "test_texts.jsonl").write_text(json.dumps({"text_id": 1, "text": "t", "image_ids": ["../../x"]}) + "\n")
    with pytest.raises(LayoutError, match="not a plain file name"):
        import_dataset("chinese-clip", root, tmp_path / "e.jsonl")
    assert not (tmp_path / "x.png").exists()


# ---- coco-cn ---------------------------------------------------------------------------------------------------
def _coco_cn(coco: Path) -> Path:
    rel = coco / "coco-cn-version1805v1.1"
    rel.mkdir(parents=True)
    ids = {"train": ["COCO_train2014_000000128475"], "val": ["COCO_val2014_000000498374"],
           "test": ["COCO_val2014_000000217153", "COCO_val2014_000000000073"]}
    for split, names in ids.items():
        (rel / f"coco-cn_{split}.txt").write_text("\n".join(names) + "\n")
        for n in names:
            _image(coco / n.split("_")[1] / f"{n}.jpg")
    (rel / "imageid.human-written-caption.txt").write_text(
        "COCO_val2014_000000217153#0\t一个男人和一个女人穿着军装玩手机。\n"
        "COCO_train2014_000000128475#0\t三个甜甜圈旁边放着三种不同口味的蘸酱\n"
        "COCO_val2014_000000217153#1\t两个军人在看手机\n"
        "COCO_val2014_000000498374#0\t一个人正透过白色的门框向厕所中拍照\n", encoding="utf-8")
    (rel / "imageid.manually-translated-caption.txt").write_text(
        "COCO_val2014_000000217153#0\t一名男子和一名女子在看手机。\n"
        "COCO_val2014_000000000073#0\t一辆摩托车停在路边。\n", encoding="utf-8")
    (rel / "imageid.human-written-tags.txt").write_text("COCO_val2014_000000217153 男人 女人 手机\n",
                                                        encoding="utf-8")
    return rel


def test_coco_cn_human_written_sentences_per_image_with_splits_and_tags(tmp_path):
    rel = _coco_cn(tmp_path / "coco")
    summary = import_dataset("coco-cn", rel, tmp_path / "cn.jsonl")
    assert summary["num_records"] == 3 and summary["splits"] == ["test", "train", "val"]
    assert "1 image(s) have no human-written sentence" in summary["notes"][0]
    test = [r for r in _read(tmp_path / "cn.jsonl") if r["split"] == "test"]
    assert test == [{**test[0], "image": _resolved(tmp_path / "coco" / "val2014" / "COCO_val2014_000000217153.jpg"),
                     "captions_zh": ["一个男人和一个女人穿着军装玩手机。", "两个军人在看手机"],
                     "tags_zh": ["男人", "女人", "手机"]}]
    both = import_dataset("coco-cn", tmp_path / "coco", tmp_path / "b.jsonl", split="test", captions="all")
    assert both["num_records"] == 2
    assert _read(tmp_path / "b.jsonl")[0]["captions_zh"][-1] == "一名男子和一名女子在看手机。"
    with pytest.raises(ValueError, match="captions='machine'"):
        import_dataset("coco-cn", rel, tmp_path / "x.jsonl", captions="machine")


# ---- imagenet --------------------------------------------------------------------------------------------------
def test_imagenet_bundled_lists_are_complete_and_in_wnid_order():
    from polymodal.data.importers.imagenet import BUNDLED, bundled_classes
    data = bundled_classes()
    assert data["wnids"] == sorted(data["wnids"]) and len(set(data["wnids"])) == 1000
    assert len(data["classes"]) == len(data["classes_zh"]) == 1000
    assert (data["classes"][0], data["classes_zh"][0], data["classes"][999]) == ("tench", "丁鲷", "toilet paper")
    assert len(data["templates"]) == len(data["templates_zh"]) == 80
    assert all(t.count("{}") == 1 for t in data["templates"] + data["templates_zh"])
    sources = (BUNDLED.parent / "SOURCES.md").read_text()
    assert all(f"`{k}`" in sources for k in data)
    assert "data/importers/data/*" in (Path(__file__).parents[1] / "pyproject.toml").read_text()


def test_imagenet_synset_folders_and_flat_val_with_its_solution_file(tmp_path):
    root = tmp_path / "imagenet"
    _image(root / "train" / "n01440764" / "n01440764_10026.JPEG", fmt="JPEG")
    _image(root / "train" / "n01443537" / "n01443537_1.JPEG", fmt="JPEG")
    _image(root / "val" / "ILSVRC2012_val_00000001.JPEG", fmt="JPEG")
    _image(root / "val" / "ILSVRC2012_val_00000002.JPEG", fmt="JPEG")
    (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n"
                                               "ILSVRC2012_val_00000001,n15075141 1 2 3 4 n15075141 5 6 7 8\n")
    summary = import_dataset("imagenet", root, tmp_path / "out" / "in.jsonl")
    assert summary["kind"] == "classification" and summary["num_classes"] == 1000
    recs = _read(tmp_path / "out" / "in.jsonl")
    assert [(Path(r["image"]).name, r["label"], r["split"]) for r in recs] == [
        ("n01440764_10026.JPEG", 0, "train"), ("n01443537_1.JPEG", 1, "train"),
        ("ILSVRC2012_val_00000001.JPEG", 999, "val")]
    assert any("1 image(s) have no ImageNet-1k label" in n for n in summary["notes"])
    classes = json.loads((tmp_path / "out" / "classes.json").read_text(encoding="utf-8"))
    assert classes["classes"][1] == "goldfish" and classes["classes_zh"][1] == "金鱼"
    assert classes["templates"][0] == "a bad photo of a {}." and len(classes["templates_zh"]) == 80
    assert import_dataset("imagenet", root / "train", tmp_path / "tr.jsonl")["splits"] == ["train"]   # one split
    (root / "train").rename(root / "ILSVRC2012_img_train")
    assert "splits" not in import_dataset("imagenet", root / "ILSVRC2012_img_train", tmp_path / "x.jsonl")


def test_imagenet_kaggle_tree_with_a_synset_mapping_of_its_own(tmp_path):
    root = tmp_path / "kaggle"
    _image(root / "ILSVRC" / "Data" / "CLS-LOC" / "val" / "n01443537" / "v.JPEG", fmt="JPEG")
    _image(root / "ILSVRC" / "Data" / "CLS-LOC" / "val" / "n99999999" / "w.JPEG", fmt="JPEG")
    (root / "LOC_synset_mapping.txt").write_text("n01443537 goldfish, Carassius auratus\n"
                                                 "n99999999 made-up thing, fake\n")
    summary = import_dataset("imagenet", root, tmp_path / "k.jsonl", split="val")
    assert summary["num_classes"] == 2 and [r["label"] for r in _read(tmp_path / "k.jsonl")] == [0, 1]
    classes = json.loads((tmp_path / "classes.json").read_text(encoding="utf-8"))
    assert classes["classes"] == ["goldfish", "made-up thing"] and "classes_zh" not in classes
    (root / "LOC_synset_mapping.txt").unlink()
    with pytest.raises(LayoutError, match="n99999999: 1 class folder"):
        import_dataset("imagenet", root, tmp_path / "k.jsonl")


# ---- clip-benchmark-wds ----------------------------------------------------------------------------------------
def _tar(path: Path, samples: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_clip_benchmark_wds_classification_writes_images_classes_and_templates(tmp_path):
    root = tmp_path / "wds_cars"
    _tar(root / "test" / "0.tar", [("s0000000", {"png": _image_bytes((9, 9, 9)), "cls": b"1"}),
                                   ("s0000001", {"jpg": _image_bytes((200, 9, 9), "JPEG"), "cls": b"0"})])
    _tar(root / "test" / "1.tar", [("s0000002", {"png": _image_bytes((9, 200, 9)), "cls": b"1"})])
    (root / "test" / "nshards.txt").write_text("2\n")
    (root / "classnames.txt").write_text("red car\nblue car\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\na {c} on a road.\n")
    summary = import_dataset("clip-benchmark-wds", root, tmp_path / "w.jsonl")
    recs = _read(tmp_path / "w.jsonl")
    assert [(Path(r["image"]).name, r["label"]) for r in recs] == [
        ("s0000000.png", 1), ("s0000001.jpg", 0), ("s0000002.png", 1)]
    assert Path(recs[1]["image"]).read_bytes() == _image_bytes((200, 9, 9), "JPEG")
    assert Path(recs[0]["image"]).parent == (root / "images_decoded" / "test").resolve()
    classes = json.loads((tmp_path / "classes.json").read_text())
    assert classes == {"classes": ["red car", "blue car"], "templates": ["a photo of a {}.", "a {} on a road."]}
    assert summary["kind"] == "classification" and summary["splits"] == ["test"]


def test_clip_benchmark_wds_retrieval_reads_captions_one_a_line(tmp_path):
    root = tmp_path / "wds_flickr"
    _tar(root / "test" / "0.tar", [("s0000000", {"webp": _image_bytes((1, 1, 1), "WEBP"),
                                                 "txt": "a dog runs\na brown dog\n".encode()})])
    (root / "test" / "nshards.txt").write_text("1")
    (root / "dataset_type.txt").write_text("retrieval\n")
    summary = import_dataset("clip-benchmark-wds", root, tmp_path / "r.jsonl", image_dir=str(tmp_path / "img"))
    assert summary["kind"] == "image" and summary["num_texts"] == 2
    rec = _read(tmp_path / "r.jsonl")[0]
    assert rec["captions"] == ["a dog runs", "a brown dog"] and rec["image"].endswith("img/test/s0000000.webp")


# ---- long text: urban1k, dci, iiw, sharegpt4v ------------------------------------------------------------------
LONG = ("A busy street corner with a red bus. Pedestrians cross in front of it while a cyclist waits. "
        "Tall buildings line both sides.")


def test_urban1k_pairs_caption_files_with_images_in_number_order(tmp_path):
    root = tmp_path / "Urban1k"
    for n in (10, 2, 1):
        _image(root / "image" / f"{n}.jpg")
        (root / "caption").mkdir(parents=True, exist_ok=True)
        (root / "caption" / f"{n}.txt").write_text(f"Scene {n}. " + LONG + "\n")
    (root / "caption" / "11.txt").write_text("An orphan caption. No image.\n")
    summary = import_dataset("urban1k", tmp_path, tmp_path / "u.jsonl")
    recs = _read(tmp_path / "u.jsonl")
    assert [Path(r["image"]).name for r in recs] == ["1.jpg", "2.jpg", "10.jpg"]
    assert recs[0]["caption"] == "Scene 1." and recs[0]["long_caption"] == "Scene 1. " + LONG
    assert "first sentence" in summary["notes"][0] and "1 caption(s) have no image" in summary["notes"][-1]


def _dci(base: Path) -> Path:
    root = base / "densely_captioned_images"
    for name in ("sa_1545038.jpg", "sa_1545118.jpg"):
        _image(root / "photos" / name)
    (root / "annotations").mkdir(parents=True)
    for k, name in enumerate(["sa_1545038.jpg", "sa_1545118.jpg"]):
        (root / "annotations" / f"11302{k}-data.json").write_text(json.dumps(
            {"image": name, "short_caption": f"A balcony {k}.", "extra_caption": "Torn fabric hangs from grates.",
             "mask_data": {}, "mask_keys": []}))
    (root / "splits.json").write_text(json.dumps({"train": ["113020-data.json"], "valid": [],
                                                  "test": ["113021-data.json"]}))
    return root


def test_dci_short_caption_and_extended_long_caption_per_split(tmp_path):
    _dci(tmp_path)
    summary = import_dataset("dci", tmp_path, tmp_path / "d.jsonl")
    assert summary["splits"] == ["test", "train"] and summary["num_records"] == 2
    recs = _read(tmp_path / "d.jsonl")
    assert recs[1] == {**recs[1], "caption": "A balcony 1.", "split": "test",
                       "long_caption": "A balcony 1.\nTorn fabric hangs from grates."}
    assert import_dataset("dci", tmp_path, tmp_path / "t.jsonl", split="test")["num_records"] == 1


def test_iiw_finds_images_by_key_or_name_and_splits_off_a_short_caption(tmp_path):
    data = tmp_path / "imageinwords" / "IIW-400"
    data.mkdir(parents=True)
    (data / "data.jsonl").write_text("\n".join(json.dumps(o) for o in [
        {"IIW": "A close-up of a blue globe flower.\n\nThe stem is pale.", "IIW-P5B": "A bee on a thistle.",
         "image/key": "aar_test_04600", "objects": []},
        {"IIW": "A tiled wall under a sky. Clouds drift.", "image/key": "aar_test_04601"}]) + "\n")
    docci = tmp_path / "docci"
    _image(docci / "images_aar" / "aar_test_04600.jpg")
    _image(docci / "images_aar" / "aar_test_04601.jpg")
    summary = import_dataset("iiw", data, tmp_path / "i.jsonl", image_root=str(docci))
    recs = _read(tmp_path / "i.jsonl")
    assert recs[0]["caption"] == "A close-up of a blue globe flower."
    assert recs[0]["long_caption"] == "A close-up of a blue globe flower. The stem is pale."
    assert "first sentence" in summary["notes"][0]
    model = import_dataset("iiw", data / "data.jsonl", tmp_path / "p.jsonl", image_root=str(docci),
                           description="IIW-P5B")
    assert model["num_records"] == 1 and "1 line(s) have no 'IIW-P5B'" in model["notes"][-1]
    dci_test = tmp_path / "DCI_Test"                    # DCI_Test names the image file: found in DCI's photos/
    dci_test.mkdir()
    (dci_test / "data.jsonl").write_text(json.dumps({"IIW": "A balcony. Torn.", "image": "sa_1545038.jpg"}) + "\n")
    root = _dci(tmp_path / "dci")
    assert import_dataset("iiw", dci_test, tmp_path / "c.jsonl", image_root=str(root))["num_records"] == 1
    docci_test = tmp_path / "DOCCI_Test"               # DOCCI_Test names the image by its DOCCI id, no suffix
    docci_test.mkdir()
    (docci_test / "data.jsonl").write_text(json.dumps({"DOCCI": "A toilet.", "IIW": "A white toilet. Towels.",
                                                       "image": "aar_test_04601"}) + "\n")
    assert _read_iiw(docci_test, docci, tmp_path)["long_caption"] == "A white toilet. Towels."


def _read_iiw(folder: Path, images: Path, tmp_path: Path) -> dict:
    import_dataset("iiw", folder, tmp_path / "iiw.jsonl", image_root=str(images))
    return _read(tmp_path / "iiw.jsonl")[0]


def test_sharegpt4v_first_n_entries_are_the_test_split(tmp_path):
    data = tmp_path / "sharegpt4v" / "data"
    entries = []
    for k, image in enumerate(["coco/train2017/000000000009.jpg", "sam/images/sa_1.jpg", "llava/x/2.jpg"]):
        _image(data / image)
        entries.append({"id": str(k), "image": image, "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image."},
            {"from": "gpt", "value": f"Picture {k} shows a bowl.\nIt is on a table. Light comes in."}]})
    (data / "share-captioner_coco_lcs_sam_1246k_1107.json").write_text(json.dumps(entries))
    summary = import_dataset("sharegpt4v", data, tmp_path / "s.jsonl", first_n=2)
    recs = _read(tmp_path / "s.jsonl")
    assert [r["split"] for r in recs] == ["test", "test", "train"]
    assert recs[1]["caption"] == "Picture 1 shows a bowl."
    assert recs[1]["long_caption"] == "Picture 1 shows a bowl. It is on a table. Light comes in."
    assert "[0, 2) are the test split" in summary["notes"][0]
    assert import_dataset("sharegpt4v", data, tmp_path / "t.jsonl", split="test")["num_records"] == 3
    with pytest.raises(ValueError, match="first_n"):
        import_dataset("sharegpt4v", data, tmp_path / "t.jsonl", first_n=-1)


def test_first_sentence_of_long_text():
    from polymodal.data.importers.longtext import first_sentence
    assert first_sentence("Dr. Who? No.  A man\nwalks.") == "Dr."     # a plain rule, documented as such
    assert first_sentence("One sentence only") == "One sentence only"
    assert first_sentence("一只猫。在沙发上。") == "一只猫。"


# ---- image-folder guards ---------------------------------------------------------------------------------------
def _one_line_refusal(folder: Path, command: str | None) -> str:
    with pytest.raises(ManifestError) as err:
        read_image_folder(folder)
    msg = str(err.value)
    assert "\n" not in msg and "not an image folder of classes" in msg
    if command:
        assert f"`polymodal data import {command} {folder}" in msg
    else:
        assert "polymodal data import" not in msg
    with pytest.raises(ManifestError):
        read_manifest(folder)
    return msg


def test_folder_of_wordnet_id_subfolders_points_to_the_imagenet_reader(tmp_path):
    for wnid in ("n01440764", "n01443537"):
        _image(tmp_path / "val" / wnid / "a.JPEG", fmt="JPEG")
    assert "WordNet ids" in _one_line_refusal(tmp_path / "val", "imagenet")
    assert "ImageNet splits" in _one_line_refusal(tmp_path, "imagenet")            # train/ val/ of synsets
    records, names = read_image_folder(tmp_path / "val", classes=["n01440764", "n01443537"])   # said: classes
    assert names == ["n01440764", "n01443537"] and len(records) == 2


def test_urban1k_and_dci_roots_are_refused_with_their_readers(tmp_path):
    _image(tmp_path / "Urban1k" / "image" / "1.jpg")
    (tmp_path / "Urban1k" / "caption").mkdir()
    (tmp_path / "Urban1k" / "caption" / "1.txt").write_text("A street.")
    _one_line_refusal(tmp_path / "Urban1k", "urban1k")
    _one_line_refusal(_dci(tmp_path / "d"), "dci")


def test_coco_image_folders_point_to_the_karpathy_reader(tmp_path):
    _image(tmp_path / "coco" / "train2014" / "COCO_train2014_000000000001.jpg")
    _image(tmp_path / "coco" / "val2014" / "COCO_val2014_000000000002.jpg")
    _one_line_refusal(tmp_path / "coco", "karpathy")
    _image(tmp_path / "flickr" / "images" / "1.jpg")
    (tmp_path / "flickr" / "dataset_flickr30k.json").write_text("{}")
    _one_line_refusal(tmp_path / "flickr", "karpathy")


def test_split_folders_and_a_single_subfolder_are_not_classes(tmp_path):
    for split in ("train", "val", "test"):
        _image(tmp_path / "data" / split / "x.png")
    assert "split or media folders" in _one_line_refusal(tmp_path / "data", None)
    _image(tmp_path / "pets" / "cat" / "1.png")
    assert "only cat/ holds images" in _one_line_refusal(tmp_path / "pets", None)
    records, names = read_image_folder(tmp_path / "pets", classes=["cat", "dog"])   # a class list: allowed
    assert names == ["cat", "dog"] and len(records) == 1
    _image(tmp_path / "pets" / "dog" / "2.png")
    assert read_image_folder(tmp_path / "pets")[1] == ["cat", "dog"]               # two classes: fine
