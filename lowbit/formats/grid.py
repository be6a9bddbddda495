"""The Grid a format presents to algorithms, and what an algorithm returns (Quantized).

A Grid answers four questions and nothing else:
  bind(w)           tensor-level parameters, fixed once (an FP8 per-tensor scale). Binding on the
                    concatenated q/k/v weights is how a fused group shares one scale.
  fit(block)        parameters of one row-block (per channel, per group, per token).
  encode(x, p)      codes, rounding with frozen parameters: the only place rounding happens.
  decode(codes, p)  float32 values, computed exactly as compressed-tensors dequantizes
                    (codes.to(scale dtype) * scale), so our weights and a consumer's agree bit for bit.
Algorithms never look at the format: it is a parameter, not a branch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch

from ..schemes import QuantSpec
from .fp4 import FP4Grid
from .fp8 import E4M3_MAX, round_e4m3
from .int import int_range, round_int


@dataclass(frozen=True)
class QParams:
    """Scale (float32, broadcastable against the coded block) and optional zero point."""

    scale: torch.Tensor
    zero: torch.Tensor | None = None


def abs_max(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """max |x| over `dim` (all of x when None) from one aminmax pass: x.abs() would first copy
    x, which costs 2.3x per call on activations. NaN propagates, as through abs().amax()."""
    lo, hi = torch.aminmax(x) if dim is None else torch.aminmax(x, dim=dim, keepdim=keepdim)
    return torch.maximum(hi, -lo)


def _scale_from_amax(amax: torch.Tensor, qmax: float, dtype: torch.dtype) -> torch.Tensor:
    """scale = amax / qmax (MLPerf FP8: amax / 448), at least 2^-126, exact in `dtype`.

    Consumers hold scales in the model's dtype (transformers casts them to bf16), so a scale is
    rounded *up* to that dtype before any code is computed with it: codes and stored scale then
    agree in every consumer, and rounding up never clips the calibrated maximum. Where the 2^-126
    floor applies (amax < qmax * 2^-126) the round-trip error of the smallest values is absolute,
    not relative: see the comment on the floor.
    """
    amax = amax.float()
    # An all-zero tensor or row has no range; any scale codes it exactly, 1.0 keeps it finite.
    # Divide by a tensor, not a Python number: CUDA turns division by a scalar into
    # multiplication by its reciprocal, which rounds differently and changes stored scales.
    # A subnormal amax would make amax / qmax underflow to a zero scale (x / 0 in every
    # consumer), and a scale below 2^-128 has no finite float32 reciprocal (vLLM's static FP8
    # quant kernel multiplies by 1 / scale): the smallest normal float32, 2^-126, survives both
    # and still covers the range. The price: values are coded against 2^-126 instead of
    # amax / qmax, to within half an E4M3 step of x / 2^-126 (2^-136 absolute below 2^-132), and
    # decode (codes * scale in the scale's dtype, as compressed-tensors computes it) rounds a
    # product below 2^-126 onto that dtype's subnormal grid: in bf16 multiples of 2^-133, up to
    # 2^-134 off, more than the E4M3 step itself.
    # No scale rule can do better there, since the decoded value is a bf16 number (issue 14:
    # x = 2.0468e-40 decodes to 2^-132, the nearest bf16 number; tests/test_properties.py).
    scale = torch.where(amax > 0, amax / torch.full_like(amax, qmax), torch.ones_like(amax))
    scale = scale.clamp(min=torch.finfo(torch.float32).tiny)
    stored = scale.to(dtype)
    below = stored.float() < scale
    return torch.where(below, _next_up(stored), stored)


_SAME_WIDTH_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _next_up(x: torch.Tensor) -> torch.Tensor:
    """The next representable value above positive finite x, by stepping its bit pattern.
    (torch.nextafter on CUDA steps bf16 in float32 and rounds back, returning x itself.)"""
    bits = x.view(_SAME_WIDTH_INT[x.element_size()])
    return (bits + 1).view(x.dtype)


ROW_CHUNK = 1 << 20  # elements of row-wise work at a time (8 MiB of float64 temporaries)


def _slice_rows(t: torch.Tensor | None, start: int, end: int, rows: int):
    """Rows [start, end) of a parameter that has one row per block row; a shared one as is."""
    return t[start:end] if t is not None and t.dim() > 0 and t.shape[0] == rows else t


def _by_rows(f: Callable, x: torch.Tensor, p: QParams | None = None):
    """f(x, p) computed over chunks of rows and concatenated.

    Encoding and fitting are row-wise (every operation is elementwise or reduces within a
    row), so chunking gives bit-identical results while a 7B layer's float64 working copies
    take megabytes instead of gigabytes.
    """
    rows = x.shape[0] if x.dim() > 1 else 1
    step = max(1, ROW_CHUNK // max(1, x.numel() // max(rows, 1)))
    if x.dim() < 2 or rows <= step:
        return f(x) if p is None else f(x, p)
    parts = []
    for a in range(0, rows, step):
        b = min(a + step, rows)
        if p is None:
            parts.append(f(x[a:b]))
        else:
            parts.append(f(x[a:b], QParams(_slice_rows(p.scale, a, b, rows), _slice_rows(p.zero, a, b, rows))))
    if isinstance(parts[0], QParams):
        zero = None if parts[0].zero is None else torch.cat([q.zero for q in parts])
        return QParams(torch.cat([q.scale for q in parts]), zero)
    return torch.cat(parts)


def _check_finite(x: torch.Tensor) -> None:
    if not torch.isfinite(x).all():
        raise ValueError("cannot quantize a tensor containing NaN or Inf")


def best_per_row(grid, block: torch.Tensor, scales: list[torch.Tensor]) -> QParams:
    """Per row of `block`, the candidate scale whose round trip decode(encode(block)) has the
    smallest squared error, the first candidate winning ties; a lone candidate is taken as is.
    `block` is already known to be finite."""
    best, best_err = scales[0], None
    if len(scales) == 1:
        return QParams(best)
    for s in scales:
        p = QParams(s)
        err = (grid.decode(grid.encode(block, p, check=False), p).double() - block.double()).pow(2)
        err = err.sum(-1, keepdim=True)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        if s.element_size() == 1:  # FP8 / E8M0 scales: where() takes no float8, so pick the bytes
            best = torch.where(better, s.view(torch.uint8), best.view(torch.uint8)).view(s.dtype)
        else:
            best = torch.where(better, s, best)
        best_err = torch.minimum(err, best_err)
    return QParams(best)


@dataclass(frozen=True)
class ScaleGrid:
    """A symmetric grid: codes = round(clip(x / scale)), scale = amax / qmax per block."""

    spec: QuantSpec
    qmax: float
    round: Callable[[torch.Tensor], torch.Tensor]
    scale_dtype: torch.dtype = torch.float32  # the dtype scales are stored (and multiplied) in
    tensor_scale: torch.Tensor | None = None  # set by bind() for per-tensor specs
    shrink: tuple[float, ...] = (1.0,)  # candidate ranges, as fractions of amax (see fit)

    def bind(self, w: torch.Tensor) -> "ScaleGrid":
        if self.spec.granularity != "tensor":
            return self
        _check_finite(w)
        return self.bind_amax(torch.linalg.vector_norm(w, float("inf")))  # max |w|, without an |w| copy

    def bind_amax(self, amax: torch.Tensor) -> "ScaleGrid":
        """Per-tensor scale from an observed range (calibrated activations: no tensor to scan)."""
        return dataclasses.replace(self, tensor_scale=_scale_from_amax(amax, self.qmax, self.scale_dtype))

    def fit(self, block: torch.Tensor) -> QParams:
        """block: [rows, cols]; one scale per row, or the bound per-tensor scale.

        With several `shrink` candidates, each row takes the clipped range (p * amax) whose
        rounding gives the smallest squared error: on coarse grids (INT4) a slightly clipped
        range beats the full one, because most weights are far from the row's maximum.
        """
        if self.spec.granularity == "tensor":
            bound = self.tensor_scale if self.tensor_scale is not None else self.bind(block).tensor_scale
            return QParams(bound.reshape(1, 1))
        return _by_rows(self._fit_rows, block)

    def _fit_rows(self, block: torch.Tensor) -> QParams:
        amax = abs_max(block, -1, keepdim=True)
        if not torch.compiler.is_compiling():  # a compiled decode step cannot raise on a value
            _check_finite(amax)  # NaN and Inf propagate into the maximum: one check per row, not per value
        return best_per_row(self, block, [_scale_from_amax(amax * p, self.qmax, self.scale_dtype)
                                          for p in self.shrink])

    def encode(self, x: torch.Tensor, p: QParams, work: torch.dtype = torch.float64,
               check: bool = True) -> torch.Tensor:
        """Codes of x. Weights divide in float64, where the quotient is exact enough that the
        only rounding is the grid's; activations pass work=float32, as a runtime computes them,
        and check=False: a runtime does not scan them for NaN either, and the scan costs a pass."""
        if check:
            _check_finite(x)
        return _by_rows(lambda xs, ps: self.round(xs.to(work) / ps.scale.to(work)), x, p)

    def decode(self, codes: torch.Tensor, p: QParams) -> torch.Tensor:
        return codes.to(p.scale.dtype) * p.scale


@dataclass(frozen=True)
class AffineGrid(ScaleGrid):
    """An asymmetric integer grid: codes = round(x / scale + zero) on [qmin, qmax].

    Each block's range [min(x, 0), max(x, 0)] spans the whole code range; zero is an integer
    code (the one that decodes to 0.0), so zero stays exactly representable.
    """

    def fit(self, block: torch.Tensor) -> QParams:
        return _by_rows(self._fit_rows, block)

    def _fit_rows(self, block: torch.Tensor) -> QParams:
        qmin, qmax = int_range(self.spec.bits)
        lo = block.amin(dim=-1, keepdim=True).clamp(max=0).float()
        hi = block.amax(dim=-1, keepdim=True).clamp(min=0).float()
        _check_finite(hi - lo)
        scale = _scale_from_amax(hi - lo, qmax - qmin, self.scale_dtype)
        zero = torch.round(qmin - lo.double() / scale.double()).clamp(qmin, qmax).to(torch.int8)
        return QParams(scale, zero)

    def encode(self, x: torch.Tensor, p: QParams, work: torch.dtype = torch.float64,
               check: bool = True) -> torch.Tensor:
        if check:
            _check_finite(x)
        return _by_rows(lambda xs, ps: self.round(xs.to(work) / ps.scale.to(work) + ps.zero.to(work)), x, p)

    def decode(self, codes: torch.Tensor, p: QParams) -> torch.Tensor:
        # compressed-tensors: (x_q - zero_point) * scale, all in the scale's dtype
        return (codes.to(p.scale.dtype) - p.zero.to(p.scale.dtype)) * p.scale


INT_SHRINK = tuple(1 - 0.02 * i for i in range(16))  # 1.00, 0.98, ..., 0.70
FP4_SHRINK = tuple(1 - 0.05 * i for i in range(7))  # 1.00, 0.95, ..., 0.70 (NVFP4 group scales)


def grid_for(spec: QuantSpec, scale_dtype: torch.dtype = torch.float32) -> ScaleGrid | FP4Grid:
    """The one place a spec's format becomes numerics."""
    match spec.format, spec.bits, spec.symmetric:
        case "fp8", 8, True:
            return ScaleGrid(spec, E4M3_MAX, round_e4m3, scale_dtype)
        case "int", bits, True if 2 <= bits <= 8:
            # weights search a clipped range; runtime (dynamic) activations use amax as-is
            shrink = (1.0,) if spec.dynamic else INT_SHRINK
            return ScaleGrid(spec, float(int_range(bits)[1]), lambda s: round_int(s, bits), scale_dtype,
                             shrink=shrink)
        case "int", bits, False if 2 <= bits <= 8 and spec.granularity != "tensor":
            return AffineGrid(spec, float(int_range(bits)[1]), lambda s: round_int(s, bits), scale_dtype)
        # FP4 group scales have a stored dtype of their own (E4M3, E8M0): scale_dtype does not apply
        case "nvfp4", 4, True if spec.granularity == "group":
            return FP4Grid(spec, "e4m3", shrink=FP4_SHRINK)
        case "mxfp4", 4, True if spec.granularity == "group":
            return FP4Grid(spec, "e8m0", shrink=(1.0, 2.0))  # >1 candidate: floor and ceil exponent
    raise NotImplementedError(f"no numerics for {spec}")


def activation_codes(grid: ScaleGrid, flat: torch.Tensor, p: QParams | None = None
                     ) -> tuple[torch.Tensor, QParams]:
    """The codes and parameters of activations flat [rows, cols] as a runtime computes them
    (float32 quotients, no NaN scan), fitted per row where p is None: what qdq decodes, and
    what an integer kernel multiplies (runtime/kernels_cpu.int8_dynamic_mm)."""
    p = grid.fit(flat) if p is None else p
    return grid.encode(flat, p, torch.float32, check=False), p


def qdq(grid: ScaleGrid, x: torch.Tensor, p: QParams | None = None) -> torch.Tensor:
    """Quantize-dequantize activations x[..., features] (p=None: dynamic, fitted per row, or per
    group of `group_size` features for group specs)."""
    g = grid.spec.group_size if grid.spec.granularity == "group" else x.shape[-1]
    codes, p = activation_codes(grid, x.reshape(-1, g), p)
    if (p.zero is None and p.scale.numel() == 1 and not torch.compiler.is_compiling()
            and p.scale.to(x.dtype).float() == p.scale):
        # Codes (<= 8 significant bits) times a scale exact in x's dtype round once either
        # way, so decoding straight into x's dtype is bit-identical and saves two passes
        # (not taken in a compiled step: a branch on a value would break its graph, and
        # Inductor fuses the passes anyway).
        p = QParams(p.scale.to(x.dtype))
    return grid.decode(codes, p).to(x.dtype).reshape(x.shape)


def activation_grid(spec: QuantSpec) -> ScaleGrid | FP4Grid:
    """The grid activations of `spec` are quantized on at run time: scales follow the serving
    engine's rule, amax as it is (no clipped-range search)."""
    return dataclasses.replace(grid_for(spec), shrink=(1.0,))


def activation_qdq(spec: QuantSpec, scale: torch.Tensor | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> quantize-dequantize(x) as a runtime computes it: with the stored static per-tensor
    `scale`, or (dynamic specs) with float32 scales fitted to each token at run time."""
    grid = activation_grid(spec)
    if spec.dynamic:
        return lambda x: qdq(grid, x)
    if spec.granularity == "tensor":
        p = QParams(scale.float().reshape(1, 1))
        return lambda x: qdq(grid, x, p)
    grid = dataclasses.replace(grid, tensor_scale=scale.float().reshape(1))  # NVFP4 global scale
    return lambda x: qdq(grid, x)


@dataclass
class Quantized:
    """What an algorithm returns: codes [out, in], scales in their export shape, the grid."""

    codes: torch.Tensor
    scale: torch.Tensor  # tensor: [1]; channel: [out, 1]; group: [out, in // group_size]
    grid: ScaleGrid
    zero: torch.Tensor | None = None  # int8 codes, shaped like scale (asymmetric grids)
    mask: torch.Tensor | None = None  # bool [out, in], True where a weight was pruned (SparseGPT)

    def params(self) -> QParams:
        """Parameters broadcast against the full [out, in] code matrix."""
        scale, zero = self.scale, self.zero
        if self.grid.spec.granularity == "group":
            g = self.grid.spec.group_size
            scale = scale.repeat_interleave(g, dim=1)
            zero = zero.repeat_interleave(g, dim=1) if zero is not None else None
        elif scale.dim() == 1:
            scale = scale.reshape(1, 1)
        return QParams(scale, zero)

    def dequantize(self) -> torch.Tensor:
        if self.grid.spec.granularity != "group":
            return self.grid.decode(self.codes, self.params())
        # groups as a dimension of their own, so the scales broadcast instead of being repeated
        # to a full [out, in] float32 copy (0.28 GB for one 13B MLP matrix); the same products
        out, width = self.codes.shape
        g = self.grid.spec.group_size
        zero = None if self.zero is None else self.zero.unsqueeze(-1)
        grouped = self.grid.decode(self.codes.reshape(out, width // g, g),
                                   QParams(self.scale.unsqueeze(-1), zero))
        return grouped.reshape(out, width)

    def exact(self) -> "Quantized":
        """The same codes with 16-bit scales widened to float32, so that decode's codes * scale
        is exact (<= 8-bit codes times 8/11-bit scales), as vLLM's float32 scales compute it; a
        bf16 product rounds each weight (measured by `lowbit verify`: 0.2 nats on FP8_DYNAMIC
        SmolLM2). Cast to a 16-bit dtype afterwards, it rounds once, as a 16-bit product does."""
        if self.scale.dtype not in (torch.bfloat16, torch.float16):
            return self
        return dataclasses.replace(self, scale=self.scale.float())

    def rows(self, start: int, end: int) -> "Quantized":
        """Output rows [start, end): one member of a fused set quantized as one matrix."""
        per_row = self.grid.spec.granularity != "tensor"
        return Quantized(self.codes[start:end], self.scale[start:end] if per_row else self.scale,
                         self.grid, self.zero[start:end] if self.zero is not None else None,
                         self.mask[start:end] if self.mask is not None else None)
