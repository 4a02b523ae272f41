"""Run logging (TensorBoard, validation loss) and the run report (`polymodal report`, its page in a browser)."""
import argparse
import html
import json
import math
import shutil
import subprocess

import pytest
import torch
from torch import nn

from polymodal.config import ConfigError
from polymodal.eval.html_report import (chance_levels, differing_sentences, group_metrics, headline, render_gallery,
                                        smooth)
from polymodal.train import logging as run_logging
from polymodal.train.loop import OptimConfig, TrainConfig, Trainer


class Regression(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.3), nn.Linear(16, 1))

    def forward(self, batch):
        loss = ((self.net(batch["x"]) - batch["y"]) ** 2).mean()
        return {"loss": loss, "mse": loss.detach()}


def make_loader(epoch, skip):
    g = torch.Generator().manual_seed(100 + epoch)
    x = torch.randn(48, 4, generator=g)
    return [{"x": x[i:i + 8], "y": x[i:i + 8].sum(1, keepdim=True)} for i in range(0, 48, 8)][skip:]


def val_batches():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(20, 4, generator=g)
    return [{"x": x[i:i + 8], "y": x[i:i + 8].sum(1, keepdim=True)} for i in range(0, 20, 8)]   # 8, 8, 4


def train(out, steps=6, val=False, **kw):
    cfg = TrainConfig(steps=steps, log_every=2, ckpt_every=3, progress=False,
                      val_loss_every=3 if val else 0, **kw)
    trainer = Trainer(Regression(), make_loader, OptimConfig(lr=1e-2, warmup_steps=2), cfg, out,
                      val_loader=val_batches if val else None)
    trainer.fit()
    return trainer


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---- train.log_to and TensorBoard ----------------------------------------------------------------------------
def test_log_to_is_checked_before_training(monkeypatch):
    with pytest.raises(ConfigError, match="must include jsonl"):
        TrainConfig(log_to=["tensorboard"]).validate("r.yaml")
    with pytest.raises(ConfigError, match="unknown target 'wandb'"):
        TrainConfig(log_to=["jsonl", "wandb"]).validate("r.yaml")
    monkeypatch.setattr(run_logging, "tensorboard_available", lambda: False)
    with pytest.raises(ConfigError, match=r"r.yaml: train.log_to lists tensorboard .* pip install tensorboard"):
        TrainConfig(log_to=["jsonl", "tensorboard"]).validate("r.yaml")
    TrainConfig(log_to=["jsonl"]).validate("r.yaml")


def test_log_to_override_parses_as_a_list():
    from polymodal.train.run import load_recipe
    cfg = load_recipe(None, ["train.log_to=[jsonl,tensorboard]"])
    assert cfg.train.log_to == ["jsonl", "tensorboard"]
    assert load_recipe(None, []).train.log_to == ["jsonl"]


def _read_events(folder):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_event_file_holds_the_logged_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    train(tmp_path, val=True, log_to=["jsonl", "tensorboard"])
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    events = _read_events(tmp_path / "tensorboard")
    logged = records(tmp_path / "metrics.jsonl")
    for key, tag in [("loss", "train/loss"), ("lr", "train/lr"), ("samples_per_s", "train/samples_per_s"),
                     ("val/loss", "val/loss")]:
        want = [(r["step"], r[key]) for r in logged if key in r]
        assert want and [s for s, _ in events[tag]] == [s for s, _ in want]
        assert [v for _, v in events[tag]] == pytest.approx([v for _, v in want], rel=1e-6)
    assert [s for s, _ in events["val/loss"]] == [3, 6]


def test_tensorboard_resume_drops_the_killed_runs_later_steps(tmp_path):
    pytest.importorskip("tensorboard")
    cfg = dict(log_to=["jsonl", "tensorboard"])
    train(tmp_path / "a", steps=8, **cfg)
    train(tmp_path / "b", steps=8, stop_after=4, **cfg)     # checkpoint at 3 and 4 (the stop)
    ckpts = sorted((tmp_path / "b" / "checkpoints").glob("*.pt"))
    ckpts[-1].unlink()                                       # resume from step 3: step 4 is logged twice
    train(tmp_path / "b", steps=8, **cfg)
    a, b = _read_events(tmp_path / "a" / "tensorboard"), _read_events(tmp_path / "b" / "tensorboard")
    assert [s for s, _ in b["train/loss"]] == [2, 4, 6, 8]
    assert [v for _, v in b["train/loss"]] == pytest.approx([v for _, v in a["train/loss"]], rel=1e-6)


def test_step_zero_records_before_a_resume_do_not_purge_the_kept_steps(tmp_path):
    pytest.importorskip("tensorboard")
    first = run_logging.RunLogger(tmp_path, ["jsonl", "tensorboard"])
    for step in range(1, 7):
        first.log({"step": step, "loss": float(step)})
    first.close()
    second = run_logging.RunLogger(tmp_path, ["jsonl", "tensorboard"])    # a new process resuming at step 3
    second.log({"step": 0, "manifest_skipped": {"malformed_line": 2}})     # logged before the resume is known
    second.log({"event": "resumed", "checkpoint": "c.pt", "step": 3})
    for step in range(4, 7):
        second.log({"step": step, "loss": 10.0 * step})
    second.close()
    events = _read_events(tmp_path / "tensorboard")
    assert events["train/loss"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0)]
    assert events["train/manifest_skipped/malformed_line"] == [(0, 2.0)]


def test_scalars_flatten_dicts_and_skip_non_numbers():
    rec = {"step": 5, "loss": 1.5, "eval/retrieval/R@1": 3.0, "event": "resumed", "ok": True,
           "bad_records": {"corrupt_image": 2}, "nan": float("nan"), "AP": [1.0]}
    assert run_logging.scalars(rec) == {"train/loss": 1.5, "eval/retrieval/R@1": 3.0,
                                       "train/bad_records/corrupt_image": 2.0}


# ---- validation loss -----------------------------------------------------------------------------------------
def test_val_loss_is_the_sample_mean_and_leaves_training_unchanged(tmp_path):
    with_val = train(tmp_path / "v", val=True)
    plain = train(tmp_path / "p", val=False)
    loss = lambda p: [r["loss"] for r in records(p / "metrics.jsonl") if "loss" in r]
    assert loss(tmp_path / "v") == loss(tmp_path / "p")            # RNG restored: training is bit-identical
    task = with_val.task.eval()
    with torch.no_grad():                                           # independent: all 20 validation samples at once
        x = torch.cat([b["x"] for b in val_batches()])
        want = float(((task.net(x) - x.sum(1, keepdim=True)) ** 2).mean())
    last = [r for r in records(tmp_path / "v" / "metrics.jsonl") if "val/loss" in r][-1]
    assert last["step"] == 6 and last["val/loss"] == pytest.approx(want, rel=1e-5)
    assert plain.task.training is True


def test_val_loss_without_batches_is_a_config_error(tmp_path):
    cfg = TrainConfig(steps=2, val_loss_every=1, progress=False)
    with pytest.raises(ConfigError, match="train.val_loss_every=1 needs validation batches"):
        Trainer(Regression(), make_loader, OptimConfig(), cfg, tmp_path)
    with pytest.raises(ConfigError, match="train.val_loss_every must be an integer >= 0"):
        TrainConfig(val_loss_every=-1).validate()


# ---- report pieces -------------------------------------------------------------------------------------------
def test_smooth_is_the_debiased_ema():
    xs = [4.0, 2.0, 3.0, 1.0]
    w = 0.6
    acc, want = 0.0, []
    for t, x in enumerate(xs, 1):
        acc = w * acc + (1 - w) * x
        want.append(acc / (1 - w ** t))
    assert smooth(xs, w) == pytest.approx(want)
    assert smooth(xs, 0.0) == xs
    assert smooth([5.0, 5.0, 5.0], 0.9) == pytest.approx([5.0] * 3)


def test_chance_levels_from_each_groups_counts():
    m = {"retrieval/text_to_image_R@5": 40.0, "retrieval/image_to_text_R@1": 10.0,
         "retrieval/image_to_text_R@5": 30.0, "retrieval/mean_recall": 20.0, "retrieval/text_to_image_median_rank": 3,
         "retrieval/num_images": 100, "retrieval/num_texts": 200,
         "zeroshot/top1": 9.0, "zeroshot/top5": 20.0, "zeroshot/num_classes": 64, "other/mystery": 1.0}
    c = chance_levels(m)
    assert c["retrieval/text_to_image_R@5"] == pytest.approx(5.0)
    # 2 captions per image among 200 texts: P(one of them in a random top k) = 1 - C(198, k) / C(200, k)
    for k in (1, 5):
        assert c[f"retrieval/image_to_text_R@{k}"] == pytest.approx(100 * (1 - math.comb(198, k) / math.comb(200, k)))
    assert c["retrieval/mean_recall"] == pytest.approx((5.0 + c["retrieval/image_to_text_R@1"]
                                                        + c["retrieval/image_to_text_R@5"]) / 3)
    assert c["retrieval/text_to_image_median_rank"] == 50.5
    assert c["zeroshot/top1"] == pytest.approx(100 / 64) and c["zeroshot/top5"] == pytest.approx(500 / 64)
    assert "other/mystery" not in c


def test_groups_keep_counts_apart_and_pick_headlines():
    m = {"retrieval/text_to_image_R@1": 7.0, "retrieval/mean_recall": 20.0, "retrieval/num_images": 10,
         "zeroshot/top1": 9.0, "multilabel/AP_per_class": [1.0, 2.0], "multilabel/mAP": 30.0}
    groups = group_metrics(m, chance_levels(m))
    assert [g.name for g in groups] == ["retrieval", "zeroshot", "multilabel"]
    assert [g.headline for g in groups] == ["mean_recall", "top1", "mAP"]
    assert groups[0].counts == {"num_images": 10} and "num_images" not in groups[0].metrics
    assert "AP_per_class" not in groups[2].metrics
    label, value, chance = headline(groups)     # chance of mean_recall: the mean of its R@K chances (R@1: 1/10)
    assert (label, value) == ("retrieval/mean_recall", 20.0) and chance == pytest.approx(10.0)


def test_differing_sentence_is_marked_and_text_kept_whole():
    a = "A red circle is in the middle. A small blue square is at the top left. The background is white."
    b = "A red circle is in the middle. A small green square is at the top left. The background is white."
    parts = differing_sentences(a, b)
    assert "".join(p for p, _ in parts) == a
    assert [p for p, d in parts if d] == ["A small blue square is at the top left."]
    assert not any(d for _, d in differing_sentences("a cat.", "a dog."))     # all differ: nothing singled out
    assert not any(d for _, d in differing_sentences(a, None))


def _image(path, color):
    from PIL import Image
    Image.new("RGB", (16, 16), color).save(path)
    return str(path)


def test_gallery_shows_the_right_image_when_it_ranks_below_the_top(tmp_path):
    imgs = [_image(tmp_path / f"{i}.png", (40 * i, 0, 0)) for i in range(7)]
    ranked = [{"image": p, "score": 0.9 - 0.1 * i, "caption": f"c{i}"} for i, p in enumerate(imgs[:5])]
    rows = [{"text": "query one.", "target": imgs[6], "rank": 37, "target_score": 0.1, "ranked": ranked,
             "sentences": [("query one.", False)]},
            {"text": "query two.", "target": imgs[0], "rank": 1, "target_score": 0.9, "ranked": ranked,
             "sentences": [("query two.", True)]}]
    page = render_gallery(rows, "G")
    assert page.count("class='gallery-row'") == 2
    assert page.count("class='target'") == 2 and "#37 right image" in page and "data-rank='37'" in page
    assert "<mark class='differs'>query two.</mark>" in page


# ---- a whole run: report, CLI, browser -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from polymodal.data.synthetic.shapes import generate_shapes
    from polymodal.train.run import load_recipe, run_recipe
    root = tmp_path_factory.mktemp("report")
    generate_shapes(root / "data", n_train=120, n_test=40, n_val=20, n_hard=16, seed=1, progress=False)
    d = root / "data"
    run_recipe(load_recipe(None, [
        f"out_dir={root}/run", "model.name=tiny", f"data.train={d}/train.jsonl", "data.batch_size=20",
        "tokenizer.vocab_size=300", "optim.warmup_steps=2", "train.steps=8", "train.log_every=1",
        "train.eval_every=4", "train.ckpt_every=0", "train.progress=false", f"eval.retrieval={d}/test.jsonl",
        f"eval.longtext={d}/hard.jsonl", f"eval.classes={d}/classes.json"]))
    return root / "run"


def test_report_of_a_run_has_headline_groups_curves_galleries_and_recipe(trained_run):
    from polymodal.run_report import add_cli_arguments, main_from_args
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    page = main_from_args(parser.parse_args([str(trained_run), "--queries", "3", "--pool", "40"]))
    text = page.read_text()
    final = json.loads((trained_run / "final_metrics.json").read_text())
    want = f"{final['eval/retrieval/mean_recall']:.2f}"
    assert "id='headline'>retrieval/mean_recall = <b>" + want in text
    assert "data-group='retrieval'" in text and "data-group='longtext'" in text and "data-group='zeroshot'" in text
    assert text.count("class='gallery-row'") == 6 and text.count("class='target-rank") == 6
    assert text.count("class='target'") == 6                     # the right image in every row, whatever its rank
    assert "<pre class='recipe'>method: clip\n" in html.unescape(text) and (trained_run / "curves.png").stat().st_size > 0
    assert "No validation loss logged" in text
    assert (trained_run / "report.md").read_text().startswith("# polymodal run: clip")


def test_report_cli_errors_name_the_folder(tmp_path):
    from polymodal.run_report import write_run_report
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_run_report(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json or metrics.jsonl"):
        write_run_report(tmp_path)


def _browser():
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_report_page_renders_in_headless_chromium(trained_run, tmp_path):
    browser = _browser()
    if browser is None:
        pytest.skip("no chromium/chromium-browser on PATH")
    from PIL import Image
    from polymodal.run_report import write_run_report
    page = write_run_report(trained_run, n_queries=2, pool=40)
    common = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(common + ["--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert "id=\"headline\"" in dom and "retrieval/mean_recall" in dom
    rows = dom.split("class=\"gallery-row\"")[1:]
    assert len(rows) == 4 and all("class=\"target-rank" in r and "<img" in r and "class=\"target\"" in r for r in rows)
    shot = tmp_path / "shot.png"
    subprocess.run(common + [f"--screenshot={shot}", "--window-size=1280,2400", "--hide-scrollbars", page.as_uri()],
                   capture_output=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 0
    im = Image.open(shot).convert("L")
    lo, hi = im.getextrema()
    assert hi - lo > 100                                                # not a blank page
    colours = Image.open(shot).convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is None or len(colours) > 50                        # text, plots and images, not one colour


@pytest.mark.slow
def test_demo_writes_the_improved_report(tmp_path):
    from polymodal.cli import main
    assert main(["demo", "--out", str(tmp_path / "demo"), "--n-train", "200", "--steps", "8", "--batch-size", "32",
                 "--model", "tiny", "tokenizer.vocab_size=300", "train.progress=false"]) == 0
    text = (tmp_path / "demo" / "run" / "report.html").read_text()
    assert "id='headline'" in text and "data-group='longtext'" in text
    assert text.count("class='gallery-row'") == 8 and text.count("class='target'") == 8
    assert "<mark class='differs'>" in text


def test_chance_levels_of_the_video_scene_reward_fairness_and_word_tasks():
    from polymodal.eval.html_report import chance_levels, group_metrics, headline
    metrics = {"video_retrieval/text_to_video_R@5": 20.0, "video_retrieval/video_to_text_R@1": 9.0,
               "video_retrieval/text_to_video_median_rank": 4.0, "video_retrieval/mean_recall": 30.0,
               "video_retrieval/num_videos": 10, "video_retrieval/num_texts": 10,
               "snps3_retrieval/rerank_text_to_video_R@1": 12.0, "snps3_retrieval/num_videos": 20,
               "snps3_retrieval/num_texts": 20, "snps3_retrieval/word_P@1": 40.0,
               "snps3_retrieval/word_chance": 12.5,
               "scene/mAP": 31.0, "scene/mAP_chance": 13.6, "scene/temporal/mAP": 20.0, "scene/num_videos": 8,
               "preference/accuracy": 70.0, "preference/accuracy_tone": 60.0, "preference/pairs": 100,
               "fairness/min_skew/race": -0.4, "fairness/max_skew": 0.3, "fairness/task_accuracy": 80.0}
    chance = chance_levels(metrics)
    assert chance["video_retrieval/text_to_video_R@5"] == pytest.approx(50.0)
    assert chance["video_retrieval/text_to_video_median_rank"] == 5.5
    assert chance["snps3_retrieval/rerank_text_to_video_R@1"] == pytest.approx(5.0)
    assert chance["snps3_retrieval/word_P@1"] == 12.5 and chance["scene/mAP"] == 13.6
    assert chance["preference/accuracy"] == chance["preference/accuracy_tone"] == 50.0
    assert chance["fairness/min_skew/race"] == chance["fairness/max_skew"] == 0.0
    groups = {g.name: g for g in group_metrics(metrics, chance)}
    assert "temporal/mAP" in groups["scene"].metrics and "mAP_chance" not in groups["scene"].metrics
    assert groups["fairness"].headline == "max_skew"                        # not the first per-attribute skew
    assert headline([groups["preference"]])[2] == 50.0
