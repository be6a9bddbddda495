"""Bit layouts for export, and their inverses.

compressed-tensors' pack-quantized layout: signed codes are offset to unsigned (add
2^(bits-1)), then element c of a row goes to bit position c*bits of the row's int32 words,
lowest bits first. (Not AutoGPTQ/AWQ's `qweight`, which interleaves nibbles.)
FP4: two E2M1 nibbles per uint8 (see pack_fp4).
"""

from __future__ import annotations

import torch

from .fp4 import E2M1_VALUES


def pack_int32(codes: torch.Tensor, bits: int, dim: int = 1, rows_per_block: int = 1024) -> torch.Tensor:
    """int8 codes [rows, cols] -> int32 words, packed along `dim` (0 packs columns of rows).

    The packing arithmetic is in int64, 8 bytes per code: a block of rows at a time, so a
    13B MLP matrix costs a few tens of MB of temporaries instead of about 1.7 GB."""
    if 32 % bits:
        raise ValueError(f"packing supports widths that divide 32, not {bits}")
    if dim == 0:
        return pack_int32(codes.T, bits, 1, rows_per_block).T.contiguous()
    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int64, device=codes.device) * bits
    blocks = []
    for a in range(0, max(codes.shape[0], 1), rows_per_block):
        u = codes[a:a + rows_per_block].to(torch.int64) + (1 << (bits - 1))
        rows, cols = u.shape
        u = torch.nn.functional.pad(u, (0, -cols % per))  # a partial last word is zero-filled
        words = (u.reshape(rows, -1, per) << shifts).sum(-1)
        blocks.append(torch.where(words >= 2**31, words - 2**32, words).to(torch.int32))  # two's complement
    return torch.cat(blocks).contiguous()


def unpack_int32(words: torch.Tensor, bits: int, shape: tuple[int, int], dim: int = 1) -> torch.Tensor:
    """Inverse of pack_int32: int32 words -> int8 codes of `shape`."""
    per = 32 // bits
    w = (words.T if dim == 0 else words).to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per, dtype=torch.int64, device=words.device) * bits
    u = ((w[..., None] >> shifts) & ((1 << bits) - 1)).reshape(w.shape[0], -1)
    n = shape[0] if dim == 0 else shape[1]
    codes = (u[:, :n] - (1 << (bits - 1))).to(torch.int8)
    return codes.T.contiguous() if dim == 0 else codes


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (float8_e4m3fn values) [rows, cols] -> uint8 [rows, cols/2].

    compressed-tensors' nvfp4/mxfp4-pack-quantized: a nibble is sign (bit 3) and the index of the
    magnitude in 0, .5, 1, 1.5, 2, 3, 4, 6 (bits 0-2); even columns in the low nibble.
    """
    v = codes.to(torch.float32)
    if v.shape[-1] % 2:
        raise ValueError("FP4 packing needs an even number of columns")
    mags = torch.tensor(E2M1_VALUES, device=v.device)
    index = (v.abs()[..., None] == mags).to(torch.uint8).argmax(-1).to(torch.uint8)
    if not (mags[index.long()] == v.abs()).all():
        raise ValueError("FP4 packing got values that are not E2M1 codes")
    nibble = index | (torch.signbit(v).to(torch.uint8) << 3)
    return (nibble[:, 0::2] | (nibble[:, 1::2] << 4)).contiguous()


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_fp4: uint8 [rows, cols/2] -> codes float8_e4m3fn [rows, cols]."""
    nibble = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1)
    mag = torch.tensor(E2M1_VALUES, device=packed.device)[(nibble & 7).long()]
    return torch.where((nibble & 8) > 0, -mag, mag).to(torch.float8_e4m3fn)
