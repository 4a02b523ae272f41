"""Multiple-choice questions about images with MMBench's CircularEval (the `mcq` eval task).

CircularEval (MMBench, Liu et al. 2023; the grouping read from open-compass/VLMEvalKit's `mcq_circular_eval` and
OpenCompass' `tools/eval_mmbench.py`): a question with N options is asked N times, its options circularly shifted
by 0 .. N-1 places (the correct letter moves with them), and counts as right only when every pass is answered
right. A model that prefers a letter or a position, or guesses, gets little: a uniform guess scores (1/N)^N.

Passes: records that share `circular_of` (the MMBench importer writes it: the row's index mod 10^6) are the passes of
one question, as the released TSVs ship them; a question that arrives alone gets its N-1 shifted passes made here.
Plain ("vanilla") accuracy is reported beside it: the share of questions whose first pass is right.

How a model chooses (`choice`):

- `classifier` (a `VQAModel`, `answer_logits`): the option with the highest logit among the options in the
  model's answer vocabulary (normalised as VQA answers); a question none of whose options is in the vocabulary
  is a miss (`options_outside_vocabulary` counts them). The model reads the question alone, so the passes agree.
- `likelihood` (an MLLM, `option_logprobs`): the option text with the highest summed log-likelihood as the answer
  to the prompt "<question>\\nA. <option>\\nB. <option> ..." (the options listed in the pass's order; ours: the
  released evaluations generate and extract instead).
- `generate` (any `generate_text` model): the answer is generated and an option read from it the way MMBench's
  evaluation does before asking a judge LLM: exactly one of the pass's letters standing alone (or as "A.", "(A)",
  "A)" ...), else exactly one option text inside the answer. No judge LLM is asked here: an answer no option can be
  read from is a miss, counted in `unparsed`.

`auto` picks the first of these the model supports.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

CHOICES = ("auto", "classifier", "likelihood", "generate")
LETTERS = "ABCDEFGHI"
_WRAPS = (("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."), (":", ""), (":", ","),
          (":", "."), (":", ")"), (":", ")."))


@dataclass
class Pass:
    """One asking of a question: its image, question, options in this pass's order and the correct option's place."""
    question_id: str
    image: str
    question: str
    options: list
    correct: int
    category: str
    l2_category: str


def shifted(options: list, correct: int, k: int) -> tuple[list, int]:
    """Options circularly shifted left by k places, and where the correct one lands: (["a", "b", "c"], 0, 1) ->
    (["b", "c", "a"], 2)."""
    n = len(options)
    return options[k:] + options[:k], (correct - k) % n


def build_passes(records: list[dict], where: str, circular: bool = True) -> list[list[Pass]]:
    """The passes of every question, in the records' order of questions.

    Args:
        records: MCQ records (`image`, `question`, `options`, and `answer` (the option text) or `answer_letter`;
            optional `circular_of`, `circular_pass`, `question_type` / `category`, `l2_category`).
        where: the manifest, for errors.
        circular: False = each question's first pass only (vanilla).
    Returns:
        One list of `Pass`es per question (its first pass first).
    Raises:
        ValueError: a record without options or answer, or whose answer is not one of its options (naming the line).
    """
    groups: dict = {}
    for k, r in enumerate(records):
        at = f"{where} line {r.get('_line', k + 1)}"
        options = [str(o) for o in r.get("options") or []]
        if len(options) < 2:
            raise ValueError(f"{at}: a multiple-choice record needs `options` (a list of >= 2 option texts)")
        letter = str(r.get("answer_letter") or "").strip()
        if letter:
            if letter not in LETTERS[:len(options)]:
                raise ValueError(f"{at}: answer_letter {letter!r} is not one of its {len(options)} options")
            correct = LETTERS.index(letter)
        elif r.get("answer") is not None and str(r["answer"]) in options:
            correct = options.index(str(r["answer"]))
        elif r.get("answer") is None:
            raise ValueError(f"{at}: no `answer` (a test split: MMBench's test answers are hidden, score the dev split "
                             f"or submit predictions to the MMBench server)")
        else:
            raise ValueError(f"{at}: answer {r['answer']!r} is not one of its options {options}")
        qid = str(r.get("circular_of", r.get("index", f"line-{k + 1}")))
        p = Pass(qid, str(r["image"]), str(r["question"]), options, correct,
                 str(r.get("question_type") or r.get("category") or "all"), str(r.get("l2_category") or ""))
        k_pass = int(r.get("circular_pass") or 0)
        if any(k_pass == kp for kp, _ in groups.get(qid, [])):
            raise ValueError(f"{at}: a second record for pass {k_pass} of question {qid} (`circular_of` / `index`): "
                             f"duplicate rows; give each question's passes distinct `circular_pass` numbers")
        groups.setdefault(qid, []).append((k_pass, p))
    out = []
    for qid, passes in groups.items():
        passes.sort(key=lambda kp: kp[0])
        first = passes[0][1]
        if not circular:
            out.append([first])
        elif len(passes) == 1:                    # the question alone: make its shifted passes
            made = [first]
            for k in range(1, len(first.options)):
                opts, correct = shifted(first.options, first.correct, k)
                made.append(Pass(qid, first.image, first.question, opts, correct, first.category, first.l2_category))
            out.append(made)
        else:
            out.append([p for _, p in passes])
    return out


def read_choice(text: str, options: list) -> int | None:
    """Which option a free-text answer names (MMBench's matching before its judge LLM): exactly one of the letters
    standing alone or wrapped ("B", "B.", "(B)" ...), else exactly one option text inside the answer (case-folded);
    None when neither is unique."""
    letters = LETTERS[:len(options)]
    words = [w.strip() for w in str(text).split()]
    for before, after in (("", ""), *_WRAPS):
        found = [c for c in letters if f"{before}{c}{after}" in words]
        if len(found) == 1:
            if not before and not after and found[0] == "A" and len(words) > 3:
                continue                          # "A" may be the article of a sentence
            return letters.index(found[0])
    low = str(text).lower()
    inside = [i for i, o in enumerate(options) if str(o).lower() and str(o).lower() in low]
    return inside[0] if len(inside) == 1 else None


def listed_prompt(question: str, options: list) -> str:
    """The question and its lettered options, one per line."""
    return "\n".join([question, *(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))])


def pick_choice(model, choice: str) -> str:
    """The `choice` a model supports ("auto" resolved); ValueError naming the option when it cannot."""
    if choice not in CHOICES:
        raise ValueError(f"mcq: choice must be one of {', '.join(CHOICES)}, got {choice!r}")
    able = {"classifier": hasattr(model, "answer_logits"), "likelihood": hasattr(model, "option_logprobs"),
            "generate": hasattr(model, "generate_text")}
    if choice == "auto":
        for name, ok in able.items():
            if ok:
                return name
        raise ValueError(f"mcq: a {type(model).__name__} can neither classify answers, score options nor generate "
                         f"text; give a VQA model (method: vqa) or an MLLM")
    if not able[choice]:
        raise ValueError(f"mcq: -o choice={choice} needs a model with "
                         f"{dict(classifier='answer_logits', likelihood='option_logprobs', generate='generate_text')[choice]}"
                         f"; a {type(model).__name__} has none")
    return choice


def check_mcq_manifest(manifest, limit: int = 0, on_bad_record: str = "error", circular: bool = True, **_) -> int:
    """Read an MCQ manifest the way the `mcq` task will and build its passes (before any training step).

    Returns:
        The number of questions.
    Raises:
        ManifestError / ValueError: as `build_passes` (naming the manifest and line).
    """
    from ..encode import read_records
    records = read_records(manifest, limit, on_bad_record, required=("image", "question"), media="image")
    return len(build_passes(records, str(manifest), circular))


def mcq_task(model, manifest, limit: int = 0, progress: bool = False, lang: str = "en", cache=None,
             on_bad_record: str = "error", batch_size: int = 32, choice: str = "auto", circular: bool = True) -> dict:
    """The `mcq` evaluation (`polymodal eval MODEL --task mcq --data mmb.jsonl`): CircularEval accuracy.

    Args:
        model: a `VQAModel`, an MLLM or any model with `generate_text` (with `tokenizer` and `image_transform`).
        manifest: MCQ records (`polymodal data import mmbench`, or hand-written: image, question, options, answer).
        choice: "auto" | "classifier" | "likelihood" | "generate" (module docstring).
        circular: False = vanilla accuracy only (each question's first pass).
        limit: first N records (a question's passes may then be partial: with circular, made ones fill in).
        progress, lang, cache, on_bad_record, batch_size: as every task (lang and cache are unused).
    Returns:
        circular_accuracy, vanilla_accuracy and the uniform guess's chance_circular_accuracy /
        chance_vanilla_accuracy (percent), num_questions, num_passes, unparsed (generate: passes no option could be
        read from), options_outside_vocabulary (classifier: questions none of whose options it can answer), and per
        category C `category/C/...` and per l2 category `l2_category/C/...` (accuracies and num_questions).
    """
    from ..data.images import load_image
    from ..encode import device_of, read_records
    from .vqa import normalize_answer
    how = pick_choice(model, choice)
    if getattr(getattr(model, "config", None), "num_frames", 0):
        raise ValueError("mcq: the model answers about videos; MCQ records are about images")
    records = read_records(manifest, limit, on_bad_record, required=("image", "question"), media="image")
    questions = build_passes(records, str(manifest), circular)
    flat = [p for q in questions for p in q]
    device = device_of(model)
    images: dict = {}
    vocab = {a: i for i, a in enumerate(model.answers)} if how == "classifier" else {}
    chosen: list = []                       # per pass: the chosen option's place, or None (nothing chosen)
    batches = range(0, len(flat), batch_size)
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, desc="mcq", unit="batch")
    with torch.no_grad():
        for start in batches:
            chunk = flat[start:start + batch_size]
            for p in chunk:
                if p.image not in images:
                    images[p.image] = model.image_transform(load_image(p.image))
            pixels = torch.stack([images[p.image] for p in chunk]).to(device)           # (B, 3, H, W)
            prompts = [listed_prompt(p.question, p.options) for p in chunk]
            if how == "classifier":
                logits = model.answer_logits(pixels, model.tokenizer([p.question for p in chunk]).to(device))  # (B, A)
                for p, row in zip(chunk, logits):
                    known = [(vocab[a], i) for i, a in enumerate(normalize_answer(o) for o in p.options) if a in vocab]
                    chosen.append(max(known, key=lambda ai: float(row[ai[0]]))[1] if known else None)
            elif how == "likelihood":
                picked = [0] * len(chunk)
                # passes of different option counts cannot share one (B, K) call: score them count by count
                for n in sorted({len(p.options) for p in chunk}):
                    rows = [i for i, p in enumerate(chunk) if len(p.options) == n]
                    lp = model.option_logprobs(pixels[rows], [prompts[i] for i in rows],
                                               [chunk[i].options for i in rows])                  # (B', n)
                    for i, best in zip(rows, lp.argmax(dim=1).tolist()):
                        picked[i] = best
                chosen += picked
            else:
                chosen += [read_choice(t, p.options) for p, t in zip(chunk, model.generate_text(pixels, prompts))]
    right = [c == p.correct for c, p in zip(chosen, flat)]
    hits, firsts, k = [], [], 0             # per question: (every pass right, first pass right, option count)
    for q in questions:
        hits.append((all(right[k:k + len(q)]), right[k], len(q[0].options)))
        firsts.append(k)
        k += len(q)
    out = _accuracies(hits, circular)
    out.update(num_passes=len(flat), unparsed=sum(c is None for c in chosen) if how == "generate" else 0,
               options_outside_vocabulary=sum(chosen[i] is None for i in firsts) if how == "classifier" else 0)
    for name in ("category", "l2_category"):
        groups = defaultdict(list)
        for q, h in zip(questions, hits):
            if getattr(q[0], name):
                groups[getattr(q[0], name)].append(h)
        for c, hs in sorted(groups.items()):
            out.update({f"{name}/{c}/{m}": v for m, v in _accuracies(hs, circular).items()})
    return out


def _accuracies(hits: list[tuple], circular: bool) -> dict:
    """Percentages of (all passes right, first pass right, option count) rows, with a uniform guess's."""
    n = max(len(hits), 1)
    out = {"vanilla_accuracy": 100.0 * sum(h[1] for h in hits) / n,
           "chance_vanilla_accuracy": 100.0 * sum(1 / h[2] for h in hits) / n, "num_questions": len(hits)}
    if circular:
        out["circular_accuracy"] = 100.0 * sum(h[0] for h in hits) / n
        out["chance_circular_accuracy"] = 100.0 * sum((1 / h[2]) ** h[2] for h in hits) / n
    return out


__all__ = ["CHOICES", "Pass", "shifted", "build_passes", "read_choice", "listed_prompt", "pick_choice",
           "check_mcq_manifest", "mcq_task"]
