"""HF sequence-classification folders as reward models (`polymodal.models.reward.HFRewardModel`).

A folder that transformers' `AutoModelForSequenceClassification` reads: one saved by polymodal's reward training
(`polymodal_reward.json` beside transformers' own files) or by another tool (TRL's RewardTrainer, a hub snapshot
with a `*ForSequenceClassification` architecture). Nothing is downloaded.
"""
from __future__ import annotations

from pathlib import Path

from .common import CheckpointError, read_json


def detect(path) -> bool:
    """True for an HF model folder (config.json without `polymodal_version`) that is a one-score classifier or
    carries polymodal's reward settings."""
    from ..models.reward import HF_EXTRA_FILE, is_hf_model_dir
    path = Path(path)
    if not (path.is_dir() and is_hf_model_dir(path)):
        return False
    if (path / HF_EXTRA_FILE).is_file():
        return True
    try:
        config = read_json(path / "config.json")
    except CheckpointError:
        return False
    return any(str(a).endswith("ForSequenceClassification") for a in config.get("architectures") or [])


def load(path, **options):
    """The folder as an `HFRewardModel` (options: max_length, template, separator, dtype)."""
    from ..models.reward import HFRewardModel
    return HFRewardModel.from_pretrained(path, **options)
