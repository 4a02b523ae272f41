"""Methods: each file pairs a model with its training objective (a task module: batch -> dict of losses)."""
