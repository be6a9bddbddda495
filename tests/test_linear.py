"""Packed Linears (runtime/linear.py, kernels_cpu.py) against the dequantizing reference path and
a float64 product written here: every INT4 group size, symmetric and with zero points, INT8
weights with odd K, per-token INT8 inputs, the forced fallback, and whole tiny models."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

import lowbit
from lowbit.formats.grid import Quantized, grid_for
from lowbit.runtime import kernels_fp as F
from lowbit.runtime.linear import Int4Linear, Int8Linear, packed_linear, resident_bytes
from lowbit.runtime.load import load_model
from lowbit.schemes import QuantSpec

TOKEN_INT8 = QuantSpec("int", 8, "token", dynamic=True)


def random_quantized(n: int, k: int, bits: int, group: int | None, symmetric: bool, seed: int = 0) -> Quantized:
    """Random codes, bf16 scales (as checkpoints store them) and zero points."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    spec = QuantSpec("int", bits, "group" if group else "channel", group, symmetric)
    codes = torch.randint(lo, hi + 1, (n, k), generator=g, dtype=torch.int8)
    scale = ((torch.rand(n, k // group if group else 1, generator=g) + 0.1) / 50).bfloat16()
    zero = None if symmetric else torch.randint(lo, hi + 1, scale.shape, generator=g, dtype=torch.int8)
    return Quantized(codes, scale, grid_for(spec, torch.bfloat16), zero)


def exact(q: Quantized) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 weights (code - zero) * scale and |zero * scale|, broadcast per group here."""
    n, k = q.codes.shape
    per = k // q.scale.shape[1]
    s = q.scale.double().repeat_interleave(per, 1)
    z = torch.zeros_like(s) if q.zero is None else q.zero.double().repeat_interleave(per, 1)
    return (q.codes.double() - z) * s, (z * s).abs()


def bf16_input_bound(x: torch.Tensor, q: Quantized) -> torch.Tensor:
    """What the INT4/INT8 weight kernels may differ from the exact product by: they round each
    input to bf16 (relative 2^-9) and hold the zero offset -zero*scale in bf16 (2^-9 of it),
    then accumulate in float32 (relative ~K * 2^-24, far smaller): 2^-8 leaves a factor 2."""
    w, zs = exact(q)
    return 2.0**-8 * (x.double().abs() @ (w.abs() + zs).T) + 1e-6


def int16_input_bound(x: torch.Tensor, q: Quantized) -> torch.Tensor:
    """What the C INT4 kernel may differ from the exact product by: each input rounds to int16
    per weight group, at most half a step (max|x_g| / 32767) each, times the group's |w|; the
    float32 steps after the exact integer sums (a product by s * t, the sum over groups) add
    ~G * 2^-24 relative: 2^-20 of sum |x| |w| covers them."""
    w, _ = exact(q)
    n, k = w.shape
    g = k // q.scale.shape[1]
    step = x.double().abs().reshape(*x.shape[:-1], k // g, g).amax(-1) / 32767  # [..., G]
    per_group = w.abs().reshape(n, k // g, g).sum(-1)  # [N, G]
    return step @ per_group.T / 2 + 2.0**-20 * (x.double().abs() @ w.abs().T) + 1e-6


def int4_kernel(k: int, group: int) -> str:
    from lowbit.runtime import kernels_cpu as K

    return "int4-c" if K.int4_c_supported(k, group) else "int4pack"


def check(linear, x: torch.Tensor, q: Quantized, bound: torch.Tensor,
          want: torch.Tensor | None = None) -> None:
    """linear(x) against `want` (default: the float64 product with the exact weights)."""
    y = linear(x)
    want = x.double() @ exact(q)[0].T if want is None else want
    assert y.shape == want.shape and y.dtype == x.dtype
    assert ((y.double() - want).abs() <= bound).all(), (y.double() - want).abs().max()


@pytest.mark.parametrize("group", [32, 64, 128, 256])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("fast", [True, False])
def test_int4_kernels_match_the_exact_product(group, symmetric, fast):
    q = random_quantized(48, 3 * group, 4, group, symmetric, seed=group)
    linear = packed_linear(q, None, torch.float32, fast)
    kernel = int4_kernel(3 * group, group) if fast else "dequant"
    assert linear.kernel == kernel
    bound = int16_input_bound if kernel == "int4-c" else bf16_input_bound
    for x in (torch.randn(1, 3 * group), torch.randn(2, 3, 3 * group)):  # row-kernel sizes
        check(linear, x, q, bound(x, q))
    if kernel == "int4-c":  # the documented layout, read back
        from lowbit.runtime import kernels_cpu as K

        assert torch.equal(K.int4_c_unpack(linear.weight_packed, 3), (q.codes + 8).to(torch.uint8))
        for dtype in (torch.float32, torch.bfloat16):  # the dense weights: the reference's, rounded once
            want = exact(q)[0].to(dtype)
            assert torch.equal(K.int4_c_dense(linear.weight_packed, linear.weight_scale,
                                              linear.weight_offset, group, dtype), want)
    if fast:  # torch's int4pack, the kernel where the C library is not built
        torch_kernel = Int4Linear(q, torch.float32, c=False)
        assert torch_kernel.kernel == "int4pack"
        for x in (torch.randn(1, 3 * group), torch.randn(3, 3 * group)):
            check(torch_kernel, x, q, bf16_input_bound(x, q))
    if not fast:  # the fallback computes exactly what the reference path loads
        x = torch.randn(7, 3 * group)
        wide = dataclasses.replace(q, scale=q.scale.float())  # 16-bit scales: float32 products
        assert torch.equal(linear(x), torch.nn.functional.linear(x, wide.dequantize()))


def test_int4_rows_the_kernel_cannot_pack_fall_back():
    q = random_quantized(40, 64, 4, 32, False)  # 40 rows: not a multiple of 16
    linear = packed_linear(q, None, torch.float32)
    assert linear.kernel == "dequant"
    x = torch.randn(3, 64)
    check(linear, x, q, bf16_input_bound(x, q))


@pytest.mark.parametrize("k, kernel", [(96, "int8pack"), (77, "dequant"), (72, "dequant")])
def test_int8_weight_kernel_and_odd_k(k, kernel):
    # torch 2.13's int8 kernel crashes unless K % 16 == 0, so those shapes must fall back
    q = random_quantized(37, k, 8, None, True)
    linear = Int8Linear(q, torch.bfloat16, c=False)
    assert linear.kernel == kernel
    x = torch.randn(4, k).bfloat16()
    # bf16 output: one more rounding of the result, relative 2^-9 of |x| @ |W|
    check(linear, x, q, 2 * bf16_input_bound(x, q))


@pytest.mark.skipif(F.library() is None, reason="the C library is not built here")
@pytest.mark.parametrize("k", [96, 77, 72, 8, 200])
def test_int8_c_kernel_takes_float32_inputs_as_they_come(k):
    # every K (the vector loops' tails): the C kernel multiplies the float32 inputs by the exact
    # codes and sums in float32 (~K * 2^-24 relative: 2^-16 of sum |x| |w| covers it), where
    # int8pack's bf16 inputs would be off by up to 2^-9 relative
    q = random_quantized(37, k, 8, None, True, seed=k)
    linear = packed_linear(q, None, torch.float32)
    assert linear.kernel == "int8-c"
    for x in (torch.randn(1, k), torch.randn(2, 3, k)):
        check(linear, x, q, 2.0**-16 * (x.double().abs() @ exact(q)[0].abs().T) + 1e-7)
    x = torch.randn(40, k)  # prefill-sized: the dense GEMM on the codes
    check(linear, x, q, 2.0**-16 * (x.double().abs() @ exact(q)[0].abs().T) + 1e-7)


@pytest.mark.parametrize("fast", [True, False])
def test_int8_dynamic_inputs_are_quantized_per_token(fast):
    q = random_quantized(64, 160, 8, None, True)
    x = torch.randn(6, 160)
    x[2] *= 1000  # an outlier token: a per-tensor input scale would swamp the others
    x[4] = 0.0
    linear = packed_linear(q, TOKEN_INT8, torch.float32, fast)
    assert linear.kernel == ("fbgemm" if fast else "dequant")
    # both paths quantize each token as the reference does (symmetric, step amax / 127): the
    # float64 product of those codes is the answer, up to float32 rounding of the products'
    # sums (~K * 2^-24 relative: 2^-16 of sum |x q| |w| covers it)
    w = exact(q)[0]
    xq = torch.stack([_token_qdq_float64(r) for r in x])
    check(linear, x, q, 2.0**-16 * (xq.abs() @ w.abs().T) + 1e-6, want=xq @ w.T)
    assert (linear(x)[4] == 0).all()


def _token_qdq_float64(x: torch.Tensor) -> torch.Tensor:
    """One token's symmetric INT8 round trip as a runtime computes it: scale = amax / 127 in
    float32, codes = x / scale in float32 rounded half to even, decoded here in float64."""
    amax = x.float().abs().max()
    if amax == 0:
        return torch.zeros_like(x, dtype=torch.float64)
    s = amax / 127
    return torch.round(x.float() / s).clamp(-128, 127).double() * s.double()


@pytest.mark.parametrize("halves", [False, True])
def test_int8_dynamic_codes_exact_either_way(halves):
    # the AVX2 form (each code as 2h + l, two FBGEMM calls) and the VNNI form (one call) give
    # the integer product of the codes times the scales, in float32 whichever this CPU runs
    from lowbit.runtime import kernels_cpu as K

    q = random_quantized(48, 96, 8, None, True, seed=3)
    g = torch.Generator().manual_seed(4)
    codes = torch.randint(-128, 128, (5, 96), generator=g).float()
    codes[0] = 127  # the top of the range against the weights' own: 16-bit pair sums would saturate
    handle = K.int8_dynamic_pack(q.codes.contiguous(), q.scale.reshape(-1).float())
    try:
        y = K._fbgemm_codes(codes, handle, halves)
        want = codes.double() @ exact(q)[0].T
        assert ((y.double() - want).abs() <= 2.0**-20 * (codes.double().abs() @ exact(q)[0].abs().T)).all()
    finally:
        K.int8_dynamic_release(handle)


@pytest.mark.skipif(F.library() is None, reason="the C library is not built here")
def test_int8_token_codes_in_c_are_the_reference_rule():
    from lowbit.formats.grid import activation_codes
    from lowbit.runtime import kernels_cpu as K

    g = torch.Generator().manual_seed(5)
    x = torch.randn(7, 333, generator=g) * torch.logspace(-30, 30, 7).unsqueeze(1)
    x[1] = 0.0
    x[2, :5] = torch.tensor([1e-40, -3e-39, 2.5, -2.5, 0.5])  # subnormals, exact half-way quotients
    x[3] = torch.round(torch.randn(333, generator=g) * 50) + 0.5  # ties everywhere
    x[3, 0] = 127.0
    want_codes, p = activation_codes(K.TOKEN_INT8_GRID, x)
    codes, scale = K.int8_token_codes(x, c=True)
    assert torch.equal(scale, p.scale) and torch.equal(codes, want_codes.float())
    assert torch.isnan(K.int8_token_codes(torch.tensor([[1.0, float("nan")]]), c=True)[1]).all()


def test_int8_dynamic_kernel_does_not_saturate():
    # all inputs at the top of their range times all weights at +127: where 16-bit pair sums
    # saturate (AVX2's vpmaddubsw without reduce_range) this product comes out far too small
    q = Quantized(torch.full((32, 256), 127, dtype=torch.int8), torch.full((32, 1), 0.01).bfloat16(),
                  grid_for(QuantSpec("int", 8, "channel"), torch.bfloat16))
    x = torch.ones(3, 256)
    y = packed_linear(q, TOKEN_INT8, torch.float32)(x)
    assert torch.allclose(y, torch.full_like(y, 256 * 127 * q.scale[0, 0].item()), rtol=1e-2)


@pytest.fixture(scope="module")
def checkpoints(tiny_dir, tmp_path_factory):
    """The tiny llama quantized (RTN, data-free) to each packed format."""
    src = tiny_dir("llama")
    root = tmp_path_factory.mktemp("packed")
    made = {}
    for scheme, options in [("W4A16", dict(group_size=32)), ("W4A16_ASYM", dict(group_size=64)),
                            ("W8A16", {}), ("W8A8_INT8", dict(smoothquant="off"))]:
        made[scheme] = root / scheme
        lowbit.quantize(src, made[scheme], scheme, algorithm="rtn", seq_len=64, **options)
    return src, made


@pytest.mark.parametrize("scheme, kernel", [("W4A16", "int4"), ("W4A16_ASYM", "int4"),
                                            ("W8A16", "int8"), ("W8A8_INT8", "fbgemm")])
def test_packed_models_match_the_reference_path(checkpoints, scheme, kernel):
    src, made = checkpoints
    if kernel == "int4":  # group 32 (W4A16 here): torch's int4pack; 64 (ASYM) the C kernel
        kernel = int4_kernel(64, 32 if scheme == "W4A16" else 64)
    if kernel == "int8":
        kernel = "int8pack" if F.library() is None else "int8-c"
    ids = torch.randint(8, 250, (1, 48), generator=torch.Generator().manual_seed(0))
    original = load_model(src)(input_ids=ids).logits
    reference_model = load_model(made[scheme])
    reference = reference_model(input_ids=ids).logits
    packed = lowbit.load(made[scheme], torch.float32)
    assert {getattr(m, "kernel", None) for m in packed.modules()} == {None, kernel}
    quantization = (reference - original).norm()
    fast = packed(input_ids=ids).logits
    if kernel == "int8-c":  # the reference's inputs and weights, float32 sums (int8pack's bf16 inputs: 37 %)
        assert (fast - reference).norm() < 1e-3 * quantization
    elif kernel == "fbgemm":
        # the reference's input codes, but float32 sums in another order move a few of the
        # next layer's inputs across a rounding boundary of their grid (a one-step change of
        # one input each): 1.0 % of quantization's difference here, where FBGEMM's own
        # (asymmetric, 255-step) input grid, which this replaced, made 84 %
        assert (fast - reference).norm() < 0.05 * quantization
    else:  # bf16 (or int16) inputs: a difference well under what quantization itself makes
        assert (fast - reference).norm() < 0.5 * quantization
    fallback = load_model(made[scheme], torch.float32, packed=True, fast=False)
    assert torch.equal(fallback(input_ids=ids).logits, reference)  # the same weights, same math
    assert resident_bytes(packed) < resident_bytes(reference_model)
    linear_bytes = sum(b.numel() * b.element_size() for m in packed.modules()
                       if hasattr(m, "kernel") for b in m.buffers()) + sum(
        getattr(m, "fbgemm_bytes", 0) for m in packed.modules())
    weights = sum(m.in_features * m.out_features for m in packed.modules() if hasattr(m, "kernel"))
    rows = sum(m.out_features for m in packed.modules() if hasattr(m, "kernel"))
    # 4 or 8 bits a weight, plus a bf16 scale and offset per group (of 32 or more), or at most
    # 8 bytes of scale per row (FBGEMM keeps doubles)
    bits, scales = (4, weights // 32 * 4) if scheme.startswith("W4") else (8, rows * 8)
    assert linear_bytes <= weights * bits // 8 + scales


def test_without_vector_instructions_the_fallback_is_chosen(checkpoints):
    _, made = checkpoints
    script = (
        "import sys, torch, lowbit\n"
        "from lowbit.runtime.load import load_model\n"
        "m = lowbit.load(sys.argv[1], torch.float32)\n"
        "ids = torch.arange(8, 40)[None]\n"
        "same = torch.equal(m(input_ids=ids).logits, load_model(sys.argv[1])(input_ids=ids).logits)\n"
        "print(torch.backends.cpu.get_cpu_capability(),"
        " sorted({getattr(x, 'kernel', '') for x in m.modules()} - {''}), same)\n")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    for scheme in ("W4A16", "W8A8_INT8"):
        out = subprocess.run([sys.executable, "-c", script, str(made[scheme])], env=env,
                             capture_output=True, text=True, check=True).stdout
        assert out.split() == ["DEFAULT", "['dequant']", "True"], out


def dense_bound(x: torch.Tensor, q: Quantized) -> torch.Tensor:
    """The dense per-call path rounds the inputs to bf16 (2^-9 relative), each weight's product
    (code - 8) * scale to bf16 (2^-9 of |w|) and, with zero points, the bf16 offset and the sum
    (2^-9 of |zero * scale| each, and of |w|); float32 accumulation adds ~K * 2^-24: four such
    roundings bound it, 2^-7."""
    w, zs = exact(q)
    return 2.0**-7 * (x.double().abs() @ (w.abs() + zs).T) + 1e-6


@pytest.mark.parametrize("group", [32, 64, 128, 256])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("c", [True, False])
def test_prefill_sized_inputs_take_the_dense_gemm(group, symmetric, c, monkeypatch):
    from lowbit.runtime import kernels_cpu as K

    q = random_quantized(128, 3 * group, 4, group, symmetric, seed=group + 1)
    linear = Int4Linear(q, torch.float32, c=c)
    kernel = int4_kernel(3 * group, group) if c else "int4pack"
    assert linear.kernel == kernel and linear.dense_from == K.DENSE_ROWS[kernel.replace("pack", "")]
    calls = []
    name = "int4_c_dense" if kernel == "int4-c" else "int4_dense_weight"
    unpack = getattr(K, name)
    monkeypatch.setattr(K, name, lambda *a: calls.append(1) or unpack(*a))
    rows = linear.dense_from
    for x in (torch.randn(rows - 1, 3 * group), torch.randn(2, rows, 3 * group)):
        # rows - 1 rows: the row kernel (torch's bf16 inputs, or C's int16 ones); then the GEMM
        extra = int16_input_bound(x, q) if kernel == "int4-c" else 0
        check(linear, x, q, dense_bound(x, q) + extra)
    assert len(calls) == 1  # only the input with >= dense_from rows dequantized


@pytest.mark.parametrize("k", [96, 160])
def test_int8_prefill_dense_path(k):
    from lowbit.runtime import kernels_cpu as K

    q = random_quantized(48, k, 8, None, True, seed=k)
    linear = packed_linear(q, None, torch.float32)
    assert linear.dense_from == K.DENSE_ROWS["int8"]
    for rows in (1, linear.dense_from - 1, linear.dense_from, 3 * linear.dense_from):
        x = torch.randn(rows, k)
        # codes are exact in bf16 and the scale multiplies the float32 output, so only the bf16
        # inputs and (bf16 GEMM) its output round: 2^-8 covers both
        check(linear, x, q, bf16_input_bound(x, q))


def test_avx2_int4_layout_is_read_too():
    # torch packs INT4 in blocks of 32 rows under AVX2 and 64 under AVX512: the loader checks
    # its unpacker round-trips whichever layout this process got, and uses it
    script = (
        "import torch, sys\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from tests.test_linear import random_quantized, exact\n"
        "from lowbit.runtime.linear import packed_linear\n"
        "q = random_quantized(96, 128, 4, 32, False)\n"
        "m = packed_linear(q, None, torch.float32)\n"
        "x = torch.randn(200, 128)\n"
        "err = (m(x).double() - x.double() @ exact(q)[0].T).abs().max().item()\n"
        "print(torch.backends.cpu.get_cpu_capability(), m.dense_from, err < 0.05)\n")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "LOWBIT_NO_C_KERNELS": "1"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", script, root], env=env, capture_output=True,
                         text=True, check=True).stdout
    from lowbit.runtime.kernels_cpu import DENSE_ROWS

    assert out.split() == ["AVX2", str(DENSE_ROWS["int4"]), "True"], out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 72), (1, 72), (3, 72), (2, 5, 72), (9, 72)])
@pytest.mark.parametrize("fast", [True, False])
def test_dense_linear_matches_a_float64_product(dtype, shape, fast):
    """Float Linears of a packed model: a few bf16 rows through the C kernel (`fast`), one
    float32 row through torch.mv, more through F.linear; all within the rounding of the output
    to `dtype` plus float32 accumulation of K products."""
    from lowbit.runtime.linear import dense_linear

    g = torch.Generator().manual_seed(1)
    base = torch.nn.Linear(72, 40).to(dtype)
    with torch.no_grad():
        base.weight.copy_(torch.randn(40, 72, generator=g))
        base.bias.copy_(torch.randn(40, generator=g))
    dense = dense_linear(base, fast)
    assert dense.weight is base.weight and dense.bias is base.bias  # shared, not copied
    assert dense.c_gemv == (fast and F.library() is not None)
    x = torch.randn(*shape, generator=g).to(dtype)
    y = dense(x)
    want = x.double() @ base.weight.double().T + base.bias.double()
    eps = torch.finfo(dtype).eps
    bound = eps * want.abs() + 72 * 2.0**-23 * (x.double().abs() @ base.weight.double().abs().T) \
        + eps * base.bias.double().abs()
    assert y.shape == want.shape and y.dtype == dtype
    assert ((y.double() - want).abs() <= bound + 1e-6).all(), (y.double() - want).abs().max()


def test_packed_model_keeps_the_tied_lm_head_shared(tiny_dir, tmp_path):
    """The lm_head of a packed model with tied embeddings (Gemma ties them, as SmolLM2 does)
    is a DenseLinear on the embedding's own tensor, and a decode-shaped call (one row) gives
    the logits the full-sequence call gives at that row."""
    from lowbit.runtime.linear import DenseLinear

    out = tmp_path / "w4"
    lowbit.quantize(tiny_dir("gemma3_text"), out, "W4A16", algorithm="rtn", seq_len=64, group_size=32)
    model = lowbit.load(out, torch.bfloat16)
    assert model.config.tie_word_embeddings
    head = model.get_output_embeddings()
    assert isinstance(head, DenseLinear) and head.weight is model.get_input_embeddings().weight
    ids = torch.randint(8, 250, (1, 12), generator=torch.Generator().manual_seed(2))
    full = model(input_ids=ids).logits[:, -1].float()
    last = model(input_ids=ids, logits_to_keep=1).logits[:, -1].float()  # one row: torch.mv
    assert torch.allclose(last, full, rtol=2**-7, atol=2**-7 * full.abs().max())
    reference = load_model(out, torch.bfloat16)(input_ids=ids).logits[:, -1].float()
    assert (last - reference).norm() < 0.05 * reference.norm()  # the embedding, not meta/zeros


C_PATHS = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from tests.test_linear import random_quantized, exact, int16_input_bound
from lowbit.runtime import kernels_cpu as K
from lowbit.runtime.clib import library
ok = []
# odd row counts: the last row is stored on its own, after the pairs
for n, k, group, symmetric in [(41, 192, 64, True), (10, 256, 64, False), (24, 384, 128, False),
                                (17, 512, 256, True)]:
    q = random_quantized(n, k, 4, group, symmetric, seed=k)
    packed, s, c = K.int4_c_pack(q.codes, q.scale, q.zero)
    ok.append(torch.equal(K.int4_c_dense(packed, s, c, group, torch.float32), exact(q)[0].float()))
    ok.append(torch.equal(K.int4_c_unpack(packed, k // group), (q.codes + 8).to(torch.uint8)))
    for m in (1, 3):
        x = torch.randn(m, k)
        err = (K.int4_c_mm(x, packed, s, c, group).double() - x.double() @ exact(q)[0].T).abs()
        ok.append(bool((err <= int16_input_bound(x, q)).all()))
from lowbit.runtime import kernels_fp as F
for n, k in [(37, 200), (7, 4105)]:  # short rows one at a time; long ones four at a time + the rest
    w = torch.randn(n, k).bfloat16()
    x = torch.randn(2, k)
    err = (K.bf16_gemv(x, w).double() - x.double() @ w.double().T).abs()
    ok.append(bool((err <= k * 2.0**-23 * (x.double().abs() @ w.double().abs().T) + 1e-6).all()))
    codes = (torch.randn(n, k + 3) * 40).clamp(-448, 448).to(torch.float8_e4m3fn)
    codes[0, :4] = torch.tensor([2.0**-9, -(2.0**-8), 3 * 2.0**-9, -448])  # subnormals, the extremes
    x = torch.randn(2, k + 3)
    err = (F.fp8_gemv(x, codes).double() - x.double() @ codes.double().T).abs()
    ok.append(bool((err <= k * 2.0**-23 * (x.double().abs() @ codes.double().abs().T) + 1e-6).all()))
    codes = torch.randint(-128, 128, (n, k + 5), dtype=torch.int8)
    scale = torch.rand(n) + 0.5
    x = torch.randn(3, k + 5)
    want = (x.double() @ codes.double().T) * scale.double()
    err = (K.int8_gemv(x, codes, scale).double() - want).abs()
    ok.append(bool((err <= k * 2.0**-23 * (x.double().abs() @ codes.double().abs().T) * scale.double() + 1e-6).all()))
    x = torch.randn(3, k) * 10.0 ** torch.arange(-3, 0).unsqueeze(1)  # three rows: one scale each
    x[1, 3] = 0.5 * float(x[1].abs().max() / 127) * 3  # a quotient near 1.5: ties go to even
    codes, scale = K.int8_token_codes(x, c=True)
    want_codes, p = K.int8_token_codes(x, c=False)
    ok.append(torch.equal(codes, want_codes) and torch.equal(scale, p))
print(library().int4_vector_bits(), all(ok))
"""


@pytest.mark.skipif(F.library() is None or os.uname().machine != "x86_64", reason="x86-64 C builds")
@pytest.mark.parametrize("march, bits", [("native", None), ("x86-64-v3", 256), ("x86-64", 0)])
def test_the_c_kernels_built_for_other_cpus_are_exact_too(march, bits, tmp_path):
    """kernels.c built for this CPU and, with -march=x86-64-v3 / x86-64, as an AVX2-only or older
    CPU builds it: the INT4 kernel within its int16 input bound, the bf16, FP8 and INT8 rows
    (short and long, whose AVX512 loop takes four rows at a time) within float32 accumulation,
    and W8A8's per-token input codes equal to torch's."""
    if bits is None:
        bits = F.library().int4_vector_bits()
    env = {**os.environ, "LOWBIT_KERNEL_MARCH": march, "LOWBIT_KERNEL_CACHE": str(tmp_path)}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", C_PATHS, root], env=env, capture_output=True,
                         text=True, check=True).stdout
    assert out.split() == [str(bits), "True"], out
