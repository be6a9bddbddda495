"""Linears that keep their stored integer weights packed: one class per stored format, the
kernel picked once when the checkpoint is loaded (by format, shape and the machine's ISA), so
forward() never branches. Each keeps plain tensors as buffers (no tensor subclasses)."""

from __future__ import annotations

import weakref
from functools import partial

import torch
from torch import nn

from ..formats.grid import Quantized, activation_qdq
from ..formats.pack import pack_fp4, unpack_fp4
from ..schemes import QuantSpec
from . import kernels_cpu as K
from . import kernels_fp as F


class _Packed(nn.Module):
    """What every packed Linear shares: its shape, an optional bias, the chosen kernel. Inputs
    are quantized (and rotated) by the loader's forward pre-hook, as on the reference path,
    unless `quantizes_inputs` (FBGEMM's W8A8 quantizes its own)."""

    quantizes_inputs = False

    def __init__(self, q: Quantized, dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = q.codes.shape
        self.bias: nn.Parameter | None = None  # set by the loader, like any parameter
        self.kernel = "dequant"  # the fallback; subclasses name the kernel they chose

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._mm(x, bias=self.bias)  # the kernel bound at load

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"


class Int4Linear(_Packed):
    """INT4 weights in groups of 32-256, symmetric or with zero points (W4A16): the C library's
    integer kernel (kernels_cpu.int4_c_mm) where it is built, else torch's int4pack, else the
    dequantizing fallback. `dense=False` keeps prefill-sized inputs on the packed kernel too
    (tests compare the two); `c=False` skips the C kernel."""

    def __init__(self, q: Quantized, dtype: torch.dtype, fast: bool = True, dense: bool = True,
                 c: bool = True):
        super().__init__(q, dtype)
        g = q.grid.spec.group_size
        if fast and c and K.int4_c_supported(self.in_features, g):
            self.kernel = "int4-c"
            packed, s, c = K.int4_c_pack(q.codes, q.scale, q.zero)
            self.register_buffer("weight_packed", packed)
            self.register_buffer("weight_scale", s)
            self.register_buffer("weight_offset", c)
            self.dense_from = K.DENSE_ROWS["int4-c"] if dense else K.NEVER
            self._mm = partial(K.int4_c_mm, packed=packed, s=s, c=c, group=g,
                               dense_from=self.dense_from, dtype=F.dense_dtype(dtype))
        elif fast and K.int4_supported(self.out_features, self.in_features, g):
            self.kernel = "int4pack"
            packed, scale_offset = K.int4_pack(q.codes, q.scale, q.zero)
            self.register_buffer("weight_int4pack", packed)
            self.register_buffer("weight_scale_offset", scale_offset)
            # prefill-sized inputs dequantize for the call, where the unpacker reads this layout
            unpacked = K.int4_unpack(packed, self.out_features, self.in_features)
            known = unpacked is not None and torch.equal(unpacked, (q.codes.T + 8).to(torch.uint8))
            self.dense_from = K.DENSE_ROWS["int4"] if known and dense else K.NEVER
            self._mm = partial(K.int4_mm, packed=packed, scale_offset=scale_offset, group=g,
                               dense_from=self.dense_from, dtype=F.dense_dtype(dtype))
        else:
            _dequant_buffers(self, q, g)


class Int8Linear(_Packed):
    """INT8 per-channel weights, 16-bit activations (W8A16): the C library's row kernel on
    float32 inputs where it is built (`c=False` skips it), else torch's int8pack, else the
    dequantizing fallback."""

    def __init__(self, q: Quantized, dtype: torch.dtype, fast: bool = True, dense: bool = True,
                 c: bool = True):
        super().__init__(q, dtype)
        c = fast and c and K.library() is not None
        if c or (fast and K.int8_weight_supported(self.in_features)):
            self.kernel = "int8-c" if c else "int8pack"
            # float32 scales for the C kernel (a bf16 scale converts exactly); int8pack takes bf16
            scale = q.scale.reshape(-1).to(torch.float32 if c else torch.bfloat16)
            codes = q.codes.contiguous()
            self.register_buffer("weight", codes)
            self.register_buffer("weight_scale", scale)
            self.dense_from = K.DENSE_ROWS["int8"] if dense else K.NEVER
            self._mm = partial(K.int8_weight_mm, codes=codes, scale=scale, dense_from=self.dense_from,
                               dtype=F.dense_dtype(dtype), c=c)
        else:
            _dequant_buffers(self, q, self.in_features)


class Int8DynamicLinear(_Packed):
    """INT8 per-channel weights, INT8 inputs quantized per token at run time (W8A8 dynamic):
    FBGEMM's integer product on the reference's input codes, formed by the C library (or, with
    `c=False` or without it, by torch)."""

    quantizes_inputs = True

    def __init__(self, q: Quantized, dtype: torch.dtype, inputs: QuantSpec, fast: bool = True,
                 c: bool = True):
        super().__init__(q, dtype)
        if fast and K.int8_dynamic_supported():
            self.kernel = "fbgemm"
            # FBGEMM keeps its own packed copy; the int8 codes are not kept beside it
            handle = K.int8_dynamic_pack(q.codes.contiguous(), q.scale.reshape(-1).float())
            weakref.finalize(self, K.int8_dynamic_release, handle)
            self.fbgemm_bytes = q.codes.numel() + 8 * self.out_features  # codes + double scales
            # AVX512-VNNI accumulates u8*s8 products in 32 bits; AVX2's vpmaddubsw saturates
            halves = not torch.cpu._is_vnni_supported()
            self._mm = partial(K.int8_dynamic_mm, handle=handle, n=self.out_features, halves=halves,
                               c_codes=c and K.library() is not None)
        else:
            _dequant_buffers(self, q, self.in_features)
            quant, mm = activation_qdq(inputs), self._mm
            self._mm = lambda x, bias: mm(quant(x), bias=bias)


class Fp8Linear(_Packed):
    """FP8 E4M3 weights, per-tensor or per-channel scales, one byte a weight (W8A16_FP8, and the
    weights of FP8 / FP8_DYNAMIC, whose inputs the loader's hook quantizes as the reference does)."""

    def __init__(self, q: Quantized, dtype: torch.dtype, fast: bool = True):
        super().__init__(q, dtype)
        codes = q.codes.contiguous()
        scale = q.scale.float().reshape(-1)  # [N] or [1]: what the reference multiplies in float32
        self.register_buffer("weight", codes)
        self.register_buffer("weight_scale", scale)
        if fast and F.library() is not None:
            self.kernel = "fp8-c"
            self._mm = partial(F.fp8_mm, codes=codes, scale=scale, dense_from=F.DENSE_ROWS,
                               dtype=F.dense_dtype(dtype))
        else:  # the reference path's weights, codes.to(float32) * scale, formed per call
            self._mm = lambda x, bias: torch.nn.functional.linear(
                x, (codes.float() * scale.unsqueeze(-1)).to(x.dtype), bias)


class Fp4Linear(_Packed):
    """NVFP4 / MXFP4 weights as stored: two E2M1 codes a byte, one E4M3 (NVFP4, groups of 16,
    under a float32 global scale) or E8M0 (MXFP4, groups of 32) scale a group (NVFP4A16,
    MXFP4A16, and the weights of NVFP4 / MXFP4, inputs quantized and rotated by the hook)."""

    def __init__(self, q: Quantized, dtype: torch.dtype, fast: bool = True):
        super().__init__(q, dtype)
        grid, g = q.grid, q.grid.spec.group_size
        packed = pack_fp4(q.codes)
        self.register_buffer("weight_packed", packed)
        self.register_buffer("weight_scale", q.scale.contiguous())
        gs = None if grid.tensor_scale is None else grid.tensor_scale.float().reshape(1)
        self.register_buffer("weight_global_scale", gs)
        if fast and F.library() is not None:
            self.kernel = "fp4-c"
            self._mm = partial(F.fp4_mm, packed=packed, scale=self.weight_scale, kind=grid.scale_kind,
                               group=g, divide=gs if grid.scale_kind == "e4m3" else None,
                               dense_from=F.DENSE_ROWS, dtype=F.dense_dtype(dtype))
        else:  # the reference path's weights, decoded per call by the same grid
            scale = self.weight_scale
            self._mm = lambda x, bias: torch.nn.functional.linear(
                x, Quantized(unpack_fp4(packed), scale, grid).dequantize().to(x.dtype), bias)


class DenseLinear(nn.Linear):
    """A float Linear (an unquantized layer, the lm_head) that multiplies a single row with a
    matrix-vector kernel (kernels_cpu.dense_mm). Still an nn.Linear, with the same parameters,
    so tying, hooks and state-dict names are unchanged."""

    c_gemv = False  # bf16 rows through the C kernel (set where the library is there)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return K.dense_mm(x, self.weight, self.bias, self.c_gemv)


def dense_linear(linear: nn.Linear, fast: bool = True) -> DenseLinear:
    """A DenseLinear holding `linear`'s own weight and bias (no copy); `fast=False` keeps
    torch's own kernels."""
    new = DenseLinear(linear.in_features, linear.out_features, bias=False, device="meta")
    new.weight, new.bias = linear.weight, linear.bias
    new.c_gemv = fast and F.library() is not None
    return new


def _dequant_buffers(m: _Packed, q: Quantized, group: int) -> None:
    """The fallback: int8 codes [N, K/group, group] with their scales (and zero points),
    dequantized on every call."""
    n, q = m.out_features, q.exact()  # float32 products, as on the reference path
    codes = q.codes.reshape(n, -1, group)
    scale = q.scale.reshape(n, -1, 1)
    zero = None if q.zero is None else q.zero.reshape(n, -1, 1)
    m.register_buffer("weight_codes", codes)
    m.register_buffer("weight_scale", scale)
    m.register_buffer("weight_zero_point", zero)
    m._mm = partial(K.dequant_mm, codes=codes, scale=scale, zero=zero)


def packed_linear(q: Quantized, inputs: QuantSpec | None, dtype: torch.dtype,
                  fast: bool = True) -> nn.Module | None:
    """The packed Linear for a stored weight and input spec, or None where the format has none
    yet (the caller keeps the dequantized reference Linear). `fast=False` forces the portable
    dequantize-per-call kernel. Input quantization other than FBGEMM's own is the caller's."""
    w = q.grid.spec
    if w.format == "fp8" and w.granularity in ("tensor", "channel"):
        return Fp8Linear(q, dtype, fast)
    if w.format in ("nvfp4", "mxfp4") and w.granularity == "group":
        return Fp4Linear(q, dtype, fast)
    if w.format != "int" or w.granularity not in ("group", "channel"):
        return None
    if inputs is None and w.bits == 4 and w.granularity == "group":
        return Int4Linear(q, dtype, fast)
    if w.bits == 8 and w.granularity == "channel" and q.zero is None:
        if inputs is None:
            return Int8Linear(q, dtype, fast)
        if inputs.format == "int" and inputs.bits == 8 and inputs.dynamic and inputs.symmetric \
                and inputs.granularity == "token":
            return Int8DynamicLinear(q, dtype, inputs, fast)
    return None


def resident_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (each storage once), FBGEMM's packed weights
    included: what the weights hold in memory."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total + sum(getattr(m, "fbgemm_bytes", 0) for m in model.modules())
