"""Calibration statistics as plain accumulators: a sum and a count, divided once at the end.

Keeping raw sums (not running means) is what lets shards, ranks and resumed runs merge exactly.
"""

from __future__ import annotations

import torch


class AbsMax:
    """Largest |x| seen (the MLPerf "dynamic range" of a tensor), or per last-dim channel."""

    def __init__(self, per_channel: bool = False) -> None:
        self.value = torch.zeros((), dtype=torch.float32)
        self.per_channel = per_channel
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().abs()
        seen = x.reshape(-1, x.shape[-1]).amax(0) if self.per_channel else x.amax()
        self.value = torch.maximum(self.value, seen.float())
        self.count += x.numel()

    def merge(self, other: "AbsMax") -> None:
        self.value = torch.maximum(self.value, other.value)
        self.count += other.count


HESSIAN_ROWS = 2048


class Hessian:
    """Sum of x^T x over calibration tokens (float64), and how many tokens went in.

    GPTQ's H = 2 X^T X / n; the factor 2 and the mean cancel in the algorithm, so callers get
    the mean and the constant stays out of the statistics.
    """

    def __init__(self, features: int) -> None:
        self.sum = torch.zeros(features, features, dtype=torch.float64)
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if self.sum.device != x.device:  # accumulate where the activations are (GPU or CPU)
            self.sum = self.sum.to(x.device)
        # a block of rows of x^T x at a time (added in float64, exactly widened): for a
        # 13824-wide input the whole float32 product and its widened copy were 2.3 GB of
        # temporaries beside the 1.5 GB sum. Inputs up to HESSIAN_ROWS wide take one block.
        for a in range(0, x.shape[1], HESSIAN_ROWS):
            self.sum[a:a + HESSIAN_ROWS] += x[:, a:a + HESSIAN_ROWS].T @ x
        self.count += x.shape[0]

    def merge(self, other: "Hessian") -> None:
        self.sum += other.sum
        self.count += other.count

    def mean(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """sum / count, rounded to `dtype`; computed a block of rows at a time, so a large
        Hessian (11008^2 for a 7B down_proj) needs no second float64 copy."""
        out = torch.empty(self.sum.shape, dtype=dtype, device=self.sum.device)
        step = max(1, 2**20 // max(1, self.sum.shape[-1]))
        for a in range(0, self.sum.shape[0], step):
            out[a:a + step] = self.sum[a:a + step] / max(self.count, 1)
        return out
