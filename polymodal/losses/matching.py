"""Video-text matching losses for SNP-S3: MIL-NCE, a MoCo key queue, image(video)-text matching (ITM).

MIL-NCE (Miech et al. 2020) takes scores `s[i, j, c]` of text i against candidate c (a clip) of video j;
pair i's positives are the candidates of video i for text i. For each pair i

    loss_i = logsumexp(cat(s[i, :, :], s[:, i, :])) - logsumexp_c s[i, i, c]

the denominator runs over text i against every video and every text against video i (so the positives
appear twice there, as in the reference implementation). With one candidate per video it is a symmetric
InfoNCE with a shared denominator.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..distributed import all_gather_no_grad


def mil_nce(scores: Tensor, valid: Tensor | None = None) -> Tensor:
    """MIL-NCE over (text, video, candidate) scores.

    Args:
        scores: (B, B, C) score of text i with candidate c of video j; already divided by any temperature.
        valid: optional (B, C) bool, True for real candidates of video j (padding clips are left out).
    Returns:
        Scalar mean loss over the B pairs.
    """
    B, B2, C = scores.shape
    if B != B2:
        raise ValueError(f"mil_nce: scores must be (B, B, C), got {tuple(scores.shape)}")
    return mil_nce_blocks(scores, scores, 0, valid, valid)


def mil_nce_blocks(rows: Tensor, cols: Tensor, offset: int, valid_rows: Tensor | None = None,
                   valid_cols: Tensor | None = None) -> Tensor:
    """MIL-NCE of one rank's share of a global batch, from the two blocks of scores it needs.

    Pair i (global index `offset + i`): the positives are text i's scores with the candidates of video i,
    the negatives every candidate of every video against text i and every text against video i's candidates.
    Rank r scores its B texts against the N = W*B gathered videos (`rows`) and the N gathered texts against
    its B videos (`cols`); the mean over ranks equals `mil_nce` of one process on the whole batch, and so do
    the gradients when the features were gathered with gradient. In one process `mil_nce(s, v)` is
    `mil_nce_blocks(s, s, 0, v, v)`.

    Args:
        rows: (B, N, C) local texts x all videos' candidates.
        cols: (N, B, C) all texts x the local videos' candidates.
        offset: global index of this rank's first pair.
        valid_rows: optional (N, C) bool, the real candidates of all videos.
        valid_cols: optional (B, C) bool, the real candidates of the local videos.
    Returns:
        Scalar mean loss over the B local pairs.
    """
    B = rows.shape[0]
    if rows.shape[1] != cols.shape[0] or cols.shape[1] != B or rows.shape[2] != cols.shape[2]:
        raise ValueError(f"mil_nce_blocks: rows {tuple(rows.shape)} and cols {tuple(cols.shape)} are not "
                         f"(B, N, C) and (N, B, C)")
    if valid_rows is not None:
        rows = rows.masked_fill(~valid_rows[None].bool(), float("-inf"))           # (B, N, C)
    if valid_cols is not None:
        cols = cols.masked_fill(~valid_cols[None].bool(), float("-inf"))           # (N, B, C)
    idx = torch.arange(B, device=rows.device)
    pos = torch.logsumexp(rows[idx, offset + idx], dim=-1)                          # (B,)
    negatives = torch.cat([rows.reshape(B, -1), cols.transpose(0, 1).reshape(B, -1)], dim=1)   # (B, 2*N*C)
    return (torch.logsumexp(negatives, dim=-1) - pos).mean()


def itm_loss(logits_pos: Tensor, logits_neg: Tensor) -> Tensor:
    """Two-way matching cross-entropy: (B, 2) logits of matched pairs (label 1) and of false pairs (label 0)."""
    logits = torch.cat([logits_pos, logits_neg])                                    # (2B, 2)
    labels = torch.cat([torch.ones(len(logits_pos)), torch.zeros(len(logits_neg))]).long().to(logits.device)
    return F.cross_entropy(logits, labels)


def moco_loss(q: Tensor, k_pos: Tensor, queue: Tensor, temperature: float) -> Tensor:
    """InfoNCE of queries against their positive key and the queue's keys as the only negatives.

    Args:
        q: (B, D) L2-normalised queries.
        k_pos: (B, D) L2-normalised positive keys (from the momentum encoder, no gradient).
        queue: (Q, D) L2-normalised negative keys.
        temperature: softmax temperature.
    Returns:
        Scalar loss.
    """
    pos = (q * k_pos).sum(-1, keepdim=True)                                         # (B, 1)
    neg = q @ queue.T                                                                # (B, Q)
    logits = torch.cat([pos, neg], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


class KeyQueue(nn.Module):
    """A FIFO of L2-normalised keys (MoCo). All state lives in buffers, so a checkpoint resumes it exactly.

    Args:
        size: number of keys Q.
        dim: key width D.
    Buffers: `keys` (Q, D), `ptr` () the next slot, `filled` () how many slots hold real keys.
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        if size < 1:
            raise ValueError(f"queue size must be >= 1, got {size}")
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=-1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    def valid_keys(self) -> Tensor:
        """The keys enqueued so far (Q', D); all Q once the queue is full (random keys are never used)."""
        n = int(self.filled)
        return self.keys if n >= self.size else self.keys[:n]

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Write (B, D) keys at the pointer, wrapping around and overwriting the oldest (dequeue)."""
        keys = keys.detach().to(self.keys.dtype)
        if len(keys) > self.size:
            keys = keys[-self.size:]
        B, p = len(keys), int(self.ptr)
        slots = (torch.arange(B, device=self.keys.device) + p) % self.size
        self.keys[slots] = keys
        self.ptr.fill_((p + B) % self.size)
        self.filled.fill_(min(int(self.filled) + B, self.size))

    @torch.no_grad()
    def enqueue_from_all_ranks(self, keys: Tensor) -> None:
        """Enqueue every rank's (B, D) keys in rank order (MoCo's gather before the enqueue): under DDP all
        queues then hold the same keys from the whole global batch; in one process this is `enqueue`."""
        self.enqueue(all_gather_no_grad(keys.detach().contiguous()))


__all__ = ["mil_nce", "mil_nce_blocks", "itm_loss", "moco_loss", "KeyQueue"]


def lvwm_scores(words: Tensor, clips: Tensor) -> Tensor:
    """S[i, j, c] = logsumexp_k <words[i, k], clips[j, c]>: (B, K, W) x (N, n, W) -> (B, N, n)."""
    return torch.logsumexp(torch.einsum("ikw,jcw->ijck", words, clips), dim=-1)
