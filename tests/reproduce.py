"""What training evaluated is what a user loads: a run's final eval numbers against `polymodal eval` on its saved
model (shared by the tests of the methods that wrap a model)."""
import json

import pytest

from polymodal.cli import main


def assert_eval_reproduces(final: dict, model_dir, task: str, data, out_json, abs_tol: float = 1e-6,
                           options: tuple = ()) -> None:
    """Every `eval/<task>/...` number of `final` equals `polymodal eval MODEL --task TASK --data DATA`'s.

    Args:
        final: a run's final metrics (`run_recipe`'s return).
        model_dir: the run's saved model folder.
        out_json: where `polymodal eval --out` writes its numbers.
        options: `-o KEY=VALUE` task options.
    """
    extra = [a for o in options for a in ("-o", o)]
    assert main(["eval", str(model_dir), "--task", task, "--data", str(data), "--out", str(out_json), *extra]) in (0, None)
    got = json.loads(open(out_json).read())
    prefix = f"eval/{task}/"
    want = {k[len(prefix):]: v for k, v in final.items() if k.startswith(prefix)}
    assert want and set(want) == set(got)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=abs_tol), k
