"""ASD, anti-stereotype debiasing of a multimodal LLM (arXiv 2408.06569), on counterfactual concept data.

Each epoch, before its first batch, the current model answers every concept question of the training set;
from those option probabilities the Skew of each (attribute, concept, value) is computed over the training
set (`eval.fairness.skew_table`) and each sample gets its Skew (the signed Skew of its answer concept at
the attribute with the largest |Skew|; task questions get 0). Then

* `resample`: the epoch's samples come from `data.resample.EpochResampler` (drop Skew > 0 samples with
  probability Skew/(Skew+tau1), copy Skew <= 0 samples through an accumulator and tau2); the loader keeps
  the base length, so the resampled list is shuffled and cut or extended to it (ours);
* `loss`: the step loss is `losses.fairness.fairness_loss` (exp(-Skew)-weighted answer NLL), else the mean NLL.

Both off = plain fine-tuning. The resampler's state and the epoch's skews live on the task
(`get_extra_state`), so the Trainer's checkpoint carries them and a resumed run is exact.

**QA mixing (ours).** `asd.qa_train` names a visual-QA manifest (`polymodal data shapes-qa` train.jsonl: image,
question, answers) whose questions join training as plain answer-NLL samples, so the MLLM has a general QA ability
that the paper's "maintains the original performance" claim can be measured on (`polymodal eval --task vqa`). A QA
sample's prompt is its question verbatim (the counterfactual world's style: a bare lower-case question, no template;
it is also exactly what the `vqa` eval gives `generate_text`), its target the consensus of its normalised answers
(`eval.vqa.consensus`). QA samples have Skew 0 (loss weight 1) and sit outside the resampler: it draws the
counterfactual samples only, and every QA sample is in every epoch exactly once. The ablation's base model mixes QA
in; the paper's ASD fine-tune uses debiasing data only, so the fine-tuning recipes leave `asd.qa_train` empty
(replaying QA while fine-tuning is the option of setting it there too).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config import ConfigError
from ..data.resample import EpochResampler
from ..eval.fairness import (attribute_values_of, concept_rows, option_probabilities, read_records, sample_skew,
                             skew_table)
from ..losses.fairness import bound_skews, fairness_loss, fairness_weights
from .base import Method, build_tokenizer


@dataclass
class ASDConfig:
    loss: bool = True               # exp(-Skew)-weighted answer NLL (False = plain NLL)
    resample: bool = True           # per-epoch drop/copy resampling (False = every sample once)
    tau1: float = 1.0               # drop temperature
    tau2: float = 1.0               # copy threshold of the accumulator
    max_weight: float = 20.0        # cap on a sample's loss weight exp(-Skew): Skew is floored at -ln(max_weight)
                                    # = -3.0 (ours; a pairing the model never chooses has Skew -inf)
    max_copies: int = 3             # most extra copies of one sample per epoch (ours)
    skew_batch_size: int = 128      # questions per forward pass when the epoch's skews are computed
    vision_path: str = ""           # a saved image-text model whose image tower starts the MLLM's (load_model)
    freeze_vision: bool = True      # LLaVA keeps the image tower frozen; training it from a cold start collapses
                                    # its tokens to a constant before the LM learns to read them
    qa_train: str = ""              # a QA manifest (image, question, answers) mixed in as Skew-0 answer-NLL samples
                                    # (ours; "" = none: the paper's ASD fine-tune uses debiasing data only)

    def __post_init__(self):
        if self.tau1 <= 0 or self.tau2 <= 0:
            raise ValueError(f"asd.tau1 and asd.tau2 must be > 0, got {self.tau1}, {self.tau2}")
        if not self.max_weight >= 1:
            raise ValueError(f"asd.max_weight must be >= 1 (a cap on exp(-Skew)), got {self.max_weight}")
        if self.max_copies < 0:
            raise ValueError(f"asd.max_copies must be >= 0, got {self.max_copies}")
        if self.skew_batch_size < 1:
            raise ValueError(f"asd.skew_batch_size must be >= 1, got {self.skew_batch_size}")

    @property
    def needs_skew(self) -> bool:
        return self.loss or self.resample


def _first_record(manifest) -> tuple[int, dict | None]:
    """(line number, record) of a jsonl manifest's first non-empty line; (0, None) when it has none or it is not a
    JSON object (the full readers report that)."""
    with open(manifest, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if line.strip():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    return n, None
                return n, rec if isinstance(rec, dict) else None
    return 0, None


def _is_qa_record(rec: dict | None) -> bool:
    return isinstance(rec, dict) and "question" in rec and "prompt" not in rec and "kind" not in rec


def training_records(manifest) -> list[dict]:
    """The records of a counterfactual training manifest that have an answer."""
    n, first = _first_record(manifest)
    if _is_qa_record(first):
        raise ConfigError(f"data.train: {manifest} line {n} is a QA record (question/answers, no prompt/kind); "
                          f"data.train takes a counterfactual manifest (polymodal data counterfactual) - give QA "
                          f"manifests as asd.qa_train={manifest}")
    recs = [r for r in read_records(manifest) if r.get("answer") is not None]
    if not recs:
        raise ValueError(f"asd: {manifest} has no answered question; give a training manifest "
                         f"(`polymodal data counterfactual` writes train.jsonl)")
    return recs


def qa_records(manifest, key: str = "asd.qa_train") -> list[dict]:
    """The training samples of a visual-QA manifest, checked line by line before training.

    Args:
        manifest: a jsonl file of QA records (`polymodal data shapes-qa` train.jsonl): `image` (relative to the
            manifest's folder or absolute), `question` (a non-empty string), `answers` (a non-empty list) or `answer`.
        key: the recipe key named in errors.
    Returns:
        [{"kind": "qa", "image" (absolute), "prompt" (the question, verbatim), "answer" (the consensus of the
        normalised answers), "question_type"}], in file order.
    Raises:
        ConfigError: a missing file, a line that is not a JSON object, a counterfactual record, a missing or empty
            key, an image that does not exist (one line naming the file, the line, the key and the fix).
    """
    from ..eval.vqa import consensus, record_answers
    path = Path(manifest)
    if not path.is_file():
        raise ConfigError(f"{key}: {manifest} does not exist; write a QA manifest with `polymodal data shapes-qa "
                          f"--out DIR` and give {key}=DIR/train.jsonl")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{key}: {path} line {n}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{where}: not JSON ({e.msg}); regenerate it with "
                                  f"`polymodal data shapes-qa`") from None
            if not isinstance(rec, dict):
                raise ConfigError(f"{where}: a {type(rec).__name__}, not a JSON object; each line is one QA record")
            if "kind" in rec or "prompt" in rec:
                raise ConfigError(f"{where}: a counterfactual record (key {'kind' if 'kind' in rec else 'prompt'!r}); "
                                  f"{key} takes a QA manifest (polymodal data shapes-qa), data.train the "
                                  f"counterfactual one")
            for k in ("image", "question"):
                if not isinstance(rec.get(k), str) or not rec[k].strip():
                    raise ConfigError(f"{where}: key {k!r} is missing or not a non-empty string; every QA record "
                                      f"needs image, question and answers")
            try:
                answers = record_answers(rec, where)
            except ValueError as e:
                raise ConfigError(f"{e}; add the human answers as `answers`") from None
            image = (path.parent / rec["image"]).resolve()
            if not image.is_file():
                raise ConfigError(f"{where}: key 'image': {image} does not exist; keep the manifest beside its "
                                  f"images/ folder (regenerate with `polymodal data shapes-qa`)")
            target = consensus(answers)
            if not target:
                raise ConfigError(f"{where}: key 'answers': every answer is empty after normalisation; give answers "
                                  f"with text")
            out.append({"kind": "qa", "image": str(image), "prompt": rec["question"], "answer": target,
                        "question_type": str(rec.get("question_type") or "all")})
    if not out:
        raise ConfigError(f"{key}: {path} has no QA record; write one with `polymodal data shapes-qa`")
    return out


def check_lengths(model, records: list[dict], key: str) -> None:
    """Every prompt and answer fits the MLLM's `max_prompt_tokens` / `max_answer_tokens` (the model would cut a longer
    one silently: a prompt from the left, an answer at its end).

    Raises:
        ConfigError: the first record that does not fit, naming the recipe key, the text and the setting to raise.
    """
    tok, c = model.tokenizer, model.config
    for r in records:
        n = len(tok.encode(r["prompt"]))
        if n > c.max_prompt_tokens:
            raise ConfigError(f"{key}: the prompt {r['prompt'][:60]!r} takes {n} tokens, over the MLLM's "
                              f"max_prompt_tokens {c.max_prompt_tokens} (it would be cut from the left); set "
                              f"model.overrides.max_prompt_tokens={n} (a new model) or shorten it")
        n = len(tok.encode(r["answer"])) + 2                                  # SEP and EOS
        if n > c.max_answer_tokens:
            raise ConfigError(f"{key}: the answer {r['answer'][:60]!r} takes {n} tokens with SEP and EOS, over the "
                              f"MLLM's max_answer_tokens {c.max_answer_tokens} (it would be cut); set "
                              f"model.overrides.max_answer_tokens={n} (a new model) or shorten it")


class ASDTask(nn.Module):
    """An MLLM and the ASD objective; `forward(batch) -> {"loss", "nll", "weight", "floored"}` (floored: the share
    of concept samples whose Skew was floored at -ln(asd.max_weight) this epoch).

    Args:
        model: an `MLLM`.
        cfg: the `asd` section.
        records: the training records (`training_records`, then any `qa_records`), indexed by the batches' "index".
            Records of kind "qa" have Skew 0 and are left out of the resampler (each in every epoch once).
        seed: resampling seed.
    """

    def __init__(self, model: nn.Module, cfg: ASDConfig, records: list[dict], seed: int = 0):
        super().__init__()
        self.model, self.cfg, self.records = model, cfg, records
        if cfg.freeze_vision:
            model.visual.requires_grad_(False)
        self.debias_at = np.array([i for i, r in enumerate(records) if r["kind"] != "qa"], dtype=np.int64)
        self.qa_at = np.array([i for i, r in enumerate(records) if r["kind"] == "qa"], dtype=np.int64)
        self.resampler = EpochResampler(len(self.debias_at), cfg.tau1, cfg.tau2, seed, max_copies=cfg.max_copies)
        self.concept_at = [i for i, r in enumerate(records) if r["kind"] == "concept"]
        self.skews = torch.zeros(len(records))
        self.floored = 0.0              # share of the concept samples whose Skew was floored at the last refresh

    def fsdp_blockers(self) -> list[str]:
        """Why this task cannot train under `train.strategy=fsdp` (empty: it can). The skews are computed with the
        model at each epoch's start, by the data loader, outside the task's forward, where FSDP keeps the weights
        sharded."""
        if self.cfg.needs_skew and self.concept_at:
            return ["asd.loss / asd.resample score every concept sample with the model outside the training forward "
                    "(set asd.loss=false and asd.resample=false)"]
        return []

    def refresh(self, epoch: int) -> None:
        """Compute epoch `epoch`'s skews with the current model and draw its samples (once per epoch)."""
        if self.resampler.epoch == epoch:
            return
        skews = np.zeros(len(self.records))
        if self.cfg.needs_skew and self.concept_at:
            skews = self.compute_skews()
        debias = skews[self.debias_at]                   # QA samples (Skew 0) never reach the resampler
        if self.cfg.resample:
            self.resampler.draw(debias, epoch)
        else:
            self.resampler.indices, self.resampler.skews = np.arange(len(self.debias_at)), debias
            self.resampler.epoch = epoch
        self.skews = self._all_skews(self.resampler.skews)

    def _all_skews(self, debias_skews) -> torch.Tensor:
        """(R,) float32: the resampler's skews at the debiasing records, 0 at the QA records."""
        out = torch.zeros(len(self.records))
        out[torch.as_tensor(self.debias_at)] = torch.as_tensor(np.asarray(debias_skews), dtype=torch.float32)
        return out

    def epoch_order(self) -> np.ndarray:
        """(R,) record indices of the current epoch: the debiasing records as the resampler drew them (fitted to
        their count, `EpochResampler.epoch_order`; in order without `asd.resample`), then every QA record once."""
        n = len(self.debias_at)
        part = self.resampler.epoch_order(n) if self.cfg.resample and n else np.arange(n)
        return np.concatenate([self.debias_at[part], self.qa_at]).astype(np.int64)

    @torch.no_grad()
    def compute_skews(self) -> np.ndarray:
        """(R,) every training sample's Skew under the current model (0 for task questions), floored at
        -ln(asd.max_weight) (`losses.fairness.bound_skews`)."""
        was = self.model.training
        self.model.eval()
        try:
            concept = [self.records[i] for i in self.concept_at]
            probs = option_probabilities(self.model, concept, self.cfg.skew_batch_size)
        finally:
            self.model.train(was)
        table = skew_table(concept_rows(concept, probs), attribute_values_of(concept))
        skews = np.zeros(len(self.records))
        for i, r in zip(self.concept_at, concept):
            skews[i] = sample_skew(table, r["answer"], r["attributes"])
        bounded = bound_skews(skews, self.cfg.max_weight)    # a never-chosen pairing gives -inf: bound its weight
        self.floored = float((bounded != skews).sum() / max(1, len(concept)))
        return bounded

    def forward(self, batch: dict) -> dict:
        """batch: pixels, prompt_ids/mask, answer_ids/mask, index -> losses (scalars)."""
        nll = self.model(batch["pixels"], batch["prompt_ids"], batch["prompt_mask"], batch["answer_ids"],
                         batch["answer_mask"]).nll                                      # (B,)
        skews = self.skews.to(nll.device)[batch["index"]]
        w = self.cfg.max_weight
        loss = fairness_loss(nll, skews, w) if self.cfg.loss else nll.mean()
        return {"loss": loss, "nll": nll.mean().detach(), "weight": fairness_weights(skews, w).mean(),
                "floored": torch.tensor(self.floored)}

    def get_extra_state(self) -> dict:
        return {"resampler": self.resampler.state_dict()}

    def set_extra_state(self, state: dict) -> None:
        self.resampler.load_state_dict(state["resampler"])
        self.skews = self._all_skews(self.resampler.skews)


class CounterfactualQADataset(torch.utils.data.Dataset):
    """Training questions of fixed length; `set_epoch` refreshes the task's skews and the epoch's order.

    Args:
        task: the `ASDTask` (its records, resampler and model).
        transform: PIL image -> (3, H, W).
    """

    def __init__(self, task: ASDTask, transform):
        self.task, self.transform = task, transform
        self.order = np.arange(len(task.records))
        self._pixels: dict = {}

    def __len__(self) -> int:
        return len(self.task.records)

    def set_epoch(self, epoch: int) -> None:
        self.task.refresh(epoch)
        self.order = self.task.epoch_order()

    def __getitem__(self, i: int) -> dict:
        from PIL import Image
        j = int(self.order[i])
        r = self.task.records[j]
        if r["image"] not in self._pixels:
            with Image.open(r["image"]) as im:
                self._pixels[r["image"]] = self.transform(im.convert("RGB"))
        return {"pixels": self._pixels[r["image"]], "prompt": r["prompt"], "answer": r["answer"], "index": j}


class QACollate:
    """Samples -> {pixels (B,3,H,W), prompt_ids/mask (B,Lp) left-padded, answer_ids/mask (B,La), index (B,)}."""

    def __init__(self, model):
        self.model = model

    def __call__(self, samples: list[dict]) -> dict:
        pid, pm = self.model.encode_prompts([s["prompt"] for s in samples])
        aid, am = self.model.encode_answers([s["answer"] for s in samples])
        return {"pixels": torch.stack([s["pixels"] for s in samples]), "prompt_ids": pid, "prompt_mask": pm,
                "answer_ids": aid, "answer_mask": am, "index": torch.tensor([s["index"] for s in samples])}


class ASDMethod(Method):
    """`method: asd`: fine-tune an MLLM on counterfactual questions with the ASD loss and/or resampling."""

    config_cls = ASDConfig

    def validate(self) -> None:
        if not self.run.data.train:
            raise ValueError("asd: data.train must be a counterfactual manifest (polymodal data counterfactual)")

    def paths(self) -> list[str]:
        # asd.qa_train is checked by `check_data` (its message names the key and how to write the manifest)
        return [self.cfg.vision_path] if self.cfg and self.cfg.vision_path else []

    def check_data(self) -> None:
        """data.train is a counterfactual manifest and `asd.qa_train` (when set) a readable QA manifest whose every
        line has an image, a question and answers (ConfigError naming the file, line and key otherwise)."""
        if self.run.data.train and Path(self.run.data.train).is_file():
            n, first = _first_record(self.run.data.train)
            if _is_qa_record(first):
                training_records(self.run.data.train)            # raises the one-line error
        self._qa = qa_records(self.cfg.qa_train) if self.cfg and self.cfg.qa_train else []

    def qa_samples(self) -> list[dict]:
        """The `asd.qa_train` samples (`qa_records`; read once, by `check_data` at start-up)."""
        if getattr(self, "_qa", None) is None:
            self._qa = qa_records(self.cfg.qa_train) if self.cfg.qa_train else []
        return self._qa

    def build_tokenizer(self, out_dir: Path):
        def texts() -> list[str]:
            out = []
            for r in read_records(self.run.data.train):
                out += [r["prompt"], *r["options"]] + ([r["answer"]] if r.get("answer") else [])
            for r in self.qa_samples():
                out += [r["prompt"], r["answer"]]
            return out
        return build_tokenizer(self.run, out_dir, texts=texts, min_frequency=1)

    def build_model(self, tokenizer) -> nn.Module:
        from ..hub import load_model
        from ..models.mllm import MLLM, create_mllm, mllm_config
        spec = self.run.model
        if spec.path:
            model = load_model(spec.path)
            if not isinstance(model, MLLM):
                raise ValueError(f"model.path {spec.path}: a {type(model).__name__}, not an MLLM (model_type 'mllm'); "
                                 f"give a saved asd run's out_dir/model")
            if tokenizer is not None:
                model.tokenizer = tokenizer
            return model.train()
        vision = None
        if self.cfg.vision_path:
            vision = load_model(self.cfg.vision_path).visual
        cfg = mllm_config(spec.name, dict(spec.overrides), tokenizer)
        return create_mllm(cfg, tokenizer, vision=vision)

    def build_task(self, model: nn.Module) -> nn.Module:
        debias, qa = training_records(self.run.data.train), self.qa_samples()
        check_lengths(model, debias, "data.train")
        check_lengths(model, qa, "asd.qa_train")
        self._task = ASDTask(model, self.cfg, debias + qa, self.run.train.seed)
        return self._task

    def build_dataset(self, model: nn.Module, rank: int, world_size: int):
        task = getattr(self, "_task", None)
        if task is None or task.model is not model:
            raise RuntimeError("asd: build_task must run before build_dataset (the data needs the task's skews)")
        return CounterfactualQADataset(task, model.image_transform), None

    def collate(self, model: nn.Module):
        return QACollate(model)
