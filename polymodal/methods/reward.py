"""Reward models on preference pairs (`method: reward`; Hummer; docs/methods.md).

`data.train` is a preference JSONL file or a folder of `<dimension>/<split>.jsonl` files
(`polymodal.data.preference`). The model is our text tower with a scalar head (a new one, or `model.path`
holding a saved one) or any local HF directory (`model.path`; `AutoModelForSequenceClassification`).
Loss: Bradley-Terry, `-log sigmoid(r_w - r_l - margin)`, plus TRL-style reward centring when
`reward.center_rewards > 0`.

Sampling over dimensions (`reward.sampling`, `polymodal.data.samplers`):

- `mix`: every training pair once per epoch, shuffled (plain mixing; dimensions in their natural proportions);
- `uniform`: each sample's dimension drawn uniformly, then one of its pairs;
- `hybrid`: the dimension drawn from (1 - alpha)/K + alpha * softmax(-beta * valAcc), valAcc measured every
  `reward.refresh_every` training forwards on held-out pairs (`reward.val`, or `reward.val_fraction` of the
  training pairs of each dimension, taken out of training).

The sampler lives on the task (its state is part of the task's state dict through `get_extra_state`), and the
dataset asks it for each position's draw when the batch is fetched, so a resumed run draws exactly what the
uninterrupted run would have (this needs `data.num_workers: 0` under hybrid sampling: workers would hold stale
copies of the weights).

Evaluation task `preference` (`polymodal.eval.preference.preference_eval_task`) on the reward model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import ConfigError
from ..data.samplers import SAMPLING_MODES, DimensionSampler
from ..models.base import ConfigDict
from ..losses.preference import bradley_terry_loss
from ..models.reward import TEMPLATES
from .base import Method, build_tokenizer

EVAL_TASK = "preference"
BACKBONES = ("auto", "text", "hf")


@dataclass
class RewardSection(ConfigDict):
    """The recipe's `reward:` section."""
    backbone: str = "auto"          # "auto" (the kind of model.path; a new text tower without one) | "text" | "hf"
    text: dict = field(default_factory=dict)   # TextConfig keys of a new tower (width, layers, heads ...)
    max_length: int = 128           # tokens per (prompt, response) text, cut from the left
    max_chars: int = 65536          # longest prompt / chosen / rejected text in characters, checked on reading (0 = none)
    separator: str = "\n"           # between prompt and response (plain template)
    template: str = "trl"           # HF models: "trl" (prompt+response+EOS; chat template for messages, as TRL)
                                    # | "plain" | "chat" | "auto" (see models.reward.HFRewardModel)
    keys: dict = field(default_factory=dict)   # field mapping for other layouts (see data.preference)
    dimension: str = ""             # force one dimension on every training record ("" = from the data)
    split: str = "train"            # file read inside each dimension folder
    dimensions: list = field(default_factory=list)   # train on these dimensions only ([] = all)
    center_rewards: float = 0.0     # TRL's center_rewards_coefficient (0 = off)
    use_margin: bool = True         # subtract the records' `margin` inside the loss
    sampling: str = "mix"           # "mix" | "uniform" | "hybrid"
    alpha: float = 0.5              # hybrid: share of the adaptive weights
    beta: float = 10.0              # hybrid: softmax(-beta * valAcc) sharpness
    refresh_every: int = 50         # hybrid: training forwards between valAcc measurements
    val: str = ""                   # hybrid: held-out pairs (file or folder); "" = val_fraction of train
    val_fraction: float = 0.1       # hybrid: share of each dimension's pairs held out when `val` is empty
    val_max_per_dim: int = 64       # hybrid: at most this many held-out pairs per dimension are scored
    epoch_size: int = 0             # uniform/hybrid: draws per epoch (0 = number of training pairs)

    def __post_init__(self):
        if self.backbone not in BACKBONES:
            raise ConfigError(f"reward.backbone must be one of {', '.join(BACKBONES)}, got {self.backbone!r}")
        if self.template not in TEMPLATES:
            raise ConfigError(f"reward.template must be one of {', '.join(TEMPLATES)}, got {self.template!r}")
        if self.sampling not in SAMPLING_MODES:
            raise ConfigError(f"reward.sampling must be one of {', '.join(SAMPLING_MODES)}, got {self.sampling!r}")
        if self.max_length < 4:
            raise ConfigError(f"reward.max_length must be >= 4, got {self.max_length}")
        if self.max_chars < 0:
            raise ConfigError(f"reward.max_chars must be >= 0 (0 = no limit), got {self.max_chars}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"reward.alpha must be in [0, 1], got {self.alpha}")
        if self.beta < 0:
            raise ConfigError(f"reward.beta must be >= 0, got {self.beta}")
        if self.refresh_every < 1:
            raise ConfigError(f"reward.refresh_every must be >= 1, got {self.refresh_every}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"reward.val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.val_max_per_dim < 1 or self.epoch_size < 0:
            raise ConfigError("reward.val_max_per_dim must be >= 1 and reward.epoch_size >= 0")
        if self.center_rewards < 0:
            raise ConfigError(f"reward.center_rewards must be >= 0, got {self.center_rewards}")


class PreferenceData:
    """Rendered training texts by dimension, the held-out ones, and the sampler.

    Args:
        train: PreferenceSet of training pairs.
        val: PreferenceSet of held-out pairs, or None.
        cfg: the reward section.
        model: gives `format(prompt, response)`.
        seed: the run seed.
    """

    def __init__(self, train, val, cfg: RewardSection, model: nn.Module, seed: int):
        by_dim = train.by_dimension()
        if cfg.dimensions:
            missing = [d for d in cfg.dimensions if d not in by_dim]
            if missing:
                raise ValueError(f"reward.dimensions: {missing} not in the training data (it has "
                                 f"{', '.join(by_dim)})")
            by_dim = {d: by_dim[d] for d in cfg.dimensions}
        held: dict[str, list] = {}
        if cfg.sampling == "hybrid":
            if val is not None:
                held = val.by_dimension()
                missing = [d for d in by_dim if d not in held]
                if missing:
                    raise ValueError(f"reward.val {cfg.val}: no held-out pairs of dimension(s) {missing}")
            else:                                    # hold out a share of each dimension, out of training
                rng = np.random.default_rng([seed & 0xFFFFFFFF, 77])
                for d, pairs in list(by_dim.items()):
                    n_val = max(1, int(len(pairs) * cfg.val_fraction))
                    if len(pairs) - n_val < 1:
                        raise ValueError(f"dimension {d!r} has {len(pairs)} pair(s): too few to hold out "
                                         f"reward.val_fraction={cfg.val_fraction}; give reward.val")
                    order = rng.permutation(len(pairs))
                    held[d] = [pairs[i] for i in order[:n_val]]
                    by_dim[d] = [pairs[i] for i in sorted(order[n_val:])]
        self.dimensions = list(by_dim)
        render = lambda p: (model.format(p.prompt, p.chosen), model.format(p.prompt, p.rejected),
                            float("nan") if p.margin is None or not cfg.use_margin else p.margin)
        self.texts = [[render(p) for p in by_dim[d]] for d in self.dimensions]          # per dimension
        self.val = [[render(p)[:2] for p in held[d][:cfg.val_max_per_dim]] for d in self.dimensions] if held else []
        self.sampler = DimensionSampler(self.dimensions, [len(t) for t in self.texts], cfg.sampling, cfg.alpha,
                                        cfg.beta, seed)


class PreferenceDataset(torch.utils.data.Dataset):
    """Position i of an epoch -> one rendered pair: the i-th pair (mix) or the sampler's draw for (epoch, i)."""

    def __init__(self, data: PreferenceData, epoch_size: int = 0):
        self.data, self.sampler = data, data.sampler
        self.flat = [(k, j) for k, texts in enumerate(data.texts) for j in range(len(texts))]
        self.n = epoch_size if (epoch_size and self.sampler.mode != "mix") else len(self.flat)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        k, j = self.flat[i] if self.sampler.mode == "mix" else self.sampler.draw(self.epoch, i)
        chosen, rejected, margin = self.data.texts[k][j]
        return {"index": i, "chosen": chosen, "rejected": rejected, "margin": margin, "dim": k}


class PreferenceCollate:
    """Samples -> chosen/rejected ids and masks (B, L), margin (B,) (NaN = none), dim (B,), index (B,)."""

    def __init__(self, encoder):
        self.encoder = encoder

    def __call__(self, samples: list[dict]) -> dict:
        ids_c, mask_c = self.encoder([s["chosen"] for s in samples])
        ids_r, mask_r = self.encoder([s["rejected"] for s in samples])
        return {"index": torch.tensor([s["index"] for s in samples]), "chosen_ids": ids_c, "chosen_mask": mask_c,
                "rejected_ids": ids_r, "rejected_mask": mask_r,
                "margin": torch.tensor([s["margin"] for s in samples], dtype=torch.float32),
                "dim": torch.tensor([s["dim"] for s in samples])}


def _pad_to(x: torch.Tensor, width: int, value) -> torch.Tensor:
    return x if x.shape[1] == width else torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)


class RewardTask(nn.Module):
    """Bradley-Terry loss on a batch of pairs; under hybrid sampling it also refreshes the sampler's weights.

    Args:
        model: a reward model (`forward(ids, mask) -> (B,)`, `encode`).
        cfg: the reward section.
        data: the PreferenceData (its sampler and held-out texts), or None (no sampling state).
    """

    def __init__(self, model: nn.Module, cfg: RewardSection, data: PreferenceData | None = None):
        super().__init__()
        self.model, self.cfg, self.data = model, cfg, data
        self.calls = 0                                # training forwards so far (part of the state)

    def rewards(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,), (B,) rewards of the chosen and rejected texts, in one forward over both."""
        ids_c, ids_r = batch["chosen_ids"], batch["rejected_ids"]
        width = max(ids_c.shape[1], ids_r.shape[1])
        pad = getattr(self.model.tokenizer, "pad_id", None)
        pad = pad if pad is not None else getattr(self.model.tokenizer, "pad_token_id", 0)
        ids = torch.cat([_pad_to(ids_c, width, pad), _pad_to(ids_r, width, pad)])            # (2B, L)
        mask = torch.cat([_pad_to(batch["chosen_mask"], width, False), _pad_to(batch["rejected_mask"], width, False)])
        r = self.model(ids, mask)                                                            # (2B,)
        return r[:len(ids_c)], r[len(ids_c):]

    def forward(self, batch: dict) -> dict:
        if self.training:
            if self.data is not None and self.data.sampler.mode == "hybrid" and self.calls > 0 \
                    and self.calls % self.cfg.refresh_every == 0:
                self.refresh()
            self.calls += 1
        r_c, r_r = self.rewards(batch)
        margin = batch.get("margin")
        if margin is not None:
            margin = torch.nan_to_num(margin.to(r_c.dtype), nan=0.0)
        loss = bradley_terry_loss(r_c.float(), r_r.float(), margin, self.cfg.center_rewards)
        return {"loss": loss, "accuracy": (r_c > r_r).float().mean().detach(),
                "reward_gap": (r_c - r_r).float().mean().detach()}

    @torch.no_grad()
    def val_accuracy(self) -> list[float]:
        """Held-out pairwise accuracy per dimension (in the sampler's order)."""
        was = self.model.training
        self.model.eval()
        try:
            out = []
            for pairs in self.data.val:
                r_c = self.model.score([c for c, _ in pairs])
                r_r = self.model.score([r for _, r in pairs])
                out.append(float((r_c > r_r).float().mean()))
            return out
        finally:
            self.model.train(was)

    def refresh(self) -> None:
        """Measure the held-out accuracy and hand it to the sampler (hybrid sampling)."""
        self.data.sampler.update(self.val_accuracy())

    def get_extra_state(self) -> dict:
        return {"calls": self.calls, "sampler": None if self.data is None else self.data.sampler.state_dict()}

    def set_extra_state(self, state: dict) -> None:
        self.calls = int(state["calls"])
        if state.get("sampler") is not None and self.data is not None:
            self.data.sampler.load_state_dict(state["sampler"])


class RewardMethod(Method):
    """`method: reward`."""

    config_cls = RewardSection
    media = "none"

    def __init__(self, run: Any, cfg: Any = None):
        super().__init__(run, cfg if cfg is not None else RewardSection())
        self._data: PreferenceData | None = None
        self._train = None

    # ---- checks ------------------------------------------------------------------------------------
    def backbone(self) -> str:
        """"text" or "hf": what `reward.backbone` (or model.path's kind under "auto") asks for."""
        if self.cfg.backbone != "auto":
            return self.cfg.backbone
        from ..models.reward import is_hf_model_dir
        return "hf" if self.run.model.path and is_hf_model_dir(self.run.model.path) else "text"

    def validate(self) -> None:
        if not self.run.data.train:
            raise ValueError("data.train must name a preference JSONL file or a folder of <dimension>/train.jsonl")
        if self.run.data.shards:
            raise ValueError("data.shards: reward models read preference JSONL (data.train), not shards")
        if self.cfg.sampling == "hybrid" and self.run.data.num_workers:
            raise ValueError(f"reward.sampling=hybrid needs data.num_workers=0 (got {self.run.data.num_workers}): "
                             f"the sampling weights change during training and loader workers would hold stale copies")
        if self.cfg.backbone == "hf" and not self.run.model.path:
            raise ValueError("reward.backbone=hf needs model.path (a local HF model directory)")

    def paths(self) -> list[str]:
        return [self.cfg.val] if self.cfg.val else []

    # ---- building -----------------------------------------------------------------------------------
    def _train_set(self):
        if self._train is None:
            from ..data.preference import read_preferences
            c = self.cfg
            self._train = read_preferences(self.run.data.train, keys=c.keys, dimension=c.dimension,
                                           on_bad_record=self.run.data.on_bad_record, split=c.split,
                                           max_chars=c.max_chars)
            if self._train.skipped:
                print(f"warning: {self._train.report()}")
        return self._train

    def preference_data(self, model: nn.Module) -> PreferenceData:
        """The rendered training data and sampler (built once, shared by the task and the dataset)."""
        if self._data is None:
            from ..data.preference import read_preferences
            val = None
            if self.cfg.sampling == "hybrid" and self.cfg.val:
                val = read_preferences(self.cfg.val, keys=self.cfg.keys, on_bad_record=self.run.data.on_bad_record,
                                       max_chars=self.cfg.max_chars,
                                       split="val" if Path(self.cfg.val).is_dir() else self.cfg.split)
            self._data = PreferenceData(self._train_set(), val, self.cfg, model, self.run.train.seed)
        return self._data

    def build_tokenizer(self, out_dir: Path):
        from ..data.preference import render_text

        def texts() -> list[str]:
            out = []
            for p in self._train_set():
                out += [render_text(p.prompt, p.chosen, self.cfg.separator), render_text("", p.rejected)]
            return out
        return build_tokenizer(self.run, out_dir, texts=texts, context_length=self.cfg.max_length)

    def build_model(self, tokenizer) -> nn.Module:
        from ..models.reward import HFRewardModel, TextRewardModel
        c, path = self.cfg, self.run.model.path
        if self.backbone() == "hf":
            return HFRewardModel.from_pretrained(path, max_length=c.max_length, template=c.template,
                                                 separator=c.separator).train()
        if path:
            from ..hub import load_model
            model = load_model(path)
            if not isinstance(model, TextRewardModel):
                raise ValueError(f"model.path {path}: a {type(model).__name__}, not a text reward model (model_type "
                                 f"'text_reward'); give a saved reward run's out_dir/model or a local HF model folder")
            if tokenizer is not None:
                model.tokenizer = tokenizer
            return model.train()
        return TextRewardModel.from_tokenizer(tokenizer, {"context_length": c.max_length, **c.text},
                                              c.separator).train()

    def build_dataset(self, model: nn.Module, rank: int, world_size: int):
        return PreferenceDataset(self.preference_data(model), self.cfg.epoch_size), None

    def collate(self, model: nn.Module):
        return PreferenceCollate(model.text_encoder())

    def build_task(self, model: nn.Module) -> nn.Module:
        return RewardTask(model, self.cfg, self.preference_data(model))


__all__ = ["RewardSection", "RewardTask", "RewardMethod", "PreferenceData", "PreferenceDataset",
           "PreferenceCollate", "EVAL_TASK"]
