"""KL of RTN, GPTQ and MR-GPTQ on the FP4 schemes (issue #5): each scheme x algorithm is
quantized with `lowbit quantize` and scored with `lowbit eval --baseline` on the held-out split.

    python bench/fp4_kl.py --model .cache/smollm2-135m-bf16 --schemes MXFP4A16 NVFP4A16
Prints one row per run and, per scheme, the ratios KL(GPTQ)/KL(RTN) and KL(MR-GPTQ)/KL(GPTQ).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]
ALGORITHMS = ("rtn", "gptq", "mr-gptq")


def run(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-m", "lowbit", *args, "--json"], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--schemes", nargs="+", default=["MXFP4A16", "NVFP4A16"])
    ap.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--workdir", type=Path, default=ROOT / ".cache" / "bench-fp4")
    args = ap.parse_args()

    rows = {}
    for scheme in args.schemes:
        for alg in args.algorithms:
            out = args.workdir / f"{scheme}-{alg}"
            start = time.perf_counter()
            run(["quantize", str(args.model), str(out), "--scheme", scheme, "--algorithm", alg,
                 "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--overwrite"])
            wall = time.perf_counter() - start
            r = run(["eval", str(out), "--baseline", str(args.model), "--windows", str(args.windows)])
            rows[scheme, alg] = (r["kl"], r["ppl"], r["top1"], wall)
            print(scheme, alg, rows[scheme, alg], flush=True)

    print(f"\nsamples {args.samples} x {args.seq_len} tokens, eval {args.windows} windows\n")
    print("| scheme | algorithm | KL | ppl | top-1 | quantize wall (s) |")
    print("|---|---|---|---|---|---|")
    for (scheme, alg), (kl, ppl, top1, wall) in rows.items():
        print(f"| {scheme} | {alg} | {kl:.5f} | {ppl:.4f} | {top1:.2%} | {wall:.0f} |")
    print("\n| scheme | KL(GPTQ) / KL(RTN) | KL(MR-GPTQ) / KL(GPTQ) |\n|---|---|---|")
    for scheme in args.schemes:
        kl = {a: rows[scheme, a][0] for a in args.algorithms if (scheme, a) in rows}
        ratio = lambda a, b: f"{kl[a] / kl[b]:.2f}" if a in kl and b in kl else "-"  # noqa: E731
        print(f"| {scheme} | {ratio('gptq', 'rtn')} | {ratio('mr-gptq', 'gptq')} |")


if __name__ == "__main__":
    main()
