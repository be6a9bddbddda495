"""Block-wise Hadamard rotations (MR-GPTQ, Egiazarian et al. 2025, "micro-rotations").

A Linear computes y = x Wᵀ. For an orthogonal block-diagonal R (one normalised b x b Hadamard
per block of b input features), y = (x R)(W R)ᵀ: the weight is rotated offline, W -> W R, and
the runtime rotates each input online, x -> x R. With b equal to the format's group size every
FP4 group of the weight, and of the input, is a rotation of exactly one original group: outliers
are spread across their own group (where the group scale is shared) and never leak into others.
GPTQ then sees the rotated inputs, whose Hessian is Rᵀ Hess R.

export.py records it as a compressed-tensors TransformConfig (type "hadamard", head_dim = b): an
online "input" transform, and its inverse on "weight_input", already fused into the weights.
"""

from __future__ import annotations

import math

import torch


def hadamard(b: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Sylvester's b x b Hadamard matrix of ±1 (b a power of two), unnormalised, as the library's
    deterministic_hadamard_matrix builds it."""
    if b < 1 or b & (b - 1):
        raise ValueError(f"a Hadamard block must be a power of two, not {b}")
    H = torch.ones(1, 1, dtype=dtype)
    while H.shape[0] < b:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


def _blocks(x: torch.Tensor, b: int) -> torch.Tensor:
    if x.shape[-1] % b:
        raise ValueError(f"{x.shape[-1]} features do not split into Hadamard blocks of {b}")
    return x.unflatten(-1, (x.shape[-1] // b, b))


def rotate_weight(weight: torch.Tensor, b: int) -> torch.Tensor:
    """W [out, in] -> W R in float64 (offline fusion, as the library fuses it), then float32."""
    H = (hadamard(b) / math.sqrt(b)).to(weight.device)
    return (_blocks(weight.double(), b) @ H).flatten(-2).float()


def rotate_input(x: torch.Tensor, b: int) -> torch.Tensor:
    """x [..., in] -> x R, computed as compressed-tensors' online transform does: float32
    matmul with the ±1 matrix, divided by sqrt(b), back to x's dtype."""
    H = hadamard(b, torch.float32).to(x.device)
    return ((_blocks(x.float(), b) @ H).flatten(-2) / math.sqrt(b)).to(x.dtype)


def rotate_hessian(hessian: torch.Tensor, b: int) -> torch.Tensor:
    """Hess [in, in] -> Rᵀ Hess R: the Hessian of the rotated inputs x R."""
    H = (hadamard(b) / math.sqrt(b)).to(hessian.device)
    R = torch.block_diag(*[H] * (hessian.shape[0] // b))
    return (R.T @ hessian.double() @ R).to(hessian.dtype)


def online_input(rot: int | None, quant=None):
    """What a runtime does to a quantized Linear's input: rotate (MR-GPTQ), then quantize."""
    if rot is None:
        return quant
    if quant is None:
        return lambda x: rotate_input(x, rot)
    return lambda x: quant(rotate_input(x, rot))


def once_per_input(f):
    """f, computed once per input tensor: the members of a fused set (q/k/v, gate/up) read the
    very same tensor, and quantize-dequantizing it once instead of three times is most of the
    cost of simulating static activations. The last input is held, so its identity cannot be
    reused by another tensor while it is remembered."""
    last: list = [None, None]

    def once(x):
        if torch.compiler.is_compiling():
            # in a compiled step the held tensor would become a guard on the last call's shape
            # (a recompile per prompt length); there the graph's own common-subexpression pass
            # shares the work instead
            return f(x)
        if last[0] is not x:
            last[0], last[1] = x, f(x)
        return last[1]
    return once
