"""The CLIP stand-in (`benchmarks/common.py::clip_standin`): built once by a normal recipe run, cached by content."""
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_standin_is_built_once_and_keyed_by_content(tmp_path, load_benchmark):
    common = load_benchmark("common")
    small = dict(n_train=72, n_val=8, steps=2, threads=1)
    model = common.clip_standin(tmp_path, **small)
    assert (model / "config.json").is_file()
    stamp = (model / "model.safetensors").stat().st_mtime_ns
    assert common.clip_standin(tmp_path, **small) == model                  # cached: nothing retrained
    assert (model / "model.safetensors").stat().st_mtime_ns == stamp
    # The tokenizer knows the MovingShapes caption words (trained on the frames' source-video captions too).
    from polymodal.data.text import Tokenizer
    tok = Tokenizer.from_dir(model)
    assert tok.backend.token_to_id("\u0120moves") is not None                # "moves" is one piece
    # Another data setting or another recipe file is another stand-in.
    other = common.clip_standin(tmp_path, positions=False, **small)
    assert other != model
    recipe = tmp_path / "standin.yaml"
    shutil.copy(ROOT / "recipes" / "clip_moving_standin.yaml", recipe)
    recipe.write_text(recipe.read_text().replace("lr: 2.0e-3", "lr: 1.0e-3"))
    assert common.standin_key({"a": 1}, recipe, []) != common.standin_key({"a": 1}, common.STANDIN_RECIPE, [])
