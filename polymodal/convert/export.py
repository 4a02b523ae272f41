"""Export polymodal CLIP models to the layouts other codebases load: HF transformers and OpenCLIP.

* ``format="hf"``: a `transformers.CLIPModel` directory (config.json, model.safetensors,
  preprocessor_config.json and the tokenizer). With the CLIP BPE tokenizer it is written as vocab.json +
  merges.txt, so `CLIPTokenizer` / `CLIPProcessor.from_pretrained(dir)` load it; any other tokenizer is
  written as tokenizer.json (`AutoTokenizer` / `PreTrainedTokenizerFast`). A tokenizer whose end token
  is id 2 (polymodal's trained ones) is renumbered on the way out (ids 2 and V-1 exchanged, with the
  embedding rows), because transformers reads `eos_token_id == 2` as its legacy argmax pooling.
* ``format="openclip"``: an OpenCLIP hub-style directory: open_clip_model.safetensors in OpenCLIP's
  state-dict layout plus open_clip_config.json (`model_cfg`, `preprocess_cfg`). A tokenizer other than
  the CLIP BPE (which OpenCLIP ships itself) is saved beside it for polymodal to read back.

Both are read back by `polymodal.load_model(dir)` (the HF and OpenCLIP importers). Only the CLIP family
maps; other families and options without an exact equivalent (LoTLIP corner tokens, BERT-style text
towers, projection biases for HF ...) are refused with an error naming the option. Directories are
written into a temporary folder and swapped in (`replace_dir`), so an interrupted export leaves none
half-written.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

FORMATS = ("hf", "openclip")
HF_WEIGHTS = "model.safetensors"
OPENCLIP_WEIGHTS = "open_clip_model.safetensors"
OPENCLIP_CONFIG = "open_clip_config.json"


class ExportError(ValueError):
    """The model cannot be written in the requested format; the message names the option and the way out."""


def _check_clip(model, fmt: str) -> None:
    from ..models.clip import CLIP
    if not isinstance(model, CLIP):
        kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ExportError(f"export --format {fmt}: a {kind!r} model has no {fmt} layout; only CLIP dual encoders "
                          f"(model_type 'clip') can be exported; save it with model.save_pretrained(dir) instead")


def _way_out(model, other: str) -> str:
    """What to do when one format refuses the model: the other format when it takes the model, else neither."""
    try:
        if other == "hf":
            from .hf_clip import hf_config_from, to_hf_state_dict
            hf_config_from(model.config, 1.0)
            to_hf_state_dict(model)
        else:
            from .openclip import openclip_config_from, to_openclip_state_dict
            openclip_config_from(model.config)
            to_openclip_state_dict(model)
    except ValueError:
        return ("this model has no equivalent in the HF or the OpenCLIP layout; keep polymodal's own format "
                "(model.save_pretrained, which pm.load_model reads)")
    return f"export with --format {other}, or keep polymodal's own format (model.save_pretrained)"


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _save_weights(state: dict, path: Path) -> None:
    from safetensors.torch import save_file
    save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})


def _hf_clip_tokenizer_files(tokenizer, directory: Path) -> None:
    """vocab.json + merges.txt + tokenizer_config.json as transformers' CLIPTokenizer reads them."""
    model = json.loads(tokenizer.backend.to_str())["model"]
    vocab = dict(sorted(model["vocab"].items(), key=lambda kv: kv[1]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    _write_json(directory / "vocab.json", vocab)
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    sot, eot = tokenizer.backend.id_to_token(tokenizer.bos_id), tokenizer.backend.id_to_token(tokenizer.eos_id)
    # transformers pads CLIP with EOT; our own loader reads that back as OpenAI's pad id 0 (see data.text).
    _write_json(directory / "tokenizer_config.json", {
        "tokenizer_class": "CLIPTokenizer", "model_max_length": tokenizer.context_length, "do_lower_case": True,
        "bos_token": sot, "eos_token": eot, "unk_token": eot, "pad_token": eot})
    _write_json(directory / "special_tokens_map.json",
                {"bos_token": sot, "eos_token": eot, "unk_token": eot, "pad_token": eot})


def _swap_token_ids(tokenizer, a: int, b: int):
    """The same tokenizer with ids `a` and `b` exchanged (vocabulary, added tokens and special ids)."""
    from ..data.text import Tokenizer
    from tokenizers import Tokenizer as Backend
    swap = {a: b, b: a}
    data = json.loads(tokenizer.backend.to_str())
    data["model"]["vocab"] = {t: swap.get(i, i) for t, i in data["model"]["vocab"].items()}
    for added in data.get("added_tokens") or []:
        added["id"] = swap.get(added["id"], added["id"])
    c = tokenizer.config
    ids = ("bos_id", "eos_id", "pad_id", "unk_id", "mask_id")
    config = dataclasses.replace(c, **{f: swap.get(getattr(c, f), getattr(c, f)) for f in ids
                                       if getattr(c, f) is not None})
    return Tokenizer(Backend.from_str(json.dumps(data, ensure_ascii=False)), config)


def _hf_renumbered(model, tokenizer):
    """(config, tokenizer, id swap) with the end token moved off id 2 when the text tower pools at it.

    transformers' CLIPModel reads `eos_token_id == 2` as "pool at argmax(ids)" (configs from before it pooled
    at the first EOS), and polymodal's own trained tokenizers put <|endoftext|> at id 2. Exchanging ids 2
    and V-1 in the vocabulary, the embedding rows and the tokenizer gives the same features in transformers
    (pooled at the first EOS, which is also the largest id).
    """
    cfg = model.config
    if cfg.text.pool != "eot" or cfg.text.eot_token_id != 2 or cfg.text.vocab_size <= 3:
        return cfg, tokenizer, None
    a, b = 2, cfg.text.vocab_size - 1
    swap = {a: b, b: a}
    cfg = copy.deepcopy(cfg)
    cfg.text.eot_token_id = swap[cfg.text.eot_token_id]
    cfg.text.pad_token_id = swap.get(cfg.text.pad_token_id, cfg.text.pad_token_id)
    return cfg, (None if tokenizer is None else _swap_token_ids(tokenizer, a, b)), (a, b)


def _write_hf(model, directory: Path) -> None:
    from ..data.text import has_tokenizer, is_clip_bpe
    from .hf_clip import hf_config_from, to_hf_state_dict
    tokenizer = model.tokenizer if has_tokenizer(model) else None
    try:
        cfg, tokenizer, swap = _hf_renumbered(model, tokenizer)
        config = hf_config_from(cfg, float(model.logit_scale.detach()),
                                bos_token_id=None if tokenizer is None else tokenizer.bos_id)
        state = to_hf_state_dict(model)
        if swap is not None:
            key = "text_model.embeddings.token_embedding.weight"
            state[key] = state[key].clone()
            state[key][list(swap)] = state[key][list(reversed(swap))]
    except ValueError as e:
        raise ExportError(f"{e}; {_way_out(model, 'openclip')}") from None
    _write_json(directory / "config.json", config)
    _save_weights(state, directory / HF_WEIGHTS)
    if model.image_transform is not None:
        pre = model.image_transform.to_dict()
        pre.pop("polymodal", None)             # our own block: not a CLIPImageProcessor option
        pre["processor_class"] = "CLIPProcessor"
        _write_json(directory / "preprocessor_config.json", pre)
    if tokenizer is not None:
        if is_clip_bpe(tokenizer):
            _hf_clip_tokenizer_files(tokenizer, directory)
        else:
            tokenizer.save(directory)          # tokenizer.json + tokenizer_config.json (PreTrainedTokenizerFast)


def _write_openclip(model, directory: Path) -> None:
    from ..data.text import has_tokenizer, is_clip_bpe
    from .openclip import openclip_config_from, to_openclip_state_dict
    try:
        model_cfg = openclip_config_from(model.config)
        state = to_openclip_state_dict(model)
    except ValueError as e:
        raise ExportError(f"{e}; {_way_out(model, 'hf')}") from None
    preprocess = {}
    if model.image_transform is not None:
        t = model.image_transform
        preprocess = {"size": list(t.image_size) if t.image_size[0] != t.image_size[1] else t.image_size[0],
                      "mean": list(t.mean), "std": list(t.std), "interpolation": t.interpolation,
                      "resize_mode": "squash" if t.resize == "squash" else "shortest"}
    _write_json(directory / OPENCLIP_CONFIG, {"model_cfg": model_cfg, "preprocess_cfg": preprocess})
    _save_weights(state, directory / OPENCLIP_WEIGHTS)
    if has_tokenizer(model) and not is_clip_bpe(model.tokenizer):
        model.tokenizer.save(directory)        # OpenCLIP knows only its own tokenizers; polymodal reads this


def export_model(model, out_dir, format: str = "hf") -> Path:
    """Write a CLIP model in HF transformers or OpenCLIP layout.

    Args:
        model: a polymodal CLIP (e.g. from `polymodal.load_model`), with its tokenizer and image transform.
        out_dir: the directory to write; an existing one is replaced only once the new one is complete.
        format: "hf" (a `transformers.CLIPModel` directory) or "openclip" (open_clip_model.safetensors +
            open_clip_config.json).
    Returns:
        The directory written.
    Raises:
        ExportError: not a CLIP, or an option without an exact equivalent in `format` (named).
    """
    if format not in FORMATS:
        raise ExportError(f"export format {format!r} is not one of {', '.join(FORMATS)}")
    _check_clip(model, format)
    from ..models.base import replace_dir
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (_write_hf if format == "hf" else _write_openclip)(model, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out)
    return out


# ------------------------------------------------------------------ command line

def add_cli_arguments(parser) -> None:
    """Arguments of `polymodal export MODEL --format hf|openclip --out DIR`.

    Args:
        parser: an `argparse.ArgumentParser` (or sub-parser) to add them to.
    """
    parser.add_argument("model", help="a model polymodal loads: our saved dir, an HF CLIP dir, an OpenCLIP "
                                      "checkpoint, or a bundled config name")
    parser.add_argument("--format", choices=FORMATS, default="hf",
                        help="hf: a transformers CLIPModel directory; openclip: OpenCLIP's checkpoint layout")
    parser.add_argument("--out", required=True, help="output directory (replaced atomically if it exists)")


def main_from_args(args) -> dict:
    """Run `polymodal export` from parsed arguments.

    Returns:
        {"out": directory, "format": ..., "files": [names]} (the CLI prints it as JSON).
    """
    from ..hub import load_model
    model = load_model(args.model)
    out = export_model(model, args.out, args.format)
    return {"out": str(out), "format": args.format, "files": sorted(p.name for p in out.iterdir())}


__all__ = ["export_model", "ExportError", "FORMATS", "add_cli_arguments", "main_from_args"]
