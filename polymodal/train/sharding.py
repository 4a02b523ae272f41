"""Fully sharded data parallel (FSDP2), activation checkpointing and the per-rank memory plan.

`train.strategy: fsdp` shards every parameter, gradient and optimiser state over the ranks with
`torch.distributed.fsdp.fully_shard`: one unit per transformer block and one at the root (the task), so at most
one block's full parameters are gathered at a time beyond the root's own. The blocks are found without naming a
method or a model:

- the items of every `nn.ModuleList` attribute named `blocks` (our `Transformer`, `MultiwayEncoder`, and so every
  tower, the multiway M2 stacks, the CoCa decoder, SNP-S3's BERT stacks and our MLLM decoder);
- the layer classes a transformers model lists in its `_no_split_modules` (e.g. `LlamaDecoderLayer`,
  `GPT2Block`): the units transformers itself never splits.

Zero-dimensional parameters (CLIP's `logit_scale`, SigLIP's bias) cannot be sharded (fully_shard refuses them):
they stay replicated, like under DDP, and their gradients are averaged over the ranks by
`average_replicated_grads`. Frozen parameters outside the blocks stay replicated as well (see `apply_fsdp`).

A task whose code reads a block's weights outside that block's forward (or the model's outside the task's
forward) cannot run sharded; it says so with `fsdp_blockers() -> list[str]` (one "key: why; fix" line each), and
`check_fsdp_support` refuses the run before anything is sharded.
"""
from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

STRATEGIES = ("ddp", "fsdp")

__all__ = ["STRATEGIES", "shard_units", "apply_fsdp", "meta_copy", "materialize_", "average_replicated_grads",
           "clip_grad_norm", "set_gradient_sync", "enable_activation_checkpointing", "MemoryPlan", "memory_plan",
           "available_memory", "resident_bytes", "check_memory_plan", "check_fsdp_support", "has_meta_parameters",
           "fill_from_rank0"]


def shard_units(module: nn.Module) -> list[nn.Module]:
    """The modules that become their own FSDP unit: transformer blocks, outermost first, each once.

    Args:
        module: the task (or model) to shard.
    Returns:
        The blocks in `module.modules()` order; a block inside another listed block is left out (it is
        gathered with its parent).
    """
    hf_names: set[str] = set()
    for m in module.modules():
        names = getattr(m, "_no_split_modules", None)
        if isinstance(names, (list, tuple, set)):
            hf_names.update(n for n in names if isinstance(n, str))
    found: dict[int, nn.Module] = {}
    for m in module.modules():
        blocks = getattr(m, "blocks", None)
        if isinstance(blocks, nn.ModuleList):
            for b in blocks:
                found.setdefault(id(b), b)
        if type(m).__name__ in hf_names:
            found.setdefault(id(m), m)
    inside: set[int] = set()
    for b in found.values():
        for sub in b.modules():
            if sub is not b:
                inside.add(id(sub))
    return [b for b in found.values() if id(b) not in inside]


def apply_fsdp(module: nn.Module, device: torch.device, mixed_precision: bool = False,
               offload: bool = False) -> list[nn.Parameter]:
    """Shard `module` in place over all ranks of the default process group (one unit per block + the root).

    Args:
        module: the task, already on `device`.
        device: this rank's device (cpu under gloo, cuda:N under nccl).
        mixed_precision: bf16 parameters and compute, fp32 gradient reduction (CUDA only; the caller decides).
        offload: keep the sharded parameters, gradients and optimiser state in CPU memory
            (`CPUOffloadPolicy`); the step then runs on the CPU.
    Returns:
        The trained parameters left replicated (zero-dimensional ones): their gradients must be averaged by
        `average_replicated_grads` after backward. Frozen parameters outside the blocks are replicated too.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    units = shard_units(module)
    in_units = {id(p) for u in units for p in u.parameters()}
    # Frozen parameters outside the blocks stay whole on every rank: FSDP2 gathers the root's parameters into
    # temporary full tensors for the forward, so an in-place update made there (a MoCo/EMA momentum encoder's
    # embeddings, poolers and heads) would be lost at the reshard. Frozen ones have no gradient or optimizer state.
    frozen_root = [p for p in module.parameters() if not p.requires_grad and id(p) not in in_units]
    replicated = [p for p in module.parameters() if p.ndim == 0 and p.requires_grad]
    # Pinned host memory needs an accelerator; on a CPU run the shards are in CPU memory anyway.
    policy = CPUOffloadPolicy(pin_memory=device.type == "cuda") if offload else OffloadPolicy()
    kwargs = {"mesh": mesh, "offload_policy": policy}
    if mixed_precision:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    ignored = set(replicated) | {p for p in module.parameters() if p.ndim == 0} | set(frozen_root)
    for block in units:
        fully_shard(block, ignored_params=ignored & set(block.parameters()) or None, **kwargs)
    fully_shard(module, ignored_params=ignored or None, **kwargs)
    return replicated


def set_gradient_sync(module: nn.Module, enabled: bool) -> None:
    """Turn FSDP's gradient reduce-scatter on or off (off for the first micro-batches of an accumulation)."""
    fn = getattr(module, "set_requires_gradient_sync", None)
    if callable(fn):
        fn(enabled)


def meta_copy(module: nn.Module) -> nn.Module:
    """A copy of `module` whose parameters and buffers are on the meta device (no memory).

    Taken before sharding, it is the plain (unsharded) model that the full state dict is loaded into for
    evaluation and `save_pretrained` (`Trainer.full_task`). Tied parameters stay tied.
    """
    memo: dict[int, object] = {}
    for p in module.parameters():
        if id(p) not in memo:
            memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in module.buffers():
        if id(b) not in memo:
            memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(module, memo)


def _is_dtensor(t: Tensor) -> bool:
    return type(t).__name__ == "DTensor"


def average_replicated_grads(params: list[nn.Parameter]) -> None:
    """Average the gradients of replicated parameters over the ranks, as DDP would (one all-reduce)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else grads[0].device
    flat = torch.cat([g.reshape(-1).to(device) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))       # copy_ moves it back where it lives
        offset += g.numel()


def clip_grad_norm(params, max_norm: float) -> float:
    """Scale gradients so their global L2 norm is at most `max_norm` (as `clip_grad_norm_`), for a mix of sharded
    (DTensor) and replicated gradients: each shard's squares are summed over the ranks, replicated ones count once.

    Args:
        params: the trained parameters.
        max_norm: the largest allowed norm.
    Returns:
        The total norm before clipping.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    sharded = [g.to_local() for g in grads if _is_dtensor(g)]
    plain = [g for g in grads if not _is_dtensor(g)]
    distributed = dist.is_available() and dist.is_initialized()
    # The sum travels on the group's device: nccl reduces CUDA tensors only (offloaded shards are on the CPU).
    device = torch.device("cuda", torch.cuda.current_device()) if distributed and dist.get_backend() == "nccl" \
        else (sharded or plain)[0].device
    sq_sharded = torch.zeros((), dtype=torch.float32, device=device)
    for g in sharded:
        sq_sharded += g.float().pow(2).sum().to(device)
    if sharded and distributed:
        dist.all_reduce(sq_sharded)
    sq = sq_sharded + sum((g.float().pow(2).sum().to(device) for g in plain), torch.zeros((), device=device))
    total = float(sq.sqrt())
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for g in grads:
            (g.to_local() if _is_dtensor(g) else g).mul_(coef)
    return total


def enable_activation_checkpointing(module: nn.Module) -> int:
    """Recompute every block's activations in backward instead of keeping them (`train.activation_checkpointing`).

    Our stacks (`Transformer`, `MultiwayEncoder`) have a `grad_checkpointing` switch (torch.utils.checkpoint with
    use_reentrant=False per block); transformers models get `activation_checkpointing_enable` (called
    `gradient_checkpointing_enable` before transformers 5), non-reentrant too.

    Args:
        module: the task.
    Returns:
        How many stacks were switched (0: the task has no block stack to recompute).
    """
    count = 0
    for m in module.modules():
        if hasattr(m, "grad_checkpointing") and isinstance(getattr(m, "blocks", None), nn.ModuleList):
            m.grad_checkpointing = True
            count += 1
        elif getattr(m, "supports_gradient_checkpointing", False) and hasattr(m, "gradient_checkpointing_enable"):
            # transformers >= 5 renamed the switch (the old name warns); the nested models of one LM are switched once.
            new = hasattr(m, "activation_checkpointing_enable")
            if not getattr(m, "is_activation_checkpointing" if new else "is_gradient_checkpointing", False):
                if new:
                    m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
                else:
                    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                count += 1
    return count


# --------------------------------------------------------------------------- memory plan


@dataclass
class MemoryPlan:
    """What one rank holds for the model and its optimiser (bytes).

    Attributes:
        strategy: "ddp" or "fsdp".
        world_size: ranks sharing the shards.
        params: this rank's parameters (the full model under DDP, 1/W of it under FSDP, plus the largest
            block gathered at a time).
        grads: gradients of the trained parameters (full under DDP, 1/W under FSDP).
        optimizer: AdamW's two moments of the trained parameters (full or 1/W), fp32.
        offload: the shards live in CPU memory (`train.fsdp_offload`).
    """

    strategy: str
    world_size: int
    params: int
    grads: int
    optimizer: int
    offload: bool = False

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer

    def describe(self) -> str:
        gib = _size
        where = " (offloaded to CPU memory)" if self.offload else ""
        return (f"memory plan per rank ({self.strategy}, {self.world_size} rank(s)){where}: params {gib(self.params)}, "
                f"grads {gib(self.grads)}, optimizer state {gib(self.optimizer)}, total {gib(self.total)} "
                f"(activations not included)")


def _size(n: int) -> str:
    """Bytes in GiB (or MiB below one GiB), for messages."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def memory_plan(module: nn.Module, strategy: str, world_size: int, offload: bool = False) -> MemoryPlan:
    """The per-rank bytes of parameters, gradients and AdamW state under `strategy` (activations excluded).

    Args:
        module: the task, before sharding (full parameters).
        strategy: "ddp" (everything replicated) or "fsdp" (everything 1/W, plus the largest block gathered).
        world_size: the number of ranks.
        offload: FSDP's shards are in CPU memory.
    Returns:
        A `MemoryPlan`.
    """
    seen: set[int] = set()
    total = trained = 0
    for p in module.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
        if p.requires_grad:
            trained += p.numel() * p.element_size()
    optimizer = 2 * sum(p.numel() * 4 for p in module.parameters() if p.requires_grad)
    if strategy == "fsdp" and world_size > 1:
        largest = max((sum(p.numel() * p.element_size() for p in b.parameters()) for b in shard_units(module)),
                      default=0)
        w = world_size
        return MemoryPlan(strategy, w, math.ceil(total / w) + largest, math.ceil(trained / w),
                          math.ceil(optimizer / w), offload)
    return MemoryPlan(strategy, world_size, total, trained, optimizer, offload)


def available_memory(device: torch.device) -> int | None:
    """Free bytes for one rank's model on `device`: CUDA's free device memory, or the machine's available RAM
    (`MemAvailable`) divided among the ranks of this machine. None when unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    ram = int(line.split()[1]) * 1024
                    break
            else:
                return None
    except OSError:
        return None
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return ram // max(local, 1)


def resident_bytes(module: nn.Module, device: torch.device) -> int:
    """Bytes of `module`'s parameters already held where the run's memory is counted (on `device`): they are part
    of the plan and no longer part of the free memory."""
    seen: set[int] = set()
    total = 0
    for p in module.parameters():
        if id(p) not in seen and p.device.type == device.type:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def check_memory_plan(plan: MemoryPlan, available: int | None, device: torch.device, resident: int = 0) -> None:
    """Refuse a run whose model and optimiser cannot fit this rank's share of memory, naming the fix.

    Called before the model moves to the device. On the CPU every rank has already built the whole model (it shards
    it next), so its parameters (`resident`) count as free for the plan; under offload the shards count against CPU
    memory. Activations are not planned.

    Args:
        plan: from `memory_plan`.
        available: free bytes for this rank (`available_memory`), None when unknown (no check).
        device: the rank's device, for the message.
        resident: bytes of the plan already allocated (and so missing from `available`).
    Raises:
        MemoryError: one line with the plan, what is free, and what to change.
    """
    if available is None or plan.total <= available + resident:
        return
    available += resident
    gib = _size
    where = "CPU memory" if device.type == "cpu" or plan.offload else f"{device} memory"
    if plan.strategy == "ddp":
        fix = "set train.strategy=fsdp (shards parameters, gradients and optimizer state over the ranks)"
    elif not plan.offload and device.type == "cuda":
        fix = "use more ranks, or train.fsdp_offload=true (keeps the shards in CPU memory)"
    else:
        fix = "use more ranks (or machines), or a smaller model"
    raise MemoryError(f"the model and optimizer need {gib(plan.total)} per rank ({plan.describe().split(': ', 1)[1]}) "
                      f"but only {gib(available)} of {where} is free per rank; {fix}")


def materialize_(module: nn.Module, device: torch.device | str = "cpu") -> nn.Module:
    """Give a meta-device module (from `meta_copy`) real, uninitialised storage on `device`, in place.

    Unlike `nn.Module.to_empty`, a parameter shared by two modules (tied embeddings) stays one parameter.
    """
    done: dict[int, Tensor] = {}
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is None or not p.is_meta:
                continue
            if id(p) not in done:
                done[id(p)] = nn.Parameter(torch.empty_like(p, device=device), requires_grad=p.requires_grad)
            m._parameters[name] = done[id(p)]
        for name, b in list(m._buffers.items()):
            if b is None or not b.is_meta:
                continue
            if id(b) not in done:
                done[id(b)] = torch.empty_like(b, device=device)
            m._buffers[name] = done[id(b)]
    return module


def check_fsdp_support(task: nn.Module) -> None:
    """Refuse `train.strategy=fsdp` for a task that declares, through `fsdp_blockers()`, code that reads sharded
    weights outside a forward (e.g. an attention read-out that calls a block's projections directly).

    Raises:
        ConfigError: one line naming the task's reasons and the fix.
    """
    from ..config import ConfigError
    blockers = getattr(task, "fsdp_blockers", None)
    reasons = list(blockers()) if callable(blockers) else []
    if reasons:
        raise ConfigError(f"train.strategy=fsdp cannot shard this task: {'; '.join(reasons)}; or use "
                          f"train.strategy=ddp")


def has_meta_parameters(module: nn.Module) -> bool:
    """True when `module` was built on the meta device (a rank that waits for rank 0's weights)."""
    return any(t.is_meta for t in list(module.parameters()) + list(module.buffers()))


def fill_from_rank0(module: nn.Module, full_state: dict | None, device: torch.device) -> None:
    """Deferred initialisation: after `apply_fsdp`, give every rank rank 0's weights; every rank calls it.

    Ranks other than 0 may have built the task on the meta device (no memory): their shards get storage here
    (`to_empty`, which keeps shared parameters shared for FSDP's DTensors) and are filled from rank 0's full state
    dict, broadcast shard by shard (`broadcast_from_rank0`); every buffer, persistent or not, is broadcast from rank 0
    as DDP does at wrap time.

    Args:
        module: the sharded task.
        full_state: rank 0's `state_dict()` taken before sharding (None on the other ranks).
        device: this rank's device.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    if has_meta_parameters(module):
        module.to_empty(device=device)
    set_model_state_dict(module, full_state if dist.get_rank() == 0 else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for _, buf in sorted(module.named_buffers(), key=lambda kv: kv[0]):
        dist.broadcast(buf, src=0)
