"""SparseGPT on random matrices and on a tiny model's real activations: the pattern it promises,
and output errors (float64, computed here) below magnitude pruning's."""

import pytest
import torch

from lowbit.algorithms.gptq import gptq
from lowbit.algorithms.rtn import rtn
from lowbit.algorithms.sparsegpt import sparsegpt
from lowbit.errors import LowbitError
from lowbit.formats.grid import grid_for
from lowbit.schemes import QuantSpec
from test_algorithms import correlated_inputs
from tiny import tiny_model

SPECS = {
    "int4-g32": QuantSpec("int", 4, "group", group_size=32),
    "int4-g32-asym": QuantSpec("int", 4, "group", group_size=32, symmetric=False),
    "int8-channel": QuantSpec("int", 8, "channel"),
    "fp8-tensor": QuantSpec("fp8", 8, "tensor"),
}


def scattered_inputs(n=128):
    """Correlated inputs whose high-energy channels are scattered, as LLM outlier channels are
    (adjacent channels of similar energy would leave a 2:4 pattern nothing to choose)."""
    X = correlated_inputs(n=n)
    return X[:, torch.randperm(n, generator=torch.Generator().manual_seed(0))]


def rel_output_error(X, W, Wq):
    """||X (Wq - W)^T|| / ||X W^T|| in float64."""
    X, W, Wq = X.double(), W.double(), Wq.double()
    return ((X @ (Wq - W).T).norm() / (X @ W.T).norm()).item()


def magnitude_prune(W, sparsity, structure):
    """Reference baseline, written independently: drop the smallest |w| (per row for
    unstructured, the 2 smallest of every 4 input columns for 2:4)."""
    W = W.double().clone()
    if structure == "2:4":
        quads = W.reshape(W.shape[0], -1, 4)
        drop = quads.abs().argsort(dim=-1)[..., :2]
        return quads.scatter(-1, drop, 0.0).reshape(W.shape)
    k = int(W.shape[1] * sparsity)
    drop = W.abs().argsort(dim=1)[:, :k]
    return W.scatter(1, drop, 0.0)


def hessian(X):
    X = X.double()
    return (X.T @ X / len(X)).float()


def assert_two_of_four(Wp):
    quads = Wp.reshape(Wp.shape[0], -1, 4)
    zeros = (quads == 0).sum(-1)
    assert (zeros >= 2).all(), "a group of 4 input columns keeps more than 2 weights"


@pytest.mark.parametrize("name", [None, *SPECS])
def test_2_4_pattern_holds_in_every_group_of_four(name):
    X = correlated_inputs()
    W = torch.randn(48, X.shape[1], generator=torch.Generator().manual_seed(1))
    grid = grid_for(SPECS[name], torch.bfloat16).bind(W) if name else None
    Wp, q = sparsegpt(W, hessian(X), grid, sparsity=0.5, structure="2:4")
    assert_two_of_four(Wp)
    if q is not None:
        assert_two_of_four(q.dequantize())
        assert q.mask.reshape(48, -1, 4).sum(-1).eq(2).all()  # exactly 2 of 4 chosen
        assert (q.dequantize()[q.mask] == 0).all()  # pruned weights stored as an exact zero
        assert torch.equal(q.dequantize().float(), Wp)


@pytest.mark.parametrize("sparsity", [0.5, 0.6, 0.7])
def test_unstructured_sparsity_is_the_requested_fraction_of_every_block(sparsity):
    X = correlated_inputs(n=256)
    W = torch.randn(32, 256, generator=torch.Generator().manual_seed(2))
    Wp, _ = sparsegpt(W, hessian(X), None, sparsity=sparsity, structure="unstructured", block=128)
    for b in range(0, 256, 128):
        assert (Wp[:, b:b + 128] == 0).sum().item() == int(32 * 128 * sparsity)


@pytest.mark.parametrize("structure,sparsity", [("2:4", 0.5), ("unstructured", 0.5), ("unstructured", 0.7)])
def test_sparsegpt_beats_magnitude_pruning_on_correlated_inputs(structure, sparsity):
    X = scattered_inputs()
    W = torch.randn(48, X.shape[1], generator=torch.Generator().manual_seed(3))
    Wp, _ = sparsegpt(W, hessian(X), None, sparsity=sparsity, structure=structure)
    e_sparse = rel_output_error(X, W, Wp)
    e_magnitude = rel_output_error(X, W, magnitude_prune(W, sparsity, structure))
    assert e_sparse < 0.5 * e_magnitude


@torch.no_grad()
@pytest.mark.parametrize("structure,sparsity", [("2:4", 0.5), ("unstructured", 0.6)])
def test_sparsegpt_beats_magnitude_pruning_on_a_tiny_models_activations(structure, sparsity):
    """Every Linear of a tiny Llama's first layer, on the inputs it really sees."""
    model = tiny_model("llama")
    layer = model.model.layers[0]
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: inputs.setdefault(n, []).append(a[0]))
             for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]
    ids = torch.randint(4, 256, (8, 64), generator=torch.Generator().manual_seed(4))
    model(input_ids=ids)
    for h in hooks:
        h.remove()
    for name, lin in layer.named_modules():
        if not isinstance(lin, torch.nn.Linear):
            continue
        X = torch.cat(inputs[name]).reshape(-1, lin.in_features)
        W = lin.weight.float()
        Wp, _ = sparsegpt(W, hessian(X), None, sparsity=sparsity, structure=structure)
        assert rel_output_error(X, W, Wp) < rel_output_error(X, W, magnitude_prune(W, sparsity, structure)), name


@pytest.mark.parametrize("name", ["int4-g32", "int4-g32-asym"])
def test_joint_prune_and_quantize_beats_pruning_then_rounding(name):
    """One sweep that compensates pruning and rounding errors together (the paper's joint mode)
    against pruning with compensation, then rounding the survivors to nearest. (On INT8 and
    FP8 grids the rounding error is too small next to the pruning error to tell them apart.)"""
    X = scattered_inputs()
    W = torch.randn(48, X.shape[1], generator=torch.Generator().manual_seed(5))
    grid = grid_for(SPECS[name], torch.bfloat16)
    H = hessian(X)
    joint, q = sparsegpt(W, H, grid, structure="2:4")
    pruned, _ = sparsegpt(W, H, None, structure="2:4")
    then_rtn = rtn(pruned, grid).dequantize()
    assert_two_of_four(then_rtn)
    assert rel_output_error(X, W, joint) < rel_output_error(X, W, then_rtn)


def test_joint_codes_lie_on_the_grid_with_the_returned_parameters():
    X = correlated_inputs(n=64)
    W = torch.randn(16, 64)
    _, q = sparsegpt(W, hessian(X), grid_for(SPECS["int4-g32-asym"], torch.bfloat16), structure="2:4")
    assert q.codes.dtype == torch.int8 and q.codes.min() >= -8 and q.codes.max() <= 7
    assert q.scale.shape == (16, 2) and q.zero.shape == (16, 2)
    zero, scale = q.zero.double().repeat_interleave(32, 1), q.scale.double().repeat_interleave(32, 1)
    assert torch.equal(q.dequantize().double(), ((q.codes.double() - zero) * scale).to(torch.bfloat16).double())
    assert torch.equal(q.codes[q.mask].double(), zero[q.mask])  # a pruned weight is the zero point


def test_gptq_is_the_same_sweep_without_a_mask():
    """Unchanged GPTQ: storage-order GPTQ equals the shared sweep run with nothing pruned."""
    X = correlated_inputs(n=64)
    W = torch.randn(16, 64)
    grid = grid_for(SPECS["int4-g32"], torch.bfloat16)
    assert gptq(W, hessian(X), grid, act_order=False).mask is None


@pytest.mark.parametrize("kwargs,match", [
    (dict(sparsity=0.0), "strictly between 0 and 1"),
    (dict(sparsity=1.0), "strictly between 0 and 1"),
    (dict(sparsity=0.6, structure="2:4"), "exactly half"),
    (dict(sparsity=0.5, structure="4:8"), "unknown sparsity structure"),
])
def test_invalid_sparsity_is_a_lowbit_error(kwargs, match):
    with pytest.raises(LowbitError, match=match):
        sparsegpt(torch.randn(4, 8), torch.eye(8), None, **kwargs)


def test_2_4_needs_in_features_divisible_by_4():
    with pytest.raises(LowbitError, match="divisible by 4"):
        sparsegpt(torch.randn(4, 10), torch.eye(10), None, structure="2:4")
