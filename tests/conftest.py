"""Shared test helpers."""
import importlib.util
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")       # no test reaches a hub, also when pytest runs without make


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
def spawn_ranks():
    """`spawn_ranks(worker, args, world, out_dir, timeout_s)`: run `worker(rank, *args)` in `world` spawned
    processes, fail the test if they are not done within the deadline, and return the `out_dir/rank{r}.pt`
    results they wrote, in rank order (a fault in gloo's teardown after every result is written: `ranks.py`)."""
    import torch
    from ranks import run_ranks

    def run(worker, args: tuple, world: int, out_dir, timeout_s: float = 90) -> list:
        results = [Path(out_dir) / f"rank{r}.pt" for r in range(world)]
        run_ranks(worker, args, world, out_dir, timeout_s, finished=lambda r: results[r].is_file())
        return [torch.load(f, weights_only=True) for f in results]
    return run


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
