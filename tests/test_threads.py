"""`train.threads=auto`: idle usable cores, at least one (issue: performance, item 4)."""
import pytest

from polymodal.train import threads


def test_fixed_values_pass_through():
    assert threads.resolve_threads(3) == 3
    assert threads.resolve_threads(0) == 0


def test_auto_takes_the_idle_cores(monkeypatch):
    monkeypatch.setattr(threads, "usable_cores", lambda: 4)
    assert threads.resolve_threads("auto", idle=4.0) == 4
    assert threads.resolve_threads("auto", idle=1.6) == 2
    assert threads.resolve_threads("auto", idle=0.2) == 1             # never zero
    assert threads.resolve_threads("auto", idle=7.5) == 4             # never more than this process may use
    monkeypatch.setattr(threads, "idle_cores", lambda: None)
    assert threads.resolve_threads("auto") == 4                       # unknown idleness: all usable cores


def test_idle_cores_from_two_readings(monkeypatch):
    readings = iter([(100, 1000), (250, 1200)])                       # 150 of 200 jiffies idle
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 2)
    assert threads.idle_cores(0.0, read=lambda: next(readings)) == pytest.approx(1.5)
    assert threads.idle_cores(0.0, read=lambda: None) is None


def test_reads_proc_stat(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  10 0 5 80 5 0 0 0 0 0\ncpu0 5 0 2 40 3 0 0 0 0 0\n")
    assert threads._read_cpu_times(str(stat)) == (85, 100)
    stat.write_text("intr 1 2 3\n")
    assert threads._read_cpu_times(str(stat)) is None


def test_the_command_line_defaults_to_auto_and_the_recipe_wins(tmp_path):
    from polymodal.cli import recipe_defaults
    from polymodal.train.run import load_recipe
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: clip\ntrain: {steps: 3}\n")
    cfg = load_recipe(recipe, [], base=recipe_defaults())
    assert cfg.train.threads == "auto" and cfg.train.steps == 3          # merged key by key, not replaced
    recipe.write_text("method: clip\ntrain: {steps: 3, threads: 1}\n")
    assert load_recipe(recipe, [], base=recipe_defaults()).train.threads == 1
    assert load_recipe(recipe, ["train.threads=2"], base=recipe_defaults()).train.threads == 2
    assert load_recipe(tmp_path / "r.yaml").train.threads == 1
