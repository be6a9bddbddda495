"""Calibration statistics as plain accumulators: a sum and a count, divided once at the end.

Keeping raw sums (not running means) is what lets shards, ranks and resumed runs merge exactly.
"""

from __future__ import annotations

import torch

from .formats.grid import abs_max


class AbsMax:
    """Largest |x| seen (the MLPerf "dynamic range" of a tensor), or per last-dim channel."""

    def __init__(self, per_channel: bool = False) -> None:
        self.value = torch.zeros((), dtype=torch.float32)
        self.per_channel = per_channel
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach()
        seen = abs_max(x.reshape(-1, x.shape[-1]), 0) if self.per_channel else abs_max(x)
        self.value = torch.maximum(self.value, seen.float())
        self.count += x.numel()

    def merge(self, other: "AbsMax") -> None:
        self.value = torch.maximum(self.value, other.value)
        self.count += other.count


HESSIAN_ROWS = 2048


class Hessian:
    """Sum of x^T x over calibration tokens, and how many tokens went in.

    GPTQ's H = 2 X^T X / n; the factor 2 and the mean cancel in the algorithm, so callers get
    the mean and the constant stays out of the statistics. The sum is float32, like the
    products added to it and like the GPTQ solve: a float64 sum doubled the largest tensor of
    a 13B run (the down projection's 13824^2) and needed a second copy to hand over.
    """

    def __init__(self, features: int) -> None:
        self.sum = torch.zeros(features, features, dtype=torch.float32)
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if self.sum.device != x.device:  # accumulate where the activations are (GPU or CPU)
            self.sum = self.sum.to(x.device)
        # a block of rows of x^T x at a time, added in place: for a 13824-wide input the whole
        # product was a 764 MB temporary beside the sum. Inputs up to HESSIAN_ROWS wide take one.
        for a in range(0, x.shape[1], HESSIAN_ROWS):
            self.sum[a:a + HESSIAN_ROWS].addmm_(x[:, a:a + HESSIAN_ROWS].T, x)
        self.count += x.shape[0]

    def merge(self, other: "Hessian") -> None:
        self.sum += other.sum
        self.count += other.count

    def mean(self) -> torch.Tensor:
        """sum / count, a new tensor."""
        return self.sum / max(self.count, 1)

    def take_mean(self) -> torch.Tensor:
        """sum / count computed in the sum's own memory, which the caller then owns: the
        Hessian is spent (a 13B down projection's is 764 MB; no second copy is made)."""
        out, self.sum = self.sum.div_(max(self.count, 1)), None
        return out
