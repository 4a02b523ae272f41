"""What training evaluated is what a user loads: for every recipe in recipes/, a short run's final eval numbers
(final_metrics.json) equal `polymodal eval out_dir/model` run with the commands the run wrote
(eval_commands.json), to 1e-4. One recipe per method runs in the default suite; every recipe under `-m slow`.

Each recipe runs as written except for its size (2 steps, batch 8) and its data paths, which point at small
worlds built here in the recipes' own layouts (`data/<world>/...`, `runs/<run>/model`)."""
import json
import shlex
from pathlib import Path

import pytest
import yaml

from polymodal.cli import main

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
# One recipe per method that adapts or wraps a model (the list) plus the plain families.
DEFAULT = ("scene_two_stream", "m2raap_tiny", "snps3_full", "shenet_full", "reward_tiny", "asd_full",
           "text_as_image", "video_stan", "vqa_shapes")
SIZE = ["train.steps=2", "data.batch_size=8", "data.num_workers=0", "train.log_every=1", "train.ckpt_every=0",
        "train.progress=false", "train.threads=1", "train.report=false", "train.val_loss_every=0"]


@pytest.fixture(scope="module")
def worlds(tmp_path_factory, moving_world):
    """`data/<name>` of the recipes -> a small world of that layout."""
    from polymodal.data.frame_shards import write_frame_shards
    from polymodal.data.synthetic.counterfactual import generate_counterfactual
    from polymodal.data.synthetic.preferences import generate_preferences
    from polymodal.data.synthetic.shapes import generate_shapes
    shapes = tmp_path_factory.mktemp("shapes")
    generate_shapes(shapes, n_train=64, n_test=16, n_val=16, n_hard=8, seed=4, progress=False)
    moving = moving_world(n_train=32, n_test=8, n_val=8, seed=11, num_frames=8)
    # M2-RAAP's ACG reads auxiliary captions: every video gets two (another record's captions, any text will do),
    # in the test and training manifests alike, so the evaluation really goes through the ACG head.
    for split in ("train", "test", "val"):
        rows = [json.loads(x) for x in (moving / f"{split}.jsonl").read_text().splitlines()]
        for i, r in enumerate(rows):
            r["aux_captions"] = [rows[(i + 1) % len(rows)]["caption"], rows[(i + 2) % len(rows)]["caption"]]
        (moving / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (moving / "train_filtered.jsonl").write_text((moving / "train.jsonl").read_text())
    for split in ("train", "test"):          # the names the M2-RAAP recipes' aux-captions steps write
        (moving / f"{split}_aux.jsonl").write_text((moving / f"{split}.jsonl").read_text())
    if not (moving / "frames_kf").exists():
        write_frame_shards(moving / "train_filtered.jsonl", moving / "frames_kf", num_frames=4, strategy="keyframes",
                           progress=False)
    prefs = tmp_path_factory.mktemp("prefs")
    generate_preferences(prefs, n_train=48, n_base=24, n_val=16, n_test=24, seed=0)
    counterfactual = tmp_path_factory.mktemp("counterfactual")
    generate_counterfactual(counterfactual, n_train_sets=6, n_eval_sets=3, seed=0)
    from polymodal.data.synthetic.moving_frames import MovingFramesConfig, generate_moving_frames
    frames = tmp_path_factory.mktemp("moving_frames")
    generate_moving_frames(frames, n_train=64, n_test=0, n_val=16, seed=0, cfg=MovingFramesConfig(positions=True),
                           progress=False)
    from polymodal.data.synthetic.shapes_qa import generate_shapes_qa
    shapes_qa = tmp_path_factory.mktemp("shapes_qa")
    generate_shapes_qa(shapes_qa, n_train=32, n_test=8, n_val=8, seed=4, progress=False, workers=1)
    from polymodal.data.synthetic.moving_qa import generate_moving_qa
    moving_qa = tmp_path_factory.mktemp("moving_qa")
    generate_moving_qa(moving, moving_qa)
    return {"shapes": shapes, "shapes_qa": shapes_qa, "moving_qa": moving_qa, "shapes_coca": shapes, "shapes_lotlip": shapes, "shapes_m2": shapes, "moving": moving,
            "moving_distractors": moving_world(n_train=32, n_test=8, seed=12, num_frames=8, distractor_fraction=0.8),
            "moving_m2raap": moving, "moving_m2raap_small": moving, "moving_scene": moving,
            "prefs": prefs, "counterfactual": counterfactual, "moving_frames": frames}


def _remap(value, worlds: dict, runs: dict, tmp: Path):
    """Recipe paths -> the test's: data/<world>/rest -> that world; runs/<run>/model -> a run made here."""
    if isinstance(value, dict):
        return {k: _remap(v, worlds, runs, tmp) for k, v in value.items()}
    if isinstance(value, list):
        return [_remap(v, worlds, runs, tmp) for v in value]
    if isinstance(value, str) and value.startswith("data/"):
        world, _, rest = value[len("data/"):].partition("/")
        return str(Path(worlds[world]) / rest)
    if isinstance(value, str) and value.startswith("runs/"):
        run = value[len("runs/"):].split("/")[0]
        return str(Path(runs[run]) / "model") if value.endswith("/model") else str(tmp / value)
    return value


@pytest.fixture(scope="module")
def train(worlds, tmp_path_factory):
    """`train(name) -> out_dir`: the recipe trained briefly (runs it starts from are trained first, once)."""
    from polymodal.train.run import load_recipe, run_recipe
    tmp = tmp_path_factory.mktemp("runs")
    done: dict = {}

    def run(name: str) -> Path:
        if name not in done:
            raw = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())
            starts = {v.split("/")[1] for v in _strings(raw) if v.startswith("runs/") and v.endswith("/model")}
            runs = {start: run(start) for start in starts}
            data = _remap(raw, worlds, runs, tmp)
            data["out_dir"] = str(tmp / name)
            run_recipe(load_recipe(None, SIZE, base=data))
            done[name] = tmp / name
        return done[name]
    return run


def _strings(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, str):
        yield value


def _assert_eval_reproduces(out_dir: Path, capsys):
    final = json.loads((out_dir / "final_metrics.json").read_text())
    commands = json.loads((out_dir / "eval_commands.json").read_text())
    assert commands, f"{out_dir}: the recipe evaluates nothing"
    checked = 0
    for prefix, line in commands.items():
        argv = shlex.split(line)
        assert argv[:2] == ["polymodal", "eval"] and argv[2] == str(out_dir / "model")
        capsys.readouterr()
        assert main(argv[1:]) == 0
        got = json.loads(capsys.readouterr().out)
        want = {k[len(f"eval/{prefix}/"):]: v for k, v in final.items() if k.startswith(f"eval/{prefix}/")}
        if argv[argv.index("--task") + 1] == "longtext":      # the CLI's long-text mode prints prefixed keys
            got = {k[len(f"{prefix}/"):]: v for k, v in got.items() if k.startswith(f"{prefix}/")}
        if argv[argv.index("--task") + 1] == "zeroshot":      # printed beside the numbers: what they were made with
            got = {k: v for k, v in got.items() if k not in ("class_names", "templates")}
        assert want and set(want) == set(got), (prefix, sorted(set(want) ^ set(got)))
        for k, v in want.items():
            assert (v is None and got[k] is None) or got[k] == pytest.approx(v, abs=1e-4, nan_ok=True), (prefix, k)
        checked += len(want)
    return checked


@pytest.mark.parametrize("name", DEFAULT)
def test_saved_model_reproduces_the_training_eval(name, train, capsys):
    assert _assert_eval_reproduces(train(name), capsys) > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(p.stem for p in RECIPES.glob("*.yaml") if p.stem not in DEFAULT))
def test_every_recipe_reproduces_its_training_eval(name, train, capsys):
    assert _assert_eval_reproduces(train(name), capsys) > 0


def test_m2raap_saved_model_is_the_acg_mug_model_training_evaluated(train):
    """The equality above is not the plain video model agreeing with itself: the saved model carries the heads."""
    from polymodal.hub import load_model
    from polymodal.models.video_heads import M2RAAPModel
    out = train("m2raap_tiny")
    model = load_model(out / "model")
    assert isinstance(model, M2RAAPModel) and model.config.similarity == "mug" and model.acg is not None
    assert float(model.acg.gate.detach().abs().sum()) > 0                 # the head trained
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["eval/video_retrieval/num_without_aux"] == 0            # and read the test videos' captions
