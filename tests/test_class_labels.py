"""Labels as users have them: class names in manifests, image folders (one subfolder per class), inline classes."""
import json
from collections import Counter

import pytest
import torch
from PIL import Image

import polymodal
from polymodal.config import ConfigError
from polymodal.data.folders import read_image_folder, write_folder_manifest
from polymodal.data.labels import LabelError, classes_argument, label_indices, parse_class_list
from polymodal.data.manifests import ManifestError, read_manifest
from polymodal.data.text import train_tokenizer
from polymodal.eval.suite import retrieval_eval, zeroshot_eval_manifest
from polymodal.eval.zeroshot import accuracy, build_classifier

COLOURS = {"cat": (200, 40, 40), "dog": (40, 200, 40), "red car": (40, 40, 200)}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def data(tmp_path):
    """Six images, two per class, a manifest with class-name labels, the same with indices, classes.json."""
    (tmp_path / "imgs").mkdir()
    names, rows, rows_int = list(COLOURS), [], []
    for i in range(6):
        name = names[i % 3]
        Image.new("RGB", (20, 20), tuple(c + 5 * i for c in COLOURS[name])).save(tmp_path / "imgs" / f"{i}.png")
        rows.append({"image": f"imgs/{i}.png", "caption": f"a {name} number {i}", "label": name})
        rows_int.append({**rows[-1], "label": names.index(name)})
    (tmp_path / "classes.json").write_text(json.dumps({"classes": names}))
    return tmp_path, write_jsonl(tmp_path / "names.jsonl", rows), write_jsonl(tmp_path / "ints.jsonl", rows_int)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    tok = train_tokenizer([f"a photo of a {n} number {i}." for n in COLOURS for i in range(6)] * 3,
                          vocab_size=200, context_length=32)
    return polymodal.create_model("tiny", tokenizer=tok).eval()


# ---- manifests -----------------------------------------------------------------------------------------

def test_class_name_labels_are_read_as_written(data):
    root, names, _ = data
    m = read_manifest(names)
    assert [r["label"] for r in m] == ["cat", "dog", "red car"] * 2


def test_classes_map_names_to_indices(data):
    root, names, ints = data
    mapped = read_manifest(names, classes=root / "classes.json")
    assert [r["label"] for r in mapped] == [r["label"] for r in read_manifest(ints)]
    inline = read_manifest(names, classes=["red car", "dog", "cat"])            # the list's order fixes indices
    assert [r["label"] for r in inline] == [2, 1, 0, 2, 1, 0]


def test_unknown_class_name_names_the_label_line_and_classes_file(data):
    root, names, _ = data
    rows = [json.loads(line) for line in names.read_text().splitlines()]
    rows[3]["label"] = "Cat"
    path = write_jsonl(root / "bad.jsonl", rows)
    with pytest.raises(ManifestError) as err:
        read_manifest(path, classes=root / "classes.json")
    msg = str(err.value)
    assert f"{path} line 4:" in msg and "'Cat'" in msg and str(root / "classes.json") in msg
    assert "did you mean 'cat'" in msg and "[unknown_label]" in msg and "\n" not in msg
    m = read_manifest(path, classes=root / "classes.json", on_bad_record="skip")
    assert len(m) == 5 and m.skipped == Counter({"unknown_label": 1})
    with pytest.raises(ManifestError, match="label index 7 is outside"):
        read_manifest(write_jsonl(root / "idx.jsonl", [{**rows[0], "label": 7}]), classes=["cat", "dog"])


def test_csv_labels_by_name_and_index(tmp_path, data):
    root, _, _ = data
    (root / "m.csv").write_text('image,caption,label,labels\nimgs/0.png,x,red car,"cat|2"\nimgs/1.png,y,1,dog\n')
    m = read_manifest(root / "m.csv")
    assert m[0]["label"] == "red car" and m[0]["labels"] == ["cat", 2] and m[1]["label"] == 1
    mapped = read_manifest(root / "m.csv", classes=root / "classes.json")
    assert mapped[0]["label"] == 2 and mapped[0]["labels"] == [0, 2] and mapped[1]["labels"] == [1]


def test_label_indices_helper():
    records = [{"label": "dog", "_line": 1}, {"label": 0, "_line": 2}, {"label": "2", "_line": 3}]
    assert label_indices(records, ["cat", "dog", "bird"]) == [1, 0, 2]
    with pytest.raises(LabelError, match="m.jsonl line 2: no 'label' field"):
        label_indices([{"label": "cat"}, {"caption": "x", "_line": 2}], ["cat"], where="m.jsonl")


def test_retrieval_ignores_class_name_labels(data, model):
    root, names, ints = data
    assert retrieval_eval(model, names) == retrieval_eval(model, ints)


# ---- zero-shot ----------------------------------------------------------------------------------------

def _manual_top1(model, image_paths, targets, classnames):
    """Top-1 accuracy computed here from the public pieces: image features, prompt classifier, accuracy."""
    pixels = torch.stack([model.image_transform(Image.open(p).convert("RGB")) for p in image_paths])
    with torch.no_grad():
        img = model.encode_image(pixels)
    return accuracy(img @ build_classifier(model, classnames, "en").T, torch.tensor(targets), ks=(1,))["top1"]


def test_zeroshot_with_class_name_labels_equals_indices(data, model):
    root, names, ints = data
    a = zeroshot_eval_manifest(model, names, root / "classes.json")
    b = zeroshot_eval_manifest(model, ints, root / "classes.json")
    assert a == b and a["num_classes"] == 3
    paths = [root / "imgs" / f"{i}.png" for i in range(6)]
    assert a["top1"] == pytest.approx(_manual_top1(model, paths, [0, 1, 2] * 2, list(COLOURS)))


def test_zeroshot_with_inline_classes_and_an_unknown_label(data, model):
    root, names, _ = data
    inline = zeroshot_eval_manifest(model, names, parse_class_list('cat,dog,"red car"'))
    assert inline == zeroshot_eval_manifest(model, names, root / "classes.json")
    with pytest.raises(LabelError) as err:
        zeroshot_eval_manifest(model, names, ["cat", "dog"])
    msg = str(err.value)
    assert f"{names} line 3:" in msg and "'red car'" in msg and "the inline class list" in msg


@pytest.fixture()
def folder(tmp_path):
    root = tmp_path / "pets"
    for name, colour in COLOURS.items():
        sub = root / name.replace(" ", "_")
        (sub / "nested").mkdir(parents=True)
        Image.new("RGB", (20, 20), colour).save(sub / "b.png")
        Image.new("RGB", (24, 16), tuple(c // 2 for c in colour)).save(sub / "nested" / "a.JPG", format="JPEG")
        (sub / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    Image.new("RGB", (8, 8)).save(root / ".hidden" / "x.png")
    (root / "empty").mkdir()
    return root


def test_image_folder_records_and_classes(folder):
    records, classes = read_image_folder(folder)
    assert classes == ["cat", "dog", "red car"]                  # sorted, '_' read as a space, hidden/empty skipped
    assert [(r["class"], r["label"]) for r in records] == [(c, i) for i, c in enumerate(classes) for _ in (0, 1)]
    assert records[4]["image"] == str(folder / "red_car" / "b.png")
    assert records[5]["image"] == str(folder / "red_car" / "nested" / "a.JPG")
    assert records[4]["caption"] == "a photo of a red car."
    ordered, names = read_image_folder(folder, caption_template="{}", classes=["dog", "cat", "red car", "bird"])
    assert names[:2] == ["dog", "cat"] and [r["label"] for r in ordered] == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ManifestError, match="class 'red car' is not in the inline class list"):
        read_image_folder(folder, classes=["cat", "dog"])
    with pytest.raises(ManifestError, match="no subfolder holds images"):
        read_image_folder(folder / "empty")


def test_read_manifest_takes_an_image_folder(folder):
    m = read_manifest(folder)
    assert [r["image"] for r in m] == [r["image"] for r in read_image_folder(folder)[0]]
    assert all(r["caption"].startswith("a photo of a ") for r in m)


def test_zeroshot_on_an_image_folder(folder, model, tmp_path):
    result = zeroshot_eval_manifest(model, folder, tmp_path / "no-such-classes.json")
    records, classes = read_image_folder(folder)
    assert result["num_classes"] == 3
    assert result["top1"] == pytest.approx(_manual_top1(model, [r["image"] for r in records],
                                                        [r["label"] for r in records], classes))
    manifest, classes_file = write_folder_manifest(folder, tmp_path / "written")
    assert json.loads(classes_file.read_text()) == {"classes": classes}
    assert zeroshot_eval_manifest(model, manifest, classes_file) == result
    # a classes file in another order: same accuracy, indices follow the file
    (tmp_path / "other.json").write_text(json.dumps({"classes": ["red car", "cat", "dog"]}))
    assert zeroshot_eval_manifest(model, folder, tmp_path / "other.json")["top1"] == result["top1"]


def test_image_folder_trains_through_the_dataset(folder, model):
    from polymodal.data.datasets import ImageTextCollate, ManifestDataset, SampleBuilder
    ds = ManifestDataset(folder, SampleBuilder(model.image_transform, model.tokenizer))
    batch = ImageTextCollate(model.tokenizer)([ds[i] for i in range(len(ds))])
    assert batch["pixels"].shape == (6, 3, 32, 32) and batch["labels"].tolist() == [0, 0, 1, 1, 2, 2]
    with torch.no_grad():
        assert model(batch["pixels"], batch["input_ids"]).text_embeds.shape == (6, 32)


# ---- inline class lists -------------------------------------------------------------------------------

def test_parse_class_list():
    assert parse_class_list('cat,dog,"red car"') == ["cat", "dog", "red car"]
    assert parse_class_list(' cat , "big, red car" ,dog') == ["cat", "big, red car", "dog"]
    for bad, why in (("cat,,dog", "empty class name"), ("cat,", "empty class name"), ("cat,dog,cat", "twice"),
                     ("cat", "at least two")):
        with pytest.raises(ConfigError, match=why):
            parse_class_list(bad)


def test_classes_argument_is_a_file_or_an_inline_list(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"classes": ["a", "b"]}))
    assert classes_argument(str(tmp_path / "c.json")) == str(tmp_path / "c.json")
    assert classes_argument('cat,"red car"') == ["cat", "red car"]
    with pytest.raises(FileNotFoundError, match="no such classes file"):
        classes_argument(str(tmp_path / "missing.json"))
