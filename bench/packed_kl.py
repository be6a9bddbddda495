"""Claim: the packed kernels lowbit.load runs give the dequantizing reference path's accuracy
(issue 11 item 5): KL(original || model) and top-1 agreement on held-out ShareGPT windows for
each checkpoint through (a) the reference path, (b) the packed kernels as `lowbit eval
--packed` runs them (prefill-sized windows take each format's dense per-call GEMM), and (c) the
packed kernels forced onto their decode-sized (row) path for every input, which is what a
generated token goes through: torch's int4pack / int8pack, FBGEMM, and the C library's INT4
(int16 inputs), FP8 and FP4 row kernels. The ratio column is each KL over the reference's.

`--perturb N` adds N rows of the reference path itself with every Linear's output moved by one
unit in the last place of the compute dtype (each value up, down or kept, at random, seeds 1..N):
what another equally valid summation order does. Their spread is the floor below which a KL
difference says nothing: where activations are quantized (W8A8, FP8_DYNAMIC), one-ulp changes
move some inputs of the next layer across a rounding boundary of their grid, and those moves
compound through the layers.

    python bench/packed_kl.py .cache/smollm2-135m-bf16 W4A16=.cache/smollm2-135m-w4a16 ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
import lowbit  # noqa: E402
from lowbit.hardware import cpu_isa  # noqa: E402
from lowbit.runtime import kernels_cpu, kernels_fp  # noqa: E402


def rows_path(enabled: bool) -> None:
    """Every packed kernel on its row (decode) path for inputs of any size, or back to normal.
    Linears read their threshold at load, so set this before lowbit.load."""
    for k in kernels_cpu.DENSE_ROWS:
        kernels_cpu.DENSE_ROWS[k] = kernels_cpu.NEVER if enabled else rows_path.saved[k]
    kernels_fp.DENSE_ROWS = kernels_cpu.NEVER if enabled else rows_path.saved["fp"]


rows_path.saved = {**kernels_cpu.DENSE_ROWS, "fp": kernels_fp.DENSE_ROWS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("original", type=Path)
    ap.add_argument("quantized", nargs="+", metavar="NAME=DIR")
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compute-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="what every path computes in (auto: bf16 where this CPU runs it natively); "
                         "float32 keeps the reference's own bf16 rounding out of the comparison")
    ap.add_argument("--perturb", type=int, default=0, metavar="N",
                    help="also N runs of the reference with one-ulp perturbed Linear outputs (its noise floor)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"CPU ISA {cpu_isa()}, torch {torch.__version__}, {a.windows} windows x {a.seq_len} tokens, "
          f"compute {a.compute_dtype}")
    print("| checkpoint | path | kernels | KL | KL / reference | top-1 |\n|---|---|---|---|---|---|")
    for spec in a.quantized:
        name, _, path = spec.partition("=")
        ref = None
        for label, packed, rows in (("reference", False, False), ("packed (eval --packed)", True, False),
                                    ("packed, row kernels", True, True)):
            rows_path(rows)
            kernels = "dequantized"
            if packed:
                m = lowbit.load(path, a.compute_dtype)
                kernels = "+".join(sorted({getattr(x, "kernel", "") for x in m.modules()} - {""}))
                del m
            r = lowbit.evaluate(path, a.original, windows=a.windows, seq_len=a.seq_len, device="cpu",
                                packed=packed, compute=a.compute_dtype)
            rows_path(False)
            kl, top1 = r["kl"], r["top1"]
            ref = ref if ref is not None else kl
            print(f"| {name} | {label} | {kernels} | {kl:.5f} | {kl / ref:.4f} | {top1 * 100:.2f} % |",
                  flush=True)
        for seed in range(1, a.perturb + 1):
            r = perturbed_reference(Path(path), a.original, seed, a)
            print(f"| {name} | reference, 1-ulp perturbed (seed {seed}) | dequantized | {r['kl']:.5f} | "
                  f"{r['kl'] / ref:.4f} | {r['top1'] * 100:.2f} % |", flush=True)


def perturbed_reference(path: Path, original: Path, seed: int, a: argparse.Namespace) -> dict:
    """The reference path's KL and top-1 (as lowbit.evaluate computes them) with every Linear's
    output multiplied by 1 + u eps, u in {-1, 0, 1} drawn per value from `seed`, eps the
    compute dtype's machine epsilon: one unit in the last place, in float32 then rounded back."""
    from lowbit import data
    from lowbit.api import _compute_for, load
    from lowbit.checkpoint import load_tokenizer
    from lowbit.metrics import compare

    dtype = _compute_for(path, a.compute_dtype).dtype
    wins = data.eval_windows(load_tokenizer(path), data.read_records("sharegpt"), windows=a.windows,
                             seq_len=a.seq_len)
    model, base = load(path, dtype, packed=False), load(original, dtype, packed=False)
    gen, eps = torch.Generator().manual_seed(seed), torch.finfo(dtype).eps

    def nudge(module, inputs, out):
        u = torch.randint(-1, 2, out.shape, generator=gen, dtype=torch.float32)
        return (out.float() * (1 + u * eps)).to(out.dtype)

    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_hook(nudge)
    return compare(model, wins, base)


if __name__ == "__main__":
    main()
