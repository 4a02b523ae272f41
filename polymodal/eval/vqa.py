"""Visual question answering: the VQAv2 answer normalisation and accuracy, and the `vqa` eval task.

Rules (read from the VQA evaluation code: GT-Vision-Lab/VQA `vqaEval.py` and the EvalAI / VQA-Challenge version
that facebookresearch/mmf's `EvalAIAnswerProcessor` follows; written here from those rules, not copied):

- **normalisation** of an answer: newlines and tabs become spaces, then strip; *punctuation*: each of
  ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is deleted when it touches a space (or when the text holds a
  digit-comma-digit), else replaced by a space; a full stop is deleted unless a digit follows it (the official
  pattern's look-behind is mistyped, so "3.5" keeps its point and "yes." loses it); *digits and articles*: lower
  case, words split on white space, number words zero..ten (and "none") become digits, the articles a / an / the
  are dropped, apostrophe-less contractions ("dont", "isnt", "youre" ...) get their apostrophe back.
- **accuracy** of a predicted answer against N human answers: for each human answer, min(#matches among the
  other N - 1 / 3, 1), averaged over the N leave-one-out subsets (the 10-choose-9 average of VQAv2); records with
  fewer than 4 answers (MSVD-QA, TextVQA-style single answers) score the share of answers that match (one answer:
  exact match).
- per question type: the mean of the per-question accuracies (EvalAI's version; GT-Vision-Lab's older script
  appends the last subset's value instead, a known slip).

Our one deviation: the human answers are normalised exactly like the prediction (VQAv2's official script only
strips their punctuation, because VQAv2's answers were normalised when collected; imported and synthetic answers
are not). See docs/methods.md.
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import torch

PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
               "!"]
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
_CONTRACTED = ("ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't "
               "he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't "
               "mightn't've might've mustn't must've needn't not've o'clock oughtn't shan't she'd've should've "
               "shouldn't shouldn't've somebody'd've somebody'll somebody's someone'd someone'd've someone'll "
               "someone's something'd something'd've something'll that's there'd there'd've there're there's they'd "
               "they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll what're what's what've "
               "when's where'd where's where've who'd who'd've who'll who's who've why'll why're why's won't "
               "would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've").split()


def _contractions() -> dict[str, str]:
    """Apostrophe-less spellings -> the contraction: all apostrophes dropped, and (for two) either one dropped.

    The official table's capitalised keys ("Im", "Ive", "Id've") and self-maps ("let's", "she's") never fire after
    lower-casing, so those contractions are not in the list."""
    out = {}
    for word in _CONTRACTED:
        out[word.replace("'", "")] = word
        marks = [i for i, ch in enumerate(word) if ch == "'"]
        if len(marks) > 1:
            for i in marks:
                out[word[:i] + word[i + 1:]] = word
    return out


CONTRACTIONS = _contractions()
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_PERIOD_STRIP = re.compile(r"\.(?!\d)")


def process_punctuation(text: str) -> str:
    """The punctuation step of the VQA normalisation (see the module docstring)."""
    out = text
    digit_comma = _COMMA_STRIP.search(text) is not None
    for p in PUNCTUATION:
        if p + " " in text or " " + p in text or digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def process_digit_article(text: str) -> str:
    """The number-word, article and contraction step of the VQA normalisation (lower-cases)."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(text: str) -> str:
    """An answer in the VQA evaluation's normal form, e.g. "Two." -> "2", "a Red star" -> "red star"."""
    text = str(text).replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def vqa_score(prediction: str, answers: list[str]) -> float:
    """VQA accuracy of one normalised prediction against the normalised human answers (in [0, 1]).

    Args:
        prediction: the predicted answer, normalised.
        answers: the N human answers, normalised (VQAv2: N = 10).
    Returns:
        N >= 4: the mean over the N leave-one-out subsets of min(#matches / 3, 1); N < 4: #matches / N.
    """
    n = len(answers)
    if n == 0:
        raise ValueError("vqa_score: a question with no answers")
    matches = sum(a == prediction for a in answers)
    if n < 4:
        return matches / n
    # Leaving out a matching answer leaves matches - 1 matches, leaving out another one leaves all of them.
    return (matches * min((matches - 1) / 3, 1.0) + (n - matches) * min(matches / 3, 1.0)) / n


def soft_scores(answers: list[str]) -> dict[str, float]:
    """Every distinct normalised answer's VQA score as a prediction (the soft training target of a question)."""
    return {a: vqa_score(a, answers) for a in set(answers)}


def consensus(answers: list[str]) -> str:
    """The most common normalised answer (ties: the first given)."""
    counts = Counter(answers)
    best = max(counts.values())
    return next(a for a in answers if counts[a] == best)


def record_answers(record: dict, where: str) -> list[str]:
    """A QA record's human answers, normalised: its `answers` list (strings, or VQAv2's {"answer": ...} dicts), or
    its single `answer`.

    Raises:
        ValueError: neither key, or an empty list (naming `where`).
    """
    raw = record.get("answers")
    if raw is None and record.get("answer") is not None:
        raw = [record["answer"]]
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{where}: a QA record needs `answers` (a non-empty list) or `answer`; got keys "
                         f"{', '.join(sorted(k for k in record if not k.startswith('_')))}")
    return [normalize_answer(a["answer"] if isinstance(a, dict) else a) for a in raw]


def qa_metrics(predictions: list[str], answers: list[list[str]], types: list[str], references: list[str],
               baseline: list[str], answer_types: list[str] | None = None) -> dict:
    """VQA accuracy and exact match (percent), overall and per question type, beside the same for `baseline`.

    Args:
        predictions: N normalised predicted answers.
        answers: N lists of normalised human answers.
        types: N question types.
        references: N reference answers for exact match (normalised).
        baseline: N answers of the majority baseline (normalised).
        answer_types: N answer types (VQAv2's yes/no, number, other) or None.
    Returns:
        vqa_accuracy, exact_match, majority_vqa_accuracy, majority_exact_match, num_questions and, per question type
        T, the same under `type/T/` (with `type/T/num_questions`); per answer type A under `answer_type/A/`.
    """
    def block(idx: list[int]) -> dict:
        acc = [vqa_score(predictions[i], answers[i]) for i in idx]
        base = [vqa_score(baseline[i], answers[i]) for i in idx]
        em = [predictions[i] == references[i] for i in idx]
        bem = [baseline[i] == references[i] for i in idx]
        mean = lambda xs: 100.0 * sum(xs) / len(xs)                                    # noqa: E731
        return {"vqa_accuracy": mean(acc), "majority_vqa_accuracy": mean(base), "exact_match": mean(em),
                "majority_exact_match": mean(bem), "num_questions": len(idx)}

    out = block(list(range(len(predictions))))
    for t in sorted(set(types)):
        out.update({f"type/{t}/{k}": v for k, v in block([i for i, x in enumerate(types) if x == t]).items()})
    for t in sorted(set(answer_types or [])):
        out.update({f"answer_type/{t}/{k}": v for k, v in block([i for i, x in enumerate(answer_types) if x == t])
                    .items()})
    return out


def majority_answers(manifest, where: str = "majority_from") -> tuple[dict, str]:
    """The majority baseline of a training manifest: each question type's most common consensus answer, and the
    overall one (ties: alphabetical).

    Raises:
        FileNotFoundError / ValueError: the manifest is missing or a record has no answers (naming `where`).
    """
    from ..encode import read_records
    if not Path(manifest).exists():
        raise FileNotFoundError(f"vqa: {where} manifest {manifest} does not exist (give -o {where}=TRAIN.jsonl)")
    by_type, overall = {}, Counter()
    for k, r in enumerate(read_records(manifest, 0, "error", required=("question",), media="none")):
        c = consensus(record_answers(r, f"{manifest} line {r.get('_line', k + 1)}"))
        by_type.setdefault(str(r.get("question_type") or "all"), Counter())[c] += 1
        overall[c] += 1
    pick = lambda counts: max(sorted(counts), key=lambda a: counts[a])                 # noqa: E731
    return {t: pick(c) for t, c in by_type.items()}, pick(overall)


def check_vqa_manifest(manifest, limit: int = 0, on_bad_record: str = "error", **_) -> int:
    """Read a QA manifest the way the `vqa` task will and check every record's answers (before any training step).

    Returns:
        The number of records checked.
    Raises:
        ManifestError / ValueError: a record without a question or answers (naming the manifest and line).
    """
    from ..encode import read_records
    records = read_records(manifest, limit, on_bad_record, required=("question",), media="none")
    for k, r in enumerate(records):
        where = f"{manifest} line {r.get('_line', k + 1)}"
        record_answers(r, where)
        if not (r.get("image") or r.get("video")):
            raise ValueError(f"{where}: a QA record needs `image` (or `video` for a video VQA model)")
    return len(records)


def vqa_task(model, manifest, limit: int = 0, progress: bool = False, lang: str = "en", cache=None,
             on_bad_record: str = "error", batch_size: int = 64, majority_from: str = "",
             generate_method: str = "greedy") -> dict:
    """The `vqa` evaluation: a model's answers to a manifest's questions (`polymodal eval MODEL --task vqa`).

    Two kinds of model: a classifier over answers (`VQAModel`: `answer_logits(pixels, ids)` and `answers`; its
    stored majority answers are the baseline) or a generator of free text (an MLLM: `generate_text(pixels,
    questions)`; its answers are normalised like the humans'; the baseline needs `majority_from`).

    Args:
        model: a `VQAModel` or a model with `generate_text` (both with `tokenizer` and `image_transform`).
        manifest: QA records: `image` (`video` for a video VQA model: its `num_frames` uniform frames), `question`,
            `answers` (or `answer`), optional `question_type`.
        majority_from: a training manifest whose majority answers are the baseline (default: the model's stored
            ones; required for a generative model).
        generate_method: decoding of generative models ("greedy" | "beam").
        limit, progress, lang, cache, on_bad_record, batch_size: as every task (lang and cache are unused).
    Returns:
        The numbers of `qa_metrics` (percent), plus `num_answers` (a classifier's answer vocabulary) and
        `answer_coverage` (percent of questions whose consensus answer is in it: the ceiling of exact match), or
        `generative: 1` for a generative model.
    Raises:
        ValueError: a generative model without `majority_from` (one line naming the option).
    """
    from ..data.images import load_image
    from ..encode import device_of, read_records
    classifier = hasattr(model, "answer_logits")
    if majority_from:
        type_majority, overall = majority_answers(majority_from)
        baseline_of = lambda t: type_majority.get(t, overall)                          # noqa: E731
    elif classifier:
        baseline_of = model.majority_answer
    else:
        raise ValueError(f"vqa: a {type(model).__name__} answers in free text and stores no training answers; give "
                         f"the training manifest for the majority baseline with -o majority_from=TRAIN.jsonl")
    frames = int(getattr(getattr(model, "config", None), "num_frames", 0) or 0)
    strategy = str(getattr(getattr(model, "config", None), "frame_strategy", "uniform") or "uniform")
    media = "video" if frames else "image"
    records = read_records(manifest, limit, on_bad_record, required=(media, "question"), media=media)
    device = device_of(model)
    pixel_cache: dict = {}

    def pixels_of(path: str) -> torch.Tensor:             # (3, H, W) or (T, 3, H, W) frames, each file once
        if path not in pixel_cache:
            if frames:
                from ..data.video import read_video
                pixel_cache[path] = read_video(path, num_frames=frames, strategy=strategy).pixels(model.image_transform)
            else:
                pixel_cache[path] = model.image_transform(load_image(path))
        return pixel_cache[path]

    vocab = list(model.answers) if classifier else []
    predictions, answers, types, refs, base, atypes = [], [], [], [], [], []
    for k, r in enumerate(records):
        a = record_answers(r, f"{manifest} line {r.get('_line', k + 1)}")
        answers.append(a)
        qtype = str(r.get("question_type") or "all")
        types.append(qtype)
        refs.append(normalize_answer(r["answer"]) if isinstance(r.get("answer"), str) else consensus(a))
        base.append(normalize_answer(baseline_of(qtype)))
        atypes.append(str(r["answer_type"]) if r.get("answer_type") else None)
    batches = range(0, len(records), batch_size)
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, desc="vqa", unit="batch")
    with torch.no_grad():
        for start in batches:
            chunk = records[start:start + batch_size]
            pixels = torch.stack([pixels_of(r[media]) for r in chunk]).to(device)   # (B, [T,] 3, H, W)
            questions = [str(r["question"]) for r in chunk]
            if classifier:
                ids = model.tokenizer(questions).to(device)                            # (B, L)
                logits = model.answer_logits(pixels, ids)                               # (B, A)
                predictions += [vocab[i] for i in logits.argmax(dim=1).tolist()]
            else:
                texts = model.generate_text(pixels, questions, method=generate_method)
                predictions += [normalize_answer(t) for t in texts]
    out = qa_metrics(predictions, answers, types, refs, base, atypes if all(atypes) else None)
    if classifier:
        known = set(vocab)
        out["num_answers"] = len(vocab)
        out["answer_coverage"] = 100.0 * sum(x in known for x in refs) / max(len(refs), 1)
    else:
        out["generative"] = 1
    return out


__all__ = ["normalize_answer", "process_punctuation", "process_digit_article", "vqa_score", "soft_scores",
           "consensus", "record_answers", "qa_metrics", "majority_answers", "check_vqa_manifest", "vqa_task"]
