"""The same run on every device torch sees: the CPU always, a CUDA GPU when there is one.

On a CPU-only machine the GPU cases skip and the CPU case checks the device plumbing
(`device="cpu"` given explicitly); on a GPU machine they compare the GPU's checkpoint to the CPU's.
"""

from __future__ import annotations

import pytest
import torch

from lowbit.checkpoint import Checkpoint
from lowbit.export import CheckpointWriter
from lowbit.pipeline import quantize_layers
from lowbit.runtime.load import load_model
from lowbit.schemes import PRESETS
from tiny import tensors

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def samples(n=6, length=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 256, (length,), generator=g) for _ in range(n)]


def run(src, out, scheme, device):
    s = PRESETS[scheme]
    if s.weights.granularity == "group":
        s = s.with_options(group_size=32)
    with CheckpointWriter(out, src, s, overwrite=True) as w:
        report = quantize_layers(Checkpoint(src), s, samples(), w, device=device)
    return report


@pytest.fixture(scope="module")
def on_cpu(tiny_dir, tmp_path_factory):
    made = {}

    def get(scheme):
        if scheme not in made:
            made[scheme] = tmp_path_factory.mktemp("cpu") / scheme
            run(tiny_dir("llama"), made[scheme], scheme, "cpu")
        return made[scheme]

    return get


@pytest.mark.parametrize("device", DEVICES)
def test_data_free_scheme_is_byte_identical_on_every_device(device, on_cpu, tiny_dir, tmp_path):
    """Elementwise rounding from the stored weights: no device may change a single byte."""
    run(tiny_dir("llama"), tmp_path / "q", "FP8_DYNAMIC", device)
    ours, ref = tensors(tmp_path / "q"), tensors(on_cpu("FP8_DYNAMIC"))
    assert ours.keys() == ref.keys()
    for name in ref:
        assert torch.equal(ours[name].view(torch.uint8), ref[name].view(torch.uint8)), name


@pytest.mark.parametrize("device", DEVICES)
def test_static_fp8_is_byte_identical_on_every_device(device, on_cpu, tiny_dir, tmp_path):
    """Static FP8 weights depend on the weights alone; only the input scales come from the
    calibration forward, whose bf16 matmuls differ in the last bits between devices."""
    run(tiny_dir("llama"), tmp_path / "q", "FP8", device)
    ours, ref = tensors(tmp_path / "q"), tensors(on_cpu("FP8"))
    for name in ref:
        if not name.endswith("input_scale"):
            assert torch.equal(ours[name].view(torch.uint8), ref[name].view(torch.uint8)), name
        else:
            assert torch.allclose(ours[name].float(), ref[name].float(), rtol=0.02), name


@pytest.mark.parametrize("device", DEVICES)
def test_gptq_is_as_accurate_on_every_device(device, on_cpu, tiny_dir, tmp_path):
    """GPTQ's rounding choices cascade, so last-bit Hessian differences change many codes; what
    must hold is the quality: the model's output error is the CPU run's, within 10 %."""
    run(tiny_dir("llama"), tmp_path / "q", "W4A16", device)
    ids = samples(1, 40, seed=9)[0][None]
    base = load_model(tiny_dir("llama"))(input_ids=ids).logits.double()
    err = {k: (load_model(p)(input_ids=ids).logits.double() - base).norm().item()
           for k, p in (("ours", tmp_path / "q"), ("cpu", on_cpu("W4A16")))}
    assert 0.9 * err["cpu"] <= err["ours"] <= 1.1 * err["cpu"]


def test_layers_and_statistics_live_on_the_requested_device(tiny_dir, tmp_path, monkeypatch):
    """Every Linear the solver sees sits on the device asked for (GPU runs must not fall back)."""
    import lowbit.pipeline as pipeline

    device = DEVICES[-1]
    seen = []
    solve = pipeline._solve

    def spy(weights, stats, grid, scheme):
        seen.extend(w.device.type for w in weights.values())
        if stats is not None and stats.hessian is not None:
            seen.append(stats.hessian.sum.device.type)
        return solve(weights, stats, grid, scheme)

    monkeypatch.setattr(pipeline, "_solve", spy)
    run(tiny_dir("llama"), tmp_path / "q", "W4A16", device)
    assert seen and set(seen) == {torch.device(device).type}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scheme, options", [
    ("NVFP4A16", dict(algorithm="mr-gptq")), ("MXFP4", dict(algorithm="gptq")),
    ("W4A16", dict(group_size=32, sparsity=0.5, sparsity_structure="2:4"))],
    ids=["nvfp4a16-mr-gptq", "mxfp4-gptq", "w4a16-2:4"])
def test_frontier_formats_run_on_every_device_with_cpu_accuracy(device, scheme, options, tiny_dir,
                                                                 tmp_path):
    """FP4 grids, Hadamard rotations and SparseGPT masks follow the layer to the device, and
    the result is as accurate as the CPU's (output error within 15 %)."""
    s = PRESETS[scheme].with_options(**options)
    src = tiny_dir("llama")
    for where, out in (("cpu", tmp_path / "cpu"), (device, tmp_path / "dev")):
        with CheckpointWriter(out, src, s, overwrite=True) as w:
            quantize_layers(Checkpoint(src), s, samples(), w, device=where)
    ids = samples(1, 40, seed=9)[0][None]
    base = load_model(src)(input_ids=ids).logits.double()
    err = [(load_model(p)(input_ids=ids).logits.double() - base).norm().item()
           for p in (tmp_path / "cpu", tmp_path / "dev")]
    assert 0 < err[1] <= 1.15 * err[0]
