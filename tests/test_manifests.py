"""Manifest reading (JSONL, CSV), the bad-record policies and atomic writing."""
import csv
import json
import os
from collections import Counter

import pytest
from PIL import Image

from polymodal.data.manifests import Manifest, ManifestError, read_manifest, write_manifest


def _image(path, color=(10, 20, 30)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)
    return path


@pytest.fixture
def data_dir(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        _image(str(tmp_path / "imgs" / name))
    return tmp_path


def _write_jsonl(path, lines):
    with open(path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)) + "\n")
    return str(path)


def test_jsonl_fields_paths_lines_and_passthrough(data_dir):
    absolute = _image(str(data_dir / "elsewhere" / "z.png"))
    path = _write_jsonl(data_dir / "m.jsonl", [
        {"image": "imgs/a.png", "caption": "a red cube", "label": 2, "lang": "en", "source": "web", "meta": {"w": 8}},
        "",
        "   ",
        {"image": "imgs/b.png", "captions": ["one", "two"], "long_caption": "First. Second.", "labels": [1, "cat"]},
        {"image": absolute, "caption": "中文的标题", "lang": "zh"},
    ])
    m = read_manifest(path)
    assert len(m) == 3 and m.skipped == Counter()
    assert [r["_line"] for r in m.records] == [1, 4, 5]          # empty lines are skipped, not counted
    assert m[0]["image"] == os.path.join(str(data_dir), "imgs", "a.png")
    assert m[2]["image"] == absolute
    assert m[0]["source"] == "web" and m[0]["meta"] == {"w": 8} and m[0]["label"] == 2
    assert m[1]["labels"] == [1, "cat"] and m[1]["long_caption"] == "First. Second."
    assert m.captions_of(0) == ["a red cube"] and m.captions_of(1) == ["one", "two"]
    assert m.captions_of(1, "long_caption") == ["First. Second."]
    assert m[2]["caption"] == "中文的标题"


def test_csv_lists_as_json_or_pipes_and_line_numbers(data_dir):
    path = data_dir / "m.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption", "captions", "label", "labels", "extra"])
        w.writerow(["imgs/a.png", "a cube", "", "3", "1|cat| 7 ", "x"])
        w.writerow([])
        w.writerow(["imgs/b.png", "", '["has | bar", "two"]', "", '[4, "dog"]', ""])
        w.writerow(["imgs/c.png", "two\nlines", "p|q", "-1", "", "y"])
    m = read_manifest(path)
    assert len(m) == 3
    a, b, c = m.records
    assert a["label"] == 3 and a["labels"] == [1, "cat", 7] and a["extra"] == "x" and "captions" not in a
    assert b["captions"] == ["has | bar", "two"] and b["labels"] == [4, "dog"]
    assert "caption" not in b and "label" not in b and "extra" not in b    # empty cell = absent
    assert c["caption"] == "two\nlines" and c["captions"] == ["p", "q"] and c["label"] == -1
    assert [r["_line"] for r in m.records] == [2, 4, 5]
    assert m[0]["image"] == os.path.join(str(data_dir), "imgs", "a.png")


def test_tsv_is_read_with_tabs(data_dir):
    path = data_dir / "m.tsv"
    path.write_text("image\tcaption\nimgs/a.png\ta, comma\n", encoding="utf-8")
    assert read_manifest(path)[0]["caption"] == "a, comma"


BAD_RECORDS = [
    ('{"image": "imgs/a.png", "caption": ', "malformed_line", "malformed JSON"),
    ("[1, 2]", "malformed_line", "expected a JSON object"),
    ({"image": "imgs/a.png"}, "missing_key", "missing key 'caption' or 'captions'"),
    ({"caption": "no image"}, "missing_key", "missing key 'image'"),
    ({"image": "imgs/a.png", "caption": "   "}, "empty_caption", "empty 'caption'"),
    ({"image": "imgs/a.png", "captions": []}, "empty_caption", "empty 'captions'"),
    ({"image": "imgs/a.png", "captions": ["ok", ""]}, "empty_caption", "empty 'captions'"),
    ({"image": "imgs/nope.png", "caption": "x"}, "missing_image", "image 'imgs/nope.png' not found"),
    ({"image": "imgs/a.png", "caption": "x", "label": 2.5}, "bad_field", "'label' must be an integer"),
    ({"image": "imgs/a.png", "caption": 5}, "bad_field", "'caption' must be a string"),
]


@pytest.mark.parametrize("bad,reason,detail", BAD_RECORDS)
def test_bad_record_error_names_file_line_reason_and_fix(data_dir, bad, reason, detail):
    good = {"image": "imgs/a.png", "caption": "fine"}
    path = _write_jsonl(data_dir / "m.jsonl", [good, "", bad, good])
    with pytest.raises(ManifestError) as e:
        read_manifest(path)
    msg = str(e.value)
    assert f"{path} line 3:" in msg
    assert detail in msg and f"[{reason}]" in msg
    assert "data.on_bad_record=skip" in msg


@pytest.mark.parametrize("bad,reason,detail", BAD_RECORDS)
def test_bad_record_skip_counts_by_reason(data_dir, bad, reason, detail):
    good = {"image": "imgs/a.png", "caption": "fine"}
    path = _write_jsonl(data_dir / "m.jsonl", [good, "", bad, good])
    m = read_manifest(path, on_bad_record="skip")
    assert len(m) == 2 and [r["_line"] for r in m.records] == [1, 4]
    assert m.skipped == Counter({reason: 1})
    assert m.skipped_examples[reason][0].startswith(f"{path}:3: ")
    assert reason in m.report() and f"{path}:3" in m.report()


def test_skip_counts_several_reasons_and_keeps_few_examples(data_dir):
    lines = [{"image": "imgs/a.png", "caption": "ok"}]
    lines += [{"image": f"imgs/missing{i}.png", "caption": "x"} for i in range(5)]
    lines += ["not json", {"image": "imgs/b.png", "caption": ""}]
    m = read_manifest(_write_jsonl(data_dir / "m.jsonl", lines), on_bad_record="skip")
    assert len(m) == 1
    assert m.skipped == Counter({"missing_image": 5, "malformed_line": 1, "empty_caption": 1})
    assert len(m.skipped_examples["missing_image"]) == 3         # first few examples only
    assert sum(m.skipped.values()) + len(m) == len(lines)       # nothing dropped silently


def test_csv_bad_rows_are_reported_with_their_line(data_dir):
    path = data_dir / "m.csv"
    path.write_text("image,caption,label\nimgs/a.png,ok,1\nimgs/b.png,too,many,fields\nimgs/c.png,x,2.5\n")
    with pytest.raises(ManifestError, match=r"m\.csv line 3: 4 fields where the header has 3"):
        read_manifest(path)
    m = read_manifest(path, on_bad_record="skip")
    assert len(m) == 1 and m.skipped == Counter({"malformed_line": 1, "bad_field": 1})


def test_check_images_false_and_custom_required(data_dir):
    path = _write_jsonl(data_dir / "m.jsonl", [{"image": "imgs/gone.png", "label": 1}])
    with pytest.raises(ManifestError):
        read_manifest(path, check_images=False)                  # caption still required
    m = read_manifest(path, check_images=False, required=("image",))
    assert m[0]["image"].endswith(os.path.join("imgs", "gone.png"))


def test_missing_manifest_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.jsonl"):
        read_manifest(tmp_path / "nothing.jsonl")


def test_bad_policy_name_is_rejected(data_dir):
    with pytest.raises(ValueError, match="on_bad_record"):
        read_manifest(_write_jsonl(data_dir / "m.jsonl", []), on_bad_record="ignore")


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_write_manifest_relative_paths_atomic_round_trip(data_dir, suffix):
    src = _write_jsonl(data_dir / "m.jsonl", [
        {"image": "imgs/a.png", "captions": ["x", "y"], "label": 1, "labels": [2, "cat"], "lang": "en"},
        {"image": "imgs/b.png", "caption": "z", "long_caption": "A. B."},
    ])
    m = read_manifest(src)
    out = data_dir / "sub" / "dir" / f"copy{suffix}"
    m.write(out)
    assert sorted(os.listdir(out.parent)) == [out.name]          # no temporary file left behind
    text = out.read_text(encoding="utf-8")
    assert os.path.join("..", "..", "imgs", "a.png") in text and str(data_dir) not in text
    assert "_line" not in text
    again = read_manifest(out)
    strip = lambda recs: [{k: v for k, v in r.items() if k != "_line"} for r in recs]
    assert strip(again.records) == strip(m.records)


def test_write_manifest_replaces_existing_file_whole(data_dir):
    out = data_dir / "m.jsonl"
    out.write_text("old content that is longer than the new one\n" * 10)
    write_manifest([{"image": str(data_dir / "imgs" / "a.png"), "caption": "c"}], out)
    assert json.loads(out.read_text()) == {"image": os.path.join("imgs", "a.png"), "caption": "c"}


def test_manifest_is_a_plain_dataclass():
    m = Manifest(path="/x.jsonl", records=[{"image": "/a.png", "caption": "c", "_line": 7}])
    assert len(m) == 1 and m.where(0) == "/x.jsonl:7" and m.report() == ""
    assert list(m) == m.records and m[0]['caption'] == 'c'


def test_a_fifo_named_as_an_image_is_called_what_it_is(tmp_path):
    """Not "not found" (issue 30, finding 10): the path exists but is no image file."""
    import os
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "m.jsonl").write_text('{"image": "pipe.png", "caption": "a"}\n')
    with pytest.raises(ManifestError, match=r"m.jsonl line 1: image 'pipe.png' is not a regular file \(a FIFO"):
        read_manifest(tmp_path / "m.jsonl")
