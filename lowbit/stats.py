"""Calibration statistics as plain accumulators: a sum and a count, divided once at the end.

Keeping raw sums (not running means) is what lets shards, ranks and resumed runs merge exactly.
"""

from __future__ import annotations

import torch


class AbsMax:
    """Largest |x| seen (the MLPerf "dynamic range" of a tensor)."""

    def __init__(self) -> None:
        self.value = torch.zeros((), dtype=torch.float32)
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        self.value = torch.maximum(self.value, x.detach().abs().amax().float())
        self.count += x.numel()

    def merge(self, other: "AbsMax") -> None:
        self.value = torch.maximum(self.value, other.value)
        self.count += other.count


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
        self.sum += (x.T @ x).double()
        self.count += x.shape[0]

    def merge(self, other: "Hessian") -> None:
        self.sum += other.sum
        self.count += other.count

    def mean(self) -> torch.Tensor:
        return self.sum / max(self.count, 1)
