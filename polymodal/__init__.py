"""polymodal: training, adapting and evaluating vision-language models.

Public API: `load_model`, `create_model`, `load_tokenizer`, `__version__`.
"""
from .version import __version__


def load_model(path_or_name, **kwargs):
    """Load a saved/imported model or build a bundled config; see `polymodal.hub.load_model`."""
    from .hub import load_model as _load
    return _load(path_or_name, **kwargs)


def create_model(spec, overrides=None, tokenizer=None, image_transform=None):
    """A randomly initialised model; see `polymodal.models.factory.create_model`."""
    from .models.factory import create_model as _create
    return _create(spec, overrides, tokenizer, image_transform)


def load_tokenizer(directory):
    """A tokenizer from a local directory (tokenizer.json, vocab.json+merges.txt or vocab.txt)."""
    from .data.text import Tokenizer
    return Tokenizer.from_dir(directory)


__all__ = ["load_model", "create_model", "load_tokenizer", "__version__"]
