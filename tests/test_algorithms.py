"""Algorithms on random matrices: each is a function of (weight, statistics, grid)."""

import pytest
import torch

from lowbit.algorithms.gptq import gptq
from lowbit.algorithms.rtn import rtn
from lowbit.formats.grid import grid_for
from lowbit.schemes import QuantSpec
from lowbit.stats import Hessian

SPECS = {
    "int4-g32": QuantSpec("int", 4, "group", group_size=32),
    "int4-g32-asym": QuantSpec("int", 4, "group", group_size=32, symmetric=False),
    "int4-channel": QuantSpec("int", 4, "channel"),
    "int8-channel": QuantSpec("int", 8, "channel"),
    "fp8-channel": QuantSpec("fp8", 8, "channel"),
}


def correlated_inputs(n=128, tokens=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g) / n**0.5
    scale = torch.logspace(-1, 1, n)  # some inputs carry far more energy than others
    return (torch.randn(tokens, n, generator=g) @ mix + 0.05 * torch.randn(tokens, n, generator=g)) * scale


def output_error(X, W, q):
    return ((X @ (q.dequantize().double() - W.double()).T.float()).norm() / (X @ W.T).norm()).item()


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_beats_rtn_on_correlated_inputs(name, act_order):
    X = correlated_inputs()
    W = torch.randn(48, X.shape[1], generator=torch.Generator().manual_seed(1))
    h = Hessian(X.shape[1])
    for chunk in X.split(512):  # accumulated like calibration batches
        h.update(chunk)
    grid = grid_for(SPECS[name], torch.bfloat16)
    e_gptq = output_error(X, W, gptq(W, h.mean(), grid, act_order=act_order))
    e_rtn = output_error(X, W, rtn(W, grid))
    # visiting high-energy inputs first is where most of the gain comes from on such inputs
    assert e_gptq < (0.85 if act_order else 0.97) * e_rtn


def test_gptq_codes_lie_on_the_grid_with_the_returned_parameters():
    X = correlated_inputs(n=64)
    W = torch.randn(16, 64)
    grid = grid_for(SPECS["int4-g32-asym"], torch.bfloat16)
    q = gptq(W, X.T @ X / len(X), grid)
    assert q.codes.dtype == torch.int8 and q.codes.min() >= -8 and q.codes.max() <= 7
    assert q.scale.shape == (16, 2) and q.zero.shape == (16, 2)
    # the dequantized weight is exactly (code - zero) * scale with the stored parameters
    ref = (q.codes.double() - q.zero.double().repeat_interleave(32, 1)) * q.scale.double().repeat_interleave(32, 1)
    assert torch.equal(q.dequantize().double(), ref.to(torch.bfloat16).double())


def test_gptq_with_identity_hessian_equals_rtn_for_fixed_parameters():
    """With uncorrelated inputs there is no error to redistribute: GPTQ reduces to rounding."""
    W = torch.randn(8, 64)
    grid = grid_for(SPECS["int8-channel"])
    assert torch.equal(gptq(W, torch.eye(64), grid, act_order=False).codes, rtn(W, grid).codes)


def test_gptq_ignores_dead_inputs():
    X = correlated_inputs(n=64)
    X[:, 5] = 0  # an input that never fires
    W = torch.randn(8, 64)
    q = gptq(W, X.T @ X / len(X), grid_for(SPECS["int8-channel"]))
    assert (q.codes[:, 5] == 0).all()


def test_hessian_is_a_sum_and_count_that_merges_exactly():
    X = correlated_inputs(n=16, tokens=300)
    whole, a, b = Hessian(16), Hessian(16), Hessian(16)
    whole.update(X)
    a.update(X[:100])
    b.update(X[100:])
    a.merge(b)
    assert a.count == whole.count == 300
    assert torch.allclose(a.mean().double(), (X.double().T @ X.double()) / 300, rtol=1e-5, atol=1e-6)


def test_smoothing_folded_into_a_norm_preserves_the_function():
    from lowbit.algorithms.smoothquant import fold_into_norm, smoothing_scales

    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 32, generator=g) * torch.logspace(-1, 2, 32)  # outlier channels
    norm = (torch.rand(32, generator=g) + 0.5).bfloat16()
    W = torch.randn(16, 32, generator=g)
    for offset in (0.0, 1.0):  # Llama-style w, Gemma-style (1 + w)
        s = smoothing_scales(x.abs().amax(0), W.abs().amax(0), 0.5)
        stored, applied = fold_into_norm(norm, s, offset)
        assert stored.dtype == torch.bfloat16
        before = (x * (offset + norm.float())) @ W.T
        after = (x * (offset + stored.float())) @ (W * applied).T
        assert torch.allclose(after, before, rtol=1e-4, atol=1e-4 * before.abs().max().item())


def test_auto_smoothquant_beats_no_smoothing_on_outlier_activations():
    from lowbit.algorithms.smoothquant import search_alpha, smoothing_scales
    from lowbit.formats.grid import activation_qdq

    g = torch.Generator().manual_seed(4)
    x = torch.randn(512, 64, generator=g)
    x[:, [3, 17, 40]] *= 60  # the few huge channels SmoothQuant is for
    W = torch.randn(32, 64, generator=g) * 0.05
    wgrid = grid_for(SPECS["int8-channel"])
    qw = lambda w: rtn(w, wgrid).dequantize().float()  # noqa: E731
    qx = activation_qdq(QuantSpec("int", 8, "token", dynamic=True))

    def err(s):
        return ((qx(x / s) @ qw(W * s).T - x @ W.T).norm() / (x @ W.T).norm()).item()

    scales = lambda a: smoothing_scales(x.abs().amax(0), W.abs().amax(0), a)  # noqa: E731
    alpha = search_alpha(x, [W], scales, qw, qx)
    assert 0 < alpha <= 1
    assert err(scales(alpha)) < 0.5 * err(torch.ones(64))


@pytest.mark.parametrize("name", ["int4-g32-asym", "int8-channel"])
def test_gptq_on_a_stacked_fused_set_equals_gptq_per_member(name):
    """Rows are independent given the shared Hessian: q/k/v can run as one matrix."""
    X = correlated_inputs(n=64)
    H = X.T @ X / len(X)
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(24, 64, generator=g), torch.randn(8, 64, generator=g) * 3
    grid = grid_for(SPECS[name], torch.bfloat16)
    both = gptq(torch.cat([a, b]), H, grid)
    for q, (lo, hi) in zip((gptq(a, H, grid), gptq(b, H, grid)), ((0, 24), (24, 32))):
        part = both.rows(lo, hi)
        assert torch.equal(part.codes, q.codes) and torch.equal(part.scale, q.scale)
        assert torch.equal(part.dequantize(), q.dequantize())


def test_absmax_is_the_largest_magnitude_per_channel_and_overall():
    from lowbit.stats import AbsMax

    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(2, 5, 7, generator=g) * torch.linspace(0.1, 9, 7) for _ in range(3)]
    xs[1][0, 2, 4] = -50.0  # a negative extreme must count by its magnitude
    per, whole = AbsMax(per_channel=True), AbsMax()
    for x in xs:
        per.update(x.to(torch.bfloat16))
        whole.update(x)
    ref = torch.cat([x.double().reshape(-1, 7) for x in xs]).abs()
    assert torch.equal(per.value.double(), torch.cat([x.to(torch.bfloat16).double().reshape(-1, 7)
                                                      for x in xs]).abs().amax(0))
    assert whole.value.item() == ref.max().item() == 50.0
    bad = xs[0].clone()
    bad[0, 0, 3] = float("nan")
    per.update(bad)
    assert per.value[3].isnan() and not per.value[2].isnan()
