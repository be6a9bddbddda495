"""GPTQ (Frantar et al., 2022): quantize a weight column by column, pushing each column's
rounding error onto the columns not yet quantized, weighted by the inverse Hessian of the
layer's inputs, so the layer's *output* error on calibration data is what gets minimised.

One implementation for every grid: the format only enters through grid.fit/encode/decode.
"""

from __future__ import annotations

import torch

from ..errors import LowbitError
from ..formats.grid import QParams, Quantized, ScaleGrid


def _inverse_hessian_factor(hessian: torch.Tensor, perm: torch.Tensor, dead: torch.Tensor,
                            damp: float) -> torch.Tensor:
    """Upper Cholesky factor of H^-1, H = `hessian` in column order `perm` with the diagonal
    of dead inputs set to 1 and dampened by damp * mean(diag). Besides `hessian`, at most two
    [in, in] matrices are alive at a time (a 7B down_proj's are 485 MB each)."""
    H = hessian.detach().float()[perm[:, None], perm[None, :]]  # one gather: a copy we own
    H.diagonal()[dead[perm]] = 1
    H.diagonal().add_(damp * H.diagonal().mean())
    try:
        L = torch.linalg.cholesky(H)
        del H
        Hinv = torch.cholesky_inverse(L)
        del L
        return torch.linalg.cholesky(Hinv, upper=True)
    except torch.linalg.LinAlgError:
        raise LowbitError(f"GPTQ: the Hessian is not positive definite even with dampening {damp}; "
                          "use more calibration samples or a larger dampening") from None


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
    W = weight.detach().float().clone()  # [out, in]
    rows, cols = W.shape
    diag = hessian.diagonal().float().clone()
    dead = diag == 0  # inputs that were always zero: any value works, use 0
    diag[dead] = 1
    W[:, dead] = 0

    spec = grid.spec
    g = spec.group_size if spec.granularity == "group" else cols
    params: dict[int, QParams] = {}  # first storage column of a group -> its parameters
    if spec.granularity != "group":
        params[0] = grid.fit(W)
    elif act_order:
        params = {s: grid.fit(W[:, s:s + g]) for s in range(0, cols, g)}
    perm = torch.argsort(diag, descending=True) if act_order else torch.arange(cols)
    W = W[:, perm]
    U = _inverse_hessian_factor(hessian, perm, dead, damp)  # [in, in], upper

    codes = torch.empty(rows, cols, dtype=torch.int8 if spec.format == "int" else torch.float8_e4m3fn)
    block = max(g, block // g * g) if not act_order else block  # groups never straddle blocks
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            c = int(perm[i1 + i])  # storage column
            start = c - c % g
            if start not in params:  # storage order: GPTQ just entered this group
                params[start] = grid.fit(W1[:, i:i + g])
            p = params[start]
            w = W1[:, i:i + 1]
            q = grid.encode(w, p)
            codes[:, i1 + i] = q[:, 0]
            err = (w - grid.decode(q, p).float()) / U[i1 + i, i1 + i]  # [out, 1]
            W1[:, i:] -= err @ U[i1 + i, i1 + i:i2][None, :]
            E1[:, i] = err[:, 0]
        W[:, i2:] -= E1 @ U[i1:i2, i2:]

    out = torch.empty_like(codes)
    out[:, perm] = codes
    starts = sorted(params)
    scale = torch.cat([params[s].scale for s in starts], dim=1) if len(starts) > 1 else params[0].scale
    zeros = [params[s].zero for s in starts]
    zero = None if zeros[0] is None else torch.cat(zeros, dim=1)
    if spec.granularity == "tensor":
        scale = scale.reshape(1)
    return Quantized(out, scale, grid, zero)
