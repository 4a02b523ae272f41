"""`hh-rlhf`: Anthropic's HH-RLHF preference data (helpfulness and harmlessness), as prompt / chosen / rejected pairs.

Layout (anthropics/hh-rlhf, its README and files; the Hugging Face set Anthropic/hh-rlhf ships the same): one
folder per tranche, `helpful-base/`, `helpful-online/`, `helpful-rejection-sampled/` and `harmless-base/`, each
with `train.jsonl.gz` and `test.jsonl.gz`; every line is `{"chosen": "...", "rejected": "..."}`, two whole
dialogues written `"\\n\\nHuman: ...\\n\\nAssistant: ..."` that share the conversation up to the last Assistant
turn. (`red-team-attempts/` holds transcripts, not pairs, and is not read.)

Conversion, as TRL's `examples/datasets/hh-rlhf-helpful-base.py` (huggingface/trl) splits the dialogues: the
prompt is the longest common start of the two, cut back so that it ends with the last `"\\n\\nAssistant: "` in it;
the rest of each dialogue is that side's response; the prompt without that final marker is cut at every
`"\\n\\nHuman: "` / `"\\n\\nAssistant: "` into user / assistant messages. Records: `{"prompt": [messages],
"chosen": [{"role": "assistant", "content": ...}], "rejected": [...], "split", "subset"}` (subset = the
tranche folder). Pairs whose dialogues differ before the first Assistant turn or do not open with a Human turn,
and pairs with an empty or identical response, are left out and counted in the notes.

The source is the root folder, a tranche folder, or one `.jsonl.gz` / `.jsonl` file. Splits: train, test
(default: both, kept in each record's `split`). Options: none.
"""
from __future__ import annotations

import re
from pathlib import Path

from .common import Imported, jsonl_objects, require_split
from .options import check_options
from .pairs import Dropped, why_unusable

TRANCHES = ("helpful-base", "helpful-online", "helpful-rejection-sampled", "harmless-base")
FILE_NAMES = ("train.jsonl.gz", "test.jsonl.gz", "train.jsonl", "test.jsonl")
HUMAN, ASSISTANT = "\n\nHuman: ", "\n\nAssistant: "
_TURN = re.compile(r"(\n\nHuman: |\n\nAssistant: )")


def _common_start(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def split_dialogues(chosen: str, rejected: str) -> tuple[list, str, str] | str:
    """(prompt messages, chosen response, rejected response), or the reason the pair cannot be split."""
    prompt = _common_start(chosen, rejected)
    if not prompt.endswith(ASSISTANT):
        cut = prompt.rfind(ASSISTANT)
        if cut < 0:
            return "the dialogues differ before the first Assistant turn"
        prompt = prompt[:cut] + ASSISTANT
    chosen_response, rejected_response = chosen[len(prompt):], rejected[len(prompt):]
    parts = _TURN.split(prompt[: -len(ASSISTANT)])
    if parts[0] != "" or len(parts) < 3:
        return "the dialogue does not open with a Human turn"
    messages = [{"role": "user" if marker == HUMAN else "assistant", "content": content}
                for marker, content in zip(parts[1::2], parts[2::2])]
    return messages, chosen_response, rejected_response


def _files(src: Path) -> list[Path]:
    if src.is_file():
        return [src]
    if not src.is_dir():
        raise FileNotFoundError(f"{src} does not exist (give the hh-rlhf folder, a tranche folder or a .jsonl.gz)")
    files = sorted(p for n in FILE_NAMES for p in src.rglob(n) if p.is_file())
    if not files:
        raise FileNotFoundError(f"{src}: no {' / '.join(FILE_NAMES[:2])} found (in the folder and below; the "
                                f"release has one folder per tranche: {', '.join(TRANCHES)})")
    return files


def read(src, split: str | None = None, **options) -> Imported:
    """Records `{"prompt", "chosen", "rejected", "split", "subset"}` of HH-RLHF (see the module docstring)."""
    check_options("hh-rlhf", options, ())
    src = Path(src)
    files = _files(src)
    split_of = {f: f.name.split(".")[0] for f in files}
    require_split(split, set(split_of.values()), src)
    records, dropped = [], Dropped()
    for f in files:
        if split not in (None, split_of[f]):
            continue
        subset = f.parent.name if f.parent.name in TRANCHES or (src.is_dir() and f.parent != src) else None
        for n, row in jsonl_objects(f):
            where = f"{f}:{n}"
            chosen, rejected = row.get("chosen"), row.get("rejected")
            if not isinstance(chosen, str) or not isinstance(rejected, str):
                dropped.add("no 'chosen' / 'rejected' strings", where)
                continue
            parts = split_dialogues(chosen, rejected)
            if isinstance(parts, str):
                dropped.add(parts, where)
                continue
            prompt, chosen_response, rejected_response = parts
            reason = why_unusable(chosen_response, rejected_response)
            if reason:
                dropped.add(reason, where)
                continue
            record = {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen_response}],
                      "rejected": [{"role": "assistant", "content": rejected_response}], "split": split_of[f]}
            if subset:
                record["subset"] = subset
            records.append(record)
    return Imported(records, "preference", notes=dropped.notes())
