"""FP8 and FP4 (NVFP4/MXFP4) Linears kept as stored (runtime/linear.py, kernels_fp.py) against
a float64 product written here and against the dequantizing reference path: both the row kernel
(decode) and the dense per-call path (prefill), odd K, every scale granularity, the fallback
without the C kernels, and whole tiny models for every FP scheme, rotations included."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import lowbit
from lowbit.formats.fp4 import E2M1_VALUES
from lowbit.formats.grid import Quantized, grid_for
from lowbit.runtime import kernels_fp as F
from lowbit.runtime.linear import packed_linear, resident_bytes
from lowbit.runtime.load import load_model
from lowbit.schemes import FP8_CHANNEL, FP8_TENSOR, MXFP4_G32, NVFP4_G16

from test_export import write_quantized

needs_c = pytest.mark.skipif(F.library() is None, reason="no C compiler here")


def random_fp8(n: int, k: int, per_channel: bool, seed: int = 0) -> Quantized:
    g = torch.Generator().manual_seed(seed)
    codes = (torch.randn(n, k, generator=g) * 40).clamp(-448, 448).to(torch.float8_e4m3fn)
    codes[0, : min(k, 9)] = torch.tensor([2.0**-9, -(2.0**-8), 3 * 2.0**-9, 0, -0.0, 448, -448, 1, 0.5][:min(k, 9)])
    scale = ((torch.rand(n if per_channel else 1, 1, generator=g) + 0.1) / 100).bfloat16()
    if not per_channel:
        scale = scale.reshape(1)
    return Quantized(codes, scale, grid_for(FP8_CHANNEL if per_channel else FP8_TENSOR, torch.bfloat16))


def random_fp4(n: int, k: int, kind: str, seed: int = 0) -> Quantized:
    g = torch.Generator().manual_seed(seed)
    values = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES))
    codes = values[torch.randint(0, 16, (n, k), generator=g)].to(torch.float8_e4m3fn)
    if kind == "nvfp4":
        scale = (torch.rand(n, k // 16, generator=g) * 400 + 2.0**-9).to(torch.float8_e4m3fn)
        grid = grid_for(NVFP4_G16).bind_amax(torch.tensor(3.7))
    else:
        scale = torch.randint(118, 131, (n, k // 32), generator=g, dtype=torch.uint8)
        grid = grid_for(MXFP4_G32)
    return Quantized(codes, scale, grid)


def exact(q: Quantized) -> torch.Tensor:
    """float64 weights: codes times their scale, per group for FP4 (unit = E4M3 / global, or
    2^(u - 127))."""
    n, k = q.codes.shape
    if q.grid.spec.granularity != "group":
        return q.codes.double() * q.scale.double().reshape(-1, 1)
    if q.grid.scale_kind == "e8m0":
        unit = torch.exp2(q.scale.double() - 127)
    else:
        unit = q.scale.double() / q.grid.tensor_scale.double()
    return q.codes.double() * unit.repeat_interleave(k // q.scale.shape[1], 1)


def check(linear, x: torch.Tensor, q: Quantized, dense_bf16: bool) -> None:
    y = linear(x)
    w = exact(q)
    want = x.double() @ w.T
    size = x.double().abs() @ w.abs().T
    rows = x.reshape(-1, x.shape[-1]).shape[0]
    if dense_bf16 and rows >= F.DENSE_ROWS or x.dtype == torch.bfloat16:
        # bf16 GEMM (or bf16 inputs): inputs round to bf16 (2^-9 relative), the weights do not
        # (E4M3 values and E2M1 times an E4M3 / power-of-two scale are bf16 values), the bf16
        # product rounds once more (2^-9 of |x| @ |w| at most), and a bf16 output once more
        bound = 3 * 2.0**-9 * size
    else:
        # float32 inputs times exact weights, float32 sums: ~K * 2^-24 relative; 2^-14 is loose
        bound = 2.0**-14 * size
    assert y.shape == want.shape and y.dtype == x.dtype
    assert ((y.double() - want).abs() <= bound + 1e-30).all(), (y.double() - want).abs().max()


def inputs(k: int, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(k)
    return [torch.randn(1, k, generator=g).to(dtype), torch.randn(3, k, generator=g).to(dtype),
            torch.randn(2, F.DENSE_ROWS, k, generator=g).to(dtype),
            torch.randn(F.DENSE_ROWS - 1, k, generator=g).to(dtype)]


@needs_c
@pytest.mark.parametrize("k", [77, 96, 133, 1000])
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_kernel_matches_the_exact_product(k, per_channel, dtype):
    q = random_fp8(37, k, per_channel, seed=k)
    linear = packed_linear(q, None, dtype)
    assert linear.kernel == "fp8-c"
    for x in inputs(k) + inputs(k, torch.bfloat16):
        check(linear, x, q, F.dense_dtype(dtype) == torch.bfloat16)


@needs_c
@pytest.mark.parametrize("kind, k", [("nvfp4", 16), ("nvfp4", 48), ("nvfp4", 80), ("nvfp4", 1024),
                                     ("mxfp4", 32), ("mxfp4", 96), ("mxfp4", 160)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp4_kernel_matches_the_exact_product(kind, k, dtype):
    q = random_fp4(29, k, kind, seed=k)
    linear = packed_linear(q, None, dtype)
    assert linear.kernel == "fp4-c"
    for x in inputs(k) + inputs(k, torch.bfloat16):
        check(linear, x, q, F.dense_dtype(dtype) == torch.bfloat16)


@pytest.mark.parametrize("q", [random_fp8(19, 45, True), random_fp8(19, 45, False),
                               random_fp4(19, 64, "nvfp4"), random_fp4(19, 64, "mxfp4")],
                         ids=["fp8-channel", "fp8-tensor", "nvfp4", "mxfp4"])
def test_the_fallback_computes_what_the_reference_path_loads(q):
    linear = packed_linear(q, None, torch.float32, fast=False)
    assert linear.kernel == "dequant"
    x = torch.randn(5, q.codes.shape[1])
    reference = q.exact().dequantize().float()  # what load_model(packed=False) puts in a Linear
    assert torch.equal(linear(x), torch.nn.functional.linear(x, reference))


FP_SCHEMES = [("FP8", None), ("FP8_DYNAMIC", None), ("W8A16_FP8", None), ("NVFP4", None),
              ("NVFP4A16", None), ("MXFP4", None), ("MXFP4A16", None), ("MXFP4", "mr-gptq")]


@pytest.fixture(scope="module")
def fp_checkpoints(tiny_dir, tmp_path_factory):
    src = tiny_dir("llama")
    root = tmp_path_factory.mktemp("fp-packed")
    made = {}
    for scheme, algorithm in FP_SCHEMES:
        name = scheme + (f"-{algorithm}" if algorithm else "")
        made[name] = write_quantized(src, root / name, scheme, algorithm=algorithm or "rtn")
    return src, made


@needs_c
@pytest.mark.parametrize("name", [s + (f"-{a}" if a else "") for s, a in FP_SCHEMES])
def test_fp_models_match_the_reference_path(fp_checkpoints, name):
    src, made = fp_checkpoints
    ids = torch.randint(8, 250, (1, 40), generator=torch.Generator().manual_seed(0))
    original = load_model(src)(input_ids=ids).logits
    reference_model = load_model(made[name])
    reference = reference_model(input_ids=ids).logits
    packed = lowbit.load(made[name], torch.float32)
    kernels = {getattr(m, "kernel", None) for m in packed.modules()}
    assert kernels == {None, "fp8-c" if name.startswith(("FP8", "W8A16")) else "fp4-c"}
    quantization = (reference - original).norm()
    for x in (ids, ids[:, :3]):  # a prefill (dense per call) and a short one (row kernel)
        fast, ref = packed(input_ids=x).logits, reference_model(input_ids=x).logits
        # the same input quantization (the loader's hook), weights exact in both, float32 sums
        # in another order (~2^-20 relative): measured ~1e-5 of the quantization error
        assert (fast - ref).norm() < 1e-3 * quantization
    # in bf16 the reference rounds each weight to bf16 and the packed path does not (its codes
    # and group scales are exact in bf16); both round activations: the packed bf16 model is as
    # close to the float32 reference as the bf16 reference is (25 % margin for the rounding noise)
    bf16_ref = load_model(made[name], torch.bfloat16)(input_ids=ids).logits.float()
    bf16_fast = lowbit.load(made[name], torch.bfloat16)(input_ids=ids).logits.float()
    assert (bf16_fast - reference).norm() < 1.25 * (bf16_ref - reference).norm()
    fallback = load_model(made[name], torch.float32, packed=True, fast=False)
    assert torch.equal(fallback(input_ids=ids).logits, reference)  # the same weights, same math
    linears = [m for m in packed.modules() if hasattr(m, "kernel")]
    weights = sum(m.in_features * m.out_features for m in linears)
    stored = sum(b.numel() * b.element_size() for m in linears for b in m.buffers())
    # FP8: a byte a weight plus a float32 scale a row; FP4: half a byte plus a byte a group of 16
    limit = weights + 4 * sum(m.out_features for m in linears) if name[:2] in ("FP", "W8") \
        else weights // 2 + weights // 16 + 4 * len(linears)
    assert stored <= limit
    assert resident_bytes(packed) < resident_bytes(reference_model)


def test_without_a_compiler_the_torch_fallback_is_chosen(fp_checkpoints, tmp_path):
    _, made = fp_checkpoints
    script = (
        "import sys, torch, lowbit\n"
        "from lowbit.runtime.load import load_model\n"
        "for path in sys.argv[1:]:\n"
        "    m = lowbit.load(path, torch.float32)\n"
        "    ids = torch.arange(8, 40)[None]\n"
        "    same = torch.equal(m(input_ids=ids).logits, load_model(path)(input_ids=ids).logits)\n"
        "    print(sorted({getattr(x, 'kernel', '') for x in m.modules()} - {''}), same)\n")
    env = {**os.environ, "CC": str(tmp_path / "no-such-compiler"), "LOWBIT_KERNEL_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", script, str(made["FP8"]), str(made["NVFP4"])], env=env,
                         capture_output=True, text=True, check=True).stdout
    assert out.split() == ["['dequant']", "True"] * 2, out
