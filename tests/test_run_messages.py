"""What training says before its first step (as HF Trainer users expect) and when it resumes."""
import pytest

from polymodal.train.run import load_recipe, run_recipe


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from polymodal.data.synthetic.shapes import generate_shapes
    out = tmp_path_factory.mktemp("shapes")
    generate_shapes(out, n_train=48, n_test=8, n_val=0, n_hard=0, seed=5, progress=False)
    return out


def test_training_says_its_device_threads_parameters_data_and_resume(shapes, tmp_path, capsys):
    overrides = [f"out_dir={tmp_path}/run", "model.name=tiny", f"data.train={shapes}/train.jsonl",
                 "data.batch_size=16", "tokenizer.vocab_size=200", "train.steps=4", "train.ckpt_every=2",
                 "train.progress=false", "train.threads=1", "train.report=false"]
    run_recipe(load_recipe(None, overrides + ["train.stop_after=2"]))
    out = capsys.readouterr().out
    assert "train: device cpu, 1 torch thread(s) (train.threads=1), 1 process(es)" in out
    assert "trained of" in out and "parameters; 4 steps" in out
    assert "data: 48 samples, batch 16 per process, 3 steps per epoch" in out
    run_recipe(load_recipe(None, overrides))
    assert "resuming from step 2 (checkpoint" in capsys.readouterr().out
    run_recipe(load_recipe(None, overrides))
    assert "(the run is finished: nothing left to train)" in capsys.readouterr().out


def test_saved_models_and_results_get_the_usual_permissions(shapes, tmp_path):
    """Atomic writes start from owner-only temporary files (0600 / 0700); what lands follows the umask."""
    import os
    import stat
    old = os.umask(0o022)
    try:
        run_recipe(load_recipe(None, [f"out_dir={tmp_path}/run", "model.name=tiny", f"data.train={shapes}/train.jsonl",
                                      "data.batch_size=16", "tokenizer.vocab_size=200", "train.steps=1",
                                      "train.progress=false", "train.threads=1", "train.report=false",
                                      "train.ckpt_every=0"]))
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)
    assert mode(tmp_path / "run" / "model") == 0o755
    assert mode(tmp_path / "run" / "model" / "model.safetensors") == 0o644
    assert mode(tmp_path / "run" / "model" / "config.json") == 0o644
    assert mode(tmp_path / "run" / "final_metrics.json") == 0o644 and mode(tmp_path / "run" / "config.json") == 0o644


def test_data_commands_print_absolute_output_folders(tmp_path, monkeypatch, capsys):
    import json

    from polymodal.cli import main
    monkeypatch.chdir(tmp_path)
    assert main(["data", "preferences", "--out", "prefs", "--n-train", "8", "--n-base", "4", "--n-val", "2",
                 "--n-test", "2"]) in (0, None)
    assert json.loads(capsys.readouterr().out)["out_dir"] == str(tmp_path / "prefs")


@pytest.fixture(scope="module")
def compound_world(tmp_path_factory):
    from polymodal.data.synthetic.moving_shapes import generate_moving_shapes
    out = tmp_path_factory.mktemp("moving")
    generate_moving_shapes(out, n_train=4, n_test=2, num_frames=4, image_size=16, compound_fraction=1.0,
                           progress=False, workers=1)
    return out


@pytest.mark.parametrize("recipe, frames, message", [
    ("video_mean", 8, r"data.num_frames=8: the videos beside .* have 4 frames .*set data.num_frames=4 or regenerate"),
    ("scene_frame", 2, r"data.num_frames=2: the videos .* have 4 frames and compound order labels"),
])
def test_recipes_are_checked_against_the_world_they_train_on(compound_world, tmp_path, recipe, frames, message):
    from polymodal.config import ConfigError
    from polymodal.train.run import check_data
    overrides = [f"out_dir={tmp_path}/run", f"data.train={compound_world}/train.jsonl", "eval.tasks=[]",
                 "model.path="]                                   # from random weights: no stand-in built here
    if recipe == "scene_frame":
        overrides.append(f"scene.classes={compound_world}/classes.json")
    check_data(load_recipe(f"recipes/{recipe}.yaml", overrides + ["data.num_frames=4"]))     # matches: fine
    with pytest.raises(ConfigError, match=message):
        run_recipe(load_recipe(f"recipes/{recipe}.yaml", overrides + [f"data.num_frames={frames}"]))
    assert not (tmp_path / "run").exists()                                                  # before anything
    evals = [f"eval.tasks=[{{task: video_retrieval, data: {compound_world}/test.jsonl, num_frames: 8}}]"]
    with pytest.raises(ConfigError, match=r"eval video_retrieval num_frames=8: .*set num_frames=4"):
        check_data(load_recipe(f"recipes/{recipe}.yaml", overrides + ["data.num_frames=4"] + evals))


def _header_worlds(text: str) -> dict:
    """`--out FOLDER` -> its flags, for every `polymodal data moving-shapes` line of a recipe header."""
    import re
    header = "\n".join(line[1:] for line in text.splitlines() if line.startswith("#")).replace("\\\n", " ")
    return {m.group(1): m.group(2) for m in re.finditer(r"data moving-shapes --out (\S+)([^\n]*)", header)}


def test_every_video_recipe_generates_the_world_it_reads():
    """A recipe that reads data/moving*/ says how to make that folder, with at least the frames it samples."""
    import re
    from pathlib import Path

    import yaml
    recipes = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
    worlds: dict = {}                   # recipes that share a folder generate it alike (none overwrites another's)
    for path in recipes:
        for folder, flags in _header_worlds(path.read_text()).items():
            flags = sorted(flags.split("#")[0].split())
            first = worlds.setdefault(folder, (path.name, flags))
            assert first[1] == flags, f"{path.name} and {first[0]} generate {folder} differently: {flags} vs {first[1]}"
    checked = 0
    for path in recipes:
        raw = yaml.safe_load(path.read_text())
        train = (raw.get("data") or {}).get("train", "")
        folder = "/".join(train.split("/")[:2])
        if not re.fullmatch(r"data/moving(_[a-z0-9_]+)?", folder) or folder == "data/moving_frames":
            continue
        own = _header_worlds(path.read_text())
        qa = re.search(rf"data moving-qa --world (\S+) --out {re.escape(folder)}\b", path.read_text())
        folder = qa.group(1) if qa else folder          # a QA folder is made from a world the header makes
        assert folder in own, f"{path.name} reads {folder} but its header does not generate it"
        frames = re.search(r"--num-frames (\d+)", own[folder])
        assert int(frames.group(1) if frames else 16) >= raw["data"].get("num_frames", 8), path.name
        checked += 1
    assert checked >= 10


def test_a_missing_start_names_the_recipe_that_builds_it(tmp_path, monkeypatch):
    """The adaptation recipes start from `runs/clip_moving_standin/model`: before it is built, the run stops at
    start-up and says which recipe builds it, or how to start from random weights instead."""
    import shutil
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "recipes").mkdir()
    for name in ("video_mean", "clip_moving_standin"):
        shutil.copy(repo / "recipes" / f"{name}.yaml", tmp_path / "recipes")
    monkeypatch.chdir(tmp_path)                                   # a checkout where the stand-in is not built yet
    overrides = ["out_dir=run", "data.train=recipes/video_mean.yaml"]
    with pytest.raises(FileNotFoundError, match=r"model.path: runs/clip_moving_standin/model does not exist .*build it "
                                                r"first with `polymodal train recipes/clip_moving_standin.yaml`.*model.path= "):
        run_recipe(load_recipe("recipes/video_mean.yaml", overrides))
    with pytest.raises(FileNotFoundError, match=r"model.path: runs/nothing/model does not exist [^`]*point model.path"):
        run_recipe(load_recipe("recipes/video_mean.yaml", overrides + ["model.path=runs/nothing/model"]))
    assert not (tmp_path / "run").exists()


def test_a_nested_model_override_changes_only_the_keys_it_names():
    """`model.overrides.vision.width=64` on the command line arrives as {"vision": {"width": 64}}: it must change
    the width of the named config's tower, not replace the whole `vision` section with defaults."""
    from polymodal.models.factory import build_config
    cfg = load_recipe(None, ["model.name=tiny", "model.overrides.vision.width=64", "model.overrides.vision.heads=4"])
    nested = build_config("tiny", dict(cfg.model.overrides))
    dotted = build_config("tiny", {"vision.width": 64, "vision.heads": 4})
    tiny = build_config("tiny")
    assert nested.to_dict() == dotted.to_dict()
    assert (nested.vision.width, nested.vision.layers, nested.vision.image_size) == \
        (64, tiny.vision.layers, tiny.vision.image_size)
