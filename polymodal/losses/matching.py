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


def moco_loss(q: Tensor, k_pos: Tensor, queue: Tensor, temperature: float, pos_valid: Tensor | None = None,
              neg_valid: Tensor | None = None) -> Tensor:
    """MoCo InfoNCE of queries against their positive key(s), with the queue's keys as the only negatives.

    With several positives per query (SNP-S3's text query against all clip keys of its video) the numerator is the
    logsumexp over them: loss = logsumexp(cat(pos, neg) / T) - logsumexp(pos / T), as in the authors' release. With one
    positive it is the usual cross-entropy with the positive at index 0.

    Args:
        q: (B, D) L2-normalised queries.
        k_pos: (B, D) or (B, P, D) L2-normalised positive keys (from the momentum encoder, no gradient).
        queue: (Q, D) L2-normalised negative keys.
        temperature: softmax temperature.
        pos_valid: optional (B, P) bool, False for padding positives (each row needs at least one True).
        neg_valid: optional (B, Q) bool, False for queue keys left out of query i's negatives (e.g. keys of its
            own video enqueued at an earlier step).
    Returns:
        Scalar mean loss over the B queries.
    """
    k_pos = k_pos[:, None] if k_pos.dim() == 2 else k_pos                              # (B, P, D)
    pos = torch.einsum("bd,bpd->bp", q, k_pos) / temperature                          # (B, P)
    neg = q @ queue.T / temperature                                                  # (B, Q)
    if pos_valid is not None:
        pos = pos.masked_fill(~pos_valid.bool(), float("-inf"))
    if neg_valid is not None:
        neg = neg.masked_fill(~neg_valid.bool(), float("-inf"))
    return (torch.logsumexp(torch.cat([pos, neg], dim=1), dim=1) - torch.logsumexp(pos, dim=1)).mean()


class KeyQueue(nn.Module):
    """A FIFO of L2-normalised keys (MoCo), each with the id of the sample (video) it came from. All state lives in
    buffers, so a checkpoint resumes it exactly.

    The owner ids let a query leave out keys of its own video that an earlier step enqueued (`others_than`):
    once the queue covers a good part of the training set, those stale keys of the positive would otherwise be
    negatives.

    Args:
        size: number of keys Q.
        dim: key width D.
    Buffers: `keys` (Q, D) (random unit vectors before any enqueue, as in MoCo), `owner` (Q,) the sample id of each
    key (-1 for the random start keys), `ptr` () the next slot, `filled` () how many slots hold real keys.
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        if size < 1:
            raise ValueError(f"queue size must be >= 1, got {size}")
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=-1))
        self.register_buffer("owner", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    def valid_keys(self) -> Tensor:
        """The keys enqueued so far (Q', D); all Q once the queue is full (random keys are never used)."""
        n = int(self.filled)
        return self.keys if n >= self.size else self.keys[:n]

    def others_than(self, owners: Tensor) -> Tensor:
        """(B, Q) bool: True where the queue's key belongs to another sample than `owners` (B,) (random start keys
        belong to none)."""
        return self.owner[None, :] != owners.to(self.owner.device)[:, None]

    @torch.no_grad()
    def enqueue(self, keys: Tensor, owners: Tensor | None = None) -> None:
        """Write (B, D) keys (and their (B,) sample ids; -1 when None) at the pointer, wrapping around and
        overwriting the oldest (dequeue)."""
        keys = keys.detach().to(self.keys.dtype)
        owners = (torch.full((len(keys),), -1, dtype=torch.long) if owners is None else owners.detach().long())
        owners = owners.to(self.owner.device)
        if len(keys) > self.size:
            keys, owners = keys[-self.size:], owners[-self.size:]
        B, p = len(keys), int(self.ptr)
        slots = (torch.arange(B, device=self.keys.device) + p) % self.size
        self.keys[slots] = keys
        self.owner[slots] = owners
        self.ptr.fill_((p + B) % self.size)
        self.filled.fill_(min(int(self.filled) + B, self.size))

    @torch.no_grad()
    def enqueue_from_all_ranks(self, keys: Tensor, owners: Tensor | None = None, keep: Tensor | None = None) -> None:
        """Enqueue every rank's (B, D) keys (and (B,) owners) in rank order (MoCo's gather before the enqueue):
        under DDP all queues then hold the same keys from the whole global batch; in one process this is `enqueue`.
        `keep` (B,) bool leaves rows out (padding clips), after the gather so every rank gathers the same shape."""
        if owners is None:
            owners = torch.full((len(keys),), -1, dtype=torch.long, device=keys.device)
        if keep is None:
            keep = torch.ones(len(keys), dtype=torch.bool, device=keys.device)
        keys = all_gather_no_grad(keys.detach().contiguous())
        owners = all_gather_no_grad(owners.detach().long().contiguous())
        keep = all_gather_no_grad(keep.detach().long().contiguous()).bool()      # gloo gathers no bool
        self.enqueue(keys[keep], owners[keep])


__all__ = ["mil_nce", "mil_nce_blocks", "itm_loss", "moco_loss", "KeyQueue"]


def lvwm_scores(words: Tensor, clips: Tensor) -> Tensor:
    """S[i, j, c] = logsumexp_k <words[i, k], clips[j, c]>: (B, K, W) x (N, n, W) -> (B, N, n)."""
    return torch.logsumexp(torch.einsum("ikw,jcw->ijck", words, clips), dim=-1)
