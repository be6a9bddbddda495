"""FP8 E4M3 (OCP "fn" variant: no infinities, max 448) element rounding."""

from __future__ import annotations

import torch

E4M3_MAX = 448.0


def round_e4m3(scaled: torch.Tensor) -> torch.Tensor:
    """Round already-scaled values to E4M3 codes (dtype float8_e4m3fn).

    MLPerf FP8 (both the Neural Magic and AMD recipes): q = round_half_even(clip(x/s, -448, 448)).
    Clipping comes first because the cast maps out-of-range values to NaN, not to ±448;
    torch's cast rounds to nearest with ties to even, subnormals included.
    """
    return scaled.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
