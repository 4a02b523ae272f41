"""Search your own images, videos and texts with a polymodal model.

- `embed.py`: chunked, resumable embedding of a folder or manifest (images, videos with per-frame
  embeddings and times, texts); unreadable files are skipped and listed.
- `index.py`: FAISS indexes (exact inner product, IVF, HNSW) that record the model they were built with.
- `query.py`: text / image / similar-item queries, with the best-matching frame time for video hits.
- `server.py`: the FastAPI app (`create_app`) behind `polymodal serve` and the web page in `web/`.
- `cli.py`: the `embed`, `index`, `search` and `serve` subcommands.

This package sits on the top floor: it imports the rest of polymodal, and nothing imports it.
"""
