"""Plumbing the checkpoint converters share: files, key peeking, JSON configs, tokenizers, renames.

Each converter keeps what is its own (rename tables, config maps, layout checks) and calls these for
the rest: finding the weights file in a folder or beside a config, listing a checkpoint's keys
without reading its tensors, reading weights with an error that names the file, reading and finding
a JSON config beside the weights, loading the tokenizer files that sit there, and applying a
rename table (exact keys plus per-block regex rules with q/k/v fusion) to a state dict.
"""
from __future__ import annotations

import json
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch


# Weight file endings in order of preference: safetensors needs no unpickling.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# Any of these beside the weights means there is a tokenizer to load (see `Tokenizer.from_dir`).
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt")
# Training scripts nest the weights under one of these keys (Lightning, DeepSpeed, plain).
NESTED_STATE_KEYS = ("state_dict", "module", "model")
# Wrapper prefixes removed when every key carries them (DeepSpeed's `_forward_module.`, DDP's `module.`).
SHARED_PREFIXES = ("_forward_module.", "module.")
_PICKLE_FIX = "if you trust it, re-save its tensors with safetensors.torch.save_file and load that file"


class CheckpointError(ValueError):
    """A checkpoint does not fit the model: lists the missing and unexpected keys or shape mismatches."""


def load_state_strict(model: torch.nn.Module, state: dict, source: str) -> None:
    """Load `state` into `model`; any missing/unexpected key or shape mismatch raises CheckpointError."""
    check_state_match({k: tuple(v.shape) for k, v in model.state_dict().items()},
                      {k: tuple(v.shape) for k, v in state.items()}, source)
    model.load_state_dict(state, strict=True)


def check_state_match(own: dict, stored: dict, source: str) -> None:
    """Compare a model's {key: shape} with a checkpoint's; CheckpointError listing what differs.

    Args:
        own: the model's state-dict shapes; stored: the checkpoint's.
        source: what the checkpoint is, for the message (its file).
    """
    missing = sorted(set(own) - set(stored))
    unexpected = sorted(set(stored) - set(own))
    shapes = [f"{k}: checkpoint {tuple(stored[k])} vs model {tuple(own[k])}"
              for k in own if k in stored and tuple(stored[k]) != tuple(own[k])]
    if missing or unexpected or shapes:
        lines = [f"{source} does not match the model:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {', '.join(missing[:20])}" + (" ..." if len(missing) > 20 else ""))
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected[:20])}" + (" ..." if len(unexpected) > 20 else ""))
        if shapes:
            lines.append("  shape mismatches: " + "; ".join(shapes[:10]))
        raise CheckpointError("\n".join(lines))


# Prefixes of wrapped models, stripped from every key that has them (nested ones too).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def strip_prefixes(state: dict, prefixes: tuple[str, ...] = WRAPPER_PREFIXES) -> dict:
    """Remove wrapper prefixes (DDP's `module.`, torch.compile's `_orig_mod.`, nested) from every key."""
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for p in prefixes:
                if key.startswith(p):
                    key, changed = key[len(p):], True
        out[key] = value
    return out



# ------------------------------------------------------------------ weights files

def weights_in_folder(folder, suffixes: tuple[str, ...] = WEIGHT_SUFFIXES) -> list[Path]:
    """The files in `folder` whose ending is one of `suffixes`, preferred ending first, then by name.

    Args:
        folder: the directory.
        suffixes: file endings, most preferred first.
    Returns:
        The matching files (empty when there are none).
    """
    files = [p for p in Path(folder).iterdir() if p.is_file() and p.suffix in suffixes]
    return sorted(files, key=lambda p: (suffixes.index(p.suffix), p.name))


def find_weights(path, names: Iterable[str] = (), suffixes: tuple[str, ...] = WEIGHT_SUFFIXES) -> Path | None:
    """The weights file that `path` stands for.

    Args:
        path: a weights file, or a folder holding one.
        names: for a folder, the file names to look for, most preferred first.
        suffixes: for a file, the endings accepted as weights.
    Returns:
        The file itself when its ending is in `suffixes`; for a folder the first of `names` present;
        else None.
    """
    path = Path(path)
    if path.is_dir():
        return next((path / n for n in names if (path / n).is_file()), None)
    return path if path.is_file() and path.suffix in suffixes else None


def unwrap_state(obj):
    """The weights inside a training checkpoint: nested under `NESTED_STATE_KEYS`, and without a
    wrapper prefix (`SHARED_PREFIXES`) that every key carries.

    Args:
        obj: what `torch.load` / `load_file` returned.
    Returns:
        The innermost dict of weights (`obj` unchanged when it is not a dict).
    """
    while isinstance(obj, dict):
        inner = next((obj[k] for k in NESTED_STATE_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if isinstance(obj, dict):
        for prefix in SHARED_PREFIXES:
            if obj and all(isinstance(k, str) and k.startswith(prefix) for k in obj):
                obj = {k[len(prefix):]: v for k, v in obj.items()}
    return obj


def _pickle_reason(e: Exception) -> str:
    """The informative part of torch's many-line weights_only error, as a short phrase."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    if m := re.search(r"Unsupported global: GLOBAL (\S+)", text):
        return f"it stores {m.group(1)} objects, not only tensors"
    if m := re.search(r"Unsupported operand \d+", text):
        return f"not a torch pickle: {m.group(0).lower()}"
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(e).__name__)
    return first[:200]


def _torch_load(path: Path, trust_pickle: bool, fix: str):
    try:
        # mmap: the zip format is mapped instead of read, which matters for multi-GB files.
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # noqa: BLE001 - re-raised as one line naming the file and the fix
        if trust_pickle:
            raise
        raise CheckpointError(f"{path}: cannot be read with torch.load(weights_only=True) ({_pickle_reason(e)}); "
                              f"{fix}") from None


def read_weights(path, trust_pickle: bool = False, fix: str = _PICKLE_FIX) -> dict:
    """Read a state dict from .safetensors or a torch pickle (.bin/.pt/.pth/.ckpt), unwrapped.

    Args:
        path: the weights file.
        trust_pickle: unpickle with `weights_only=False` (runs code from the file: only for files
            you trust).
        fix: what the error for an unreadable pickle tells the user to do.
    Returns:
        {key: tensor}, taken out of training-checkpoint nesting (see `unwrap_state`).
    Raises:
        FileNotFoundError: the file does not exist.
        CheckpointError: a pickle that `weights_only=True` refuses (one line: the file, the reason, `fix`).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e}); is it truncated? "
                                  f"Save the model again") from None
    else:
        state = _torch_load(path, trust_pickle, fix)
    state = unwrap_state(state)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors")
    return state


def require_weights(path, names: tuple[str, ...], suffixes: tuple[str, ...], what: str) -> Path:
    """`find_weights`, or a FileNotFoundError that says what was looked for.

    Args:
        path: a weights file, or a folder holding one.
        names: for a folder, the file names to look for, most preferred first.
        suffixes: for a file, the endings accepted as weights.
        what: the kind of checkpoint, for the message (e.g. "OpenCLIP").
    Returns:
        The weights file.
    Raises:
        FileNotFoundError: `path` is neither such a file nor a folder holding one of `names`.
    """
    weights = find_weights(path, names, suffixes)
    if weights is None:
        raise FileNotFoundError(f"{path}: no {what} weights (a {'/'.join(suffixes)} file, or a folder with one of "
                                f"{', '.join(names)})")
    return weights


def peek_keys(path) -> list[str]:
    """A checkpoint's key names without reading its tensors (safetensors header; memory-mapped pickle).

    Args:
        path: a .safetensors file or a torch pickle.
    Returns:
        The keys of the (unwrapped, see `unwrap_state`) state dict; [] when it holds no dict.
    Raises:
        Whatever reading raises for a file that is not a readable checkpoint (`detect` catches it).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    state = unwrap_state(torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path)))
    return list(state) if isinstance(state, dict) else []


# ------------------------------------------------------------------ JSON configs

def read_json(path) -> Any:
    """Parse a JSON file.

    Args:
        path: the file.
    Returns:
        The parsed value.
    Raises:
        FileNotFoundError: the file does not exist.
        CheckpointError: not UTF-8 or not valid JSON (one line naming the file and the position).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON (not UTF-8 text at byte {e.start}); "
                              f"fix or replace the file") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON (line {e.lineno} column {e.colno}): {e.msg}; "
                              f"fix or replace the file (is it truncated?)") from None


def read_json_object(path, what: str) -> dict:
    """`read_json` for a file that must hold a JSON object (a config).

    Args:
        path: the file.
        what: what the object is, for the message (e.g. "an HF CLIPConfig").
    Returns:
        The parsed dict.
    Raises:
        FileNotFoundError: the file does not exist; CheckpointError: not valid JSON, or not an object.
    """
    data = read_json(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: holds a JSON {type(data).__name__}, not {what} object; fix or replace the file")
    return data


def given_config(config, parse: Callable[[Any], Any], what: str, needs: str,
                 error: type[Exception] = CheckpointError) -> tuple[Any, str]:
    """Read and check a config the caller passed explicitly (`config=`).

    Args:
        config: a dict, or the path of a JSON file.
        parse: data -> the parsed config, or None when the data is not this kind of config.
        what: the kind, for messages (e.g. "OpenCLIP model config").
        needs: what such a config holds, for messages.
        error: the exception type for data that `parse` rejects.
    Returns:
        (parsed config, source label).
    Raises:
        FileNotFoundError: the path does not exist; CheckpointError: it is not valid JSON;
        `error`: `parse` rejected it.
    """
    if isinstance(config, dict):
        parsed = parse(config)
        if parsed is None:
            raise error(f"config= dict is not an {what} (needs {needs})")
        return parsed, "config= dict"
    cpath = Path(config)
    if not cpath.is_file():
        raise FileNotFoundError(f"{what} {cpath} does not exist")
    parsed = parse(read_json(cpath))
    if parsed is None:
        raise error(f"{cpath}: not an {what} (needs {needs})")
    return parsed, str(cpath)


def search_config(candidates: Iterable[Path], parse: Callable[[Any], Any],
                  lenient: Iterable[Path] = ()) -> tuple[Any, Path] | None:
    """The first candidate file that exists and that `parse` accepts.

    Args:
        candidates: files to try in order (absent ones are passed over).
        parse: data -> the parsed config, or None when the data is not this kind of config.
        lenient: candidates whose invalid JSON is passed over instead of raising (files found by a
            wildcard, which may belong to something else).
    Returns:
        (parsed config, its file), or None when no candidate fits.
    Raises:
        CheckpointError: a candidate not in `lenient` is not valid JSON.
    """
    lenient = set(lenient)
    for cand in candidates:
        if not cand.is_file():
            continue
        try:
            data = read_json(cand)
        except CheckpointError:
            if cand in lenient:
                continue
            raise
        parsed = parse(data)
        if parsed is not None:
            return parsed, cand
    return None


# ------------------------------------------------------------------ tokenizer

def tokenizer_beside(folder, files: tuple[str, ...] = TOKENIZER_FILES):
    """The tokenizer whose files sit in `folder`, or None when none of `files` is there.

    Args:
        folder: the directory beside the weights.
        files: the file names that mark a tokenizer (sentencepiece models are not read).
    Returns:
        A `polymodal.data.text.Tokenizer` (via `Tokenizer.from_dir`), or None.
    """
    folder = Path(folder)
    if not any((folder / f).is_file() for f in files):
        return None
    from ..data.text import Tokenizer
    return Tokenizer.from_dir(folder)


def finish_clip(cfg: dict, where: str, state: dict, source: str, tokenizer=None, transform=None):
    """Build our CLIP from a translated config, load converted weights strictly, attach processors.

    Args:
        cfg: our CLIP config dict (the `config.json` schema).
        where: the config's source, for config errors.
        state: the converted state dict.
        source: the weights' label for loading errors (file and conversion).
        tokenizer, transform: attached to the model (None: unknown / the default).
    Returns:
        The CLIP in eval mode.
    Raises:
        CheckpointError: a converted weight was not consumed or one of ours was not filled.
    """
    from ..models.clip import CLIP
    from ..models.factory import attach_processors, build_config
    model = CLIP(build_config(cfg, where=where))
    load_state_strict(model, state, source)
    attach_processors(model, tokenizer, transform)
    return model.eval()


# ------------------------------------------------------------------ sizes

def mlp_ratio(hidden: int, intermediate: int) -> float:
    """A ratio with int(hidden * ratio) == intermediate (our MLP's width rule), also for odd sizes.

    Args:
        hidden: the block width.
        intermediate: the MLP's hidden width in the checkpoint.
    Returns:
        The `mlp_ratio` for our configs.
    """
    ratio = intermediate / hidden
    return ratio if int(hidden * ratio) == intermediate else (intermediate + 0.5) / hidden


def count_layers(keys: Iterable[str], pattern: re.Pattern | str, where: str) -> int:
    """The number of blocks, from the indices that `pattern`'s first group captures in `keys`.

    Args:
        keys: state-dict keys.
        pattern: a regex whose group 1 is the block index.
        where: a label for the error.
    Returns:
        N, where the indices found are exactly 0..N-1 (0 when none match).
    Raises:
        CheckpointError: the indices have gaps.
    """
    pattern = re.compile(pattern)
    ids = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    if ids != set(range(len(ids))):
        raise CheckpointError(f"{where}: block indices {sorted(ids)} are not 0..N-1 (a block's weights are missing)")
    return len(ids)


# ------------------------------------------------------------------ renames

@dataclass(frozen=True)
class BlockRule:
    """How the keys of one tower's repeated blocks map to ours.

    `pattern` matches a key with group 1 = the block index and group 2 = the name inside the block
    (e.g. "mlp.fc1.weight"); the key becomes `prefix.format(index)` + "." + the renamed inner name.
    The inner name is looked up whole in `renames` first, then without its last part ("mlp.fc1" of
    "mlp.fc1.weight"), whose replacement keeps the last part. `qkv` names the q, k and v modules
    that are concatenated (rows q | k | v) into `fused`.
    """
    pattern: str
    prefix: str
    renames: dict = field(default_factory=dict)
    qkv: tuple[str, str, str] | tuple = ()
    fused: str = "attn.qkv"


def rename_state_dict(state: dict, renames: dict, blocks: Iterable[BlockRule] = (),
                      ignored: Iterable[str] = ()) -> dict:
    """Apply a rename table to a state dict.

    Args:
        state: {their key: tensor}.
        renames: their whole key -> ours.
        blocks: per-block rules (see `BlockRule`), tried in order for keys not in `renames`.
        ignored: their keys to drop (buffers that carry no information).
    Returns:
        {our key: tensor}. Keys matching no rule keep their names, and a q/k/v triple with a member
        missing is left unfused, so strict loading reports them instead of dropping them silently.
    """
    rules = [(re.compile(rule.pattern), rule) for rule in blocks]
    ignored = set(ignored)
    ours: dict = {}
    qkv: dict = {}
    for key, value in state.items():
        if key in ignored:
            continue
        if key in renames:
            ours[renames[key]] = value
            continue
        for pattern, rule in rules:
            m = pattern.match(key)
            if m is None:
                continue
            prefix, name = rule.prefix.format(m.group(1)), m.group(2)
            base, _, kind = name.rpartition(".")
            if name in rule.renames:
                ours[f"{prefix}.{rule.renames[name]}"] = value
            elif base in rule.qkv:
                qkv.setdefault((prefix, rule.fused, kind), {})[rule.qkv.index(base)] = (key, value)
            elif base in rule.renames:
                ours[f"{prefix}.{rule.renames[base]}.{kind}"] = value
            else:
                ours[key] = value
            break
        else:
            ours[key] = value
    for (prefix, fused, kind), parts in qkv.items():
        if set(parts) == {0, 1, 2}:
            ours[f"{prefix}.{fused}.{kind}"] = torch.cat([parts[i][1] for i in range(3)], dim=0)
        else:
            ours.update(dict(parts.values()))
    return ours


def list_keys(label: str, keys: list[str], limit: int = 20) -> str:
    """One report line, "  label (N): k1, k2, ...", with at most `limit` keys shown."""
    return f"  {label} ({len(keys)}): {', '.join(keys[:limit])}" + (" ..." if len(keys) > limit else "")


__all__ = ["WEIGHT_SUFFIXES", "TOKENIZER_FILES", "weights_in_folder", "find_weights", "require_weights",
           "unwrap_state", "read_weights", "peek_keys", "read_json", "read_json_object", "given_config",
           "search_config", "tokenizer_beside", "finish_clip", "mlp_ratio", "count_layers", "BlockRule",
           "rename_state_dict", "list_keys"]
