"""Names of the captioners' decoding methods (`CoCa.generate`, the MLLM's `generate`), in a module without torch so
that command-line parsers (`polymodal caption --help`) can offer them without importing it."""

GENERATION_METHODS = ("greedy", "beam", "nucleus")

__all__ = ["GENERATION_METHODS"]
