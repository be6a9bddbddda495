"""What the machine computes natively, and so which dtype lowbit's forwards run in.

A bf16 matmul is native only where the CPU has AVX512-BF16 or AMX; elsewhere (AVX2 servers,
most laptops and CI runners) PyTorch converts both operands and runs a slow fallback: measured
here on an AVX2-only ISA, a bf16 [4096, 576] x [576, 1536] linear took 1.1 s against 0.15 s in
float32. Running a bf16 checkpoint in float32 there is both faster and more exact (bf16 values
widen to float32 exactly), so that is what "auto" picks. Stored weights and scales keep the
checkpoint's dtype whatever the compute dtype.

The choice is made from the ISA, not from a timed probe, so that two runs of one command on one
machine always compute in the same dtype (reruns are byte-identical).
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import LowbitError

if TYPE_CHECKING:
    import torch

# torch is imported where it is used: the CLI reads CHOICES for --help, which must stay quick
CHOICES = ("auto", "float32", "bfloat16")


@dataclass(frozen=True)
class Compute:
    """The dtype forwards run in, and why (printed once, written to lowbit_report.json)."""

    dtype: torch.dtype
    reason: str

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def as_dict(self) -> dict:
        return {"dtype": self.name, "reason": self.reason}


def cpu_isa() -> str:
    """PyTorch's vector ISA for its CPU kernels (AVX2, AVX512, ...; ATEN_CPU_CAPABILITY lowers
    it), with the matrix extensions that make bf16/fp16 native."""
    import torch

    isa = torch.backends.cpu.get_cpu_capability()
    extras = [name for name, probe in (("AVX512-BF16", "_is_avx512_bf16_supported"),
                                       ("AMX", "_is_amx_tile_supported"),
                                       ("AMX-FP16", "_is_amx_fp16_supported"))
              if isa.startswith("AVX512") and getattr(torch.cpu, probe, lambda: False)()]
    return "+".join([isa, *extras])


def native_dtypes(device: torch.device | str = "cpu") -> tuple[torch.dtype, ...]:
    """The floating dtypes whose matmuls run natively on `device`."""
    import torch

    if torch.device(device).type == "cuda":
        return (torch.float32, torch.bfloat16, torch.float16)
    isa = cpu_isa()
    native = [torch.float32]
    if "AVX512-BF16" in isa or "+AMX" in isa:
        native.append(torch.bfloat16)
    if "AMX-FP16" in isa:
        native.append(torch.float16)
    return tuple(native)


def compute_dtype(stored: torch.dtype, choice: str = "auto",
                  device: torch.device | str = "cpu") -> Compute:
    """The dtype to run a checkpoint stored in `stored` in: `choice` when given, else the
    fastest native dtype at least as exact as `stored` (its own, when native; float32 else)."""
    import torch

    if choice not in CHOICES:
        raise LowbitError(f"unknown compute dtype {choice!r} (use {', '.join(CHOICES)})")
    where = "GPU" if torch.device(device).type == "cuda" else f"CPU ({cpu_isa()})"
    if choice != "auto":
        return Compute(getattr(torch, choice), f"requested (--compute-dtype {choice}) on this {where}")
    stored_name = str(stored).removeprefix("torch.")
    if stored.itemsize >= 4:  # float32 (or wider): nothing faster is as exact
        return Compute(stored, f"the checkpoint's own {stored_name}: no faster dtype is as exact")
    if stored in native_dtypes(device):
        return Compute(stored, f"the checkpoint's own {stored_name}, native on this {where}")
    return Compute(torch.float32, f"{stored_name} is emulated on this {where}: float32 is faster "
                   "and exact for its values")


def cpu_name() -> str:
    """The CPU's model name, as lscpu prints it (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
