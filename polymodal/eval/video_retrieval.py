"""Video-text retrieval: text->video and video->text R@1/5/10, median and mean rank, on a manifest of videos.

Works with any image-text model (zero-shot: the mean of its frame embeddings, the baseline every video
paper reports) and with video models (anything with `encode_video(frames, valid)`). Each record has a
`video` (file, GIF or frame folder) and one or more captions; metrics come from the same exact, streaming
`embed_and_score` as image retrieval, with "image" renamed "video" in the keys.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def encode_clips(model, frames: Tensor, valid: Tensor | None = None) -> Tensor:
    """(B, T, 3, H, W) frames -> (B, E) L2-normalised video embeddings.

    A model with `encode_video` uses it; any other image-text model gets the zero-shot baseline: the mean of
    its normalised frame embeddings over the valid frames, normalised again.
    """
    if hasattr(model, "encode_video"):
        return model.encode_video(frames, valid)
    B, T = frames.shape[:2]
    per_frame = model.encode_image(frames.flatten(0, 1)).view(B, T, -1)          # (B, T, E)
    w = torch.ones(B, T, device=frames.device) if valid is None else valid.to(per_frame.dtype)
    mean = (per_frame * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1)  # (B, E)
    return F.normalize(mean, dim=-1)


def clip_batches(model, records: list[dict], num_frames: int = 8, strategy: str = "uniform", batch_size: int = 16,
                 progress: bool = False, on_bad_record: str = "error", where: str = "manifest"):
    """Decode the records' videos and yield them in batches ready for the model.

    Under `on_bad_record="skip"` a video that cannot be read is left out and counted in a warning; under
    "error" it stops with a `ManifestError` naming the manifest line and the video's error.

    Yields:
        (indices into `records`, frames (B, T, 3, H, W) and valid (B, T) on the model's device, the `VideoClip`s).
    Raises:
        ManifestError: a bad video under "error", or no readable video at all.
    """
    from PIL import Image

    from ..data.manifests import SKIP_HINT, ManifestError
    from ..data.video import VideoError, read_video
    from .suite import _progress
    device = next(model.parameters()).device
    pending: list[tuple[int, Tensor, object]] = []
    skipped = yielded = 0

    def batch():
        frames = torch.stack([p[1] for p in pending]).to(device)                     # (B, T, 3, H, W)
        valid = torch.stack([p[2].valid for p in pending]).to(device)                # (B, T)
        return [p[0] for p in pending], frames, valid, [p[2] for p in pending]

    for i, r in enumerate(_progress(records, len(records), "videos", progress)):
        try:
            clip = read_video(r["video"], num_frames=num_frames, strategy=strategy)
        except VideoError as e:
            if on_bad_record == "error":
                raise ManifestError(f"{where} line {r.get('_line', '?')}: {e}; {SKIP_HINT}") from e
            skipped += 1
            continue
        frames = torch.stack([model.image_transform(Image.fromarray(f.numpy())) for f in clip.frames])
        pending.append((i, frames, clip))
        if len(pending) == batch_size:
            yield batch()
            yielded += len(pending)
            pending.clear()
    if pending:
        yield batch()
        yielded += len(pending)
    if skipped:
        import warnings
        warnings.warn(f"{where}: skipped {skipped} video(s) that cannot be read")
    if not yielded:
        raise ManifestError(f"{where}: no readable video to evaluate")


@torch.no_grad()
def encode_videos(model, records: list[dict], num_frames: int = 8, strategy: str = "uniform", batch_size: int = 16,
                  progress: bool = False, on_bad_record: str = "error", where: str = "manifest"
                  ) -> tuple[Tensor, list[dict]]:
    """(N, E) embeddings of the records' readable videos and the N records kept (see `clip_batches`)."""
    out, kept = [], []
    for idx, frames, valid, _ in clip_batches(model, records, num_frames, strategy, batch_size, progress,
                                              on_bad_record, where):
        out.append(encode_clips(model, frames, valid).float().cpu())
        kept.extend(records[i] for i in idx)
    return torch.cat(out), kept


def video_retrieval_eval(model, manifest, caption_key: str = "caption", limit: int = 0, num_frames: int = 8,
                         strategy: str = "uniform", batch_size: int = 16, progress: bool = False,
                         on_bad_record: str = "error") -> dict:
    """Video-text retrieval on a manifest of `video` records; every caption of `caption_key` (or its plural list).

    Args:
        model: a video model (`encode_video`) or any image-text model (zero-shot frame mean).
        manifest: JSONL/CSV manifest with `video` and captions.
        caption_key: "caption", "caption_zh", ...
        limit: the first `limit` records only (0 = all).
        num_frames, strategy: frame sampling (see `polymodal.data.video.read_video`).
        on_bad_record: "error" | "skip".
    Returns:
        `text_to_video_R@{1,5,10}`, `video_to_text_R@{1,5,10}`, `text_to_video_median_rank` (MdR),
        `text_to_video_mean_rank` (MnR), `mean_recall`, `num_videos`, `num_texts`.
    """
    from .retrieval import embed_and_score
    from .suite import captions_by_record, encode_texts, read_records
    records = read_records(manifest, limit, on_bad_record, required=("video",), media="video")
    vid, records = encode_videos(model, records, num_frames, strategy, batch_size, progress, on_bad_record,
                                 str(manifest))
    texts, text_to_video = captions_by_record(records, caption_key, manifest)
    txt = encode_texts(model, texts, progress=progress)
    metrics = embed_and_score(vid, txt, torch.tensor(text_to_video))
    out = {k.replace("image", "video"): v for k, v in metrics.items()}
    out.update(num_videos=len(records), num_texts=len(texts))
    return out
