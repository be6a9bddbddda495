"""FP4 E2M1 elements under microscaling group scales: NVFP4 and MXFP4.

E2M1 (OCP MX spec): 1 sign, 2 exponent, 1 mantissa bit; magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6.
  NVFP4  groups of 16, FP8 E4M3 group scales under one FP32 per-tensor global scale. The stored
         global scale is the reciprocal form gs = 448 * 6 / amax (compressed-tensors, vLLM), and
         a group's value is code * (s_e4m3 / gs).
  MXFP4  groups of 32, E8M0 (power-of-two) scales stored as biased exponents: 2 ** (u8 - 127).
Codes are the E2M1 values themselves held in float8_e4m3fn (every E2M1 value is exact there),
so algorithms keep one code dtype for every float grid; formats/pack.py makes nibbles of them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..schemes import QuantSpec
from .fp8 import E4M3_MAX

if TYPE_CHECKING:
    from .grid import QParams

E2M1_MAX = 6.0
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # magnitude of codes 0..7
E8M0_BIAS = 127
E2M1_EMAX = 2  # exponent of the largest E2M1 power of two (4 = 2**2): the OCP scale offset
_EPS_E4M3 = 0.125  # compressed-tensors replaces a zero runtime FP8 scale by this


def round_e2m1(scaled: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 value, ties to the even code, saturating at ±6; dtype float8_e4m3fn.

    E2M1's magnitudes are evenly spaced within three ranges: steps of 0.5 below 2, of 1 in
    [2, 4) and of 2 from 4, so x rounds to round(x / step) * step with the range's step. Steps
    are powers of two (the division is exact) and torch.round breaks ties to even, and at every
    tie the even multiple of the step is the even code: 0.25 -> 0, 0.75 -> 1, 1.25 -> 1,
    1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4. Elementwise only, with no lookup tables: this runs
    for every candidate scale of every weight group (FP4Grid.fit).
    """
    mag = scaled.abs()
    step = torch.where(mag < 2, 0.5, torch.where(mag < 4, 1.0, 2.0)).to(mag.dtype)
    values = torch.round(mag / step).mul_(step).clamp_(max=E2M1_MAX)
    return torch.copysign(values, scaled).to(torch.float8_e4m3fn)


def e8m0_value(exponent: torch.Tensor) -> torch.Tensor:
    """Stored E8M0 (uint8, bias 127) -> float32 power of two."""
    return torch.exp2(exponent.to(torch.float32) - E8M0_BIAS)


def _e8m0(e: torch.Tensor) -> torch.Tensor:
    """Unbiased exponents -> stored uint8, clamped to what E8M0 holds (255 is NaN)."""
    return (e.clamp(-E8M0_BIAS, E8M0_BIAS) + E8M0_BIAS).to(torch.uint8)


def global_scale(amax: torch.Tensor) -> torch.Tensor:
    """NVFP4 reciprocal global scale 448 * 6 / amax in float32, [1]; 1.0 when amax is 0 (as
    compressed-tensors: any value codes zeros, and 1.0 stays finite)."""
    amax = amax.float().reshape(1)
    gs = E4M3_MAX * E2M1_MAX / amax.clamp(min=torch.finfo(torch.float32).tiny)
    return torch.where(torch.isfinite(gs), gs, torch.ones_like(gs))


def _round_up_e4m3(s: torch.Tensor) -> torch.Tensor:
    """The smallest E4M3 value >= s (s already within [0, 448])."""
    r = s.to(torch.float8_e4m3fn)
    below = r.float() < s
    up = (r.view(torch.uint8) + 1).view(torch.float8_e4m3fn)  # next code up, s >= 0
    return torch.where(below, up, r)


@dataclass(frozen=True)
class FP4Grid:
    """NVFP4 or MXFP4 as a Grid (see grid.py). QParams.scale holds group scales in their *stored*
    form (float8_e4m3fn for NVFP4, uint8 E8M0 exponents for MXFP4), so export writes what the
    algorithm coded with. `shrink` (1.0,) is the runtime rule (activations, as vLLM computes
    them); more candidates make fit() pick each group's scale with the least squared error."""

    spec: QuantSpec
    scale_kind: str  # "e4m3" (NVFP4) | "e8m0" (MXFP4)
    tensor_scale: torch.Tensor | None = None  # NVFP4 global scale (reciprocal form), float32 [1]
    shrink: tuple[float, ...] = (1.0,)

    def bind(self, w: torch.Tensor) -> "FP4Grid":
        if self.scale_kind != "e4m3":
            return self
        if not torch.isfinite(w).all():
            raise ValueError("cannot quantize a tensor containing NaN or Inf")
        return self.bind_amax(w.abs().amax())

    def bind_amax(self, amax: torch.Tensor) -> "FP4Grid":
        return dataclasses.replace(self, tensor_scale=global_scale(amax))

    def unit(self, stored: torch.Tensor) -> torch.Tensor:
        """Stored group scale -> the float32 step a code is multiplied by (the library's
        `scale / global_scale` for NVFP4, 2 ** (e - 127) for MXFP4)."""
        if self.scale_kind == "e8m0":
            return e8m0_value(stored)
        return stored.float() / self.tensor_scale.float()

    def _candidates(self, amax: torch.Tensor) -> list[torch.Tensor]:
        if self.scale_kind == "e8m0":
            # OCP MX: 2 ** (floor(log2 amax) - 2) puts amax in [4, 8): values above 6 clip.
            # MR-GPTQ (Egiazarian et al. 2025) blames this power-of-two scale for most of MXFP4's
            # error; one step up never clips but is coarser, so weights try both per group.
            e = torch.floor(torch.log2(amax.clamp(min=2.0**-126))) - E2M1_EMAX
            if len(self.shrink) == 1:
                # compressed-tensors / vLLM runtime rule: round amax to a power of two first
                # (mantissa >= 1.75 goes up), then take off the E2M1 offset
                m = amax / torch.exp2(e + E2M1_EMAX)
                return [_e8m0(torch.where(m >= 1.75, e + 1, e))]
            return [_e8m0(e), _e8m0(e + 1)]
        s = amax.float() / E2M1_MAX * self.tensor_scale.float()
        s = s.clamp(max=E4M3_MAX)
        if len(self.shrink) == 1:
            r = s.to(torch.float8_e4m3fn)
            return [torch.where(r.float() == 0, torch.full_like(s, _EPS_E4M3), r.float()).to(r.dtype)]
        # round-to-nearest may clip the group maximum a little, rounding up never does;
        # clipped ranges (p < 1) trade the largest values for finer steps everywhere else
        return [_round_up_e4m3(s)] + [(s * p).to(torch.float8_e4m3fn) for p in self.shrink]

    def fit(self, block: torch.Tensor) -> "QParams":
        """block: [rows, cols], one group per row -> one stored scale per row, [rows, 1]."""
        if not torch.isfinite(block).all():
            raise ValueError("cannot quantize a tensor containing NaN or Inf")
        from .grid import _by_rows  # grid.py imports this module: import late

        # row-wise, so in chunks (bit-identical): eight candidates' float64 round trips of a
        # whole 8192 x 2048 weight would stream gigabytes of temporaries through memory
        return _by_rows(self._fit_rows, block)

    def _fit_rows(self, block: torch.Tensor) -> "QParams":
        from .grid import best_per_row

        amax = block.abs().amax(dim=-1, keepdim=True).float()
        return best_per_row(self, block, self._candidates(amax))

    def encode(self, x: torch.Tensor, p: "QParams", work: torch.dtype = torch.float64,
               check: bool = True) -> torch.Tensor:
        """E2M1 codes of x / unit. A zero unit (an all-zero group, or an FP8 scale that underflowed)
        codes every element as 0, which is what any consumer decodes it to."""
        if check and not torch.isfinite(x).all():
            raise ValueError("cannot quantize a tensor containing NaN or Inf")
        from .grid import _by_rows

        def rows(xs: torch.Tensor, ps: "QParams") -> torch.Tensor:
            u = self.unit(ps.scale).to(work)
            return round_e2m1(torch.where(u > 0, xs.to(work) / torch.where(u > 0, u, 1), 0))

        return _by_rows(rows, x, p)

    def decode(self, codes: torch.Tensor, p: "QParams") -> torch.Tensor:
        return codes.to(torch.float32) * self.unit(p.scale)
