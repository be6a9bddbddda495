"""GPTQ (Frantar et al., 2022): quantize a weight column by column, pushing each column's
rounding error onto the columns not yet quantized, weighted by the inverse Hessian of the
layer's inputs, so the layer's *output* error on calibration data is what gets minimised.

One implementation for every grid: the format only enters through grid.fit/encode/decode.
`column_sweep` is the loop itself; SparseGPT (sparsegpt.py) runs the same loop with a mask.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import LowbitError
from ..formats.grid import QParams, Quantized, ScaleGrid


def visiting_order(weight: torch.Tensor, hessian: torch.Tensor, perm: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 working copies of W [out, in] and H [in, in] in visiting order `perm`, each one
    gather; inputs that were always zero get H=1 and W=0 (any value works). The caller's
    tensors are only read: a caller that passed them as temporaries (the pipeline hands over
    the Hessian's own memory) frees them by deleting its names right after this call."""
    dead = (hessian.diagonal() == 0)[perm]
    H = hessian[perm[:, None], perm[None, :]].float()
    W = weight[:, perm].float()  # gathered in the stored dtype, then widened once
    H[dead, dead] = 1
    W[:, dead] = 0
    return W, H


def inverse_hessian_factor(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 after dampening H's diagonal by damp * mean(diag),
    computed in H's own memory (H is overwritten; the factor is returned as a column-major
    view of it). LAPACK works in place on column-major storage and torch copies a row-major
    matrix first; H is symmetric, so its transpose is the same matrix already column-major.
    No [in, in] temporary is made (each would be 764 MB for a 13B down projection)."""
    H.diagonal().add_(damp * H.diagonal().mean())
    C = H.mT
    try:
        torch.linalg.cholesky(C, out=C)
    except torch.linalg.LinAlgError:
        raise LowbitError(f"GPTQ: the Hessian is not positive definite even with dampening {damp}; "
                          "use more calibration samples or a larger dampening") from None
    torch.cholesky_inverse(C, out=C)
    return torch.linalg.cholesky(C, upper=True, out=C)


# round(j, kept, W1, i, mask1) -> the value column j takes; see column_sweep
RoundColumn = Callable[[int, torch.Tensor, torch.Tensor, int, "torch.Tensor | None"], torch.Tensor]
# choose(W1 block, d) -> bool mask of the weights to prune (True = pruned)
ChooseMask = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def column_sweep(W: torch.Tensor, U: torch.Tensor, round_column: RoundColumn, *, block: int,
                 choose: ChooseMask | None = None, m: int = 0) -> torch.Tensor:
    """The loop GPTQ and SparseGPT share, over W [out, in] in visiting order (updated in place)
    with U, the upper Cholesky factor of H^-1 in the same order. Returns the mask of pruned
    weights (all False without `choose`).

    Column j becomes round_column(...) of its surviving values; the difference, divided by
    U[j, j], is pushed onto the columns right of j through row j of U (the OBS update), inside
    the block at once and onto the rest of W once per block (lazy batch updates).
    SparseGPT: `choose` picks the mask by w^2 / U[j, j]^2 for the whole block on entering it;
    with m > 0 (n:m) it picks again for each m columns on reaching them, on updated weights.
    """
    rows, cols = W.shape
    pruned = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)
    d = U.diagonal()
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        mask1 = choose(W1, d[i1:i2]) if choose is not None else None
        for i in range(i2 - i1):
            if mask1 is not None and m and i % m == 0:
                mask1[:, i:i + m] = choose(W1[:, i:i + m], d[i1 + i:i1 + i + m])
            w = W1[:, i:i + 1]
            kept = w if mask1 is None else w.masked_fill(mask1[:, i:i + 1], 0)
            q = round_column(i1 + i, kept, W1, i, mask1)
            err = (w - q) / U[i1 + i, i1 + i]  # [out, 1]
            W1[:, i:] -= err @ U[i1 + i, i1 + i:i2][None, :]
            E1[:, i] = err[:, 0]
        W[:, i2:].addmm_(E1, U[i1:i2, i2:], alpha=-1)  # in place: no [out, in] temporary
        if mask1 is not None:
            pruned[:, i1:i2] = mask1
    return pruned


def grid_rounding(grid: ScaleGrid, perm: torch.Tensor, params: dict[int, QParams],
                  codes: torch.Tensor) -> RoundColumn:
    """GPTQ's round_column: codes of the column on `grid`, written into `codes` (visiting
    order). A group's parameters are fitted when the sweep enters it (storage order), on the
    error-updated weights, with the weights to be pruned already zero (SparseGPT's joint mode:
    prune, then quantize the survivors); `params` may hold them already (static groups)."""
    g = grid.spec.group_size if grid.spec.granularity == "group" else None

    def round_column(j, kept, W1, i, mask1):
        c = int(perm[j])  # storage column
        start = c - c % g if g else 0  # channel and tensor grids have one entry, fitted up front
        if start not in params:
            block = W1[:, i:i + g]
            params[start] = grid.fit(block if mask1 is None else block.masked_fill(mask1[:, i:i + g], 0))
        p = params[start]
        q = grid.encode(kept, p)
        codes[:, j] = q[:, 0]
        return grid.decode(q, p).float()

    return round_column


def collect(codes: torch.Tensor, perm: torch.Tensor, params: dict[int, QParams], grid: ScaleGrid,
            mask: torch.Tensor | None = None) -> Quantized:
    """Codes back in storage order and the parameters in their export shape."""
    out = torch.empty_like(codes)
    out[:, perm] = codes
    starts = sorted(params)
    scale = torch.cat([params[s].scale for s in starts], dim=1) if len(starts) > 1 else params[0].scale
    zeros = [params[s].zero for s in starts]
    zero = None if zeros[0] is None else torch.cat(zeros, dim=1)
    if grid.spec.granularity == "tensor":
        scale = scale.reshape(1)
    return Quantized(out, scale, grid, zero, mask)


def code_dtype(grid: ScaleGrid) -> torch.dtype:
    return torch.int8 if grid.spec.format == "int" else torch.float8_e4m3fn


def gptq(weight: torch.Tensor, hessian: torch.Tensor, grid: ScaleGrid, *, block: int = 128,
         damp: float = 0.01, act_order: bool = True) -> Quantized:
    """Quantize weight [out, in] given the mean input Hessian X^T X / n [in, in].

    act_order visits columns by decreasing Hessian diagonal (the inputs with most energy
    first, while the most columns remain to absorb their error). Group parameters are then
    fitted once on the original weights in storage order ("static groups"), so groups stay
    contiguous on disk and no g_idx is needed; in storage order they are fitted when GPTQ
    enters the group, on the error-updated weights. Lazy batch updates: errors are applied
    inside a block of columns at once and to the rest of the matrix once per block.
    """
    rows, cols = weight.shape
    spec = grid.spec
    g = spec.group_size if spec.granularity == "group" else cols
    perm = (torch.argsort(hessian.diagonal(), descending=True) if act_order
            else torch.arange(cols, device=weight.device))
    W, H = visiting_order(weight, hessian, perm)
    del weight, hessian  # the caller's temporaries go now (see visiting_order)
    U = inverse_hessian_factor(H, damp)  # [in, in], upper, in H's memory
    params: dict[int, QParams] = {}  # first storage column of a group -> its parameters
    if spec.granularity != "group":
        params[0] = grid.fit(W)
    elif act_order:  # static groups: storage column c sits at visiting position where[c]
        where = torch.argsort(perm)
        params = {s: grid.fit(W[:, where[s:s + g]]) for s in range(0, cols, g)}

    codes = torch.empty(rows, cols, dtype=code_dtype(grid), device=W.device)
    block = max(g, block // g * g) if not act_order else block  # groups never straddle blocks
    column_sweep(W, U, grid_rounding(grid, perm, params, codes), block=block)
    return collect(codes, perm, params, grid)
