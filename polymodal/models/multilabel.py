"""A multi-label adapter over a frozen, normalised joint embedding space (Text as Image, arXiv 2312.04160).

The adapter is trained on *text* embeddings and applied to *image* embeddings of the same
frozen dual encoder::

    x' = normalize(x + alpha * MLP(x))          # residual MLP, x unit-norm (B, E)
    logits = tau * x' @ normalize(W)^T          # W (C, E): prompt embeddings of the label names

Because x and W live in the shared space, a classifier learnt from sentences carries over to
images; :func:`perturb` adds Gaussian noise to the training text embeddings so the adapter also
covers the region where image embeddings lie (the modality gap).

Saved as ``adapter_config.json`` (config + label names) and ``adapter.safetensors`` in one folder,
written atomically (temporary folder, then ``os.replace``).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import WrapsEncoder
from .factory import WrappedConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}


@dataclass
class AdapterConfig:
    embed_dim: int = 512                 # width E of the frozen embedding space
    hidden_dim: int = 0                  # MLP hidden width; 0 = embed_dim
    act: str = "gelu"                    # "gelu" | "relu" | "silu"
    dropout: float = 0.0                 # on the MLP hidden layer
    alpha: float = 0.5                   # residual weight of the MLP branch
    learn_alpha: bool = False            # make alpha a trained parameter
    logit_scale: float = 20.0            # tau in logits = tau * cos
    learn_logit_scale: bool = False      # train tau (stored as log tau)
    train_classifier: bool = False       # fine-tune the label embeddings W (frozen by default)
    zero_init: bool = True               # zero the MLP's last layer, so training starts from zero-shot

    def __post_init__(self):
        if self.embed_dim < 1:
            raise ValueError(f"AdapterConfig.embed_dim must be >= 1, got {self.embed_dim}")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"AdapterConfig.act must be one of {sorted(ACTIVATIONS)}, got {self.act!r}")
        if self.logit_scale <= 0:
            raise ValueError(f"AdapterConfig.logit_scale must be > 0, got {self.logit_scale}")

    @classmethod
    def from_dict(cls, data: dict, where: str = "adapter config") -> "AdapterConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; allowed keys: "
                             f"{', '.join(sorted(known))}")
        return cls(**data)


def perturb(x: Tensor, sigma: float, generator: torch.Generator | None = None) -> Tensor:
    """Random perturbation: ``normalize(normalize(x) + eps)``, ``eps ~ N(0, sigma^2 I)``.

    Args:
        x: (B, E) embeddings (normalised first, so the noise scale is relative to a unit vector).
        sigma: noise standard deviation per dimension; 0 returns ``normalize(x)`` unchanged.
        generator: a ``torch.Generator`` on ``x``'s device for reproducible noise.

    Returns:
        (B, E) unit-norm embeddings.
    """
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    x = F.normalize(x, dim=-1)
    if sigma == 0:
        return x
    eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) * sigma
    return F.normalize(x + eps, dim=-1)


class MultiLabelAdapter(nn.Module):
    """Residual MLP plus a cosine label classifier on frozen, normalised embeddings.

    Args:
        cfg: the adapter config (``cfg.embed_dim`` must equal the width of ``label_embeds``).
        label_embeds: (C, E) embeddings of the label names (e.g. a prompt-ensemble classifier
            from :func:`polymodal.eval.zeroshot.build_classifier`).
        label_names: C names, stored with the adapter so that evaluation can check them.
    """

    def __init__(self, cfg: AdapterConfig, label_embeds: Tensor, label_names: list[str] | None = None):
        super().__init__()
        label_embeds = torch.as_tensor(label_embeds, dtype=torch.float32)
        if label_embeds.dim() != 2 or label_embeds.shape[1] != cfg.embed_dim:
            raise ValueError(f"label_embeds must be (C, {cfg.embed_dim}), got {tuple(label_embeds.shape)}")
        if label_names is not None and len(label_names) != len(label_embeds):
            raise ValueError(f"{len(label_names)} label names for {len(label_embeds)} label embeddings")
        self.config = cfg
        self.label_names = list(label_names) if label_names is not None else [str(i) for i in range(len(label_embeds))]
        hidden = cfg.hidden_dim or cfg.embed_dim
        self.mlp = nn.Sequential(nn.Linear(cfg.embed_dim, hidden), ACTIVATIONS[cfg.act](), nn.Dropout(cfg.dropout),
                                 nn.Linear(hidden, cfg.embed_dim))
        if cfg.zero_init:
            nn.init.zeros_(self.mlp[-1].weight)
            nn.init.zeros_(self.mlp[-1].bias)
        alpha = torch.tensor(float(cfg.alpha))
        self.alpha = nn.Parameter(alpha) if cfg.learn_alpha else nn.Buffer(alpha)
        log_scale = torch.tensor(float(cfg.logit_scale)).log()
        self.log_logit_scale = nn.Parameter(log_scale) if cfg.learn_logit_scale else nn.Buffer(log_scale)
        w = F.normalize(label_embeds, dim=-1)
        self.label_embeds = nn.Parameter(w) if cfg.train_classifier else nn.Buffer(w)

    def no_weight_decay(self) -> set[str]:
        """Parameters AdamW leaves undecayed: the label embeddings when trained (used normalised: decay would only
        shrink their norm and so raise their effective learning rate)."""
        return {"label_embeds"} if isinstance(self.label_embeds, nn.Parameter) else set()

    @property
    def num_labels(self) -> int:
        return self.label_embeds.shape[0]

    @property
    def logit_scale(self) -> Tensor:
        return self.log_logit_scale.exp()

    def embed(self, x: Tensor) -> Tensor:
        """Adapted embeddings: (B, E) -> (B, E), unit norm."""
        x = F.normalize(x.float(), dim=-1)                             # (B, E)
        return F.normalize(x + self.alpha * self.mlp(x), dim=-1)       # (B, E)

    def forward(self, x: Tensor) -> Tensor:
        """Label logits ``tau * x' W^T``: (B, E) -> (B, C)."""
        w = F.normalize(self.label_embeds, dim=-1)                     # (C, E)
        return self.logit_scale * self.embed(x) @ w.T                  # (B, C)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write the adapter into ``directory`` (see :func:`save_adapter`); read it back with :func:`load_adapter`."""
        save_adapter(self, directory)


@dataclass
class AdaptedEncoderConfig(WrappedConfig):
    """A frozen image-text model plus a multi-label adapter: what a saved Text-as-Image run's config.json holds."""
    base: dict = field(default_factory=dict)           # the frozen image-text model's config
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    label_names: list = field(default_factory=list)    # the adapter's C labels, in order
    model_type: str = "multilabel_adapter"



class AdaptedEncoder(WrapsEncoder, nn.Module):
    """A frozen dual encoder with a trained `MultiLabelAdapter` on its image embeddings (one saved model).

    The image-text interface is the frozen model's, so every eval task runs on it as on that model; the
    `multilabel` task scores with `adapter` (see `polymodal.eval.multilabel`).

    Args:
        base: the frozen image-text model (CLIP, M2-Encoder ...).
        adapter: the trained adapter (its label names are saved in the config).
    """

    def __init__(self, base: nn.Module, adapter: MultiLabelAdapter):
        super().__init__()
        self.base, self.adapter = base, adapter
        self.config = AdaptedEncoderConfig(base=base.config.to_dict(), adapter=adapter.config,
                                           label_names=list(adapter.label_names))
        self.config._base = base.config

    config_class = AdaptedEncoderConfig

    @classmethod
    def from_config(cls, cfg: AdaptedEncoderConfig) -> "AdaptedEncoder":
        """A randomly initialised model of a saved config (label embeddings zero until the weights load)."""
        from .families import build_model
        names = list(cfg.label_names)
        adapter = MultiLabelAdapter(cfg.adapter, torch.zeros(len(names), cfg.adapter.embed_dim), names)
        return cls(build_model(cfg.base_config()), adapter)

    def forward(self, pixels: Tensor) -> Tensor:
        """(B, 3, H, W) images -> (B, C) adapter logits."""
        return self.adapter(self.encode_image(pixels))

    def save_pretrained(self, directory) -> None:
        """One folder: config.json (frozen model config, adapter config, labels), model.safetensors, processors."""
        from .base import save_pretrained
        save_pretrained(self, directory)


def save_adapter(adapter: MultiLabelAdapter, directory: str | os.PathLike) -> None:
    """Write ``adapter_config.json`` and ``adapter.safetensors`` into ``directory`` atomically."""
    from safetensors.torch import save_file
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    meta = {"config": asdict(adapter.config), "label_names": adapter.label_names}
    (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    state = {k: v.detach().contiguous().cpu() for k, v in adapter.state_dict().items()}
    save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    from .base import replace_dir
    replace_dir(tmp, directory)


def load_adapter(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> MultiLabelAdapter:
    """Load an adapter written by :func:`save_adapter`.

    Raises:
        FileNotFoundError: a file is missing (named).
        ValueError: the config has unknown keys, or the weights do not match it (keys listed).
    """
    from safetensors.torch import load_file
    directory = Path(directory)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} does not exist (not a saved multi-label adapter)")
    meta = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    cfg = AdapterConfig.from_dict(meta.get("config", {}), str(directory / CONFIG_FILE))
    state = load_file(str(directory / WEIGHTS_FILE), device=str(map_location))
    if "label_embeds" not in state:
        raise ValueError(f"{directory / WEIGHTS_FILE}: no 'label_embeds' tensor")
    adapter = MultiLabelAdapter(cfg, state["label_embeds"], meta.get("label_names"))
    missing = sorted(set(adapter.state_dict()) - set(state))
    unexpected = sorted(set(state) - set(adapter.state_dict()))
    if missing or unexpected:
        raise ValueError(f"{directory / WEIGHTS_FILE} does not match {CONFIG_FILE}: missing {missing}, "
                         f"unexpected {unexpected}")
    adapter.load_state_dict(state, strict=True)
    return adapter.to(map_location)
