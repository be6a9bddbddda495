"""Numerics against float64 references written here, not by calling the code under test."""

import itertools

import pytest
import torch

from lowbit.algorithms.rtn import rtn
from lowbit.formats.grid import QParams, activation_qdq, grid_for
from lowbit.schemes import QuantSpec

FP8_T = QuantSpec("fp8", 8, "tensor")
FP8_C = QuantSpec("fp8", 8, "channel")
FP8_TOK = QuantSpec("fp8", 8, "token", dynamic=True)
INT8_C = QuantSpec("int", 8, "channel")


def e4m3_values() -> list[tuple[float, int]]:
    """Every finite E4M3 ("fn") value with its code, decoded from the bit fields by hand."""
    out = []
    for code in range(256):
        sign, exp, man = code >> 7, (code >> 3) & 0xF, code & 0x7
        if exp == 0xF and man == 0x7:
            continue  # the NaN encodings; fn has no infinities
        mag = (man / 8) * 2.0**-6 if exp == 0 else (1 + man / 8) * 2.0 ** (exp - 7)
        out.append((-mag if sign else mag, code))
    return out


E4M3 = e4m3_values()
POSITIVE = sorted({v for v, _ in E4M3 if v >= 0})


def ref_round_e4m3(v: float) -> float:
    """Nearest E4M3 value after clipping to ±448, ties to the even mantissa."""
    v = max(-448.0, min(448.0, v))
    mag = abs(v)
    hi = next(i for i, g in enumerate(POSITIVE) if g >= mag)
    if POSITIVE[hi] == mag or hi == 0:
        r = POSITIVE[hi]
    else:
        lo_v, hi_v = POSITIVE[hi - 1], POSITIVE[hi]
        if mag - lo_v < hi_v - mag:
            r = lo_v
        elif mag - lo_v > hi_v - mag:
            r = hi_v
        else:  # exact tie: the code with an even last mantissa bit (index parity on the grid)
            r = lo_v if (hi - 1) % 2 == 0 else hi_v
    return -r if v < 0 else r


def ref_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    q = (x.double() / scale.double()).flatten().tolist()
    return torch.tensor([ref_round_e4m3(v) for v in q], dtype=torch.float64).reshape(x.shape)


def test_e4m3_grid_matches_bit_decoding():
    codes = torch.tensor([c for _, c in E4M3], dtype=torch.uint8).view(torch.float8_e4m3fn)
    assert codes.double().tolist() == [v for v, _ in E4M3]
    assert max(POSITIVE) == 448.0 and POSITIVE[1] == 2.0**-9  # smallest subnormal


def test_fp8_matches_mlperf_formula():
    torch.manual_seed(0)
    w = torch.randn(64, 96) * 3
    w[3, 7] = 50.0  # an outlier sets the range
    q = rtn(w, grid_for(FP8_T).bind(w))
    scale = torch.tensor(50.0, dtype=torch.float32) / 448  # scale = amax / 448, in float32
    assert q.scale.item() == scale.item()
    assert torch.equal(q.codes.double(), ref_fp8(w, scale))
    assert torch.equal(q.dequantize(), q.codes.float() * scale)


@pytest.mark.parametrize("lo,hi", list(itertools.pairwise(POSITIVE))[::7])
def test_fp8_ties_round_half_to_even(lo, hi):
    grid = grid_for(FP8_T)
    p = QParams(torch.tensor([[0.5]]))  # a power of two keeps x / scale exact
    mid = (lo + hi) / 2
    x = torch.tensor([[mid, -mid, lo, hi]], dtype=torch.float64) * 0.5
    got = grid.encode(x, p).double()
    assert torch.equal(got, ref_fp8(x, p.scale))


def test_fp8_saturates_at_448_and_handles_subnormals_and_zeros():
    grid = grid_for(FP8_T)
    p = QParams(torch.tensor([[1.0]]))
    x = torch.tensor([[1e6, -1e6, 449.0, 464.0, 2.0**-10, 3 * 2.0**-10, 2.0**-8 * 1.3, 0.0, -0.0]])
    assert torch.equal(grid.encode(x, p).double(), ref_fp8(x, p.scale))
    z = torch.zeros(4, 8)
    q = rtn(z, grid_for(FP8_T).bind(z))
    assert torch.isfinite(q.scale).all() and torch.equal(q.dequantize(), z)


def test_fp8_random_inputs_per_channel_match_reference():
    torch.manual_seed(1)
    w = torch.randn(32, 40) * torch.logspace(-4, 3, 32)[:, None]  # rows over 7 decades
    w[5] = 0  # an all-zero row must not give NaN
    q = rtn(w, grid_for(FP8_C))
    amax = w.abs().amax(1, keepdim=True)
    scale = torch.where(amax > 0, amax / 448, torch.ones_like(amax))
    assert torch.equal(q.scale, scale)
    assert torch.equal(q.codes.double(), ref_fp8(w, scale))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_inputs_are_rejected(bad):
    w = torch.randn(4, 4)
    w[1, 2] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        rtn(w, grid_for(FP8_C))
    with pytest.raises(ValueError, match="NaN or Inf"):
        grid_for(FP8_T).bind(w)


def test_fp8_per_token_dynamic_activations():
    torch.manual_seed(2)
    x = torch.randn(2, 5, 24) * 4
    got = activation_qdq(FP8_TOK)(x)
    flat = x.reshape(-1, 24)
    scale = flat.abs().amax(1, keepdim=True) / 448
    ref = ref_fp8(flat, scale) * scale.double()
    assert torch.allclose(got.reshape(-1, 24).double(), ref, rtol=0, atol=1e-6 * ref.abs().max().item())


def test_fp8_static_activations_clip_beyond_calibrated_range():
    x = torch.tensor([[1.0, -2.0, 10.0, -10.0]])
    got = activation_qdq(FP8_T, torch.tensor([2.0 / 448]))(x)
    assert got.tolist() == [[1.0, -2.0, 2.0, -2.0]]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_static_fp8_activations_in_model_dtype_match_float64_reference(dtype):
    """bf16/fp16 activations with a scale exact in their dtype: codes from the float32
    quotient (as a runtime computes them), values = code * scale rounded once to the dtype."""
    torch.manual_seed(6)
    x = (torch.randn(3, 9, 40) * 3).to(dtype)
    x[0, 0, :4] = torch.tensor([1e4, -1e4, 0.0, -0.0])  # clipped to ±448 * scale; signed zeros
    scale = torch.tensor([0.0234375]).to(dtype).float()  # exact in both dtypes
    got = activation_qdq(FP8_T, scale)(x)
    assert got.dtype == dtype
    q = (x.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn).double()
    ref = (q * scale.double()).to(dtype)
    assert torch.equal(got, ref)


def ref_int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    q = (x.double() / scale.double()).flatten().tolist()
    # Python's round() is round-half-even on float64
    return torch.tensor([max(-128, min(127, round(v))) for v in q], dtype=torch.float64).reshape(x.shape)


def test_int8_symmetric_per_channel_matches_reference():
    """Weight scales: amax/127, or a clipped range p*amax/127 (p in 1.00, 0.98, ... 0.70) when
    that rounds with a smaller squared error; the first best p wins."""
    torch.manual_seed(3)
    w = torch.randn(16, 48)
    w[2, 5] = 30.0  # an outlier row, where clipping cannot pay off
    q = rtn(w, grid_for(INT8_C))
    assert q.codes.dtype == torch.int8
    for r in range(16):
        amax = w[r].abs().max()
        best = None
        for i in range(16):
            scale = (amax * (1 - 0.02 * i)) / 127
            codes = ref_int8(w[r:r + 1], scale.reshape(1, 1))
            err = ((codes * scale.double() - w[r].double()) ** 2).sum().item()
            if best is None or err < best[0]:
                best = (err, scale, codes)
        assert q.scale[r, 0].item() == best[1].item(), r
        assert torch.equal(q.codes[r:r + 1].double(), best[2]), r
    assert q.codes[2].abs().max() == 127  # the outlier row keeps its full range


def test_int8_ties_round_half_to_even():
    grid = grid_for(INT8_C)
    x = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5, 126.5, 127.5, -128.5, -130.0]])
    got = grid.encode(x, QParams(torch.ones(1, 1)))
    assert got.tolist() == [[0, 2, 2, 0, -2, 126, 127, -128, -128]]


def test_int8_per_token_dynamic_activations():
    torch.manual_seed(4)
    x = torch.randn(7, 32)
    got = activation_qdq(QuantSpec("int", 8, "token", dynamic=True))(x)
    scale = x.abs().amax(1, keepdim=True) / 127
    assert torch.allclose(got.double(), ref_int8(x, scale) * scale.double(), atol=1e-6)


def test_bf16_stored_scale_is_rounded_up_and_codes_use_it():
    """Consumers hold scales in bf16: the stored scale is the smallest bf16 >= amax/448, and codes
    are computed with exactly that value, so stored codes and stored scale agree."""
    torch.manual_seed(5)
    w = torch.randn(16, 32)
    q = rtn(w, grid_for(FP8_T, torch.bfloat16).bind(w))
    exact = w.abs().max().double() / 448
    assert q.scale.dtype == torch.bfloat16
    s = q.scale.double().item()
    below = (q.scale.view(torch.int16) - 1).view(torch.bfloat16).double().item()
    assert below < exact.item() <= s
    assert torch.equal(q.codes.double(), ref_fp8(w, q.scale.double()))
    assert q.codes.double().abs().max() <= 448


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_stored_scales_are_the_smallest_value_at_or_above_amax_over_qmax(device, dtype):
    torch.manual_seed(7)
    amax = torch.cat([torch.rand(2000) * 10 ** torch.randint(-4, 3, (2000,)).float(),
                      torch.tensor([448.0, 1.0, 0.0])]).to(device)
    q = grid_for(FP8_C, dtype).fit(amax[:, None])
    s = q.scale[:, 0].cpu()
    amax = amax.cpu()  # reference: the correctly rounded float32 quotient, as the CPU divides
    exact = torch.where(amax > 0, amax / 448, torch.ones_like(amax)).double()
    step_down = (s.view(INT_OF[dtype]) - 1).view(dtype).double()
    assert s.dtype == dtype
    assert (s.double() >= exact).all() and (step_down < exact).all()


INT_OF = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def test_int4_asymmetric_group_matches_reference():
    torch.manual_seed(6)
    w = torch.randn(8, 64) + 0.7  # off-centre rows use the zero point
    q = rtn(w, grid_for(QuantSpec("int", 4, "group", group_size=32, symmetric=False)))
    rows = w.double().reshape(-1, 32)
    lo, hi = rows.min(1, keepdim=True).values.clamp(max=0), rows.max(1, keepdim=True).values.clamp(min=0)
    scale = (hi.float() - lo.float()) / 15  # the formula, in float32 like the stored scale
    zero = torch.tensor([[max(-8, min(7, round(-8 - l / s)))] for l, s in zip(lo.flatten().tolist(),
                                                                              scale.double().flatten().tolist())])
    codes = [[max(-8, min(7, round(v / s + z))) for v in row]
             for row, s, z in zip(rows.tolist(), scale.double().flatten().tolist(), zero.flatten().tolist())]
    assert torch.equal(q.scale, scale.reshape(8, 2))
    assert torch.equal(q.zero.long(), zero.reshape(8, 2))
    assert q.codes.reshape(-1, 32).tolist() == codes
    assert torch.equal(q.dequantize(), (q.codes.float() - q.zero.float().repeat_interleave(32, 1))
                       * q.scale.repeat_interleave(32, 1))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", [(5, 64), (3, 70), (16, 576)])
@pytest.mark.parametrize("dim", [0, 1])
def test_int32_packing_matches_compressed_tensors_and_inverts(bits, shape, dim):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    from lowbit.formats.pack import pack_int32, unpack_int32

    g = torch.Generator().manual_seed(bits * 1000 + shape[1])
    codes = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), shape, generator=g, dtype=torch.int8)
    packed = pack_int32(codes, bits, dim)
    assert torch.equal(packed, pack_to_int32(codes, bits, packed_dim=dim))
    assert torch.equal(unpack_int32(packed, bits, shape, dim), codes)


@pytest.mark.parametrize("bits, dim", [(4, 1), (4, 0), (8, 1), (2, 0)])
def test_packing_a_block_of_rows_at_a_time_gives_the_same_words(bits, dim):
    from lowbit.formats.pack import pack_int32

    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    codes = torch.randint(lo, hi + 1, (37, 44), generator=torch.Generator().manual_seed(bits), dtype=torch.int8)
    whole = pack_int32(codes, bits, dim, rows_per_block=10**6)
    for block in (1, 5, 36):
        assert torch.equal(pack_int32(codes, bits, dim, rows_per_block=block), whole)
