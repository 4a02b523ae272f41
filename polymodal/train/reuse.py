"""Train a recipe, or reuse a finished run of the very same recipe (benchmarks and sweeps rerun cheaply)."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path


def train_or_reuse(cfg, fresh: bool = False) -> tuple[Path, float, bool]:
    """Run `cfg` (a `RunConfig`) unless `cfg.out_dir` already holds a finished run with an identical config.

    A folder with another config, or an unfinished run, is deleted first: its tokenizer or checkpoints
    belong to other settings and must not leak into this run.

    Args:
        cfg: the run, as `polymodal.train.run.load_recipe` returns it.
        fresh: retrain even when a finished run with the same config exists.
    Returns:
        (the saved model directory, training seconds (as recorded when the run was made), reused?).
    """
    from ..eval.report import write_json
    from .run import run_recipe

    out_dir = Path(cfg.out_dir)
    done, saved = out_dir / "final_metrics.json", out_dir / "config.json"
    want = json.loads(json.dumps(cfg.to_dict()))
    if out_dir.exists():
        same = saved.is_file() and json.loads(saved.read_text()) == want
        if same and done.is_file() and (out_dir / "model").is_dir() and not fresh:
            return out_dir / "model", float(json.loads(done.read_text()).get("train_seconds", 0.0)), True
        shutil.rmtree(out_dir)
    start = time.perf_counter()
    run_recipe(cfg)
    seconds = time.perf_counter() - start
    write_json(done, dict(json.loads(done.read_text()), train_seconds=seconds))
    return out_dir / "model", seconds, False
