"""SparseGPT (Frantar & Alistarh, 2023): prune a weight column by column with the GPTQ loop.

Each pruned weight's removal error is pushed onto the columns not yet visited through the
inverse Hessian of the layer's inputs, exactly as GPTQ pushes rounding errors; so this file
only decides *which* weights go (the mask) and reuses gptq.column_sweep for everything else.

Mask selection by the saliency w^2 / U_jj^2, U the upper Cholesky factor of H^-1 (the paper's
code): U_jj^2 is [H^-1]_jj over the columns not yet visited, so this is the OBS error of
removing w once the sweep reaches it. Unstructured sparsity takes the lowest-saliency
fraction of each block of 128 columns on entering it; n:m (2:4) takes the n lowest of every
m consecutive input columns, chosen when the sweep reaches them, on the updated weights.
With a grid, the survivors are quantized inside the same sweep (the paper's joint mode), so
each column's pruning *and* rounding error is compensated by the columns after it.
"""

from __future__ import annotations

import torch

from ..errors import LowbitError
from ..formats.grid import QParams, Quantized, ScaleGrid
from ..schemes import check_sparsity
from .gptq import code_dtype, collect, column_sweep, grid_rounding, inverse_hessian_factor, visiting_order


def _n_m(structure: str) -> tuple[int, int]:
    """(how many to prune, out of every m): '2:4' keeps 2 of 4 -> (2, 4); unstructured -> (0, 0)."""
    if structure == "unstructured":
        return 0, 0
    n, m = (int(x) for x in structure.split(":"))
    return m - n, m


def mask_chooser(sparsity: float, structure: str):
    """choose(W [out, k], d [k]) -> bool mask (True = prune) by saliency w^2 / d^2."""
    prune, m = _n_m(structure)

    def choose(W: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        saliency = W.pow(2) / d.pow(2)[None, :]
        mask = torch.zeros_like(W, dtype=torch.bool)
        if m:  # n:m: the `prune` least salient of every m consecutive input columns
            groups = saliency.reshape(W.shape[0], -1, m)
            idx = torch.argsort(groups, dim=-1, stable=True)[..., :prune]
            return mask.reshape(W.shape[0], -1, m).scatter_(-1, idx, True).reshape(W.shape)
        k = int(W.numel() * sparsity)  # unstructured: the k least salient of the block
        mask.view(-1)[torch.argsort(saliency.flatten(), stable=True)[:k]] = True
        return mask

    return choose


def sparsegpt(weight: torch.Tensor, hessian: torch.Tensor, grid: ScaleGrid | None, *,
              sparsity: float = 0.5, structure: str = "unstructured", block: int = 128,
              damp: float = 0.01) -> tuple[torch.Tensor, Quantized | None]:
    """Prune weight [out, in] to `sparsity` given the mean input Hessian X^T X / n [in, in].

    Returns (pruned weight in float32 with the pruned entries exactly 0, Quantized or None).
    With a grid the survivors are quantized in the same sweep and the pruned weight is the
    dequantized result; without one they keep their error-compensated float values. Columns
    are visited in storage order: the n:m groups and the per-block masks are defined there.
    """
    check_sparsity(sparsity, structure)
    rows, cols = weight.shape
    _, m = _n_m(structure)
    if m and cols % m:
        raise LowbitError(f"{structure} sparsity needs in_features divisible by {m}, got {cols}")
    perm = torch.arange(cols, device=weight.device)  # storage order: masks are defined there
    W, H = visiting_order(weight, hessian, perm)
    del weight, hessian  # the caller's temporaries go now
    U = inverse_hessian_factor(H, damp)  # [in, in], upper, in H's memory
    choose = mask_chooser(sparsity, structure)
    if grid is None:
        out = torch.empty_like(W)

        def keep_float(j, kept, W1, i, mask1):
            out[:, j] = kept[:, 0]
            return kept

        column_sweep(W, U, keep_float, block=block, choose=choose, m=m)
        return out, None
    spec = grid.spec
    params: dict[int, QParams] = {}
    if spec.granularity != "group":
        params[0] = grid.fit(W)  # as GPTQ: once, up front (a per-tensor grid arrives bound)
    else:
        g = spec.group_size
        if g % max(m, 1):
            raise LowbitError(f"group size {g} is not a multiple of the {structure} pattern's {m}")
        block = max(g, block // g * g)  # groups never straddle blocks
    codes = torch.empty(rows, cols, dtype=code_dtype(grid), device=W.device)
    pruned = column_sweep(W, U, grid_rounding(grid, perm, params, codes), block=block, choose=choose, m=m)
    q = collect(codes, perm, params, grid, pruned)
    return q.dequantize().float(), q
