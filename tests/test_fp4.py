"""FP4 (E2M1) numerics, NVFP4 and MXFP4 group scales, and FP4 packing, against float64
references written here from the format definitions (OCP MX spec, compressed-tensors docs)."""

import math

import pytest
import torch

from lowbit.algorithms.rtn import rtn
from lowbit.formats.grid import QParams, activation_qdq, grid_for
from lowbit.formats.pack import pack_fp4, unpack_fp4
from lowbit.schemes import MXFP4_G32, NVFP4_G16

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]  # index = code & 7


def ref_e2m1(v: float) -> float:
    """Nearest E2M1 value after clipping to ±6; an exact tie goes to the even code index."""
    mag = min(abs(v), 6.0)
    best = min(range(8), key=lambda i: (abs(E2M1[i] - mag), i % 2))
    return math.copysign(E2M1[best], v)


def ref_round(x: torch.Tensor) -> torch.Tensor:
    return torch.tensor([ref_e2m1(v) for v in x.double().flatten().tolist()],
                        dtype=torch.float64).reshape(x.shape)


def codes_of(grid, x, p):
    return grid.encode(x, p).double()


# ------------------------------------------------------------------ E2M1 element rounding


def test_e2m1_ties_go_to_the_even_code():
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    expected = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]  # codes 0, 2, 2, 4, 4, 6, 6
    grid = grid_for(NVFP4_G16)
    p = QParams(torch.tensor([[1.0]]).to(torch.float8_e4m3fn))
    g = grid.bind_amax(torch.tensor(448.0 * 6))  # global scale 1: unit = group scale = 1
    for sign in (1, -1):
        got = g.encode(sign * ties[None], p).double()[0].tolist()
        assert got == [sign * e for e in expected]
    assert ref_round(ties).tolist() == expected  # the reference agrees on what a tie is


def test_e2m1_matches_reference_on_random_and_saturating_values():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(4000, generator=g) * 3, torch.linspace(-9, 9, 1441),
                   torch.tensor([6.0, -6.0, 7.0, -1e30, 1e30, 0.0, -0.0])])
    grid = grid_for(NVFP4_G16).bind_amax(torch.tensor(448.0 * 6))
    p = QParams(torch.tensor([[1.0]]).to(torch.float8_e4m3fn))
    got = grid.encode(x[None], p).double()[0]
    assert torch.equal(got, ref_round(x))
    assert got.abs().max() == 6.0  # saturation, never NaN (E4M3 codes would NaN above 448)


# ------------------------------------------------------------------ NVFP4


def ref_nvfp4_runtime(x: torch.Tensor, gs: float) -> torch.Tensor:
    """vLLM/compressed-tensors activation rule, per group of 16: s = e4m3(amax/6 * gs) (0 -> 0.125),
    step = s / gs in float32, values rounded on E2M1."""
    out = torch.empty_like(x, dtype=torch.float64)
    for r in range(x.shape[0]):
        for c in range(0, x.shape[1], 16):
            grp = x[r, c:c + 16].double()
            s = min(grp.abs().max().item() / 6 * gs, 448.0)
            s = torch.tensor(s, dtype=torch.float32).to(torch.float8_e4m3fn).double().item() or 0.125
            step = torch.tensor(s, dtype=torch.float32) / torch.tensor(gs, dtype=torch.float32)
            out[r, c:c + 16] = ref_round(grp / step.double()) * step.double()
    return out


def test_nvfp4_global_scale_is_the_reciprocal_form():
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    gs = grid_for(NVFP4_G16).bind(w).tensor_scale
    assert gs.dtype == torch.float32 and gs.shape == (1,)
    assert gs.item() == pytest.approx(448 * 6 / w.abs().max().item(), rel=1e-6)
    # all zeros: no range, 1.0 as the library uses, and the weights code to zeros
    zero = grid_for(NVFP4_G16).bind(torch.zeros(4, 16))
    assert zero.tensor_scale.item() == 1.0
    assert torch.equal(rtn(torch.zeros(4, 16), zero).dequantize(), torch.zeros(4, 16))


def test_nvfp4_activations_match_the_runtime_rule():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 64, generator=g) * torch.logspace(-3, 1, 64)  # groups of very different range
    x[0, :16] = 0  # an all-zero group
    gs = 448 * 6 / 5.0  # calibrated on a smaller range than seen: the largest groups saturate
    got = activation_qdq(NVFP4_G16, torch.tensor([gs]))(x)
    assert torch.equal(got.double(), ref_nvfp4_runtime(x, gs).float().double())


def test_nvfp4_weight_scales_are_stored_e4m3_and_decode_as_the_library_does():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
    grid = grid_for(NVFP4_G16).bind(w)
    q = rtn(w, grid)
    assert q.scale.dtype == torch.float8_e4m3fn and q.scale.shape == (16, 4)
    gs = grid.tensor_scale.item()
    # decode: code * (s / gs) in float32, as compressed-tensors' dequantize computes it
    step = (q.scale.float() / torch.tensor(gs, dtype=torch.float32)).repeat_interleave(16, 1)
    assert torch.equal(q.dequantize(), q.codes.float() * step)
    # codes are the E2M1 rounding of w / step (no second rounding anywhere)
    assert torch.equal(q.codes.double(), ref_round(w.double() / step.double()))


def test_nvfp4_weight_scale_search_never_loses_to_the_plain_rule():
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(4)) ** 3  # heavy tails
    grid = grid_for(NVFP4_G16).bind(w)
    err = (rtn(w, grid).dequantize().double() - w.double()).pow(2).reshape(-1, 16).sum(1)
    plain = ref_nvfp4_runtime(w, grid.tensor_scale.item())  # amax/6 rounded to nearest E4M3
    plain_err = (plain - w.double()).pow(2).reshape(-1, 16).sum(1)
    assert (err <= plain_err * (1 + 1e-6)).all()  # float32 decoding vs the float64 reference
    assert err.sum() < 0.97 * plain_err.sum()  # and the search finds something on heavy tails


def test_nvfp4_tiny_groups_under_a_large_global_range_do_not_become_nan():
    w = torch.full((2, 32), 1e-6)
    w[0, 0] = 1000.0  # global amax: groups of 1e-6 need a scale far below E4M3's smallest
    q = rtn(w, grid_for(NVFP4_G16).bind(w))
    deq = q.dequantize()
    assert torch.isfinite(deq).all()
    assert deq[0, 0].item() == pytest.approx(1000.0, rel=1e-6)
    assert deq[1].abs().max() <= 1e-3  # underflowed scales decode their group near zero


def test_fp4_refuses_nan():
    with pytest.raises(ValueError, match="NaN"):
        grid_for(NVFP4_G16).bind(torch.tensor([[float("nan")] * 16]))


# ------------------------------------------------------------------ MXFP4


def ref_mx_exponent(amax: float, runtime: bool) -> list[int]:
    """OCP MX: shared exponent floor(log2 amax) - 2 (E2M1's emax). The runtime rule of
    compressed-tensors/vLLM first rounds amax to a power of two (mantissa >= 1.75 rounds up)."""
    m, e = math.frexp(amax)  # amax = m * 2**e, m in [0.5, 1)
    floor_e = e - 1 - 2
    if runtime:
        return [floor_e + (1 if 2 * m >= 1.75 else 0)]
    return [floor_e, floor_e + 1]


def test_mxfp4_runtime_scales_match_the_reference():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(8, 64, generator=g) * torch.logspace(-4, 3, 64)
    x[0, :32] = torch.linspace(-1.75, 1.75, 32)  # amax exactly at the 1.75 threshold
    x[1, :32] = torch.linspace(-1.7, 1.7, 32)
    got = activation_qdq(dataclass_dynamic(MXFP4_G32))(x)
    ref = torch.empty_like(x, dtype=torch.float64)
    for r in range(8):
        for c in (0, 32):
            grp = x[r, c:c + 32].double()
            (e,) = ref_mx_exponent(grp.abs().max().item(), runtime=True)
            ref[r, c:c + 32] = ref_round(grp / 2.0**e) * 2.0**e
    assert torch.equal(got.double(), ref)


def dataclass_dynamic(spec):
    import dataclasses
    return dataclasses.replace(spec, dynamic=True)


def test_mxfp4_weight_scales_are_e8m0_and_pick_floor_or_ceil_by_error():
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(6)) * 0.02
    q = rtn(w, grid_for(MXFP4_G32))
    assert q.scale.dtype == torch.uint8 and q.scale.shape == (32, 4)
    for r in range(32):
        for k in range(4):
            grp = w[r, 32 * k:32 * k + 32].double()
            cands = ref_mx_exponent(grp.abs().max().item(), runtime=False)
            errs = [((ref_round(grp / 2.0**e) * 2.0**e - grp) ** 2).sum().item() for e in cands]
            e = int(q.scale[r, k]) - 127  # stored with bias 127
            assert e in cands
            assert errs[cands.index(e)] == min(errs)
            assert torch.equal(q.dequantize()[r, 32 * k:32 * k + 32].double(),
                               ref_round(grp / 2.0**e) * 2.0**e)


def test_mxfp4_zero_group_and_extreme_ranges():
    w = torch.zeros(3, 32)
    w[1, 0], w[2, 0] = 1e-30, 1e30
    deq = rtn(w, grid_for(MXFP4_G32)).dequantize()
    assert torch.isfinite(deq).all()
    assert deq[0].abs().max() == 0
    assert deq[1, 0].item() == pytest.approx(1e-30, rel=0.35)
    assert deq[2, 0].item() == pytest.approx(1e30, rel=0.35)


# ------------------------------------------------------------------ packing


def test_fp4_packing_matches_the_documented_layout_and_the_library():
    from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8, unpack_fp4_from_uint8

    values = torch.tensor([[0.5, -6.0, 0.0, 3.0], [-0.5, 1.5, 4.0, -2.0]])
    packed = pack_fp4(values.to(torch.float8_e4m3fn))
    # even column in the low nibble, sign in bit 3, magnitude index in bits 0-2
    assert packed.tolist() == [[0x1 | (0xF << 4), 0x0 | (0x5 << 4)], [0x9 | (0x3 << 4), 0x6 | (0xC << 4)]]
    g = torch.Generator().manual_seed(7)
    codes = ref_round(torch.randn(16, 64, generator=g) * 3).float()
    packed = pack_fp4(codes.to(torch.float8_e4m3fn))
    assert torch.equal(packed, pack_fp4_to_uint8(codes))
    assert torch.equal(unpack_fp4(packed).float(), codes)
    assert torch.equal(unpack_fp4_from_uint8(packed, 16, 64, torch.float32), codes)


def test_fp4_packing_refuses_values_off_the_grid():
    with pytest.raises(ValueError, match="E2M1"):
        pack_fp4(torch.tensor([[0.75, 1.0]]).to(torch.float8_e4m3fn))


@pytest.mark.parametrize("fmt", ["NVFP4", "MXFP4"])
def test_runtime_activation_quantization_is_the_librarys(fmt):
    """W4A4 inputs as compressed-tensors fake-quantizes them (what transformers and the
    reference implementations compute), bit for bit: dynamic group scales, NVFP4 under the
    calibrated global scale."""
    import dataclasses

    from compressed_tensors.quantization import quant_scheme
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils.helpers import compute_dynamic_scales_and_zp

    g = torch.Generator().manual_seed(8)
    x = torch.randn(8, 64, generator=g) * torch.logspace(-3, 1, 64)
    x[1, :32] = 0
    args = getattr(quant_scheme, fmt)["input_activations"]
    gs = torch.tensor([448 * 6 / 5.0]) if fmt == "NVFP4" else None
    s, z = compute_dynamic_scales_and_zp(x, args, module=None, global_scale=gs)
    theirs = fake_quantize(x, s, z, args, global_scale=gs)
    spec = NVFP4_G16 if fmt == "NVFP4" else dataclasses.replace(MXFP4_G32, dynamic=True)
    assert torch.equal(activation_qdq(spec, gs)(x), theirs)
