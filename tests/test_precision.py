"""Precision check: bf16 only where the device runs it natively, with a message that names the fix."""
import pytest
import torch

import polymodal.precision as precision
from polymodal.config import ConfigError
from polymodal.precision import autocast, check_precision


@pytest.fixture
def cpu_without_bf16(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "fma", "sse2"}))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")


@pytest.fixture
def cpu_with_bf16(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_bf16"}))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")


def test_fp32_is_always_fine(cpu_without_bf16):
    check_precision("fp32", "cpu")


def test_bf16_on_a_cpu_without_native_bf16_stops_with_slowdown_and_fix(cpu_without_bf16):
    with pytest.raises(ConfigError) as err:
        check_precision("bf16", "cpu", where="recipes/x.yaml")
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("recipes/x.yaml: train.precision=bf16")
    assert "25x slower" in msg and "train.precision=fp32" in msg and "train.precision_force=true" in msg
    assert "avx2" in msg


def test_bf16_forced_or_native_passes(cpu_without_bf16, monkeypatch):
    check_precision("bf16", "cpu", force=True)
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "amx_bf16"}))
    check_precision("bf16", "cpu")


def test_native_bf16_flag_is_detected(cpu_with_bf16):
    assert precision.cpu_has_native_bf16()
    check_precision("bf16", torch.device("cpu"))


def test_message_uses_the_callers_key_names(cpu_without_bf16):
    with pytest.raises(ConfigError, match=r"caption: --precision=bf16 .* use --precision=fp32, or --precision-force"):
        check_precision("bf16", "cpu", where="caption", key="--precision", force_key="--precision-force")


def test_unknown_precision_is_a_config_error():
    with pytest.raises(ConfigError, match="train.precision must be one of fp32, bf16, got 'fp16'"):
        check_precision("fp16", "cpu")


def test_cuda_without_bf16_support_stops(monkeypatch):
    monkeypatch.setattr(precision, "cuda_has_native_bf16", lambda device: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    with pytest.raises(ConfigError, match="Tesla T4 has no native bf16"):
        check_precision("bf16", "cuda:0", force=True)
    monkeypatch.setattr(precision, "cuda_has_native_bf16", lambda device: True)
    check_precision("bf16", "cuda:0")


def test_real_cpu_detection_agrees_with_proc_cpuinfo():
    flags = precision.cpu_flags()
    want = bool({"avx512_bf16", "amx_bf16", "bf16"} & flags)
    assert precision.cpu_has_native_bf16() == (want or "BF16" in torch.backends.cpu.get_cpu_capability().upper())


def test_autocast_context():
    x = torch.randn(4, 4)
    with autocast("bf16", "cpu"):
        assert (x @ x).dtype == torch.bfloat16
    with autocast("fp32", "cpu"):
        assert (x @ x).dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_check_matches_the_device():
    native = precision.cuda_has_native_bf16(torch.device("cuda"))
    if native:
        check_precision("bf16", "cuda")
    else:
        with pytest.raises(ConfigError):
            check_precision("bf16", "cuda")


def test_caption_command_refuses_emulated_bf16_before_loading(cpu_without_bf16, tmp_path):
    import argparse

    from polymodal.caption import add_caption_arguments, caption_main
    args = add_caption_arguments(argparse.ArgumentParser()).parse_args(
        ["no-such-model", str(tmp_path / "x.png"), "--device", "cpu", "--precision", "bf16"])
    with pytest.raises(ConfigError, match="caption: --precision=bf16 .*--precision-force"):
        caption_main(args)
