"""`polymodal report RUN_DIR`: the report of any finished (or running) training run, also written at the end
of `polymodal train`.

It reads what a run folder holds (`config.json`, `metrics.jsonl`, `final_metrics.json`, `model/`) and writes
`report.html` + `report.md` + `curves.png` beside them: the headline and grouped metrics with chance levels,
smoothed training-loss and validation-loss curves, text-to-image galleries on the recipe's retrieval
manifests (always showing the right image and its rank), and the recipe.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path


def read_run(run_dir: str | Path) -> tuple[dict, list[dict], dict]:
    """(recipe, metrics.jsonl records, final_metrics.json) of a run folder; missing files give empty values.

    Raises:
        FileNotFoundError: `run_dir` is not a folder, or holds neither config.json nor metrics.jsonl.
    """
    from .eval.html_report import read_metrics
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist (give the out_dir of a training run)")
    config_path, metrics_path = run_dir / "config.json", run_dir / "metrics.jsonl"
    if not config_path.is_file() and not metrics_path.is_file():
        raise FileNotFoundError(f"{run_dir}: no config.json or metrics.jsonl; is it the out_dir of a training run?")
    recipe = _read_json(config_path)
    final = _read_json(run_dir / "final_metrics.json")
    return recipe, read_metrics(metrics_path), final


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); the run may have been killed while writing it") from None
    return data if isinstance(data, dict) else {}


def eval_metrics(records: list[dict], final: dict) -> dict:
    """The run's latest evaluation as flat `group/metric` numbers (the "eval/" prefix removed):
    final_metrics.json's when present, else the last record with eval numbers."""
    source = final if any(k.startswith("eval/") for k in final) else next(
        (r for r in reversed(records) if any(k.startswith("eval/") for k in r)), {})
    return {k[5:]: v for k, v in source.items() if k.startswith("eval/")}


def training_notes(recipe: dict, records: list[dict], model_type: str | None = None) -> list[str]:
    """One-line facts of the run: method, model, data, steps, last (smoothed) training and validation loss.

    Args:
        recipe: the run's config.json.
        records: its metrics.jsonl records.
        model_type: the saved model's family (its config.json), when there is one: a method that builds its own
            towers (SNP-S3, an MLLM, a reward model) does not read `model.name`.
    """
    from .eval.html_report import curve_series, smooth
    notes = []
    model = recipe.get("model", {}) or {}
    data = recipe.get("data", {}) or {}
    train = recipe.get("train", {}) or {}
    if recipe:
        if model.get("path"):
            which = f"model `{model['path']}`"
        elif model_type in (None, "clip", "m2", "coca", "video_clip", "m2raap", "shenet", "scene"):
            which = f"model `{model.get('name', '?')}`"               # built from the bundled config
        else:
            which = "the method's own model"
        which += f" (model_type `{model_type}`)" if model_type else ""
        source = data.get("shards") or data.get("train") or "made by the method (no data.train)"
        notes.append(f"Method `{recipe.get('method', '?')}`, {which}, data `{source}`, batch "
                     f"{data.get('batch_size', '?')}, {train.get('steps', '?')} steps planned.")
    series = curve_series(records)
    loss = series.get("loss", [])
    if loss:
        last = smooth([v for _, v in loss])[-1]
        speed = [r["samples_per_s"] for r in records if isinstance(r.get("samples_per_s"), (int, float))]
        notes.append(f"Trained to step {loss[-1][0]}: training loss {loss[-1][1]:.4f} (smoothed {last:.4f})"
                     + (f", {sum(speed) / len(speed):.0f} samples/s on average." if speed else "."))
    val = series.get("val/loss", [])
    if val:
        notes.append(f"Validation loss at step {val[-1][0]}: {val[-1][1]:.4f} (best {min(v for _, v in val):.4f}).")
    elif recipe:
        notes.append("No validation loss logged: set train.val_data (a manifest like data.train) and "
                     "train.val_loss_every to get one.")
    bad = next((r["bad_records"] for r in reversed(records) if isinstance(r.get("bad_records"), dict)), None)
    if bad:
        notes.append("Records skipped in training (each once): " + ", ".join(f"{k}={v}" for k, v in bad.items()) + ".")
    read = next((r["manifest_skipped"] for r in records if isinstance(r.get("manifest_skipped"), dict)), None)
    if read:
        notes.append("Records the manifest reader left out: " + ", ".join(f"{k}={v}" for k, v in read.items()) + ".")
    return notes


def gallery_sources(recipe: dict) -> list[tuple[str, str, str]]:
    """(title, manifest, caption key) of the galleries a recipe's English retrieval evaluations give."""
    ev = recipe.get("eval", {}) or {}
    out = []
    if "en" in (ev.get("langs") or ["en"]):
        if ev.get("retrieval"):
            out.append(("Text-to-image retrieval (short captions)", ev["retrieval"], "caption"))
        if ev.get("longtext"):
            out.append(("Long-caption retrieval", ev["longtext"], "long_caption"))
    for item in ev.get("tasks") or []:
        if not isinstance(item, dict) or item.get("lang", "en") != "en" or not item.get("data"):
            continue
        if item.get("task") == "retrieval":
            out.append((f"Text-to-image retrieval ({Path(item['data']).name})", item["data"], "caption"))
        elif item.get("task") == "longtext":
            out.append((f"Long-caption retrieval ({Path(item['data']).name})", item["data"], "long_caption"))
    seen, unique = set(), []
    for title, path, key in out:
        if (path, key) not in seen:
            seen.add((path, key))
            unique.append((title, path, key))
    return unique


GALLERY_NOTE = ("Each row: the whole query text (sentences that differ from the nearest other caption, e.g. a "
                "hard-set sibling's, are highlighted), the top 5 images by similarity, and the right image "
                "framed green with its rank, also when it ranks lower.")


def build_galleries(model, sources: list[tuple[str, str, str]], n_queries: int = 4, pool: int = 200,
                    seed: int = 0) -> tuple[list[tuple[str, list[dict], str]], list[str]]:
    """Galleries for `sources` (see `gallery_sources`); a source that cannot be shown gives a note instead.

    Returns:
        (galleries for `write_report`, notes).
    """
    from .eval.html_report import gallery_rows
    galleries, notes = [], []
    for title, manifest, key in sources:
        if not Path(manifest).is_file():
            notes.append(f"Gallery '{title}' left out: {manifest} does not exist here.")
            continue
        try:
            rows = gallery_rows(model, manifest, caption_key=key, n_queries=n_queries, pool=pool, seed=seed)
        except Exception as e:   # a model or manifest this gallery cannot use (video, no images): say why
            notes.append(f"Gallery '{title}' left out: {type(e).__name__}: {' '.join(str(e).split())[:200]}")
            continue
        if rows:
            galleries.append((title, rows, GALLERY_NOTE))
    return galleries, notes


def _load_gallery_model(run_dir: Path):
    """The run's saved model if it can run galleries (a dual encoder with a tokenizer), else (None, why)."""
    model_dir = run_dir / "model"
    if not model_dir.is_dir():
        return None, "no saved model (model/) yet: galleries are drawn once the run has finished"
    from .hub import load_model
    try:
        model = load_model(model_dir)
    except Exception as e:   # any format problem: the report is still written without galleries
        return None, f"model/ could not be loaded for galleries ({type(e).__name__}: {e})"
    if getattr(model, "tokenizer", None) is None or not hasattr(model, "encode_image"):
        return None, "the saved model is not an image-text dual encoder with a tokenizer: no galleries"
    model.eval()
    return model, ""


def write_run_report(run_dir: str | Path, *, title: str | None = None, metrics: dict | None = None,
                     galleries: list | None = None, notes: list[str] = (), model=None, gallery: bool = True,
                     n_queries: int = 4, pool: int = 200, smoothing: float = 0.9) -> Path:
    """Write `report.html`, `report.md` and `curves.png` into a run folder.

    Args:
        run_dir: a training run's out_dir.
        title: page title (default from the method and folder name).
        metrics: flat `group/metric` numbers (default: the run's last evaluation).
        galleries: ready `(title, rows, note)` galleries (default: built from the recipe's retrieval manifests).
        notes: lines shown before the run's own notes.
        model: the model for the galleries (default: `run_dir/model` when it is a dual encoder).
        gallery: False = no galleries (faster; no model is loaded).
        n_queries, pool: queries per gallery and images searched.
        smoothing: EMA weight of the training-loss curve.
    Returns:
        The report.html path.
    Raises:
        FileNotFoundError: `run_dir` is not a run folder.
    """
    import torch
    from .eval.html_report import plot_curves, write_report
    run_dir = Path(run_dir)
    recipe, records, final = read_run(run_dir)
    metrics = eval_metrics(records, final) if metrics is None else metrics
    try:
        model_type = _read_json(run_dir / "model" / "config.json").get("model_type")
    except ValueError:                       # a broken saved config: the report still says the rest
        model_type = None
    all_notes = list(notes) + training_notes(recipe, records, model_type)
    if not metrics:
        all_notes.append("No evaluation numbers logged: list evaluations in the recipe's `eval` section.")
    curves = run_dir / "curves.png"
    plot_curves(records, curves, smoothing=smoothing)
    if galleries is None:
        galleries = []
        sources = gallery_sources(recipe) if gallery else []
        if sources:
            why = ""
            if model is None:
                model, why = _load_gallery_model(run_dir)
            if model is None:
                all_notes.append(f"Galleries left out: {why}.")
            else:
                with torch.no_grad():
                    galleries, more = build_galleries(model, sources, n_queries=n_queries, pool=pool)
                all_notes += more
    title = title or f"polymodal run: {recipe.get('method', 'training')} ({run_dir.resolve().name})"
    _, page = write_report(run_dir, title, metrics, None, {"Training curves": curves}, all_notes,
                           recipe=recipe or None, galleries=galleries)
    return page


def report_after_training(out_dir: str | Path) -> Path | None:
    """The report written at the end of `polymodal train`: any failure is a warning, never a lost run.

    Returns:
        The report.html path, or None when it could not be written.
    """
    try:
        page = write_run_report(out_dir)
    except Exception as e:   # the model and metrics are saved already; the report can be redone later
        warnings.warn(f"{out_dir}: the run report could not be written ({type(e).__name__}: {e}); "
                      f"run `polymodal report {out_dir}` to retry", stacklevel=2)
        return None
    print(f"Report: {page}")
    return page


def add_cli_arguments(parser) -> None:
    """Arguments of `polymodal report RUN_DIR`."""
    parser.add_argument("run_dir", help="a training run's out_dir (config.json, metrics.jsonl, model/)")
    parser.add_argument("--no-gallery", action="store_true", help="leave the retrieval galleries out (no model load)")
    parser.add_argument("--queries", type=int, default=4, help="queries per gallery")
    parser.add_argument("--pool", type=int, default=200, help="images searched per gallery")
    parser.add_argument("--smoothing", type=float, default=0.9,
                        help="EMA weight of the training-loss curve (0 = raw, towards 1 = smoother)")


def main_from_args(args) -> Path:
    """Run `polymodal report` from parsed arguments; prints and returns the report.html path.

    Raises:
        ValueError: a bad option value.
        FileNotFoundError: RUN_DIR is not a run folder.
    """
    if args.queries < 1:
        raise ValueError(f"--queries {args.queries} must be >= 1")
    if args.pool < 2:
        raise ValueError(f"--pool {args.pool} must be >= 2 images")
    if not 0.0 <= args.smoothing < 1.0:
        raise ValueError(f"--smoothing {args.smoothing} must be in [0, 1)")
    page = write_run_report(args.run_dir, gallery=not args.no_gallery, n_queries=args.queries, pool=args.pool,
                            smoothing=args.smoothing)
    print(f"Report: {page}\n        {page.with_suffix('.md')}")
    return page


__all__ = ["add_cli_arguments", "build_galleries", "eval_metrics", "gallery_sources", "main_from_args", "read_run",
           "report_after_training", "training_notes", "write_run_report"]
