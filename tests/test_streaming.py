"""Bounded memory without changing a bit: row-chunked encode/fit, chunked Hessian means and the
streamed pipeline give exactly what whole-matrix computation gives."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lowbit.algorithms.gptq import gptq
from lowbit.algorithms.rtn import rtn
from lowbit.checkpoint import Checkpoint
from lowbit.export import CheckpointWriter
from lowbit.formats import grid as grid_module
from lowbit.pipeline import quantize_layers
from lowbit.schemes import PRESETS
from lowbit.stats import Hessian
from tiny import tensors

SCHEMES = ["FP8", "W8A16_FP8", "W4A16", "W4A16_ASYM", "W8A16", "W8A8_INT8", "NVFP4A16", "MXFP4A16"]


def weight_spec(name: str):
    spec = PRESETS[name].weights
    return dataclasses.replace(spec, group_size=32) if spec.granularity == "group" else spec


def adversarial_weight(seed: int = 0) -> torch.Tensor:
    """Rows of very different ranges, an all-zero row, a lone outlier, exact ties: bf16."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(70, 128, generator=g) * torch.logspace(-3, 1, 70)[:, None]
    w[4] = 0
    w[9, 17] = 300.0
    w[11, :8] = 0.5  # many equal values: rounding ties on coarse grids
    return w.bfloat16()


@pytest.mark.parametrize("name", SCHEMES)
def test_row_chunked_fit_and_encode_are_bit_identical(name, monkeypatch):
    w = adversarial_weight().float()
    grid = grid_module.grid_for(weight_spec(name), torch.bfloat16).bind(w)
    blocks = w.reshape(-1, 32) if grid.spec.granularity == "group" else w
    whole_p = grid.fit(blocks)
    whole = grid.encode(blocks, whole_p)
    monkeypatch.setattr(grid_module, "ROW_CHUNK", 100)  # a few rows per chunk, a ragged last one
    p = grid.fit(blocks)
    assert torch.equal(p.scale, whole_p.scale)
    assert (p.zero is None) == (whole_p.zero is None)
    if p.zero is not None:
        assert torch.equal(p.zero, whole_p.zero)
    codes = grid.encode(blocks, p)
    assert codes.dtype == whole.dtype and torch.equal(codes.float(), whole.float())
    # and rtn as a whole, whose encode sees [out, in] codes with broadcast group parameters
    monkeypatch.setattr(grid_module, "ROW_CHUNK", 1 << 40)
    ref = rtn(w, grid)
    monkeypatch.setattr(grid_module, "ROW_CHUNK", 64)
    got = rtn(w, grid)
    assert torch.equal(got.codes.float(), ref.codes.float()) and torch.equal(got.scale, ref.scale)


def test_encode_matches_float64_reference_when_chunked(monkeypatch):
    """FP8 per channel, chunked: codes are round-half-even(clip(w / scale)) computed in float64."""
    monkeypatch.setattr(grid_module, "ROW_CHUNK", 128 * 3)
    w = adversarial_weight(1).float()
    grid = grid_module.grid_for(weight_spec("W8A16_FP8"), torch.bfloat16)
    p = grid.fit(w)
    expected = (w.double() / p.scale.double()).clamp(-448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(grid.encode(w, p).float(), expected.float())


def test_hessian_take_mean_hands_over_the_sum_itself():
    g = torch.Generator().manual_seed(0)
    h = Hessian(300)
    for _ in range(3):
        h.update(torch.randn(40, 300, generator=g))
    expected, storage = h.sum.double() / 120, h.sum.data_ptr()
    assert torch.equal(h.mean(), (h.sum / 120))
    mean = h.take_mean()
    assert mean.data_ptr() == storage and h.sum is None  # no second [in, in] copy
    assert torch.allclose(mean.double(), expected, rtol=1e-6, atol=0)


def test_gptq_takes_bf16_weights_and_float32_hessian_as_it_took_float32_and_float64():
    w = adversarial_weight(2)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(400, 128, generator=g)
    x[:, 5] = 0  # a dead input
    h = Hessian(128)
    h.update(x)
    grid = grid_module.grid_for(weight_spec("W4A16"), torch.bfloat16)
    a = gptq(w, h.mean(), grid)
    b = gptq(w.float(), h.mean().double(), grid)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)


@pytest.mark.parametrize("name", ["FP8", "W4A16"])
def test_pipeline_checkpoint_does_not_depend_on_chunk_size(name, tiny_dir, tmp_path, monkeypatch):
    src = tiny_dir("llama")
    scheme = PRESETS[name]
    if scheme.weights.granularity == "group":
        scheme = scheme.with_options(group_size=32)
    g = torch.Generator().manual_seed(0)
    samples = [torch.randint(7, 250, (40,), generator=g) for _ in range(4)]

    def run(out):
        with CheckpointWriter(out, src, scheme) as w:
            quantize_layers(Checkpoint(src), scheme, samples, w)
        return tensors(out)

    whole = run(tmp_path / "whole")
    monkeypatch.setattr(grid_module, "ROW_CHUNK", 96)
    chunked = run(tmp_path / "chunked")
    assert whole.keys() == chunked.keys()
    for k in whole:
        assert torch.equal(whole[k].view(torch.uint8), chunked[k].view(torch.uint8)), k


def test_down_projection_hessian_in_its_own_pass_changes_nothing(tiny_dir, tmp_path, monkeypatch):
    """Collecting the wide Hessian in a forward of its own (large models) gives the same bytes
    as collecting it in the shared pass (small models), and the separate pass really runs."""
    from lowbit import pipeline

    src = tiny_dir("llama")
    scheme = PRESETS["W4A16"].with_options(group_size=32)
    g = torch.Generator().manual_seed(0)
    samples = [torch.randint(7, 250, (40,), generator=g) for _ in range(4)]
    calls = []
    separate = pipeline._later_hessian
    monkeypatch.setattr(pipeline, "_later_hessian", lambda *a, **k: calls.append(1) or separate(*a, **k))

    def run(out):
        with CheckpointWriter(out, src, scheme) as w:
            quantize_layers(Checkpoint(src), scheme, samples, w)
        return tensors(out)

    shared = run(tmp_path / "shared")
    assert not calls
    monkeypatch.setattr(pipeline, "LATER_HESSIAN_BYTES", 0)
    own_pass = run(tmp_path / "own")
    assert calls  # one per layer
    assert shared.keys() == own_pass.keys()
    for k in shared:
        assert torch.equal(shared[k].view(torch.uint8), own_pass[k].view(torch.uint8)), k


def test_hessian_in_row_blocks_matches_float64_reference(monkeypatch):
    from lowbit import stats

    x = torch.randn(3, 50, 70, generator=torch.Generator().manual_seed(0)).bfloat16()
    ref = x.double().reshape(-1, 70).T @ x.double().reshape(-1, 70)
    for rows in (16, 70, 4096):
        monkeypatch.setattr(stats, "HESSIAN_ROWS", rows)
        h = Hessian(70)
        h.update(x[:2])
        h.update(x[2:])
        assert h.count == 150
        assert torch.allclose(h.sum.double(), ref, rtol=1e-5, atol=1e-4), rows  # float32 products and sum


def test_finiteness_check_in_chunks(monkeypatch):
    from lowbit import checkpoint

    monkeypatch.setattr(checkpoint, "FINITE_CHUNK", 7)
    t = torch.randn(5, 9).bfloat16()
    assert checkpoint._all_finite(t)
    huge = torch.full((5, 9), 3e38, dtype=torch.bfloat16)  # finite values whose sum overflows
    assert checkpoint._all_finite(huge)
    for bad in (float("nan"), float("inf"), -float("inf")):
        for at in (0, 20, 44):  # first, a middle and the last chunk
            u = t.clone()
            u.view(-1)[at] = bad
            assert not checkpoint._all_finite(u), (bad, at)
