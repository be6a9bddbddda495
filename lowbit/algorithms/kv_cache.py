"""FP8 KV-cache scales from calibration."""

from __future__ import annotations

import torch

from ..formats.grid import grid_for
from ..schemes import QuantSpec
from ..stats import AbsMax


def kv_cache_scale(k: AbsMax, v: AbsMax, spec: QuantSpec, mode: str = "calibrated") -> torch.Tensor:
    """The per-tensor scale stored as both k_scale and v_scale ([1], float32).

    AMD's MLPerf recipe: K and V share one scale calibrated on the cached values,
    max(amax_K, amax_V) / 448 (vLLM reads k_scale/v_scale as amax / 448). `mode="unit"` stores
    1.0, which the same recipe uses for some models to avoid over-fitting the calibration set.
    """
    if mode == "unit":
        return torch.ones(1)
    amax = torch.maximum(k.value, v.value)
    return grid_for(spec).bind_amax(amax).tensor_scale.reshape(1)
