"""CPU matmul kernels for packed integer weights: plain functions on plain tensors.

Chosen by measurement (bench/cpu_kernels.py, one thread, SmolLM2 shapes; the tables, on this
session's Sapphire Rapids and on the same CPU restricted to AVX2, are in docs/benchmarks.md):
- INT4 groups: torch's `_weight_int4pack_mm_for_cpu` is vectorized (AVX2 and AVX512) only for
  bf16 activations; with float32 ones it runs a scalar loop ~50x slower. So activations go in as
  bf16 whatever the compute dtype: at batch 1 it beats the dense bf16 and float32 layers and
  dequantizing per call (by 10-100x on AVX2, where float32 is the compute dtype).
- INT8 weights only: `_weight_int8pack_mm`, the same story.
- INT8 weights with per-token INT8 inputs: FBGEMM's dynamic linear (`quantized::linear_dynamic`)
  is the fastest at batch 1 and for a 256-token prefill on both ISAs; quantizing inputs in torch
  for `torch._int_mm` costs more than the matmul.
Not yet handled: for prefill-sized batches the INT4/INT8 weight kernels are slower than a dense
bf16 GEMM (AMX) would be on the dequantized weights.
Without the vector ISA (ATEN's DEFAULT capability, other architectures) the packed kernels run
scalar loops; there each Linear keeps int8 codes and dequantizes per call (`dequant_mm`).
"""

from __future__ import annotations

import warnings

import torch

from ..formats.grid import abs_max

# torch's int4 CPU packing needs output rows in multiples of 16; the int8 kernel reads K in
# blocks of 16 (it crashes on K = 72 or 88 in torch 2.13, checked here)
INT4_GROUP_SIZES = (32, 64, 128, 256)


def vector_isa() -> bool:
    """Whether ATen's CPU kernels run vectorized (AVX2 or AVX512) on this machine."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX")


def int4_supported(out_features: int, in_features: int, group: int) -> bool:
    return vector_isa() and group in INT4_GROUP_SIZES and out_features % 16 == 0 \
        and in_features % group == 0


def int8_weight_supported(in_features: int) -> bool:
    return vector_isa() and in_features % 16 == 0


def int8_dynamic_supported() -> bool:
    return vector_isa() and "fbgemm" in torch.backends.quantized.supported_engines


def int4_pack(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed INT4 codes [N, K], group scales [N, K/g] and zero points (int codes, or None) in
    the kernel's layout: packed uint8 (ISA-dependent, so packed at load) and [K/g, N, 2] bf16
    (scale, offset) with w = (u - 8) * scale + offset for unsigned u = code + 8, so
    offset = -zero * scale (compressed-tensors: w = (code - zero) * scale)."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu((codes.to(torch.int32) + 8), 1)
    s = scale.float()
    offset = torch.zeros_like(s) if zero is None else -zero.float() * s
    # scales come stored in bf16 or wider; bf16 holds a bf16 scale exactly, and the offset to
    # within 2^-9 of |zero * scale| <= 8 * scale: at most 1/64 of a quantization step
    return packed, torch.stack([s, offset], -1).transpose(0, 1).contiguous().to(torch.bfloat16)


def int4_mm(x: torch.Tensor, packed: torch.Tensor, scale_offset: torch.Tensor, group: int,
            bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ dequantized INT4 weights.T, activations rounded to bf16 (see module doc)."""
    flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, packed, group, scale_offset)
    y = y.to(x.dtype).reshape(*x.shape[:-1], -1)
    return y if bias is None else y + bias


def int8_weight_mm(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ (int8 codes [N, K] * per-channel scale [N]).T, activations in bf16."""
    flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
    y = torch._weight_int8pack_mm(flat, codes, scale).to(x.dtype).reshape(*x.shape[:-1], -1)
    return y if bias is None else y + bias


def int8_dynamic_pack(codes: torch.Tensor, scale: torch.Tensor):
    """FBGEMM's packed form of int8 codes [N, K] with per-channel scales [N]."""
    with warnings.catch_warnings():  # quantized dtypes are deprecated, and the FBGEMM op with them
        warnings.simplefilter("ignore")
        w = torch._make_per_channel_quantized_tensor(
            codes, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0)
        return torch.ops.quantized.linear_prepack(w, None)


def int8_dynamic_mm(x: torch.Tensor, packed, reduce_range: bool,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] with per-token INT8 inputs @ packed INT8 weights, integer dot products.

    FBGEMM picks one (asymmetric, uint8) input scale for the whole matrix; dividing each token
    by its own max |x| first makes that scale per token: every row spans at most [-1, 1], so a
    row's quantization step is 2/255 of its max |x| (2/127 with reduce_range), against 1/127
    for the symmetric int8 grid the checkpoint's spec names. The product is multiplied back.
    `reduce_range` (7-bit inputs) is what AVX2 needs: its vpmaddubsw saturates 16-bit pair sums.
    """
    flat = x.reshape(-1, x.shape[-1]).float()
    amax = abs_max(flat, -1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    y = torch.ops.quantized.linear_dynamic(flat / amax, packed, reduce_range) * amax
    y = y.to(x.dtype).reshape(*x.shape[:-1], -1)
    return y if bias is None else y + bias


def dequant_mm(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """The portable fallback: codes [N, G, g] (g = K for per-channel) dequantized on every
    call as compressed-tensors defines it, (code - zero) * scale in the scale's dtype (float32
    for 16-bit scales, as on the reference path), so the weights equal the reference path's."""
    w = codes.to(scale.dtype) if zero is None else codes.to(scale.dtype) - zero.to(scale.dtype)
    w = (w * scale).reshape(codes.shape[0], -1).to(x.dtype)
    return torch.nn.functional.linear(x, w, bias)
