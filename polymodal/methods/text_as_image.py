"""Text as Image (arXiv 2312.04160): multi-label recognition learnt from sentences only.

The pipeline, one function per step:

1. ``sample_label_sets`` draws random sets of 1..k label names.
2. A sentence generator writes one sentence per set: :class:`TemplateSentenceGenerator` (default,
   no model needed) or :class:`LMSentenceGenerator` (any local causal LM through transformers).
3. ``extract_labels`` reads the labels back from each sentence (names, plurals, synonyms,
   whole words only), as the paper does with LLM output that may drop or add labels.
4. ``cached_text_embeddings`` encodes the sentences once with the frozen text tower and keeps
   them on disk, keyed by a hash of the model (config, weights, tokenizer) and the sentences.
5. ``train_adapter`` / ``fit_adapter`` trains a :class:`~polymodal.models.multilabel.MultiLabelAdapter`
   on the (perturbed) text embeddings with ASL or a ranking loss.
6. ``multilabel_eval_manifest`` applies it (or plain zero-shot prompts) to image embeddings and
   returns mAP and F1 from :func:`polymodal.eval.multilabel.multilabel_metrics`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..losses.multilabel import asymmetric_loss, ranking_loss
from ..models.multilabel import AdapterConfig, MultiLabelAdapter, load_adapter, perturb

# Sentence frames for the template generator; "{objects}" is a list such as "a red star and two circles".
DEFAULT_SENTENCE_TEMPLATES = [
    "a photo of {objects}.",
    "a picture of {objects}.",
    "an image with {objects}.",
    "{objects} in the picture.",
    "there are {objects} in this image.",
    "a scene with {objects}.",
]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DEFAULT_LM_PROMPT = ("Write one short sentence that describes a photo showing {labels}.\n"
                     "Sentence:")
_CJK = re.compile(r"[\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


# ----------------------------------------------------------------------------------------------
# Label names, plurals, label sets
# ----------------------------------------------------------------------------------------------
def plural(word: str, irregular: Mapping[str, str] | None = None) -> str:
    """English plural of a (possibly multi-word) name; only the last word is inflected.

    Args:
        word: e.g. ``"cross"``, ``"traffic light"``.
        irregular: explicit plurals that win over the rules (``{"person": "people"}``).

    Returns:
        ``"crosses"``, ``"traffic lights"``; ``"-y"`` after a consonant gives ``"-ies"``;
        ``-s/-x/-z/-ch/-sh`` take ``"-es"``; everything else ``"-s"``.
    """
    if irregular and word in irregular:
        return irregular[word]
    head, _, last = word.rpartition(" ")
    if _CJK.search(last):
        return word                                         # no plural form in Chinese
    if re.search(r"(s|x|z|ch|sh)$", last):
        last += "es"
    elif re.search(r"[^aeiou]y$", last):
        last = last[:-1] + "ies"
    else:
        last += "s"
    return f"{head} {last}" if head else last


def sample_label_sets(label_names: Sequence[str], n: int, max_labels: int = 4, min_labels: int = 1,
                      seed: int = 0) -> list[list[str]]:
    """``n`` random label sets; the size of each is uniform in ``[min_labels, max_labels]``.

    Args:
        label_names: the C label names.
        n: number of sets.
        max_labels: largest set (capped at C).
        min_labels: smallest set.
        seed: the sets depend only on the arguments.

    Returns:
        ``n`` lists of distinct names, in random order.
    """
    if not label_names:
        raise ValueError("sample_label_sets needs at least one label name")
    hi = min(int(max_labels), len(label_names))
    if not 1 <= min_labels <= hi:
        raise ValueError(f"need 1 <= min_labels <= max_labels (capped at {len(label_names)} labels), "
                         f"got min_labels={min_labels}, max_labels={max_labels}")
    rng = random.Random(seed)
    return [rng.sample(list(label_names), rng.randint(min_labels, hi)) for _ in range(n)]


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


# ----------------------------------------------------------------------------------------------
# Sentence generators
# ----------------------------------------------------------------------------------------------
@dataclass
class TemplateSentenceGenerator:
    """Sentences naming a label set, from frames such as ``"a photo of {objects}."``.

    Each label becomes a phrase: ``"a star"``, or with probability ``count_prob`` a count and a
    plural (``"three stars"``), and before the name, for each adjective group, an adjective of that
    group with probability ``adjective_prob`` (``"a large red star"``). Deterministic in ``seed``.
    """

    templates: list[str] = field(default_factory=lambda: list(DEFAULT_SENTENCE_TEMPLATES))
    adjective_groups: list[list[str]] = field(default_factory=list)  # e.g. [sizes, colours], in that order
    adjective_prob: float = 0.5
    count_prob: float = 0.2          # chance of "two/three <plural>" instead of "a <name>"
    max_count: int = 3
    plurals: dict[str, str] = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self):
        if not self.templates:
            raise ValueError("TemplateSentenceGenerator needs at least one template")
        for t in self.templates:
            if "{objects}" not in t:
                raise ValueError(f"sentence template {t!r} has no '{{objects}}' placeholder")

    def _phrase(self, name: str, rng: random.Random) -> str:
        adjectives = [rng.choice(g) for g in self.adjective_groups if g and rng.random() < self.adjective_prob]
        count = rng.randint(2, self.max_count) if self.max_count >= 2 and rng.random() < self.count_prob else 1
        noun = " ".join(adjectives + [name if count == 1 else plural(name, self.plurals)])
        if count > 1:
            return f"{NUMBER_WORDS[count] if count < len(NUMBER_WORDS) else count} {noun}"
        return ("an " if noun[:1].lower() in "aeiou" else "a ") + noun

    def generate(self, label_sets: Sequence[Sequence[str]]) -> list[str]:
        """One sentence per label set (the order within a set is kept)."""
        rng = random.Random(self.seed)
        out = []
        for labels in label_sets:
            if not labels:
                raise ValueError("a label set is empty")
            objects = _join([self._phrase(name, rng) for name in labels])
            out.append(rng.choice(self.templates).replace("{objects}", objects))
        return out


class LMSentenceGenerator:
    """Sentences written by a local causal language model (transformers), one per label set.

    The prompt is ``prompt_template`` with ``{labels}`` replaced by the set (``"a star, a circle
    and a heart"``). Generation is batched with left padding; the first line of the continuation,
    cut after its first sentence, is the answer. Only local folders are read (no hub access).

    Args:
        model_path: a folder with a transformers causal LM and its tokenizer.
        prompt_template: text with one ``{labels}`` placeholder.
        batch_size: prompts per ``generate`` call.
        max_new_tokens: continuation length.
        do_sample: sample (True) or decode greedily.
        temperature, top_p: sampling settings.
        seed: seeds the sampling (the output is reproducible on one machine).
        device: where the LM runs.
    """

    def __init__(self, model_path: str | os.PathLike, prompt_template: str = DEFAULT_LM_PROMPT,
                 batch_size: int = 8, max_new_tokens: int = 40, do_sample: bool = True,
                 temperature: float = 0.8, top_p: float = 0.95, seed: int = 0, device: str = "cpu"):
        path = Path(model_path)
        if not path.is_dir():
            raise FileNotFoundError(f"LM folder {path} does not exist; LMSentenceGenerator only reads local "
                                    "folders (saved with save_pretrained), never a model hub")
        if "{labels}" not in prompt_template:
            raise ValueError(f"prompt_template {prompt_template!r} has no '{{labels}}' placeholder")
        from transformers import AutoModelForCausalLM, AutoTokenizer
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.tokenizer.padding_side = "left"              # generation continues after the prompt
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True).to(device).eval()
        self.prompt_template, self.batch_size, self.max_new_tokens = prompt_template, batch_size, max_new_tokens
        self.do_sample, self.temperature, self.top_p, self.seed, self.device = do_sample, temperature, top_p, seed, device

    def prompt(self, labels: Sequence[str]) -> str:
        """The prompt for one label set."""
        return self.prompt_template.replace("{labels}", _join([("an " if l[:1] in "aeiou" else "a ") + l
                                                               for l in labels]))

    @staticmethod
    def parse(text: str) -> str:
        """First non-empty line of a continuation, up to its first sentence end, without quotes."""
        for line in text.splitlines():
            line = line.strip().strip('"“”\'').strip()
            if line:
                m = re.search(r"[.!?](\s|$)", line)
                return line[:m.end()].strip() if m else line
        return ""

    @torch.no_grad()
    def generate(self, label_sets: Sequence[Sequence[str]], progress: bool = False) -> list[str]:
        """One parsed sentence per label set (may be empty when the LM writes nothing usable)."""
        prompts = [self.prompt(labels) for labels in label_sets]
        out: list[str] = []
        starts = range(0, len(prompts), self.batch_size)
        if progress:
            from tqdm.auto import tqdm
            starts = tqdm(starts, desc="LM sentences", leave=False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            for s in starts:
                enc = self.tokenizer(prompts[s:s + self.batch_size], return_tensors="pt", padding=True).to(self.device)
                kwargs = dict(do_sample=self.do_sample, max_new_tokens=self.max_new_tokens,
                              pad_token_id=self.tokenizer.pad_token_id)
                if self.do_sample:
                    kwargs.update(temperature=self.temperature, top_p=self.top_p)
                ids = self.model.generate(**enc, **kwargs)            # (b, L_prompt + new)
                new = ids[:, enc["input_ids"].shape[1]:]               # left padding: prompts end together
                out.extend(self.parse(t) for t in self.tokenizer.batch_decode(new, skip_special_tokens=True))
        return out


# ----------------------------------------------------------------------------------------------
# Label extraction
# ----------------------------------------------------------------------------------------------
def load_synonyms(path_or_dict: str | os.PathLike | Mapping[str, Sequence[str]] | None) -> dict[str, list[str]]:
    """Synonyms per label: a dict, or a JSON file ``{"person": ["man", "woman", "people"]}``."""
    if path_or_dict is None:
        return {}
    if isinstance(path_or_dict, Mapping):
        return {k: list(v) for k, v in path_or_dict.items()}
    path = Path(path_or_dict)
    if not path.is_file():
        raise FileNotFoundError(f"synonyms file {path} does not exist")
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise ValueError(f"{path}: expected a JSON object mapping each label to a list of synonyms")
    return data


def _term_pattern(term: str) -> str:
    words = [re.escape(w) for w in term.split()]
    body = r"\s+".join(words)
    if _CJK.search(term):
        return body                                          # no spaces between words in CJK text
    return rf"(?<![\w]){body}(?![\w])"


def extract_labels(sentences: Sequence[str], label_names: Sequence[str],
                   synonyms: Mapping[str, Sequence[str]] | str | os.PathLike | None = None,
                   plurals: Mapping[str, str] | None = None, use_plurals: bool = True) -> Tensor:
    """Multi-hot labels of sentences by whole-word, case-insensitive matching.

    Every label is matched by its name, its plural (``use_plurals``; rules of :func:`plural` plus
    ``plurals``) and its synonyms (and their plurals). Matching is leftmost-longest over all terms,
    so "hot dog" counts as "hot dog" and not also as "dog"; "starfish" never matches "star".

    Args:
        sentences: N texts.
        label_names: C names (the column order).
        synonyms: label -> other names, or a JSON file of that mapping.
        plurals: explicit plurals (``{"person": "people"}``).
        use_plurals: also match plurals.

    Returns:
        (N, C) float tensor of 0/1.
    """
    syn = load_synonyms(synonyms)
    unknown = sorted(set(syn) - set(label_names))
    if unknown:
        raise ValueError(f"synonyms for unknown label(s) {unknown}; labels are {list(label_names)}")
    term_to_label: dict[str, int] = {}
    for c, name in enumerate(label_names):
        for term in [name, *syn.get(name, [])]:
            forms = [term, plural(term, plurals)] if use_plurals else [term]
            for form in forms:
                term_to_label.setdefault(form.lower(), c)
    terms = sorted(term_to_label, key=len, reverse=True)    # longer terms first: leftmost-longest
    pattern = re.compile("|".join(f"({_term_pattern(t)})" for t in terms), re.IGNORECASE)
    out = torch.zeros(len(sentences), len(label_names))
    for i, s in enumerate(sentences):
        for m in pattern.finditer(s):
            out[i, term_to_label[terms[m.lastindex - 1]]] = 1.0
    return out


# ----------------------------------------------------------------------------------------------
# Cached text embeddings
# ----------------------------------------------------------------------------------------------
def model_fingerprint(model, model_key: str | None = None) -> str:
    """A hash of what decides a text embedding: config, weights and tokenizer.

    Args:
        model: a dual encoder (``config``, ``state_dict``, ``tokenizer``).
        model_key: a caller's name for the weights (e.g. their path) that replaces hashing the
            weights, for very large models; the config and tokenizer are still hashed.

    Returns:
        A hex digest.
    """
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        h.update(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
    if model_key is not None:
        h.update(f"key:{model_key}".encode())
    else:
        for name, t in sorted(model.state_dict().items()):
            t = t.detach().cpu().contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    tok = getattr(model, "tokenizer", None)
    if tok is not None:
        backend = getattr(tok, "backend", None)
        if backend is not None and hasattr(backend, "to_str"):
            h.update(backend.to_str().encode())
        h.update(f"ctx:{getattr(tok, 'context_length', None)}".encode())
    return h.hexdigest()


def cache_key(fingerprint: str, texts: Sequence[str]) -> str:
    """Hash of a model fingerprint and a list of texts (order matters)."""
    h = hashlib.sha256(fingerprint.encode())
    for t in texts:
        h.update(b"\x00" + t.encode("utf-8"))
    return h.hexdigest()[:40]


def cached_text_embeddings(model, texts: Sequence[str], cache_dir: str | os.PathLike | None = None,
                           batch_size: int = 256, progress: bool = False, model_key: str | None = None) -> Tensor:
    """L2-normalised text embeddings (N, E), computed once and cached on disk.

    Args:
        model: the frozen dual encoder.
        texts: N sentences.
        cache_dir: where ``text_embeds_<key>.safetensors`` lives; None = no cache.
        batch_size: sentences per forward call.
        progress: show a progress bar while encoding.
        model_key: see :func:`model_fingerprint`.

    Returns:
        (N, E) float32 tensor on the CPU.
    """
    from ..eval.suite import encode_texts
    texts = list(texts)
    path = None
    if cache_dir is not None:
        key = cache_key(model_fingerprint(model, model_key), texts)
        path = Path(cache_dir) / f"text_embeds_{key}.safetensors"
        if path.is_file():
            from safetensors.torch import load_file
            emb = load_file(str(path))["embeddings"]
            if emb.shape[0] == len(texts):
                return emb
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        emb = encode_texts(model, texts, batch_size, progress).float()
    finally:
        model.train(was_training)
    if path is not None:
        from safetensors.torch import save_file
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file({"embeddings": emb.contiguous()}, str(tmp), metadata={"num_texts": str(len(texts))})
        os.replace(tmp, path)                                  # readers never see a partial file
    return emb


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
@dataclass
class TrainAdapterConfig:
    adapter: AdapterConfig = field(default_factory=AdapterConfig)  # embed_dim is taken from the model
    sigma: float = 0.05                  # std of the random perturbation of text embeddings (0 = off)
    loss: str = "asl"                    # "asl" | "ranking"
    gamma_neg: float = 4.0               # ASL
    gamma_pos: float = 0.0               # ASL
    clip: float = 0.05                   # ASL probability margin for negatives
    margin: float = 1.0                  # ranking loss margin (in logits)
    lr: float = 1e-3
    weight_decay: float = 1e-4
    epochs: int = 20
    batch_size: int = 128
    seed: int = 0
    templates: list = field(default_factory=lambda: ["en"])  # label prompts: ["en"] / ["zh"] / template strings
    progress: bool = True

    def __post_init__(self):
        if self.loss not in ("asl", "ranking"):
            raise ValueError(f"TrainAdapterConfig.loss must be 'asl' or 'ranking', got {self.loss!r}")
        if self.sigma < 0:
            raise ValueError(f"TrainAdapterConfig.sigma must be >= 0, got {self.sigma}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs} and {self.batch_size}")


def _templates(spec: Sequence[str] | str):
    from ..eval.zeroshot import load_templates
    if isinstance(spec, str):
        return load_templates(spec)
    spec = list(spec)
    if len(spec) == 1 and "{}" not in spec[0]:
        return load_templates(spec[0])
    return spec


def label_embeddings(model, label_names: Sequence[str], templates: Sequence[str] | str = "en") -> Tensor:
    """(C, E) prompt-ensemble embeddings of the label names (templates averaged), on the CPU."""
    from ..eval.zeroshot import build_classifier
    return build_classifier(model, list(label_names), _templates(templates)).float().cpu()


def fit_adapter(text_embeds: Tensor, labels: Tensor, label_embeds: Tensor, cfg: TrainAdapterConfig,
                label_names: Sequence[str] | None = None) -> MultiLabelAdapter:
    """Train an adapter on precomputed text embeddings (the loop of :func:`train_adapter`).

    Args:
        text_embeds: (N, E) sentence embeddings.
        labels: (N, C) 0/1 targets.
        label_embeds: (C, E) label prompt embeddings (the classifier's starting point).
        cfg: training settings; ``cfg.adapter.embed_dim`` is replaced by E.
        label_names: C names stored with the adapter.

    Returns:
        The trained adapter in eval mode, on the CPU. The result depends only on the inputs and
        ``cfg.seed`` (the global RNG state is left untouched).
    """
    text_embeds, labels = torch.as_tensor(text_embeds).float(), torch.as_tensor(labels).float()
    if text_embeds.dim() != 2 or labels.dim() != 2 or len(text_embeds) != len(labels):
        raise ValueError(f"text_embeds (N, E) and labels (N, C) must have the same N, got "
                         f"{tuple(text_embeds.shape)} and {tuple(labels.shape)}")
    if labels.shape[1] != label_embeds.shape[0]:
        raise ValueError(f"labels have {labels.shape[1]} columns but there are {label_embeds.shape[0]} label embeddings")
    if len(text_embeds) == 0:
        raise ValueError("fit_adapter needs at least one sentence")
    acfg = replace(cfg.adapter, embed_dim=text_embeds.shape[1])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)                          # init and dropout
        adapter = MultiLabelAdapter(acfg, label_embeds, list(label_names) if label_names is not None else None)
        adapter.train()
        params = [p for p in adapter.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        gen = torch.Generator().manual_seed(cfg.seed)        # shuffling and noise
        n = len(text_embeds)
        steps_per_epoch = -(-n // cfg.batch_size)
        bar = None
        if cfg.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=cfg.epochs * steps_per_epoch, desc=f"adapter sigma={cfg.sigma:g}", leave=False)
        for _ in range(cfg.epochs):
            order = torch.randperm(n, generator=gen)
            for s in range(0, n, cfg.batch_size):
                idx = order[s:s + cfg.batch_size]
                x = perturb(text_embeds[idx], cfg.sigma, gen)   # (b, E) noisy text = stand-in images
                logits = adapter(x)                              # (b, C)
                if cfg.loss == "asl":
                    loss = asymmetric_loss(logits, labels[idx], cfg.gamma_neg, cfg.gamma_pos, cfg.clip)
                else:
                    loss = ranking_loss(logits, labels[idx], cfg.margin)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if bar is not None:
            bar.close()
    return adapter.eval()


def train_adapter(model, sentences: Sequence[str], labels: Tensor, cfg: TrainAdapterConfig,
                  label_names: Sequence[str], cache_dir: str | os.PathLike | None = None) -> MultiLabelAdapter:
    """Train a multi-label adapter on sentences encoded by the frozen ``model``.

    Args:
        model: the frozen dual encoder (never updated).
        sentences: N training sentences.
        labels: (N, C) 0/1 targets (e.g. from :func:`extract_labels`).
        cfg: training settings.
        label_names: C label names; the classifier starts from their prompt embeddings
            (``cfg.templates``).
        cache_dir: where sentence embeddings are cached (None = encode every time).

    Returns:
        The trained :class:`MultiLabelAdapter` (eval mode, CPU).
    """
    if len(sentences) != len(labels):
        raise ValueError(f"{len(sentences)} sentences but {len(labels)} label rows")
    emb = cached_text_embeddings(model, sentences, cache_dir, progress=cfg.progress)
    return fit_adapter(emb, labels, label_embeddings(model, label_names, cfg.templates), cfg, label_names)


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------
def load_label_names(classes, lang: str = "en") -> tuple[list[str], list[str]]:
    """Label names for multi-label evaluation.

    Args:
        classes: a list of names, a JSON file (the first of the keys ``labels``, ``shapes``,
            ``classes`` that exists, e.g. ShapesWorld's ``shapes``), or a text file with one
            name per line.
        lang: for a JSON file, ``"<key>_<lang>"`` gives the prompt names of other languages.

    Returns:
        ``(names, prompt_names)``: the names that record labels use and the names that go into
        the prompts (the same for English).
    """
    if isinstance(classes, (list, tuple)):
        return list(classes), list(classes)
    path = Path(classes)
    if not path.is_file():
        raise FileNotFoundError(f"classes file {path} does not exist")
    if path.suffix != ".json":
        names = [l.strip() for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]
        if not names:
            raise ValueError(f"{path}: no label names")
        return names, names
    data = json.loads(path.read_text(encoding="utf-8"))
    key = next((k for k in ("labels", "shapes", "classes") if isinstance(data, dict) and k in data), None)
    if key is None:
        raise KeyError(f"{path}: expected a 'labels', 'shapes' or 'classes' list")
    names = list(data[key])
    if lang == "en":
        return names, names
    local = data.get(f"{key}_{lang}")
    if local is None or len(local) != len(names):
        raise KeyError(f"{path}: no '{key}_{lang}' list of {len(names)} names for language {lang!r}")
    return names, list(local)


def multilabel_targets(records: Sequence[dict], label_names: Sequence[str], where: str = "manifest") -> Tensor:
    """(N, C) 0/1 targets from records' ``labels`` (names or integer indices).

    Raises:
        KeyError / ValueError: naming the record's line and the unknown label.
    """
    index = {n: i for i, n in enumerate(label_names)}
    out = torch.zeros(len(records), len(label_names))
    for i, r in enumerate(records):
        line = r.get("_line", i + 1)
        if "labels" not in r:
            raise KeyError(f"{where}: record on line {line} has no 'labels'")
        for lab in r["labels"]:
            if isinstance(lab, int) and not isinstance(lab, bool):
                if not 0 <= lab < len(label_names):
                    raise ValueError(f"{where}: line {line}: label index {lab} is outside [0, {len(label_names)})")
                out[i, lab] = 1.0
            elif lab in index:
                out[i, index[lab]] = 1.0
            else:
                raise ValueError(f"{where}: line {line}: label {lab!r} is not one of the {len(label_names)} "
                                 f"label names ({', '.join(label_names[:10])}{' ...' if len(label_names) > 10 else ''})")
    return out


@torch.no_grad()
def multilabel_scores(model, image_embeds: Tensor, prompt_names: Sequence[str], adapter=None,
                      templates: Sequence[str] | str = "en") -> Tensor:
    """(N, C) scores: cosine to label prompts (zero-shot) or the adapter's logits."""
    image_embeds = F.normalize(torch.as_tensor(image_embeds).float(), dim=-1)
    if adapter is None:
        w = label_embeddings(model, prompt_names, templates)       # (C, E)
        return image_embeds @ w.T
    if adapter.num_labels != len(prompt_names):
        raise ValueError(f"the adapter has {adapter.num_labels} labels but the data has {len(prompt_names)}")
    adapter = adapter.eval()
    dev = adapter.label_embeds.device
    return adapter(image_embeds.to(dev)).float().cpu()


def multilabel_eval_manifest(model, manifest, classes, lang: str = "en", limit: int = 0, adapter=None,
                             templates: Sequence[str] | str | None = None, batch_size: int = 128,
                             progress: bool = False, image_embeds: Tensor | None = None) -> dict:
    """Multi-label recognition on a manifest with ``labels`` per record.

    Args:
        model: a dual encoder with tokenizer and image_transform.
        manifest: JSONL/CSV manifest; each record has ``image`` and ``labels`` (names or indices).
        classes: label names: a list, classes.json (``labels``/``shapes``/``classes``) or a text file.
        lang: prompt language (bundled templates and ``<key>_<lang>`` names).
        limit: first ``limit`` records only (0 = all).
        adapter: None = zero-shot prompts; a :class:`MultiLabelAdapter` or a folder saved by
            ``save_adapter`` = adapter logits on the image embeddings.
        templates: prompt templates (default: the bundled set of ``lang``).
        batch_size: images per forward call.
        progress: progress bars.
        image_embeds: precomputed (N, E) image embeddings of the (limited) records.

    Returns:
        :func:`polymodal.eval.multilabel.multilabel_metrics` output (mAP, AP per class, top-3 and
        threshold F1 in percent) plus ``num_images`` and ``num_labels``. Thresholds apply to
        sigmoid probabilities with an adapter, to cosines (threshold 0.5) without one.
    """
    from ..data.manifests import read_manifest
    from ..eval.multilabel import multilabel_metrics
    from ..eval.suite import encode_images
    records = read_manifest(manifest, required=("image", "labels")).records
    if limit:
        records = records[:limit]
    if not records:
        raise ValueError(f"{manifest}: no records to evaluate")
    names, prompt_names = load_label_names(classes, lang)
    targets = multilabel_targets(records, names, str(manifest))
    if isinstance(adapter, (str, os.PathLike)):
        adapter = load_adapter(adapter)
    if image_embeds is None:
        was_training = model.training
        model.eval()
        try:
            image_embeds = encode_images(model, [r["image"] for r in records], batch_size, progress)
        finally:
            model.train(was_training)
    scores = multilabel_scores(model, image_embeds, prompt_names, adapter, templates or lang)
    if adapter is not None:
        scores = torch.sigmoid(scores)
    out = multilabel_metrics(scores, targets)
    out.update(num_images=len(records), num_labels=len(names))
    return out


def modality_gap(image_embeds: Tensor, text_embeds: Tensor) -> dict[str, float]:
    """How far apart images and their matching texts lie in the joint space.

    Args:
        image_embeds: (N, E); text_embeds: (N, E) with row i describing image i.

    Returns:
        ``centroid_distance`` (||mean image - mean text||, the gap of Liang et al. 2022),
        ``matched_cosine`` (mean cosine of matched pairs), ``mean_pair_cosine`` (mean cosine
        over all image-text pairs), ``matched_minus_mean`` (their difference: the alignment
        margin).
    """
    img = F.normalize(torch.as_tensor(image_embeds).double(), dim=-1)
    txt = F.normalize(torch.as_tensor(text_embeds).double(), dim=-1)
    if img.shape != txt.shape or img.dim() != 2:
        raise ValueError(f"image and text embeddings must both be (N, E), got {tuple(img.shape)} and {tuple(txt.shape)}")
    mi, mt = img.mean(0), txt.mean(0)
    matched = float((img * txt).sum(1).mean())
    mean_pair = float(mi @ mt)                    # mean over all pairs of img_i . txt_j
    return {"centroid_distance": float((mi - mt).norm()), "matched_cosine": matched,
            "mean_pair_cosine": mean_pair, "matched_minus_mean": matched - mean_pair}
