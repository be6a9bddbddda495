"""CPU matmul kernels for packed integer weights: plain functions on plain tensors.

Chosen by measurement (bench/cpu_kernels.py, one thread, SmolLM2 shapes; the tables, on this
session's Sapphire Rapids and on the same CPU restricted to AVX2, are in docs/benchmarks.md):
- INT4 groups of 64-512: lowbit's C kernel (int4_c_mm below, kernels.c), integer dot products on
  int16 inputs, 1.3-1.5x torch's int4pack reading from DRAM at Llama-3.2-1B shapes (bench/
  cpu_kernels.py --dram, AMD EPYC AVX512, one thread); group 32 and machines without the C
  library take int4pack:
- INT4 groups: torch's `_weight_int4pack_mm_for_cpu` is vectorized (AVX2 and AVX512) only for
  bf16 activations; with float32 ones it runs a scalar loop ~50x slower. So activations go in as
  bf16 whatever the compute dtype: at batch 1 it beats the dense bf16 and float32 layers and
  dequantizing per call (by 10-100x on AVX2, where float32 is the compute dtype).
- INT8 weights only: `_weight_int8pack_mm`, the same story (bf16 inputs only); lowbit's C row
  kernel (int8_gemv) takes float32 inputs as they come and read 1.05-1.65x faster than it at
  SmolLM2 and Llama-3.2-1B shapes (AMD EPYC AVX512, one thread), so it is the first choice.
- INT8 weights with per-token INT8 inputs: FBGEMM is the fastest at batch 1 and for a 256-token
  prefill on both ISAs. Its own dynamic linear picks another input grid than the checkpoint's
  (asymmetric, 255 steps), so the inputs are coded by the reference's rule first (in C: torch's
  dozen small ops for it cost twice the product) and FBGEMM multiplies those integer codes
  exactly (int8_dynamic_mm).
- Prefill: those two weight kernels cost ~35 us a row (576x1536, one thread), a dense GEMM on
  weights dequantized for the call costs ~1.6 ms (INT4) or ~0.4 ms (INT8) once plus ~3 us a
  row on AMX; so inputs of at least DENSE_ROWS rows take the dense path (`dense_from`).
  FBGEMM's W8A8 stays for every size: its 256-row call (3 ms) costs what unpacking its weight
  for a dense GEMM alone does.
Without the vector ISA (ATEN's DEFAULT capability, other architectures) the packed kernels run
scalar loops; there each Linear keeps int8 codes and dequantizes per call (`dequant_mm`).
"""

from __future__ import annotations

import itertools
import warnings

import torch

from ..formats.grid import activation_codes, activation_grid
from ..schemes import QuantSpec
from .clib import library

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


def dense_dtype() -> torch.dtype:
    """What a prefill-sized call dequantizes weights to: bf16 where the CPU multiplies it
    natively (AMX, AVX512-BF16), else float32 (a bf16 GEMM on AVX2 is ~10x slower than float32)."""
    from ..hardware import native_dtypes

    return torch.bfloat16 if torch.bfloat16 in native_dtypes() else torch.float32


def int4_unpack(packed: torch.Tensor, n: int, k: int) -> torch.Tensor | None:
    """Unsigned codes [K, N] (code + 8, uint8) from the int4pack layout, or None where this
    torch/ISA packs otherwise. torch 2.13 packs blocks of B = 64 (AVX512) or 32 (AVX2) output
    rows as [N/B, K, B/2] bytes, row j of a block in the low nibble and row j + B/2 in the high
    one (aten/src/ATen/native/cpu/int4mm_kernel.cpp); the loader checks the round trip."""
    b = 64 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else 32
    if n % b or packed.shape != (n, k // 2):
        return None
    q = packed.reshape(n // b, k, b // 2)
    return torch.cat([q & 15, q >> 4], -1).permute(1, 0, 2).reshape(k, n)


def int4_dense_weight(packed: torch.Tensor, scale_offset: torch.Tensor, group: int,
                      dtype: torch.dtype) -> torch.Tensor:
    """The weights transposed, [K, N] in `dtype`: (u - 8) * scale + offset from the packed
    codes, rounded once by the product (the reference path's rounding) and once by the offset."""
    k, n = packed.shape[1] * 2, packed.shape[0]
    w = (int4_unpack(packed, n, k).view(torch.int8) - 8).to(dtype).view(k // group, group, n)
    # contiguous [K/g, 1, N] copies (1/g of the weights): a strided operand slows the products 5x
    scale, offset = (scale_offset[..., i].to(dtype).unsqueeze(1).contiguous() for i in (0, 1))
    return (w * scale).add_(offset).view(k, n)


# rows from which a dense GEMM on weights dequantized for the call beats the packed kernel:
# measured crossovers with bench/cpu_kernels.py on SmolLM2 shapes (docs/benchmarks.md)
# (torch's int4pack: 64; lowbit's C INT4 kernel: 8, where it cost 289 us against 250 for the
# dense bf16 GEMM at 8 rows of 576->1536 and 155 against 215 at 4, AMD EPYC AVX512-BF16)
DENSE_ROWS = {"int4": 64, "int4-c": 8, "int8": 16}
NEVER = 1 << 62  # no dense path (a layout the unpacker does not know, or forced off)


def int4_mm(x: torch.Tensor, packed: torch.Tensor, scale_offset: torch.Tensor, group: int,
            dense_from: int = NEVER, dtype: torch.dtype = torch.float32,
            bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ dequantized INT4 weights.T, activations rounded to bf16 (see module doc);
    inputs of `dense_from` rows or more through a dense GEMM in `dtype` on weights dequantized
    for the call."""
    flat = x.reshape(-1, x.shape[-1])
    if flat.shape[0] >= dense_from:
        y = torch.matmul(flat.to(dtype), int4_dense_weight(packed, scale_offset, group, dtype))
        y = y.to(x.dtype).reshape(*x.shape[:-1], -1)
        return y if bias is None else y + bias
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat.to(torch.bfloat16), packed, group, scale_offset)
    y = y.to(x.dtype).reshape(*x.shape[:-1], -1)
    return y if bias is None else y + bias


# INT4 weights times integer inputs in the C library (kernels.c). Each input row is quantized
# once per call to int16 per weight group (step max|x| / 32767, round half to even) and the dot
# products are integer, so a weight costs a nibble mask, a widening and half a multiply-add
# instruction, not a float conversion and an FMA (torch's int4pack kernel, compute-bound at
# batch 1: ~9 GB/s of the ~27 a sum reads on an AMD EPYC with AVX512, bench/cpu_kernels.py).
# int16 rather than llama.cpp's int8: the input step is 2^-15 of the group's max, finer than
# the bf16 rounding (2^-9 of each value) torch's kernel applies, where int8 inputs raised
# SmolLM2 W4A16's KL by 0.9 % (bench/packed_kl.py); the error bound the tests hold is
# |sum_k w_k dx_k| <= sum_g (max|x_g| / 65534) sum_(k in g) |w_k|.
def int4_c_supported(in_features: int, group: int) -> bool:
    # plain C (no AVX2) ran 5.8x slower than torch's int4pack here (8192x2048, g128, AVX512 CPU)
    # groups up to 512: the AVX512 sums of 256 u a (kernels.c) stay below 2^31
    return group % 64 == 0 and group <= 512 and in_features % group == 0 and library() is not None \
        and library().int4_vector_bits() > 0


def int4_c_pack(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Signed INT4 codes [N, K], group scales and zero points [N, K/g] in the C kernel's
    layout (kernels.c): u = code + 8, each 64 weights of a row as 16 little-endian 16-bit
    lanes, lane l holding u_l, u_(l+16), u_(l+32), u_(l+48) from its lowest nibble up; rows in
    pairs, group by group (row 2q's g/2 bytes of group j, then row 2q+1's), an odd last row on
    its own, [N, K/2] bytes in all; float32 scales s and int32 c = 8 + zero [N, K/g], so
    w = s * (u - c)."""
    n, k = codes.shape
    groups = scale.reshape(n, -1).shape[1]
    u = (codes.to(torch.int16) + 8).to(torch.uint8).reshape(n, k // 64, 4, 16)
    lanes = torch.stack([u[:, :, 0] | (u[:, :, 1] << 4), u[:, :, 2] | (u[:, :, 3] << 4)], -1)
    packed = _pair_rows(lanes.reshape(n, k // 2), groups, pair=True)
    s = scale.float().reshape(n, -1).contiguous()
    c = torch.full_like(s, 8, dtype=torch.int32) if zero is None else 8 + zero.to(torch.int32).reshape(n, -1)
    return packed, s, c.contiguous()


def _pair_rows(rows: torch.Tensor, groups: int, pair: bool) -> torch.Tensor:
    """Rows [N, B] of `groups` equal groups of bytes to int4_c_pack's pairs (pair=True) or back."""
    n, b = rows.shape
    even = n - n % 2
    head = rows[:even].reshape(even // 2, 2, groups, b // groups) if pair else \
        rows[:even].reshape(even // 2, groups, 2, b // groups)
    return torch.cat([head.transpose(1, 2).reshape(even, b), rows[even:]]).contiguous()


def int4_c_unpack(packed: torch.Tensor, groups: int) -> torch.Tensor:
    """The unsigned codes u [N, K] (uint8) back from int4_c_pack's layout (`groups` a row)."""
    n, h = packed.shape
    p = _pair_rows(packed, groups, pair=False).reshape(n, h // 32, 16, 2)
    lo, hi = p[..., 0], p[..., 1]
    return torch.stack([lo & 15, lo >> 4, hi & 15, hi >> 4], 2).reshape(n, 2 * h)


def int4_c_dense(packed: torch.Tensor, s: torch.Tensor, c: torch.Tensor, group: int,
                 dtype: torch.dtype) -> torch.Tensor:
    """The weights [N, K] in `dtype` (float32 or bf16): s * (u - c) in float32, exact for a
    16-bit scale (u - c is an integer below 32), rounded once to bf16."""
    n, k = packed.shape[0], packed.shape[1] * 2
    if dtype not in (torch.float32, torch.bfloat16):
        return int4_c_dense(packed, s, c, group, torch.float32).to(dtype)
    w = torch.empty(n, k, dtype=dtype)
    library().int4_dequant(n, k, group, packed.data_ptr(), s.data_ptr(), c.data_ptr(),
                           int(dtype == torch.bfloat16), w.data_ptr())
    return w


@torch.library.custom_op("lowbit::int4_gemv", mutates_args=())
def int4_gemv(x: torch.Tensor, packed: torch.Tensor, s: torch.Tensor, c: torch.Tensor,
              group: int) -> torch.Tensor:
    """x [M, K] (inputs quantized to int16 per group inside) @ the INT4 weights.T, float32 [M, N]."""
    x = x.float().contiguous()
    (m, k), n = x.shape, packed.shape[0]
    y = torch.empty(m, n)
    library().int4_gemv(m, n, k, group, x.data_ptr(), packed.data_ptr(), s.data_ptr(),
                        c.data_ptr(), y.data_ptr())
    return y


@int4_gemv.register_fake
def _(x, packed, s, c, group):
    return x.new_empty(x.shape[0], packed.shape[0], dtype=torch.float32)


def int4_c_mm(x: torch.Tensor, packed: torch.Tensor, s: torch.Tensor, c: torch.Tensor, group: int,
              dense_from: int = NEVER, dtype: torch.dtype = torch.float32,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ the INT4 weights.T: fewer than `dense_from` rows through the C row kernel,
    more through one dense GEMM in `dtype` on weights s * (u - c) formed for the call in float32
    (the reference path's weights: u - c is a small integer, so one rounding, to `dtype`)."""
    flat = x.reshape(-1, x.shape[-1])
    if flat.shape[0] >= dense_from:
        y = torch.nn.functional.linear(flat.to(dtype), int4_c_dense(packed, s, c, group, dtype))
    else:
        y = int4_gemv(flat, packed, s, c, group)
    y = y.to(x.dtype).reshape(*x.shape[:-1], -1)
    return y if bias is None else y + bias


@torch.library.custom_op("lowbit::int8_gemv", mutates_args=())
def int8_gemv(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] (float32 as it comes) @ (int8 codes [N, K] * float32 scale [N]).T, float32 [M, N]
    (kernels.c: exact products with the codes, float32 sums, the scale applied once a row)."""
    x = x.float().contiguous()
    (m, k), n = x.shape, codes.shape[0]
    y = torch.empty(m, n)
    library().int8_gemv(m, n, k, x.data_ptr(), codes.data_ptr(), scale.data_ptr(), y.data_ptr())
    return y


@int8_gemv.register_fake
def _(x, codes, scale):
    return x.new_empty(x.shape[0], codes.shape[0], dtype=torch.float32)


def int8_weight_mm(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                   dense_from: int = NEVER, dtype: torch.dtype = torch.float32, c: bool = False,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ (int8 codes [N, K] * per-channel scale [N]).T: rows through the C kernel
    (`c`, float32 scales, inputs as they come) or torch's int8pack (bf16 scales and inputs:
    in a float32 model that rounds every input to bf16, which raised SmolLM2 W8A16's KL by
    5-8 %); from `dense_from` rows a dense GEMM in `dtype` on the codes (exact in bf16), the
    scale applied to its output."""
    flat = x.reshape(-1, x.shape[-1])
    if flat.shape[0] >= dense_from:
        y = torch.nn.functional.linear(flat.to(dtype), codes.to(dtype)).float() * scale.float()
    elif c:
        y = int8_gemv(flat, codes, scale)
    else:
        y = torch._weight_int8pack_mm(flat.to(torch.bfloat16), codes, scale)
    y = y.to(x.dtype).reshape(*x.shape[:-1], -1)
    return y if bias is None else y + bias


# FBGEMM's packed weights by handle: a custom op (which torch.compile traces as one opaque call,
# runtime/compiled.py) takes tensors and numbers, not the packed-params object itself
_FBGEMM: dict[int, object] = {}
_HANDLES = itertools.count(1)  # never reused: a graph made for a freed model names its old handle


def int8_dynamic_pack(codes: torch.Tensor, scale: torch.Tensor) -> int:
    """A handle to FBGEMM's packed form of int8 codes [N, K] with per-channel scales [N]; it
    holds the packed weights until int8_dynamic_release(handle)."""
    with warnings.catch_warnings():  # quantized dtypes are deprecated, and the FBGEMM op with them
        warnings.simplefilter("ignore")
        w = torch._make_per_channel_quantized_tensor(
            codes, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0)
        packed = torch.ops.quantized.linear_prepack(w, None)
    handle = next(_HANDLES)
    _FBGEMM[handle] = packed
    return handle


def int8_dynamic_release(handle: int) -> None:
    _FBGEMM.pop(handle, None)


def _fbgemm_codes(codes: torch.Tensor, handle: int, halves: bool) -> torch.Tensor:
    """codes [M, K] (integers in [-128, 127], float32) @ the packed INT8 weights of `handle`,
    times their per-channel scales, float32 [M, N]: integer dot products, exact before the one
    float32 product with the scale. FBGEMM quantizes its input as round(x / 1) + zero point,
    so integer inputs pass through unchanged (uint8 code + 128). Without AVX512-VNNI its
    kernel sums u8 * s8 products in saturating 16-bit pairs (vpmaddubsw), which 255 * 127 * 2
    overflows; `halves` then splits each code as 2h + l, h in [-64, 63] (uint8 <= 127) and l in
    {0, 1}, two calls whose pair sums stay below 2^15, so the result is still exact."""
    op, w = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32, _FBGEMM[handle]
    if not halves:
        return op(codes, 1.0, 128, w)
    h = torch.floor(codes * 0.5)
    return op(h, 1.0, 64, w).mul_(2.0).add_(op(codes - 2.0 * h, 1.0, 0, w))


def int8_token_codes(x: torch.Tensor, c: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric INT8 codes (float32 [M, K]) and scales ([M, 1]) of float32 x
    [M, K] by the reference path's rule (formats/grid.activation_codes), with `c` in one pass
    of the C library's copy of that rule: the rule's dozen small torch ops cost ~60 us a call,
    twice FBGEMM's whole product for a SmolLM2 layer."""
    if not c:
        codes, p = activation_codes(TOKEN_INT8_GRID, x)
        return codes.float(), p.scale
    x = x.contiguous()
    codes, scale = torch.empty_like(x), x.new_empty(x.shape[0], 1)
    library().int8_token_codes(x.shape[0], x.shape[1], x.data_ptr(), codes.data_ptr(), scale.data_ptr())
    return codes, scale


TOKEN_INT8_GRID = activation_grid(QuantSpec("int", 8, "token", dynamic=True))  # W8A8's inputs


@torch.library.custom_op("lowbit::int8_dynamic", mutates_args=())
def _int8_dynamic(x: torch.Tensor, handle: int, n: int, halves: bool, c: bool) -> torch.Tensor:
    codes, scale = int8_token_codes(x, c)
    return _fbgemm_codes(codes, handle, halves).mul_(scale)


@_int8_dynamic.register_fake
def _(x, handle, n, halves, c):
    return x.new_empty(x.shape[0], n)


def int8_dynamic_mm(x: torch.Tensor, handle: int, n: int, halves: bool, c_codes: bool = False,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] with per-token INT8 inputs @ the packed INT8 weights [N = n, K] of `handle`,
    integer dot products. The inputs are quantized by the reference path's own rule
    (int8_token_codes: symmetric, step max|x| / 127 per token; `c_codes`: in C), so the codes
    are the reference's and the output differs from it only by float32 rounding; the token's
    scale is multiplied back. (FBGEMM's own dynamic quantization picks an asymmetric 255-step
    grid, which moved SmolLM2 W8A8_INT8's KL by 2-3 %.) `halves`: no AVX512-VNNI
    (_fbgemm_codes). One custom op, so torch.compile calls it as one opaque step."""
    y = _int8_dynamic(x.reshape(-1, x.shape[-1]).float(), handle, n, halves, c_codes)
    y = y.to(x.dtype).reshape(*x.shape[:-1], -1)
    return y if bias is None else y + bias


@torch.library.custom_op("lowbit::bf16_gemv", mutates_args=())
def bf16_gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ bf16 weight [N, K].T in float32 [M, N] (kernels.c: products exact, float32 sums)."""
    x = x.float().contiguous()
    (m, k), n = x.shape, weight.shape[0]
    y = torch.empty(m, n)
    library().bf16_gemv(m, n, k, x.data_ptr(), weight.data_ptr(), y.data_ptr())
    return y


@bf16_gemv.register_fake
def _(x, weight):
    return x.new_empty(x.shape[0], weight.shape[0], dtype=torch.float32)


@torch.library.custom_op("lowbit::attention_decode", mutates_args=())
def attention_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     scale: float) -> torch.Tensor:
    """One query token's attention, float32 [H, D]: q [H, D], k and v [KVH, L, D] (float32 or
    bf16, rows contiguous, one head stride), query head h on KV head h // (H // KVH); mask None,
    bool (attend where true) or additive float32, L values shared by every head. The C kernel
    reads only the positions the mask leaves, and with none left gives zeros."""
    q = q.float().contiguous()
    (h, d), (kvh, length, _) = q.shape, k.shape
    kind, m = (0, None) if mask is None else (1, mask.contiguous()) if mask.dtype == torch.bool \
        else (2, mask.float().contiguous())
    out = torch.empty(h, d)
    library().attn_decode(h, kvh, length, d, k.stride(0), q.data_ptr(), k.data_ptr(), v.data_ptr(),
                          int(k.dtype == torch.bfloat16), 0 if m is None else m.data_ptr(), kind,
                          scale, out.data_ptr())
    return out


@attention_decode.register_fake
def _(q, k, v, mask, scale):
    return q.new_empty(q.shape, dtype=torch.float32)


def attention_decode_fits(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          mask: torch.Tensor | None) -> bool:
    """Whether attention_decode computes sdpa's attention for these [B, heads, len, D] tensors:
    batch 1, one query, float32/bf16 (all one dtype), keys and values laid out alike with
    contiguous rows, a mask (if any) of one row for all heads. (Whether the C library is built is the caller's
    question, asked outside torch.compile's tracing, which cannot step into it.)"""
    b, h, n, d = query.shape
    kv = key.shape
    return (b == 1 and n == 1 and kv[0] == 1 and value.shape == kv and kv[-1] == d and h % kv[1] == 0
            and query.dtype == key.dtype == value.dtype and key.dtype in (torch.float32, torch.bfloat16)
            and key.stride()[1:] == value.stride()[1:] and key.stride(-1) == 1 and key.stride(-2) == d
            and (mask is None or (mask.numel() == kv[2] and mask.shape[-1] == kv[2]
                                  and mask.dtype in (torch.bool, torch.float32, query.dtype))))


GEMV_ROWS = 8  # fewer rows than this go through a matrix-vector kernel (see dense_mm)


def dense_mm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
             c_gemv: bool = False) -> torch.Tensor:
    """x [..., K] @ weight [N, K].T for a float weight. Decode-sized inputs (a step, the last
    position's logits) take a matrix-vector kernel that reads the weights once: for bf16 the C
    one, 4.5x faster than torch.mv (49152x2048, one thread, AMD EPYC AVX512-BF16: 8.1 against
    36 ms, 25 GB/s of the 27 a sum reads) and exact in its products; for float32 torch.mv (19
    GB/s there), since F.linear's GEMM for one row ran 1.7-2.9x slower (576x49152, Sapphire
    Rapids). For the lm_head of a small model that call is a third of a step. `c_gemv`: the
    C library is there (decided at load, not per call)."""
    rows = x.numel() // x.shape[-1]
    if c_gemv and weight.dtype == torch.bfloat16 and rows < GEMV_ROWS:
        y = bf16_gemv(x.reshape(rows, -1), weight).to(x.dtype).reshape(*x.shape[:-1], -1)
        return y if bias is None else y + bias
    if rows != 1:
        return torch.nn.functional.linear(x, weight, bias)
    y = torch.mv(weight, x.reshape(-1)).reshape(*x.shape[:-1], -1)
    return y if bias is None else y + bias


def dequant_mm(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """The portable fallback: codes [N, G, g] (g = K for per-channel) dequantized on every
    call as compressed-tensors defines it, (code - zero) * scale in the scale's dtype (float32
    for 16-bit scales, as on the reference path), so the weights equal the reference path's."""
    w = codes.to(scale.dtype) if zero is None else codes.to(scale.dtype) - zero.to(scale.dtype)
    w = (w * scale).reshape(codes.shape[0], -1).to(x.dtype)
    return torch.nn.functional.linear(x, w, bias)
