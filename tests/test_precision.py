"""``trainer.precision: auto``: what it resolves to on CPUs and GPUs with and without native bf16."""

import pytest
import torch

from metassl.engine import precision as P
from metassl.errors import ConfigError


def test_explicit_precision_is_kept():
    assert P.resolve_precision("32-true", "cpu") == "32-true"
    assert P.resolve_precision(32, "auto") == "32"
    assert P.resolve_precision("bf16-mixed", "gpu") == "bf16-mixed"


@pytest.mark.parametrize("native, expected", [(True, "bf16-mixed"), (False, "32-true")])
def test_cpu_auto_follows_native_bf16(monkeypatch, native, expected):
    monkeypatch.setattr(P, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert P.resolve_precision("auto", "cpu") == expected
    assert P.resolve_precision("auto", "auto") in (expected, "32-true")  # "32-true" where MPS is present


@pytest.mark.parametrize("bf16, expected", [(True, "bf16-mixed"), (False, "16-mixed")])
def test_gpu_auto_prefers_native_bf16_else_fp16(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(P, "_cuda_bf16", lambda: bf16)
    assert P.resolve_precision("auto", "gpu") == expected
    assert P.resolve_precision("auto", "auto") == expected
    monkeypatch.setattr(P, "cpu_has_native_bf16", lambda: False)
    assert P.resolve_precision("auto", "cpu") == "32-true"  # the CPU is asked for, not the GPU
    with pytest.raises(ConfigError, match="trainer.precision=16-mixed") as info:
        P.resolve_precision("auto", "gpu", "ddp_fork")
    assert "\n" not in str(info.value)


def test_cpuinfo_flags(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert {"avx2", "avx512_bf16"} <= P.cpuinfo_flags(x86)
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n")
    assert "bf16" in P.cpuinfo_flags(arm)
    assert P.cpuinfo_flags(tmp_path / "missing") == set()


def test_cpu_probe_agrees_with_the_kernel_flags():
    """PyTorch's probe (cpuinfo) and the kernel's flag list name the same capability."""
    flags = P.cpuinfo_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo flags on this system")
    assert P.cpu_has_native_bf16() == bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
