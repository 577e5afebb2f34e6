"""Which autocast dtype and memory layout a device gets, why, and the context that applies it.

The defaults follow what was measured (bench/RESULTS.md): a setting is on only where it paid
against the fp32 NCHW reference step on that kind of device.
"""

from __future__ import annotations

import contextlib

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Measured WRN-50-2 epoch at 64 px on an AVX2 CPU: 766 s in emulated bf16, 64 s in fp32.
EMULATED_BF16_SLOWDOWN = 12


def cpu_supports_bf16() -> bool:
    return bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())


def resolve(dtype: str, device: torch.device) -> str:
    """'auto' becomes bf16 where the device computes it natively, else fp32."""
    if dtype != "auto":
        return dtype
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_supports_bf16() else "fp32"


def layout(setting: bool | str, dtype: str, device: torch.device) -> tuple[bool, str]:
    """(channels_last?, why) for ``precision.channels_last`` with the resolved ``dtype``."""
    if setting != "auto":
        return bool(setting), "set in the spec"
    if device.type == "cuda":
        return True, "cuDNN's tensor-core convolutions read NHWC"
    if dtype == "bf16" and cpu_supports_bf16():
        return True, "1.13x over NCHW with native bf16 on the CPU"
    if dtype == "fp32":
        return False, "channels_last ran 0.91x of NCHW in fp32 on the CPU"
    return False, f"{dtype} has no native kernels on this CPU; NCHW, as for fp32"


def memory_format(setting: bool | str, dtype: str, device: torch.device) -> torch.memory_format:
    channels_last, _ = layout(setting, dtype, device)
    return torch.channels_last if channels_last else torch.contiguous_format


def emulated_bf16_warning(dtype: str, use_gpu: bool) -> str | None:
    """One line when an explicit bf16 would run emulated on this machine's CPU, else None."""
    if dtype != "bf16" or use_gpu or cpu_supports_bf16():
        return None
    return (
        "precision.dtype: bf16 on a CPU without native bf16 (no avx512_bf16 or amx_bf16) runs "
        f"emulated, about {EMULATED_BF16_SLOWDOWN}x slower than fp32 (a WRN-50-2 epoch: 766 s "
        "vs 64 s); set precision.dtype: auto or fp32"
    )


def autocast(dtype: str, device: torch.device):
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[dtype])
