"""Round to nearest: each block's parameters from its own range, no calibration data needed."""

from __future__ import annotations

import torch

from ..formats.grid import Quantized, ScaleGrid


def rtn(weight: torch.Tensor, grid: ScaleGrid) -> Quantized:
    """Quantize weight [out, in] on `grid` (already bound for per-tensor specs)."""
    w = weight.float()
    spec = grid.spec
    if spec.granularity == "group":
        g = spec.group_size
        rows = w.reshape(-1, g)  # one row per (output channel, group)
        p = grid.fit(rows)
        codes = grid.encode(rows, p).reshape(w.shape)
        zero = p.zero.reshape(w.shape[0], -1) if p.zero is not None else None
        return Quantized(codes, p.scale.reshape(w.shape[0], -1), grid, zero)
    p = grid.fit(w)
    codes = grid.encode(w, p)
    scale = p.scale.reshape(1) if spec.granularity == "tensor" else p.scale
    return Quantized(codes, scale, grid, p.zero)
