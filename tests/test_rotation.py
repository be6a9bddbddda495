"""MR-GPTQ's block-wise Hadamard rotation: the algebra in float64, agreement with the
compressed-tensors transforms the checkpoint's transform_config names, and the end-to-end
promise that a runtime applying transform_config computes the original function."""

from __future__ import annotations

import json
import math

import pytest
import torch
from compressed_tensors.transform import TransformConfig
from compressed_tensors.transform.apply import apply_transform_config
from compressed_tensors.transform.utils.hadamard import deterministic_hadamard_matrix

from lowbit.algorithms.gptq import gptq
from lowbit.algorithms.rotation import hadamard, rotate_hessian, rotate_input, rotate_weight
from lowbit.errors import LowbitError
from lowbit.export import transform_config
from lowbit.formats.grid import grid_for
from lowbit.runtime.load import load_model
from lowbit.schemes import MXFP4_G32, PRESETS
from test_export import samples, write_quantized


def ref_block_hadamard(n: int, b: int) -> torch.Tensor:
    """R = diag(H_b, ..., H_b) / sqrt(b), H_b from the ±1 recursion H_2k = [[H, H], [H, -H]]."""
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < b:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)])
    return torch.block_diag(*[H / math.sqrt(b)] * (n // b))


@pytest.mark.parametrize("b", [16, 32])
def test_rotation_is_the_block_diagonal_hadamard_and_preserves_the_linear(b):
    g = torch.Generator().manual_seed(0)
    W, x = torch.randn(24, 128, generator=g), torch.randn(5, 128, generator=g, dtype=torch.float64)
    R = ref_block_hadamard(128, b)
    assert torch.allclose(R @ R.T, torch.eye(128, dtype=torch.float64), atol=1e-12)
    assert torch.equal(hadamard(b), deterministic_hadamard_matrix(b, torch.float64))
    assert torch.allclose(rotate_weight(W, b).double(), W.double() @ R, atol=1e-6)
    assert torch.allclose(rotate_input(x, b), x @ R, atol=1e-6)
    # x R (W R)ᵀ = x Wᵀ: the rotated pair computes the original Linear
    assert torch.allclose(rotate_input(x, b) @ rotate_weight(W, b).double().T, x @ W.double().T, atol=1e-4)
    # the Hessian of rotated inputs is Rᵀ Hess R
    X = torch.randn(300, 128, generator=g, dtype=torch.float64)
    assert torch.allclose(rotate_hessian(X.T @ X, b), (X @ R).T @ (X @ R), atol=1e-9)


def test_transform_config_means_to_the_library_what_we_do():
    """Apply our transform_config with compressed-tensors itself to a Linear holding W: it must
    fuse exactly W R into the weight and rotate inputs exactly as our runtime does."""
    g = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(64, 8, bias=False)
    W = torch.randn(8, 64, generator=g)
    lin.weight.data = W.clone()
    model = torch.nn.Sequential(lin)
    apply_transform_config(model, TransformConfig.model_validate(transform_config(16, [])))
    assert torch.allclose(lin.weight.data, rotate_weight(W, 16), atol=1e-6)
    x = torch.randn(3, 64, generator=g)
    seen = {}
    lin.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    y = model(x)
    assert torch.equal(seen["x"], rotate_input(x, 16))  # the library's online transform, ours bit for bit
    assert torch.allclose(y, x @ W.T, atol=1e-4)


def test_mr_gptq_beats_gptq_on_mxfp4_with_outlier_inputs():
    """The paper's case: a few input channels carry outliers. The rotation spreads each over its
    own 32-wide group, which the power-of-two scale of MXFP4 handles far better."""
    g = torch.Generator().manual_seed(2)
    X = torch.randn(2048, 256, generator=g)
    X[:, torch.randperm(256, generator=g)[:8]] *= 20  # outlier channels
    W = torch.randn(64, 256, generator=g) * (1 + 4 * (torch.rand(64, 256, generator=g) > 0.98))
    Hess = X.T.double() @ X.double() / X.shape[0]
    grid = grid_for(MXFP4_G32)

    def out_err(Wq, Xin):
        return ((Xin.double() @ Wq.double().T - X.double() @ W.double().T).norm() / (X.double() @ W.double().T).norm()).item()

    plain = gptq(W, Hess.float(), grid).dequantize()
    rotated = gptq(rotate_weight(W, 32), rotate_hessian(Hess, 32).float(), grid).dequantize()
    e_plain, e_rot = out_err(plain, X), out_err(rotated, rotate_input(X, 32))
    assert e_rot < 0.9 * e_plain, (e_rot, e_plain)


def test_mr_gptq_needs_power_of_two_groups():
    with pytest.raises(LowbitError, match="mr-gptq"):
        PRESETS["FP8"].with_options(algorithm="mr-gptq")
    assert PRESETS["MXFP4"].with_options(algorithm="mr-gptq").rotation_block == 32
    assert PRESETS["NVFP4A16"].with_options(algorithm="mr-gptq").rotation_block == 16
    assert PRESETS["NVFP4A16"].rotation_block is None


@pytest.mark.parametrize("scheme", ["MXFP4", "NVFP4A16"])
def test_mr_gptq_checkpoint_records_the_rotation_and_lowbit_applies_it(scheme, tiny_dir, tmp_path):
    out = write_quantized(tiny_dir("llama"), tmp_path / "q", scheme, algorithm="mr-gptq")
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    parsed = TransformConfig.model_validate(cfg["transform_config"])
    (t,) = parsed.config_groups.values()
    b = 32 if scheme == "MXFP4" else 16
    assert (t.type, t.head_dim) == ("hadamard", b)
    assert {(a.location, a.inverse) for a in t.apply} == {("input", False), ("weight_input", True)}
    assert all(a.targets == ["Linear"] and a.ignore == ["lm_head"] for a in t.apply)

    ids = samples(1, 40, seed=9)[0][None]
    base = load_model(tiny_dir("llama"))(input_ids=ids).logits
    ours = load_model(out)(input_ids=ids).logits
    err = ((ours - base).norm() / base.norm()).item()
    # without applying the online rotation, the stored (rotated) weights compute something else
    del cfg["transform_config"]
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = cfg
    (out / "config.json").write_text(json.dumps(config))
    unrotated = load_model(out)(input_ids=ids).logits
    assert err < 0.5 < ((unrotated - base).norm() / base.norm()).item()


def test_mr_gptq_and_smoothquant_do_not_combine():
    with pytest.raises(LowbitError, match="smoothquant"):
        PRESETS["MXFP4"].with_options(algorithm="mr-gptq", smoothing="auto")
