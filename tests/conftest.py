"""Shared test helpers."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def load_benchmark():
    """`load_benchmark("name")`: the module of `benchmarks/name.py`, imported from its file."""
    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return load


@pytest.fixture(scope="session")
def moving_world(tmp_path_factory):
    """`moving_world(**kw)`: the folder of a small MovingShapes world (32 px, one worker), made once per settings."""
    made: dict = {}

    def make(**kw):
        from polymodal.data.synthetic.moving_shapes import generate_moving_shapes
        settings = {"n_val": 0, "image_size": 32, "workers": 1, "progress": False, **kw}
        key = tuple(sorted(settings.items()))
        if key not in made:
            made[key] = tmp_path_factory.mktemp("moving")
            generate_moving_shapes(made[key], **settings)
        return made[key]
    return make
