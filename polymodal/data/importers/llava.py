"""`llava`: LLaVA's visual instruction data (conversation JSON), as question / answer records for the MLLM methods.

Layout (as haotian-liu/LLaVA's `llava/train/train.py` reads it, `LazySupervisedDataset` and `preprocess_multimodal`;
files such as `llava_instruct_150k.json` and `llava_v1_5_mix665k.json`): one JSON list of
`{"id", "image": "coco/train2017/000000033471.jpg", "conversations": [{"from": "human", "value": "<image>\\n..."},
{"from": "gpt", "value": "..."}, ...]}`; the image path is relative to the image folder given to training
(`--image_folder`, e.g. `playground/data` holding `coco/`, `gqa/`, `ocr_vqa/`, `textvqa/`, `vg/`); entries
without `image` are text-only conversations (ShareGPT). LLaVA skips a first turn that is not the human's, expects
human and gpt turns to alternate, and moves the `<image>` token to the start of its turn (our MLLM puts the image
tokens before every prompt itself, so the token is removed from the text).

Records (what `polymodal.methods.asd` trains on, through `training_records` / `CounterfactualQADataset`: it reads
`image`, `prompt`, `answer`, `options` and `kind`): one per human / gpt turn pair, `{"image", "prompt": the
human turn, "answer": the gpt turn, "options": [], "kind": "instruction", "id", "turn"}` (turn counts pairs
from 0). The kind is neither "concept" nor "task", so ASD gives these records a Skew of 0 (plain fine-tuning)
and the fairness evaluation leaves them out. Conversations whose turns do not alternate, or whose image is not
found, are left out and counted in the notes; text-only ones are left out (the MLLM reads an image for every
record) unless `text_only=keep`.

The source is the JSON file, or a folder holding one `llava*.json`. No splits.

Options: `image_root` (the folder the `image` paths are relative to; default: the JSON's folder, then the one
above), `history` (true: each prompt starts with the conversation's earlier turns, as `Human: ...` /
`Assistant: ...` lines; default false), `text_only` (skip | keep; default skip).
"""
from __future__ import annotations

from pathlib import Path

from .common import Imported, LayoutError, find_file, media_finder, media_roots, read_json_file, require_split
from .options import check_options

JSON_NAMES = ["llava_v1_5_mix665k.json", "llava_instruct_150k.json", "llava*.json", "LLaVA*.json"]
IMAGE_TOKEN = "<image>"
ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}
OPTIONS = ("image_root", "history", "text_only")


def turn_pairs(conversations) -> list[tuple[str, str]] | None:
    """(human, gpt) text pairs of one conversation, `<image>` removed; None when the turns do not alternate."""
    if not isinstance(conversations, list) or not all(
            isinstance(t, dict) and isinstance(t.get("value"), str) and t.get("from") in ROLES for t in conversations):
        return None
    turns = [(ROLES[t["from"]], t["value"]) for t in conversations]
    if turns and turns[0][0] != "human":
        turns = turns[1:]
    if len(turns) < 2 or len(turns) % 2 or any(role != ("human", "gpt")[k % 2] for k, (role, _) in enumerate(turns)):
        return None
    texts = [v.replace(IMAGE_TOKEN, "").strip() for _, v in turns]
    return list(zip(texts[0::2], texts[1::2]))


def _flag(options: dict, name: str, default: bool) -> bool:
    value = options.get(name, default)
    if not isinstance(value, bool):
        raise LayoutError(f"llava: {name} must be true or false, got {value!r}")
    return value


def read(src, split: str | None = None, **options) -> Imported:
    """Question / answer records of LLaVA conversations (see the module docstring)."""
    check_options("llava", options, OPTIONS)
    history = _flag(options, "history", False)
    text_only = options.get("text_only", "skip")
    if text_only not in ("skip", "keep"):
        raise LayoutError(f"llava: text_only must be skip or keep, got {text_only!r}")
    path = find_file(Path(src), JSON_NAMES, "LLaVA conversation file (llava_*.json)")
    require_split(split, set(), path)
    data = read_json_file(path)
    if not isinstance(data, list):
        raise LayoutError(f"{path}: not a LLaVA conversation file (expected a list of {{id, image, conversations}})")
    if options.get("image_root") is not None:
        root = Path(options["image_root"])
        if not root.is_dir():
            raise FileNotFoundError(f"image_root {root} is not a folder")
        roots = [root]
    else:
        roots = media_roots(src, path)
    find = media_finder(roots, [])
    records, bad, missing, text_entries = [], [], [], 0
    for k, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise LayoutError(f"{path}: entry [{k}] is not an object")
        name = str(entry.get("id", k))
        pairs = turn_pairs(entry.get("conversations"))
        if pairs is None:
            bad.append(name)
            continue
        image = entry.get("image")
        if image is None:
            text_entries += 1
            if text_only == "skip":
                continue
        elif not isinstance(image, str):
            bad.append(name)
            continue
        else:
            image = find(image)
            if image is None:
                missing.append(entry["image"])
                continue
        said = []
        for turn, (question, answer) in enumerate(pairs):
            prompt = "\n".join(said + [f"Human: {question}"]) if history and said else question
            record = {"prompt": prompt, "answer": answer, "options": [], "kind": "instruction", "id": name,
                      "turn": turn}
            records.append({"image": image, **record} if image is not None else record)
            said += [f"Human: {question}", f"Assistant: {answer}"]
    notes = []
    if bad:
        notes.append(f"{len(bad)} conversation(s) whose turns do not alternate human / gpt (or whose image is not "
                     f"one path) were left out (first id: {bad[0]})")
    if text_entries:
        notes.append(f"{text_entries} text-only conversation(s) (no image) were "
                     + ("left out: the MLLM reads an image for every record (-o text_only=keep writes them)"
                        if text_only == "skip" else "kept without an image"))
    if missing:
        if not records:
            raise LayoutError(f"{path}: none of the {len(missing)} images was found under {roots[0]} (first: "
                              f"{missing[0]}); give the folder the paths are relative to with -o image_root=FOLDER")
        notes.append(f"{len(missing)} conversation(s) whose image is not under {roots[0]} were left out "
                     f"(first: {missing[0]})")
    return Imported(records, "mllm", notes=notes)
