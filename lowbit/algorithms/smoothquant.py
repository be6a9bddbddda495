"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weights.

Y = X W^T = (X / s)(W * s)^T for any per-input-channel s > 0. With
s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), the activation range shrinks where it had
outliers and the weights absorb them, which makes per-token INT8 activations viable. 1/s is
folded into the norm that produces X, so inference costs nothing extra.
AutoSmoothQuant (AMD Quark) picks alpha per layer by searching a grid for the smallest
quantized output error on calibration activations.
"""

from __future__ import annotations

from typing import Callable

import torch

ALPHAS = tuple(i / 20 for i in range(21))  # 0, 0.05, ..., 1

Quantizer = Callable[[torch.Tensor], torch.Tensor]  # tensor -> quantize-dequantize(tensor)


def weight_range(weights: list[torch.Tensor]) -> torch.Tensor:
    """max |W_ij| over the rows of every weight reading the same input: [in]."""
    return torch.stack([w.abs().amax(0) for w in weights]).amax(0).float()


def smoothing_scales(x_amax: torch.Tensor, w_amax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), per input channel."""
    s = x_amax.float().clamp(min=1e-5) ** alpha / w_amax.float().clamp(min=1e-5) ** (1 - alpha)
    return s.clamp(1e-4, 1e4)


def search_alpha(x: torch.Tensor, weights: list[torch.Tensor], scales: Callable[[float], torch.Tensor],
                 quantize_w: Quantizer, quantize_x: Quantizer, alphas=ALPHAS) -> float:
    """The alpha whose smoothing scales(alpha) minimise sum_i ||Q(x / s) Q(W_i s)^T - x W_i^T||^2.

    x [tokens, in] is a sample of the calibration activations (float32).
    """
    refs = [x @ w.T for w in weights]
    best_err, best = float("inf"), alphas[0]
    for alpha in alphas:
        s = scales(alpha)
        xq = quantize_x(x / s)
        err = sum((xq @ quantize_w(w * s).T - r).pow(2).sum().item() for w, r in zip(weights, refs))
        if err < best_err:
            best_err, best = err, alpha
    return best


def fold_into_norm(norm_weight: torch.Tensor, s: torch.Tensor, offset: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(new norm weight in its own dtype, the scale it really applies).

    The norm multiplies by (offset + w) (Gemma: offset 1). Dividing by s and rounding to the
    stored dtype changes s slightly; returning the scale the stored weight actually realises
    keeps (X / s)(W * s)^T exactly equal to X W^T.
    """
    eff = offset + norm_weight.float()
    stored = (eff / s - offset).to(norm_weight.dtype)
    return stored, eff / (offset + stored.float())
