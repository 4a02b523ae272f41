"""Where a run's logged numbers go: `metrics.jsonl` always, TensorBoard event files on request.

`metrics.jsonl` stays the record of truth (resume truncates it, `polymodal report` reads it); TensorBoard
(`train.log_to: [jsonl, tensorboard]`) gets the same numbers as scalars under `out_dir/tensorboard/`.
The tensorboard package is optional: `check_log_to` says so in one line when the config is validated,
before anything is trained.
"""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

LOG_TARGETS = ("jsonl", "tensorboard")


def tensorboard_available() -> bool:
    """True when `torch.utils.tensorboard` can be imported (it needs the `tensorboard` package)."""
    return importlib.util.find_spec("tensorboard") is not None


def check_log_to(log_to, where: str = "recipe") -> None:
    """Validate a `train.log_to` value.

    Args:
        log_to: a list of targets from `LOG_TARGETS`; it must contain "jsonl".
        where: the file (or other source) the value came from, for the message.
    Raises:
        ValueError: a bad list, an unknown target, no "jsonl", or "tensorboard" without the package.
    """
    if not isinstance(log_to, (list, tuple)) or not all(isinstance(t, str) for t in log_to):
        raise ValueError(f"{where}: train.log_to must be a list of {', '.join(LOG_TARGETS)}, got {log_to!r} "
                         f"(e.g. train.log_to=[jsonl,tensorboard])")
    unknown = [t for t in log_to if t not in LOG_TARGETS]
    if unknown:
        raise ValueError(f"{where}: train.log_to: unknown target {unknown[0]!r}; allowed: {', '.join(LOG_TARGETS)}")
    if "jsonl" not in log_to:
        raise ValueError(f"{where}: train.log_to must include jsonl (metrics.jsonl is what resume and "
                         f"`polymodal report` read), got {list(log_to)!r}")
    if "tensorboard" in log_to and not tensorboard_available():
        raise ValueError(f"{where}: train.log_to lists tensorboard but the tensorboard package is not installed; "
                         f"pip install tensorboard, or set train.log_to=[jsonl]")


def scalar_tag(key: str) -> str:
    """The TensorBoard tag of a record key: `eval/...` and `val/...` keep theirs, the rest go under `train/`."""
    return key if key.startswith(("eval/", "val/", "train/")) else f"train/{key}"


def scalars(record: dict) -> dict[str, float]:
    """The finite real numbers of a record, by TensorBoard tag (dicts of numbers flatten as `key/sub`).

    `step` is the x axis, not a scalar; booleans, strings and lists are left out."""
    out: dict[str, float] = {}

    def add(key: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                add(f"{key}/{k}", v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[scalar_tag(key)] = float(value)

    for key, value in record.items():
        if key != "step":
            add(key, value)
    return out


class RunLogger:
    """Append records to `metrics.jsonl` and, when asked, write them as TensorBoard scalars.

    Args:
        out_dir: the run folder; event files go to `out_dir/tensorboard/`.
        log_to: targets from `LOG_TARGETS` (checked with `check_log_to`).
        metrics_path: the JSONL file (default `out_dir/metrics.jsonl`).

    The event writer opens at the first record after step 0 (step-0 records wait for it: they cannot tell a
    resume from a fresh start). It purges events an earlier process wrote in the same folder from that
    record's step on (the step after the checkpoint for a `{"event": "resumed"}` record), so a resumed run's
    TensorBoard curves have no doubled steps, like `metrics.jsonl` after its truncation.
    """

    def __init__(self, out_dir: str | Path, log_to=("jsonl",), metrics_path: str | Path | None = None):
        check_log_to(list(log_to), where="config")
        self.out_dir = Path(out_dir)
        self.log_to = tuple(log_to)
        self.metrics_path = Path(metrics_path) if metrics_path is not None else self.out_dir / "metrics.jsonl"
        self.tensorboard_dir = self.out_dir / "tensorboard"
        self._writer = None
        self._pending: list[dict] = []     # step-0 records logged before the writer opened

    def log(self, record: dict) -> None:
        """Append `record` (a JSON-able dict with a `step`) to every target."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if "tensorboard" not in self.log_to:
            return
        step = int(record.get("step", 0) or 0)
        resumed = record.get("event") == "resumed"
        if self._writer is None:
            if step == 0 and not resumed:
                self._pending.append(record)
                return
            self._open(purge_step=step + 1 if resumed else step)
        self._write(record)

    def _open(self, purge_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter
        self._writer = SummaryWriter(log_dir=str(self.tensorboard_dir), purge_step=purge_step)
        pending, self._pending = self._pending, []
        for record in pending:
            self._write(record)

    def _write(self, record: dict) -> None:
        values = scalars(record)
        for tag, value in values.items():
            self._writer.add_scalar(tag, value, global_step=int(record.get("step", 0) or 0))
        if values:
            self._writer.flush()    # a killed run keeps what it logged

    def close(self) -> None:
        """Flush and close the event file (the JSONL file is closed after every record)."""
        if self._writer is None and self._pending:
            self._open(purge_step=None)
        if self._writer is not None:
            self._writer.close()
            self._writer = None


__all__ = ["LOG_TARGETS", "RunLogger", "check_log_to", "scalars", "scalar_tag", "tensorboard_available"]
