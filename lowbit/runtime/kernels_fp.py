"""CPU kernels for FP8 (E4M3) and FP4 (NVFP4/MXFP4, two E2M1 codes a byte) weights kept as
stored: a small C library built on first use, with torch's dequantize-per-call as the fallback.

Why C (measured with bench/cpu_kernels.py, one thread, 576x1536; docs/benchmarks.md): torch
2.13 has no fast path for these codes on CPU. `float8_e4m3fn.to(bf16)` runs a scalar loop (6 ms
for 0.9 M weights, against 0.08 ms for the whole INT4 matmul), `torch._scaled_mm` on CPU took
49 ms at one row and 13 s at 256, and a 16-entry lookup by tensor indexing 4.6 ms. The C loops
(runtime/kernels.c) turn codes into float32 (FP8: by an FP16 bit shift and the F16C / AVX512
conversion; E2M1: a 16-entry register table) inside the float32 dot product, so each weight is
read once and never written back out, as the int4pack/int8pack kernels do.
- decode (fewer than DENSE_ROWS inputs): `*_gemv`, y = x @ codes.T in float32, scales applied
  per group inside, per channel / per tensor on the output.
- prefill: `*_to_bf16` writes the weights (codes times group scales: exact in bf16) for one
  dense GEMM (AMX), the per-channel / tensor factor applied to its output.
Without the C library (no compiler, or LOWBIT_NO_C_KERNELS=1) every Linear dequantizes per
call in torch, computing exactly what the reference path loads.
"""

from __future__ import annotations

import functools

import torch

from ..formats.fp4 import E2M1_VALUES
from .clib import library


@functools.cache
def _tables() -> dict[str, torch.Tensor]:
    every_byte = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    e2m1 = torch.tensor(E2M1_VALUES)
    return {"fp8": every_byte.float(),
            "fp4": torch.cat([e2m1, -e2m1])}  # nibble: bit 3 the sign, bits 0-2 the magnitude


# The row kernels are custom ops (torch.library), not bare ctypes calls, so that torch.compile
# traces a decode step through them as opaque calls instead of breaking its graph at each one
# (runtime/compiled.py); each has a fake (shape-only) version for tracing.
@torch.library.custom_op("lowbit::fp8_gemv", mutates_args=())
def fp8_gemv(x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ codes.T as float32 [M, N] (codes float8_e4m3fn [N, K])."""
    x = x.float().contiguous()
    (m, k), n = x.shape, codes.shape[0]
    y = torch.empty(m, n)
    library().fp8_gemv(m, n, k, x.data_ptr(), codes.data_ptr(), _tables()["fp8"].data_ptr(), y.data_ptr())
    return y


@fp8_gemv.register_fake
def _(x, codes):
    return x.new_empty(x.shape[0], codes.shape[0], dtype=torch.float32)


def fp8_to_bf16(codes: torch.Tensor) -> torch.Tensor:
    out = torch.empty(codes.shape, dtype=torch.bfloat16)
    library().fp8_to_bf16(*codes.shape, codes.data_ptr(), _tables()["fp8"].data_ptr(), out.data_ptr())
    return out


@torch.library.custom_op("lowbit::fp4_gemv", mutates_args=())
def fp4_gemv(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, e8m0: bool,
             group: int) -> torch.Tensor:
    """x [M, K] @ (E2M1 codes * group scales).T as float32 [M, N]; packed uint8 [N, K/2],
    scale [N, K/group] the stored scale bytes (E4M3, or E8M0 where e8m0), converted in the
    kernel: a float32 copy made per call would be written and read again every step, 4 bytes a
    group against the codes' 8 (NVFP4)."""
    x = x.float()
    xe, xo = x[:, 0::2].contiguous(), x[:, 1::2].contiguous()
    (m, k), n = x.shape, packed.shape[0]
    y = torch.empty(m, n)
    library().fp4_gemv(m, n, k, xe.data_ptr(), xo.data_ptr(), packed.data_ptr(), _tables()["fp4"].data_ptr(),
                       scale.contiguous().view(torch.uint8).data_ptr(), int(e8m0), _tables()["fp8"].data_ptr(),
                       group, y.data_ptr())
    return y


@fp4_gemv.register_fake
def _(x, packed, scale, e8m0, group):
    return x.new_empty(x.shape[0], packed.shape[0], dtype=torch.float32)


def fp4_to_bf16(packed: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
    n, k = packed.shape[0], packed.shape[1] * 2
    out = torch.empty(n, k, dtype=torch.bfloat16)
    library().fp4_to_bf16(n, k, packed.data_ptr(), _tables()["fp4"].data_ptr(), scale.data_ptr(),
                          group, out.data_ptr())
    return out


@torch.library.custom_op("lowbit::fp8_to_f32", mutates_args=())
def fp8_to_f32(codes: torch.Tensor) -> torch.Tensor:
    out = torch.empty(codes.shape)
    library().fp8_to_f32(codes.numel(), codes.data_ptr(), _tables()["fp8"].data_ptr(), out.data_ptr())
    return out


@fp8_to_f32.register_fake
def _(codes):
    return codes.new_empty(codes.shape, dtype=torch.float32)


# rows from which a dense GEMM on weights written out for the call beats the row kernels
# (bench/cpu_kernels.py, SmolLM2 shapes, docs/benchmarks.md)
DENSE_ROWS = 8


def dense_dtype(compute: torch.dtype) -> torch.dtype:
    """Every packed Linear's dense (prefill-sized) GEMM dtype: bf16 only where the model
    computes in bf16 and the CPU multiplies it natively, else float32. The C row kernels take
    float32 inputs as they come, so a float32 model's dense path must not round its inputs or
    weights to bf16 either: rounding W8A8 / W4A4 inputs to bf16 moves later layers' inputs
    across their quantization grid (on a tiny FP8 model it moved the logits by a third of what
    quantization does, against 1e-5 in float32), and the INT8 dense GEMM in bf16 raised
    SmolLM2 W8A16's float32 KL by 7.5 %."""
    from .kernels_cpu import dense_dtype as native

    return torch.bfloat16 if compute == torch.bfloat16 and native() == torch.bfloat16 else torch.float32


def _finish(y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = y.to(x.dtype).reshape(*x.shape[:-1], -1)
    return y if bias is None else y + bias


def fp8_mm(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, dense_from: int,
           dtype: torch.dtype, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ (E4M3 codes [N, K] * scale).T, scale float32 [N] (per channel) or [1]
    (per tensor) applied to the float32 product; rows >= dense_from: one dense GEMM in `dtype`
    on the codes (exact in bf16)."""
    flat = x.reshape(-1, x.shape[-1])
    if flat.shape[0] >= dense_from:
        y = torch.nn.functional.linear(flat.to(dtype), fp8_to_bf16(codes).to(dtype)).float()
    else:
        y = fp8_gemv(flat, codes)
    return _finish(y * scale, x, bias)


def fp4_units(scale: torch.Tensor, kind: str) -> torch.Tensor:
    """Stored group scales -> float32: E4M3 values (NVFP4, the global scale left out), or
    E8M0 exponents u -> 2^(u - 127) (MXFP4) by placing u in float32's exponent field."""
    if kind == "e4m3":
        return fp8_to_f32(scale.view(torch.uint8))
    u = scale.to(torch.int32)
    return torch.where(u > 0, (u << 23).view(torch.float32), 2.0**-127)


def fp4_mm(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, kind: str, group: int,
           divide: torch.Tensor | None, dense_from: int, dtype: torch.dtype,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ (E2M1 codes * group scales / divide).T: packed uint8 [N, K/2] as stored,
    stored group scales [N, K/group], NVFP4's global scale `divide` ([1], applied to the
    float32 output) or None. Rows >= dense_from: one dense GEMM in `dtype` on codes times
    group scales, exact in bf16 (2 significant bits times 4, or times a power of two)."""
    flat = x.reshape(-1, x.shape[-1])
    if flat.shape[0] >= dense_from:
        w = fp4_to_bf16(packed, fp4_units(scale, kind), group).to(dtype)
        y = torch.nn.functional.linear(flat.to(dtype), w).float()
    else:
        y = fp4_gemv(flat, packed, scale, kind == "e8m0", group)
    return _finish(y if divide is None else y / divide, x, bias)
