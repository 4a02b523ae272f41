"""Data preparation with a model (`polymodal data filter`, `polymodal data aux-captions`): steps that read a
manifest, run a model over it and write a new manifest. Above `polymodal.encode`; the readers and generators
that need no model live in `polymodal.data`."""
