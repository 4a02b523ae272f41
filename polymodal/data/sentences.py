"""Training sentences for text-only multi-label learning (Text as Image, arXiv 2312.04160).

1. ``sample_label_sets`` draws random sets of 1..k label names.
2. A sentence generator writes one sentence per set: :class:`TemplateSentenceGenerator` (default, no
   model needed) or :class:`LMSentenceGenerator` (a local causal LM through transformers).
3. ``extract_labels`` reads the labels back from each sentence (names, plurals, synonyms, whole words
   only), as the paper does with LLM output that may drop or add labels.

``generate_sentences`` runs steps 1-2 from a :class:`SentenceConfig` (the recipe's
``text_as_image.sentences`` section).
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

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
# One entry point from a config
# ----------------------------------------------------------------------------------------------
GENERATORS = ("template", "lm")


@dataclass
class SentenceConfig:
    """How the training sentences are written (the recipe's ``text_as_image.sentences`` section)."""
    generator: str = "template"          # "template" | "lm" (a local causal LM folder in `lm_path`)
    num: int = 5000                      # sentences (label sets) to write
    max_labels: int = 4                  # labels per sentence: uniform in [min_labels, max_labels]
    min_labels: int = 1                  # fewest labels in one sentence
    templates: list = field(default_factory=lambda: list(DEFAULT_SENTENCE_TEMPLATES))  # frames with {objects}
    adjective_prob: float = 0.5          # template: chance of one adjective from each group
    count_prob: float = 0.2              # template: chance of "two/three <plural>"
    max_count: int = 3                   # template: the largest count written ("three cats")
    lm_path: str = ""                    # lm: folder saved with save_pretrained
    lm_prompt: str = DEFAULT_LM_PROMPT   # lm: prompt with one {labels}
    lm_batch_size: int = 8               # lm: prompts generated at once
    lm_max_new_tokens: int = 40          # lm: the longest sentence in tokens
    lm_temperature: float = 0.8          # lm: sampling temperature
    lm_top_p: float = 0.95               # lm: nucleus sampling mass

    def validate(self, where: str = "sentences") -> None:
        """Raise ValueError naming the key for a bad value (before anything is generated)."""
        if self.generator not in GENERATORS:
            raise ValueError(f"{where}.generator must be one of {', '.join(GENERATORS)}, got {self.generator!r}")
        if self.num < 1:
            raise ValueError(f"{where}.num must be >= 1, got {self.num}")
        if not 1 <= self.min_labels <= self.max_labels:
            raise ValueError(f"{where}: need 1 <= min_labels <= max_labels, got {self.min_labels} and "
                             f"{self.max_labels}")
        if self.generator == "template":
            if not self.templates or any("{objects}" not in t for t in self.templates):
                raise ValueError(f"{where}.templates: every frame needs an '{{objects}}' placeholder, "
                                 f"got {self.templates!r}")
        elif not self.lm_path:
            raise ValueError(f"{where}.lm_path: generator 'lm' needs a local causal LM folder")
        elif "{labels}" not in self.lm_prompt:
            raise ValueError(f"{where}.lm_prompt has no '{{labels}}' placeholder")


def generate_sentences(cfg: SentenceConfig, label_names: Sequence[str], adjective_groups: Sequence[Sequence[str]] = (),
                       seed: int = 0, num: int | None = None, plurals: Mapping[str, str] | None = None,
                       progress: bool = False) -> list[str]:
    """``num`` (default ``cfg.num``) sentences, each naming a random label set; deterministic in ``seed``.

    Args:
        cfg: the generator settings.
        label_names: the C label names.
        adjective_groups: template generator: groups of adjectives (e.g. sizes, colours), in that order.
        seed: seeds the label sets and the generator.
        num: overrides ``cfg.num`` (e.g. for a held-out set).
        plurals: explicit plurals (``{"person": "people"}``).
        progress: a progress bar while an LM writes.
    Returns:
        One sentence per label set (an LM may write an empty one).
    """
    cfg.validate()
    sets = sample_label_sets(label_names, num or cfg.num, cfg.max_labels, cfg.min_labels, seed)
    if cfg.generator == "lm":
        lm = LMSentenceGenerator(cfg.lm_path, cfg.lm_prompt, cfg.lm_batch_size, cfg.lm_max_new_tokens,
                                 temperature=cfg.lm_temperature, top_p=cfg.lm_top_p, seed=seed)
        return lm.generate(sets, progress=progress)
    gen = TemplateSentenceGenerator(templates=list(cfg.templates), adjective_groups=[list(g) for g in adjective_groups],
                                    adjective_prob=cfg.adjective_prob, count_prob=cfg.count_prob,
                                    max_count=cfg.max_count, plurals=dict(plurals or {}), seed=seed)
    return gen.generate(sets)


__all__ = ["DEFAULT_LM_PROMPT", "DEFAULT_SENTENCE_TEMPLATES", "LMSentenceGenerator", "SentenceConfig",
           "TemplateSentenceGenerator", "extract_labels", "generate_sentences", "load_synonyms", "plural",
           "sample_label_sets"]
