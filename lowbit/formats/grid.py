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
from .fp8 import E4M3_MAX, round_e4m3
from .int import int_range, round_int


@dataclass(frozen=True)
class QParams:
    """Scale (float32, broadcastable against the coded block) and optional zero point."""

    scale: torch.Tensor
    zero: torch.Tensor | None = None


def _scale_from_amax(amax: torch.Tensor, qmax: float, dtype: torch.dtype) -> torch.Tensor:
    """scale = amax / qmax (MLPerf FP8: amax / 448), made exactly representable in `dtype`.

    Consumers hold scales in the model's dtype (transformers casts them to bf16), so a scale is
    rounded *up* to that dtype before any code is computed with it: codes and stored scale then
    agree in every consumer, and rounding up never clips the calibrated maximum.
    """
    amax = amax.float()
    # An all-zero tensor or row has no range; any scale codes it exactly, 1.0 keeps it finite.
    # A subnormal amax would make amax / qmax underflow to a zero scale (x / 0 in every
    # consumer): the smallest normal float32 still covers it.
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax)).clamp(min=torch.finfo(torch.float32).tiny)
    stored = scale.to(dtype)
    below = stored.float() < scale
    return torch.where(below, torch.nextafter(stored, torch.full_like(stored, torch.inf)), stored)


def _check_finite(x: torch.Tensor) -> None:
    if not torch.isfinite(x).all():
        raise ValueError("cannot quantize a tensor containing NaN or Inf")


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
        return self.bind_amax(w.abs().amax())

    def bind_amax(self, amax: torch.Tensor) -> "ScaleGrid":
        """Per-tensor scale from an observed range (calibrated activations: no tensor to scan)."""
        return dataclasses.replace(self, tensor_scale=_scale_from_amax(amax, self.qmax, self.scale_dtype))

    def fit(self, block: torch.Tensor) -> QParams:
        """block: [rows, cols]; one scale per row, or the bound per-tensor scale.

        With several `shrink` candidates, each row takes the clipped range (p * amax) whose
        rounding gives the smallest squared error: on coarse grids (INT4) a slightly clipped
        range beats the full one, because most weights are far from the row's maximum.
        """
        _check_finite(block)
        if self.spec.granularity == "tensor":
            bound = self.tensor_scale if self.tensor_scale is not None else self.bind(block).tensor_scale
            return QParams(bound.reshape(1, 1))
        amax = block.abs().amax(dim=-1, keepdim=True)
        best, best_err = None, None
        for p in self.shrink:
            cand = QParams(_scale_from_amax(amax * p, self.qmax, self.scale_dtype))
            if len(self.shrink) == 1:
                return cand
            err = (self.decode(self.encode(block, cand), cand).double() - block.double()).pow(2).sum(-1, keepdim=True)
            if best is None:
                best, best_err = cand, err
            else:
                better = err < best_err
                best = QParams(torch.where(better, cand.scale, best.scale))
                best_err = torch.minimum(err, best_err)
        return best

    def encode(self, x: torch.Tensor, p: QParams, work: torch.dtype = torch.float64) -> torch.Tensor:
        """Codes of x. Weights divide in float64, where the quotient is exact enough that the
        only rounding is the grid's; activations pass work=float32, as a runtime computes them."""
        _check_finite(x)
        return self.round(x.to(work) / p.scale.to(work))

    def decode(self, codes: torch.Tensor, p: QParams) -> torch.Tensor:
        return codes.to(p.scale.dtype) * p.scale


@dataclass(frozen=True)
class AffineGrid(ScaleGrid):
    """An asymmetric integer grid: codes = round(x / scale + zero) on [qmin, qmax].

    Each block's range [min(x, 0), max(x, 0)] spans the whole code range; zero is an integer
    code (the one that decodes to 0.0), so zero stays exactly representable.
    """

    def fit(self, block: torch.Tensor) -> QParams:
        _check_finite(block)
        qmin, qmax = int_range(self.spec.bits)
        lo = block.amin(dim=-1, keepdim=True).clamp(max=0).float()
        hi = block.amax(dim=-1, keepdim=True).clamp(min=0).float()
        scale = _scale_from_amax(hi - lo, qmax - qmin, self.scale_dtype)
        zero = torch.round(qmin - lo.double() / scale.double()).clamp(qmin, qmax).to(torch.int8)
        return QParams(scale, zero)

    def encode(self, x: torch.Tensor, p: QParams, work: torch.dtype = torch.float64) -> torch.Tensor:
        _check_finite(x)
        return self.round(x.to(work) / p.scale.to(work) + p.zero.to(work))

    def decode(self, codes: torch.Tensor, p: QParams) -> torch.Tensor:
        # compressed-tensors: (x_q - zero_point) * scale, all in the scale's dtype
        return (codes.to(p.scale.dtype) - p.zero.to(p.scale.dtype)) * p.scale


INT_SHRINK = tuple(1 - 0.02 * i for i in range(16))  # 1.00, 0.98, ..., 0.70


def grid_for(spec: QuantSpec, scale_dtype: torch.dtype = torch.float32) -> ScaleGrid:
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
    raise NotImplementedError(f"no numerics for {spec}")


def qdq(grid: ScaleGrid, x: torch.Tensor, p: QParams | None = None) -> torch.Tensor:
    """Quantize-dequantize activations x[..., features] (p=None: dynamic, fitted per row)."""
    flat = x.reshape(-1, x.shape[-1])
    p = grid.fit(flat) if p is None else p
    return grid.decode(grid.encode(flat, p, torch.float32), p).to(x.dtype).reshape(x.shape)


def activation_qdq(spec: QuantSpec, scale: torch.Tensor | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> quantize-dequantize(x) as a runtime computes it: with the stored static per-tensor
    `scale`, or (dynamic specs) with float32 scales fitted to each token at run time."""
    grid = grid_for(spec)
    if spec.dynamic:
        return lambda x: qdq(grid, x)
    p = QParams(scale.float().reshape(1, 1))
    return lambda x: qdq(grid, x, p)


@dataclass
class Quantized:
    """What an algorithm returns: codes [out, in], scales in their export shape, the grid."""

    codes: torch.Tensor
    scale: torch.Tensor  # tensor: [1]; channel: [out, 1]; group: [out, in // group_size]
    grid: ScaleGrid
    zero: torch.Tensor | None = None  # int8 codes, shaped like scale (asymmetric grids)

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
        return self.grid.decode(self.codes, self.params())

    def rows(self, start: int, end: int) -> "Quantized":
        """Output rows [start, end): one member of a fused set quantized as one matrix."""
        per_row = self.grid.spec.granularity != "tensor"
        return Quantized(self.codes[start:end], self.scale[start:end] if per_row else self.scale,
                         self.grid, self.zero[start:end] if self.zero is not None else None)
