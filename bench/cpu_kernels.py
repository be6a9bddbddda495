"""Claim: the kernels lowbit/runtime/kernels_cpu.py picks are the fastest correct ones here.

Times one Linear at SmolLM2-135M shapes (batch 1 decode, and a 256-token prefill) for each
candidate: the dense layer in float32 and bf16, torch's INT4 and INT8 weight kernels with
float32 and bf16 activations, dequantizing per call, for per-token INT8 inputs FBGEMM's dynamic
linear against quantizing in torch and `torch._int_mm`, and for FP8 / NVFP4 / MXFP4 lowbit's C
kernels (runtime/kernels_fp.py) against torch's conversions and `torch._scaled_mm`. Then, by
number of rows, each packed kernel against a dense GEMM on weights dequantized for the call
(what decides kernels_cpu.DENSE_ROWS and kernels_fp.DENSE_ROWS). Best of 7 runs of 30 calls
(3 at more than one row), in microseconds. These weights are small enough to stay in the
caches; `--dram` instead times one decode row per kernel at Llama-3.2-1B shapes with the
weights read from memory, as in a model's step, with the GB/s each reaches; `--attention` times
a compiled step's one-token attention (torch's SDPA against lowbit's C kernel). Run it again
under an AVX2-only ISA with ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
MKL_ENABLE_INSTRUCTIONS=AVX2 (LOWBIT_KERNEL_MARCH=x86-64-v3 builds the C kernels' AVX2 code).

    python bench/cpu_kernels.py --threads 1
    python bench/cpu_kernels.py --dram
    python bench/cpu_kernels.py --attention
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
from lowbit.hardware import cpu_isa  # noqa: E402
from lowbit.formats.grid import Quantized, grid_for  # noqa: E402
from lowbit.formats.pack import pack_fp4, unpack_fp4  # noqa: E402
from lowbit.runtime import kernels_cpu as K  # noqa: E402
from lowbit.runtime import kernels_fp as F  # noqa: E402
from lowbit.schemes import MXFP4_G32, NVFP4_G16  # noqa: E402


def micros(f, calls: int = 30, runs: int = 7) -> float:
    for _ in range(min(3, calls)):
        f()
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(calls):
            f()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def candidates(m: int, k: int, n: int) -> dict[str, callable]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g)
    c4 = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=g)
    s4 = (torch.rand(n, k // 64, generator=g) / 50).bfloat16()
    packed, so = K.int4_pack(c4, s4, None)
    c8 = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    s8 = (torch.rand(n, generator=g) / 50).bfloat16()
    fb = K.int8_dynamic_pack(c8, s8.float())
    xb, wb = x.bfloat16(), w.bfloat16()

    def int_mm():
        s = x.abs().amax(-1, keepdim=True) / 127
        return torch._int_mm(torch.round(x / s).to(torch.int8), c8.T.contiguous()) * s * s8.float()

    f8 = (w * 40).clamp(-448, 448).to(torch.float8_e4m3fn)
    e2m1 = torch.tensor([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6])
    c2 = e2m1[torch.randint(0, 16, (n, k), generator=g)].to(torch.float8_e4m3fn)
    p4 = pack_fp4(c2)
    nv = (torch.rand(n, k // 16, generator=g) * 400).to(torch.float8_e4m3fn)
    mx = torch.randint(118, 131, (n, k // 32), dtype=torch.uint8, generator=g)
    gs = torch.tensor([2000.0])
    nvq = Quantized(c2, nv, grid_for(NVFP4_G16).bind_amax(torch.tensor(1.0)))

    def scaled_mm():  # per-tensor FP8 inputs and weights (W8A8 static) through torch's CPU op
        return torch._scaled_mm(x.clamp(-448, 448).to(torch.float8_e4m3fn), f8.T, torch.tensor(1.0),
                                torch.tensor(1.0), out_dtype=torch.bfloat16)

    cp = K.int4_c_pack(c4, s4, None)
    return {
        "dense fp32": lambda: torch.nn.functional.linear(x, w),
        "int4 C kernel (lowbit)": lambda: K.int4_c_mm(x, *cp, 64, K.DENSE_ROWS["int4-c"], K.dense_dtype()),
        "dense bf16": lambda: torch.nn.functional.linear(xb, wb),
        "int4pack bf16 in": lambda: K.int4_mm(x, packed, so, 64),
        "int4pack fp32 in": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 64, so.float()),
        "int4 dequant/call": lambda: K.dequant_mm(x, c4.reshape(n, -1, 64), s4.unsqueeze(-1), None),
        "int8pack bf16 in": lambda: K.int8_weight_mm(x, c8, s8),
        "int8pack fp32 in": lambda: torch._weight_int8pack_mm(x, c8, s8.float()),
        "int8 dequant/call": lambda: K.dequant_mm(x, c8.reshape(n, 1, k), s8.reshape(n, 1, 1), None),
        "W8A8 fbgemm": lambda: K.int8_dynamic_mm(x, fb, n, not torch.cpu._is_vnni_supported(), True),
        "W8A8 torch._int_mm": int_mm,
        "fp8 C kernel (lowbit)": lambda: F.fp8_mm(x, f8, s8.float(), F.DENSE_ROWS, torch.bfloat16),
        "fp8 torch .to(bf16)/call": lambda: torch.nn.functional.linear(xb, f8.to(torch.bfloat16)) * s8,
        "fp8 torch._scaled_mm": scaled_mm if m == 1 else None,  # 13 s a call at 256 rows
        "nvfp4 C kernel (lowbit)": lambda: F.fp4_mm(x, p4, nv, "e4m3", 16, gs, F.DENSE_ROWS, torch.bfloat16),
        "nvfp4 torch unpack/call": lambda: torch.nn.functional.linear(
            xb, Quantized(unpack_fp4(p4), nv, nvq.grid).dequantize().bfloat16()),
        "mxfp4 C kernel (lowbit)": lambda: F.fp4_mm(x, p4, mx, "e8m0", 32, None, F.DENSE_ROWS, torch.bfloat16),
    }


def crossover(m: int, k: int, n: int) -> dict[str, callable]:
    """The INT4/INT8 weight kernels against a dense GEMM on weights dequantized for the call
    (what kernels_cpu does from DENSE_ROWS rows), bf16 activations."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g).bfloat16()
    c4 = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=g)
    packed, so = K.int4_pack(c4, (torch.rand(n, k // 64, generator=g) / 50).bfloat16(), None)
    c8 = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    s8 = (torch.rand(n, generator=g) / 50).bfloat16()
    dense = K.dense_dtype()
    f8 = (torch.randn(n, k, generator=g) * 40).clamp(-448, 448).to(torch.float8_e4m3fn)
    e2m1 = torch.tensor([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6])
    p4 = pack_fp4(e2m1[torch.randint(0, 16, (n, k), generator=g)].to(torch.float8_e4m3fn))
    nv = (torch.rand(n, k // 16, generator=g) * 400).to(torch.float8_e4m3fn)
    cp, cs, cc = K.int4_c_pack(c4, (torch.rand(n, k // 64, generator=g) / 50).bfloat16(), None)
    return {
        "int4 C row kernel": lambda: K.int4_c_mm(x, cp, cs, cc, 64),
        f"int4 C dense {str(dense)[6:]}/call": lambda: K.int4_c_mm(x, cp, cs, cc, 64, 1, dense),
        "int4pack": lambda: K.int4_mm(x, packed, so, 64),
        f"int4 dense {str(dense)[6:]}/call": lambda: K.int4_mm(x, packed, so, 64, 1, dense),
        "int8pack": lambda: K.int8_weight_mm(x, c8, s8),
        f"int8 dense {str(dense)[6:]}/call": lambda: K.int8_weight_mm(x, c8, s8, 1, dense),
        "fp8 C row kernel": lambda: F.fp8_mm(x, f8, s8.float(), 1 << 62, dense),
        f"fp8 dense {str(dense)[6:]}/call": lambda: F.fp8_mm(x, f8, s8.float(), 1, dense),
        "nvfp4 C row kernel": lambda: F.fp4_mm(x, p4, nv, "e4m3", 16, None, 1 << 62, dense),
        f"nvfp4 dense {str(dense)[6:]}/call": lambda: F.fp4_mm(x, p4, nv, "e4m3", 16, None, 1, dense),
    }


def dense_single_row(m: int, k: int, n: int) -> dict[str, callable]:
    """A float Linear at one row: the GEMM F.linear calls, and torch.mv (kernels_cpu.dense_mm,
    what a packed model's unquantized Linears and lm_head run)."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    xb, wb = x.bfloat16(), w.bfloat16()
    return {
        "fp32 F.linear": lambda: torch.nn.functional.linear(x, w),
        "fp32 mv (lowbit)": lambda: K.dense_mm(x, w),
        "bf16 F.linear": lambda: torch.nn.functional.linear(xb, wb),
        "bf16 torch.mv": lambda: K.dense_mm(xb, wb),
        "bf16 C row kernel (lowbit)": lambda: K.dense_mm(xb, wb, c_gemv=True),
    }


def from_dram(k: int, n: int, copies: int) -> dict[str, callable]:
    """One decode row (1 x K -> N) per kernel, each call on the next of `copies` weight copies
    (together well past the L3), so the weights come from DRAM as in a model's step."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, k, generator=g)
    xb = x.bfloat16()
    s4 = (torch.rand(n, k // 128, generator=g) / 50).bfloat16()
    s8 = (torch.rand(n, generator=g) / 50).bfloat16()
    sets = []
    for _ in range(copies):
        c4 = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=g)
        c8 = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
        e2m1 = torch.tensor([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6])
        sets.append(dict(
            c=K.int4_c_pack(c4, s4, None), tp=K.int4_pack(c4, s4, None), c8=c8,
            fb=K.int8_dynamic_pack(c8, s8.float()),
            f8=(torch.randn(n, k, generator=g) * 40).clamp(-448, 448).to(torch.float8_e4m3fn),
            p4=pack_fp4(e2m1[torch.randint(0, 16, (n, k), generator=g)].to(torch.float8_e4m3fn)),
            bf=torch.randn(n, k, generator=g).bfloat16()))
    nv = (torch.rand(n, k // 16, generator=g) * 400).to(torch.float8_e4m3fn)
    vnni = torch.cpu._is_vnni_supported()
    calls = {
        "int4 C row kernel (g128)": (lambda d: K.int4_c_mm(x, *d["c"], 128), 0.5),
        "int4pack bf16 in (g128)": (lambda d: K.int4_mm(x, *d["tp"], 128), 0.5),
        "int8pack bf16 in": (lambda d: K.int8_weight_mm(x, d["c8"], s8), 1),
        "W8A8 fbgemm": (lambda d: K.int8_dynamic_mm(x, d["fb"], n, not vnni, True), 1),
        "fp8 C row kernel": (lambda d: F.fp8_mm(x, d["f8"], s8.float(), 1 << 62, torch.float32), 1),
        "nvfp4 C row kernel": (lambda d: F.fp4_mm(x, d["p4"], nv, "e4m3", 16, None, 1 << 62, torch.float32), 0.5),
        "bf16 torch.mv": (lambda d: K.dense_mm(xb, d["bf"]), 2),
        "bf16 C row kernel": (lambda d: K.dense_mm(xb, d["bf"], c_gemv=True), 2),
    }
    out = {}
    for name, (f, bytes_per_weight) in calls.items():
        def run(f=f):
            for d in sets:
                f(d)
        out[name] = (run, bytes_per_weight * n * k * copies)
    return out


def print_dram(shapes, copies: int) -> None:
    print(f"Decode rows from DRAM ({copies} weight copies cycled), ms per call and GB/s of weights\n")
    print("| kernel | " + " | ".join(f"1x{k}->{n}" for k, n in shapes) + " |\n" + "|---" * (len(shapes) + 1) + "|")
    table = {}
    for k, n in shapes:
        for name, (run, nbytes) in from_dram(k, n, copies).items():
            t = micros(run, calls=1, runs=5) / 1e6
            table.setdefault(name, []).append(f"{t / copies * 1e3:.3f} ({nbytes / t / 1e9:.1f})")
    for name, cells in table.items():
        print(f"| {name} | " + " | ".join(cells) + " |")
    print()


def print_attention(length: int, filled: int) -> None:
    """One-token attention over a float32 static cache of `length` positions, `filled` of them
    masked in, per layer: torch's SDPA with the query heads packed per KV head (what a compiled
    step ran before) against lowbit's C kernel, each through compiled.py's _decode_sdpa."""
    from types import SimpleNamespace

    from lowbit.runtime.compiled import _decode_sdpa

    print(f"One-token attention, float32 cache of {length} positions with {filled} filled, "
          "microseconds per layer\n\n| model shapes | torch SDPA, GQA packed | C kernel (lowbit) |\n|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for name, heads, kv, d in [("SmolLM2-135M (9 heads, 3 KV)", 9, 3, 64), ("Llama-3.2-1B (32, 8)", 32, 8, 64)]:
        q = torch.randn(1, heads, 1, d, generator=g)
        k, v = (torch.randn(1, kv, length, d, generator=g) for _ in range(2))
        mask = (torch.arange(length) < filled).reshape(1, 1, 1, length)
        cells = []
        for c in (False, True):
            module = SimpleNamespace(num_key_value_groups=heads // kv, is_causal=True, training=False,
                                     _lowbit_c_attention=c)
            with torch.inference_mode():
                cells.append(micros(lambda: _decode_sdpa(module, q, k, v, mask, scaling=d**-0.5), calls=200))
        print(f"| {name} | {cells[0]:.1f} | {cells[1]:.1f} |")
    print()


def print_table(title: str, shapes, make) -> None:
    print(f"{title}\n\n| kernel | " + " | ".join(f"{m}x{k}->{n}" for m, k, n in shapes) + " |")
    print("|---" * (len(shapes) + 1) + "|")
    table = {}
    for m, k, n in shapes:
        for name, f in make(m, k, n).items():
            slow = name.endswith("_scaled_mm")  # ~50 ms a call even at one row
            table.setdefault(name, []).append(None if f is None else micros(
                f, calls=1 if slow else 30 if m == 1 else 3, runs=2 if slow else 7))
    for name, times in table.items():
        print(f"| {name} | " + " | ".join("-" if t is None else f"{t:.0f}" for t in times) + " |")
    print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dram", action="store_true", help="only the decode rows from DRAM at "
                    "Llama-3.2-1B shapes (2048->8192, 8192->2048, 2048->2048)")
    ap.add_argument("--copies", type=int, default=8, help="weight copies cycled with --dram")
    ap.add_argument("--attention", action="store_true", help="only one-token attention over a "
                    "512-position cache, 320 filled (SmolLM2 and Llama-3.2-1B heads)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    warnings.simplefilter("ignore")
    if a.dram:
        print(f"CPU ISA {cpu_isa()}, {a.threads} thread(s)\n")
        print_dram([(2048, 8192), (8192, 2048), (2048, 2048)], a.copies)
        return
    if a.attention:
        print(f"CPU ISA {cpu_isa()}, {a.threads} thread(s)\n")
        print_attention(512, 320)
        return
    shapes = [(1, 576, 1536), (1, 1536, 576), (1, 576, 576), (256, 576, 1536)]
    print(f"CPU ISA {cpu_isa()}, {a.threads} thread(s); microseconds per call (M x K -> N)\n")
    print_table("Kernels per format", shapes, candidates)
    print_table("Packed kernel or dense GEMM per call, by rows (DENSE_ROWS)",
                [(m, 576, 1536) for m in (1, 4, 8, 16, 32, 48, 64, 128, 256)], crossover)
    print_table("Float Linears at one row (DenseLinear; 576->49152 is SmolLM2's lm_head)",
                [(1, 576, 1536), (1, 1536, 576), (1, 576, 49152)], dense_single_row)


if __name__ == "__main__":
    main()
