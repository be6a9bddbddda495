"""Bit layouts for export, and their inverses.

compressed-tensors' pack-quantized layout: signed codes are offset to unsigned (add
2^(bits-1)), then element c of a row goes to bit position c*bits of the row's int32 words,
lowest bits first. (Not AutoGPTQ/AWQ's `qweight`, which interleaves nibbles.)
"""

from __future__ import annotations

import torch


def pack_int32(codes: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """int8 codes [rows, cols] -> int32 words, packed along `dim` (0 packs columns of rows)."""
    if 32 % bits:
        raise ValueError(f"packing supports widths that divide 32, not {bits}")
    per = 32 // bits
    u = codes.to(torch.int64) + (1 << (bits - 1))
    if dim == 0:
        u = u.T
    rows, cols = u.shape
    u = torch.nn.functional.pad(u, (0, -cols % per))  # a partial last word is zero-filled
    shifts = torch.arange(per, dtype=torch.int64, device=codes.device) * bits
    words = (u.reshape(rows, -1, per) << shifts).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # two's complement
    return (words.T if dim == 0 else words).contiguous()


def unpack_int32(words: torch.Tensor, bits: int, shape: tuple[int, int], dim: int = 1) -> torch.Tensor:
    """Inverse of pack_int32: int32 words -> int8 codes of `shape`."""
    per = 32 // bits
    w = (words.T if dim == 0 else words).to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per, dtype=torch.int64, device=words.device) * bits
    u = ((w[..., None] >> shifts) & ((1 << bits) - 1)).reshape(w.shape[0], -1)
    n = shape[0] if dim == 0 else shape[1]
    codes = (u[:, :n] - (1 << (bits - 1))).to(torch.int8)
    return codes.T.contiguous() if dim == 0 else codes
