"""Collectives and rank helpers on the ground floor: losses, models and methods import them from here.

Process start-up (`init_distributed`) and DDP wrapping live in `polymodal.train.distributed`.

Everything here also works in a single process without `torch.distributed` initialised:
ranks are 0, the world has size 1 and the gathers return their input unchanged. That lets
the same loss and training code run on a laptop and under `torchrun`.

The gathers are written here rather than taken from `torch.distributed.nn`:
- `all_gather_with_grad` sends the gradient of the gathered tensor back to its owner
  (backward = all_reduce SUM inside the group, then this rank's slice). On gloo the
  backward of `torch.distributed.nn.all_gather` has been unreliable for sub-groups, and
  grouped contrastive losses (M2-Encoder) gather inside sub-groups.
- `all_gather_no_grad` gathers without a graph but puts the local tensor back in its own
  slot, so the gradient through this rank's own features still flows.
- `make_contiguous_groups` builds the groups of G contiguous ranks used by the grouped loss.
- `count_collective_bytes` measures what the gathers receive (benchmarks only).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "CollectiveBytes",
    "is_dist",
    "rank",
    "world_size",
    "local_world_size",
    "barrier",
    "all_reduce_mean",
    "all_reduce_min",
    "all_reduce_max",
    "env_int",
    "clear_group_cache",
    "all_gather_with_grad",
    "all_gather_no_grad",
    "all_gather_padded",
    "make_contiguous_groups",
    "group_size_from_nodes",
    "count_collective_bytes",
]


# --------------------------------------------------------------------------- basic state


def is_dist() -> bool:
    """True when `torch.distributed` is available and a process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """Global rank of this process (0 when not distributed)."""
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    """Number of processes in the job (1 when not distributed)."""
    return dist.get_world_size() if is_dist() else 1


def env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise RuntimeError(
                f"environment variable {name} is not set; launch with torchrun, which sets "
                "RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT"
            )
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def local_world_size() -> int:
    """Processes on this machine, from LOCAL_WORLD_SIZE (set by torchrun), else 1."""
    return env_int("LOCAL_WORLD_SIZE", 1)


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if is_dist():
        dist.barrier()


def all_reduce_mean(tensor: Tensor) -> Tensor:
    """Mean of `tensor` over all ranks (for logging; no gradient).

    Args:
        tensor: any tensor of the same shape on every rank.

    Returns:
        A new tensor holding the mean; the input is not modified.
    """
    out = tensor.detach().clone()
    if is_dist():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out /= dist.get_world_size()
    return out


def all_reduce_min(value: int, device: torch.device | str = "cpu") -> int:
    """The smallest of an integer over all ranks (the value itself in one process)."""
    if not is_dist():
        return int(value)
    t = torch.tensor([int(value)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def all_reduce_max(value: int, device: torch.device | str = "cpu") -> int:
    """The largest of an integer over all ranks (the value itself in one process)."""
    return -all_reduce_min(-int(value), device)


def clear_group_cache() -> None:
    """Forget the cached sub-groups (call when the process group is destroyed)."""
    _GROUP_CACHE.clear()


# --------------------------------------------------------------------------- byte counting


@dataclass
class CollectiveBytes:
    """What the gathers of this module moved while a `count_collective_bytes` block was open.

    Attributes:
        bytes_received: bytes this rank received in forward all-gathers (gathered output
            minus its own slice).
        backward_bytes: payload bytes of the backward all-reduces of `all_gather_with_grad`
            (the tensor size; a ring all-reduce moves about 2(G-1)/G times this per rank).
        calls: number of gathers that communicated (size-1 groups do not).
    """

    bytes_received: int = 0
    backward_bytes: int = 0
    calls: int = 0


# Open counters; a list so nested blocks each see their own totals.
_ACTIVE_COUNTERS: list[CollectiveBytes] = []


@contextmanager
def count_collective_bytes() -> Iterator[CollectiveBytes]:
    """Count the bytes received by gathers made through this module inside the block.

    Returns:
        (as the context value) a `CollectiveBytes` that fills in while the block runs.
        Backward all-reduces count when `loss.backward()` runs inside the block.
    """
    counter = CollectiveBytes()
    _ACTIVE_COUNTERS.append(counter)
    try:
        yield counter
    finally:
        _ACTIVE_COUNTERS.remove(counter)


def _record(received: int = 0, backward: int = 0) -> None:
    for c in _ACTIVE_COUNTERS:
        c.bytes_received += received
        c.backward_bytes += backward
        c.calls += 1 if received else 0


# --------------------------------------------------------------------------- gathers


def _group_rank(group) -> tuple[int, int]:
    """(size, rank inside group); raises when this process is not a member."""
    size = dist.get_world_size(group)
    r = dist.get_rank(group)
    if r < 0:
        raise ValueError(f"rank {dist.get_rank()} is not a member of the given process group")
    return size, r


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate every group member's tensor along dim 0, with gradient to the owners."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        size, r = _group_rank(group)
        ctx.group, ctx.rank, ctx.rows = group, r, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=0)  # (size * N, ...)

    @staticmethod
    def backward(ctx, grad: Tensor):
        # Every rank's loss depends on every rank's rows: the gradient for our rows is the
        # sum over the group of each rank's gradient w.r.t. those rows. Clone because
        # all_reduce works in place and autograd may still hold `grad`.
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        _record(backward=grad.numel() * grad.element_size())
        start = ctx.rank * ctx.rows
        return grad[start : start + ctx.rows], None


def all_gather_with_grad(x: Tensor, group=None) -> Tensor:
    """All-gather with gradient: concatenate `x` from every rank of `group` along dim 0.

    Backward sums the incoming gradient over the group and returns this rank's slice, so
    each rank's features receive the gradient of every rank's loss. Every rank must pass
    a tensor of the same shape (use drop_last in data loaders).

    Args:
        x: (N, ...) local tensor.
        group: a process group (None = all ranks).

    Returns:
        (size * N, ...) tensor in group-rank order; `x` itself when not distributed or
        the group has one member.
    """
    if not is_dist():
        return x
    size, _ = _group_rank(group)
    if size == 1:
        return x
    out = _AllGatherWithGrad.apply(x, group)
    _record(received=(out.numel() - x.numel()) * x.element_size())
    return out


def all_gather_no_grad(x: Tensor, group=None) -> Tensor:
    """All-gather without a graph, except that this rank's slice is `x` itself.

    Other ranks' rows are constants here; gradient flows only through the local slice
    (the OpenCLIP "gather without grad" behaviour).

    Args:
        x: (N, ...) local tensor.
        group: a process group (None = all ranks).

    Returns:
        (size * N, ...) tensor in group-rank order; `x` when not distributed.
    """
    if not is_dist():
        return x
    size, r = _group_rank(group)
    if size == 1:
        return x
    with torch.no_grad():
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.detach().contiguous(), group=group)
    parts[r] = x
    _record(received=(size - 1) * x.numel() * x.element_size())
    return torch.cat(parts, dim=0)


def all_gather_padded(x: Tensor, dim: int = 1, value=0, with_grad: bool = True, size: int | None = None) -> Tensor:
    """All-gather of tensors whose size along `dim` differs between ranks (e.g. token or node counts).

    Every rank's tensor is padded with `value` along `dim` to the largest size of any rank, then gathered
    along dim 0 (with gradient to the owner, as `all_gather_with_grad`; or, with `with_grad=False`, as
    `all_gather_no_grad`). Bool tensors travel as uint8 (gloo has no bool collectives).

    Args:
        x: (N, ...) local tensor; all other dims equal on every rank.
        dim: the dim whose size may differ (>= 1).
        value: the padding value (e.g. 0 for features, False for masks, -1 for indices).
        with_grad: gather with gradient (float tensors only).
        size: the padded size when the caller already knows it (`all_reduce_max` of the sizes, shared by the
            tensors of one batch), which saves this call's own collective.
    Returns:
        (W * N, ..., max size, ...) tensor in rank order; `x` itself when not distributed.
    """
    if not is_dist() or dist.get_world_size() == 1:
        return x
    if size is None:
        size = all_reduce_max(x.shape[dim], x.device)
    if size > x.shape[dim]:
        pad = list(x.shape)
        pad[dim] = size - x.shape[dim]
        x = torch.cat([x, torch.full(pad, value, dtype=x.dtype, device=x.device)], dim=dim)
    if x.dtype == torch.bool:
        return all_gather_no_grad(x.to(torch.uint8)).bool()
    return all_gather_with_grad(x) if with_grad else all_gather_no_grad(x)


# --------------------------------------------------------------------------- groups

# (id of the default group, W, G) -> (group, rank_in_group, group_ranks). Cleared by cleanup().
_GROUP_CACHE: dict[tuple[int, int, int], tuple[object, int, list[int]]] = {}


def make_contiguous_groups(group_size: int) -> tuple[object, int, list[int]]:
    """Split the W ranks into W/G groups of G contiguous ranks and return this rank's group.

    With one process per GPU and torchrun's rank order, a group of `k * local_world_size`
    contiguous ranks is k whole machines. `dist.new_group` is collective over all ranks, so
    every rank creates every group in the same order; this happens once per (W, G) and
    is cached.

    Args:
        group_size: G, a positive divisor of W, or -1 for all ranks (G = W).

    Returns:
        (group, rank_in_group, group_ranks). For G = W the group is the default (world)
        group; when not distributed it is (None, 0, [0]).

    Raises:
        ValueError: G is not -1 and not a positive divisor of W.
    """
    w = world_size()
    g = w if group_size == -1 else group_size
    if isinstance(g, bool) or not isinstance(g, int) or g < 1 or w % g != 0:
        raise ValueError(
            f"group_size={group_size!r} must be -1 (all ranks) or a positive divisor of the "
            f"world size {w}; for whole machines use group_size_from_nodes(aggregate_nodes)"
        )
    if not is_dist():
        return None, 0, [0]
    world_group = dist.group.WORLD
    key = (id(world_group), w, g)
    if key in _GROUP_CACHE:
        return _GROUP_CACHE[key]
    r = dist.get_rank()
    if g == w:
        mine = (world_group, r, list(range(w)))
    else:
        mine = None
        for start in range(0, w, g):
            ranks = list(range(start, start + g))
            handle = dist.new_group(ranks)  # collective: all ranks, same order
            if r in ranks:
                mine = (handle, r - start, ranks)
    _GROUP_CACHE[key] = mine
    return mine


def group_size_from_nodes(aggregate_nodes: int) -> int:
    """Group size G for groups of whole machines: `aggregate_nodes * local_world_size`.

    Args:
        aggregate_nodes: machines per group, or -1 for all ranks.

    Returns:
        G (W when `aggregate_nodes` is -1).
    """
    if aggregate_nodes == -1:
        return world_size()
    if isinstance(aggregate_nodes, bool) or not isinstance(aggregate_nodes, int) or aggregate_nodes < 1:
        raise ValueError(f"aggregate_nodes={aggregate_nodes!r} must be -1 (all ranks) or a positive integer")
    return aggregate_nodes * local_world_size()
