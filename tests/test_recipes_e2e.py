"""Recipes, the command line, and one end-to-end CLIP run on ShapesWorld."""
import json

import pytest

from polymodal.config import ConfigError
from polymodal.train.run import load_recipe, run_recipe


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from polymodal.data.synthetic.shapes import generate_shapes
    out = tmp_path_factory.mktemp("shapes")
    generate_shapes(out, n_train=400, n_test=100, n_val=50, n_hard=40, seed=3, progress=False)
    return out


def _recipe(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_unknown_recipe_key_is_named_with_allowed_keys(tmp_path):
    path = _recipe(tmp_path, "method: clip\noptim:\n  lr: 1.0e-3\n  weight_decya: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_recipe(path)
    msg = str(e.value)
    assert str(path) in msg and "optim" in msg
    assert "'weight_decya'" in msg and "allowed keys" in msg and "weight_decay" in msg


def test_unknown_top_level_section_and_bad_type(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key\(s\) 'trian'"):
        load_recipe(_recipe(tmp_path, "trian: {steps: 3}\n"))
    with pytest.raises(ConfigError, match=r"train.steps: expected int"):
        load_recipe(_recipe(tmp_path, "train: {steps: many}\n"))
    with pytest.raises(ConfigError, match="method 'clipp'"):
        load_recipe(None, ["method=clipp"])


def test_overrides_are_typed(tmp_path):
    cfg = load_recipe(_recipe(tmp_path, "optim: {lr: 0.1}\n"), ["optim.lr=1e-3", "train.steps=7", "loss.local_loss=false"])
    assert cfg.optim.lr == 1e-3 and cfg.train.steps == 7 and cfg.loss.local_loss is False
    with pytest.raises(ConfigError, match="key=value"):
        load_recipe(None, ["optim.lr"])
    with pytest.raises(ConfigError, match=r"unknown key\(s\) 'lrr'"):
        load_recipe(None, ["optim.lrr=1"])


def test_languages_with_shards_are_refused_rather_than_ignored():
    with pytest.raises(ConfigError, match=r"data.langs=\['en', 'zh'\] needs data.train"):
        load_recipe(None, ["data.shards=some/shards", "data.langs=[en,zh]"])


def test_missing_manifest_is_a_clear_error(tmp_path):
    cfg = load_recipe(None, [f"out_dir={tmp_path}/run", f"data.train={tmp_path}/nope.jsonl", "model.name=tiny"])
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        run_recipe(cfg)


def test_clip_trains_on_shapes_far_above_chance(shapes, tmp_path):
    overrides = [
        f"out_dir={tmp_path}/run", "model.name=tiny", f"data.train={shapes}/train.jsonl", "data.batch_size=40",
        "tokenizer.vocab_size=400", "optim.lr=2e-3", "optim.warmup_steps=10", "train.steps=120",
        "train.log_every=20", "train.ckpt_every=60", "train.progress=false",
        f"eval.retrieval={shapes}/test.jsonl", f"eval.classes={shapes}/classes.json",
    ]
    final = run_recipe(load_recipe(None, overrides))
    # 100 test images, 4 captions each: chance text->image R@5 is 5%; 64 classes: chance top-1 1.6%.
    assert final["eval/retrieval/text_to_image_R@5"] > 20
    assert final["eval/zeroshot/top1"] > 8
    saved = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    assert saved["step"] == 120
    # The saved model reloads and gives the same numbers through the eval command.
    from polymodal.cli import main
    out = tmp_path / "m.json"
    main(["eval", str(tmp_path / "run" / "model"), "--task", "retrieval", "--data", f"{shapes}/test.jsonl",
          "--out", str(out)])
    again = json.loads(out.read_text())
    assert again["text_to_image_R@5"] == pytest.approx(final["eval/retrieval/text_to_image_R@5"])


def test_bad_records_in_training_data_name_the_line_or_are_counted(shapes, tmp_path):
    lines = (shapes / "train.jsonl").read_text().splitlines()[:60]
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    rec = json.loads(lines[0])
    rec["image"] = str(tmp_path / "broken.png")
    lines[5] = json.dumps(rec)
    lines[9] = "{not json"
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(l.replace('"images/', f'"{shapes}/images/') for l in lines) + "\n")
    base = [f"out_dir={tmp_path}/run", "model.name=tiny", f"data.train={bad}", "data.batch_size=16",
            "tokenizer.vocab_size=300", "train.steps=10", "train.progress=false", "train.ckpt_every=0"]
    with pytest.raises(Exception, match=r"bad.jsonl.* line 10.*on_bad_record=skip"):
        run_recipe(load_recipe(None, base))
    run_recipe(load_recipe(None, base + ["data.on_bad_record=skip", f"out_dir={tmp_path}/run2"]))
    records = [json.loads(l) for l in (tmp_path / "run2" / "metrics.jsonl").read_text().splitlines()]
    image_errors = [r["bad_records"] for r in records if "bad_records" in r]
    manifest_errors = [r["manifest_skipped"] for r in records if "manifest_skipped" in r]
    assert manifest_errors == [{"malformed_line": 1}]
    # 59 records, batches of 16: 10 steps pass over the data almost 3 times; the one broken image counts once.
    assert image_errors and image_errors[-1] == {"unreadable_image": 1}, image_errors[-1]
    final = json.loads((tmp_path / "run2" / "final_metrics.json").read_text())
    assert final["bad_records"] == {"unreadable_image": 1} and final["manifest_skipped"] == {"malformed_line": 1}


def test_training_streams_webdataset_shards_and_resumes(shapes, tmp_path):
    from polymodal.cli import main
    main(["data", "shard", f"{shapes}/train.jsonl", "--out", str(tmp_path / "shards"), "--max-count", "100"])
    base = [f"out_dir={tmp_path}/run", "model.name=tiny", f"data.shards={tmp_path}/shards", "data.batch_size=32",
            f"tokenizer.path={tmp_path}/tok", "train.steps=16", "train.log_every=1", "train.ckpt_every=3",
            "train.progress=false"]
    from polymodal.data.manifests import read_manifest
    from polymodal.data.text import train_tokenizer
    captions = [r["caption"] for r in read_manifest(f"{shapes}/train.jsonl").records]
    train_tokenizer(captions, kind="bpe", vocab_size=300).save(tmp_path / "tok")
    run_recipe(load_recipe(None, base + ["train.stop_after=7"]))      # 400 samples / 32 = 12 batches an epoch
    run_recipe(load_recipe(None, base))
    run_recipe(load_recipe(None, base[1:] + [f"out_dir={tmp_path}/straight"]))
    read = lambda p: [r["loss"] for r in map(json.loads, open(p)) if "loss" in r]
    resumed, straight = read(tmp_path / "run" / "metrics.jsonl"), read(tmp_path / "straight" / "metrics.jsonl")
    assert len(straight) == 16 and resumed == straight


def test_bilingual_training_beats_chance_in_both_languages(shapes, tmp_path):
    """Mixed English/Chinese captions: one tokenizer and one model serve both languages."""
    overrides = [
        f"out_dir={tmp_path}/run", "model.name=tiny", f"data.train={shapes}/train.jsonl", "data.batch_size=40",
        "data.langs=[en,zh]", "tokenizer.vocab_size=600", "optim.lr=2e-3", "optim.warmup_steps=10",
        "train.steps=150", "train.ckpt_every=0", "train.progress=false",
        f"eval.retrieval={shapes}/test.jsonl", f"eval.classes={shapes}/classes.json", "eval.langs=[en,zh]",
    ]
    final = run_recipe(load_recipe(None, overrides))
    # 100 images x 4 captions: chance text->image R@5 is 5%.
    assert final["eval/retrieval/text_to_image_R@5"] > 12
    assert final["eval/retrieval_zh/text_to_image_R@5"] > 12
