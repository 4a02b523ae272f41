"""Data: image loading and preprocessing, tokenizers, manifests, shards and synthetic worlds.

Import the submodules directly (``polymodal.data.images``, ``polymodal.data.text`` ...);
this package file imports nothing so that ``import polymodal.data`` stays cheap.
"""
