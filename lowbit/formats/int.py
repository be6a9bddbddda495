"""Two's-complement integer codes (INT8, INT4) with symmetric scales."""

from __future__ import annotations

import torch


def int_range(bits: int) -> tuple[int, int]:
    """(qmin, qmax) of a signed `bits`-wide integer."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def round_int(scaled: torch.Tensor, bits: int) -> torch.Tensor:
    """Round already-scaled values half-to-even onto [qmin, qmax]; codes stored as int8.

    Symmetric grids put amax at qmax (scale = amax/qmax), so qmin is reached only by
    clipping; that keeps zero exact and the grid symmetric around it.
    """
    qmin, qmax = int_range(bits)
    return torch.round(scaled).clamp(qmin, qmax).to(torch.int8)
