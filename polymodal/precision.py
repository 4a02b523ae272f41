"""Numeric precision that checks the hardware: bf16 only where the device runs it natively.

bf16 autocast on a CPU without native bf16 arithmetic (x86 without AVX512-BF16 / AMX-BF16, Arm
without the BF16 extension) runs its matmuls in emulation: a ViT-B/32 fwd+bwd measured about 100 s
in bf16 instead of about 4 s in fp32 on an AVX2 machine (ours and transformers' alike). So
`check_precision` stops such a run before it starts, with the fix, unless it is forced. On CUDA bf16
needs a device that supports it natively (`torch.cuda.is_bf16_supported(including_emulation=False)`,
compute capability 8.0+).

Typical use: `check_precision(cfg.precision, device, cfg.precision_force, where=path)` at start-up,
then `with autocast(cfg.precision, device): ...` around the forward pass.
"""
from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import TYPE_CHECKING

from .config import ConfigError

if TYPE_CHECKING:                 # torch is imported where it is used: `--help` of the commands stays light
    import torch

PRECISIONS = ("fp32", "bf16")
BF16_CPU_SLOWDOWN = 25      # fp32 -> emulated bf16 time factor, ViT-B/32 fwd+bwd on AVX2 (~100 s vs ~4 s)
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")   # x86 flags; "bf16" is Arm's feature name


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (`flags` on x86, `Features` on Arm); empty where unreadable."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX-BF16 on x86, BF16 on Arm)."""
    import torch
    capability = torch.backends.cpu.get_cpu_capability()          # e.g. "AVX2", "AVX512"
    return any(f in cpu_flags() for f in NATIVE_BF16_CPU_FLAGS) or "BF16" in capability.upper()


def cuda_has_native_bf16(device: torch.device) -> bool:
    """Whether CUDA `device` supports bf16 natively (not merely by emulation)."""
    import torch
    with torch.cuda.device(device):
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:                                          # older torch: no emulation argument
            return torch.cuda.is_bf16_supported()


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return "this CPU"


def check_precision(precision: str, device: torch.device | str, force: bool = False, where: str = "config",
                    key: str = "train.precision", force_key: str = "train.precision_force=true") -> None:
    """Stop a run whose precision the device cannot run at speed.

    Args:
        precision: "fp32" or "bf16".
        device: where the run computes.
        force: run bf16 even on a CPU without native bf16 (accepting the slowdown).
        where: the file or command the setting came from, for the message.
        key: the setting's name in messages (e.g. "train.precision", "--precision").
        force_key: how to force it, for the message (e.g. "train.precision_force=true", "--precision-force").
    Raises:
        ConfigError: an unknown precision; bf16 on a CPU without native bf16 (unless `force`), naming the
            expected slowdown and the fix; bf16 on a CUDA device without bf16 support.
    """
    import torch
    if precision not in PRECISIONS:
        raise ConfigError(f"{where}: {key} must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return
    device = torch.device(device)
    if device.type == "cpu" and not force and not cpu_has_native_bf16():
        flags = ", ".join(f for f in ("avx2", "avx512f") if f in cpu_flags()) or "no AVX2/AVX512"
        raise ConfigError(
            f"{where}: {key}=bf16 on {_cpu_name()} ({flags}; no avx512_bf16/amx_bf16) emulates bf16 and runs "
            f"about {BF16_CPU_SLOWDOWN}x slower than fp32 (ViT-B/32 fwd+bwd ~100 s vs ~4 s on AVX2); "
            f"use {key}=fp32, or {force_key} to run bf16 anyway")
    if device.type == "cuda" and not cuda_has_native_bf16(device):
        name = torch.cuda.get_device_name(device)
        raise ConfigError(f"{where}: {key}=bf16 but {name} has no native bf16 (needs compute capability 8.0+); "
                          f"use {key}=fp32")


def autocast(precision: str, device: torch.device | str):
    """A context manager: bf16 autocast on `device` for "bf16", nothing for "fp32"."""
    import torch
    device = torch.device(device)
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
