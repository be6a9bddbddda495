"""Claim: peak memory of `lowbit quantize` grows with one layer plus calibration activations,
not with the model. Quantizes synthetic Llama-7B-shaped checkpoints of increasing depth to FP8
with the real CLI and reports peak RSS of each run side by side.

    python bench/layer_memory.py --tokenizer .cache/smollm2-135m --layers 2 8 32
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from measure import peak_rss_of  # noqa: E402
from synthetic import write_llama  # noqa: E402

GIB = 2**30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", type=Path, required=True, help="checkpoint dir whose tokenizer to reuse")
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 8, 32])
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "lowbit-bench")
    args = ap.parse_args()
    need = max(args.layers) * 0.43 * GIB * 1.6  # bf16 source + fp8 output, with margin
    free = shutil.disk_usage(args.workdir.parent if not args.workdir.exists() else args.workdir).free
    if free < need:
        sys.exit(f"needs about {need / GIB:.0f} GiB free under {args.workdir}, has {free / GIB:.0f} GiB")
    lowbit = [sys.executable, "-m", "lowbit"]
    rows = []
    for n in args.layers:
        src, dst = args.workdir / f"llama7b-{n}L", args.workdir / f"llama7b-{n}L-fp8"
        size = write_llama(src, n, args.tokenizer)
        rss, wall = peak_rss_of(lowbit + ["quantize", str(src), str(dst), "--scheme", "FP8",
                                          "--samples", str(args.samples), "--seq-len", str(args.seq_len),
                                          "--overwrite"])
        rows.append((n, size, rss, wall))
        shutil.rmtree(src), shutil.rmtree(dst)
    base = rows[0]
    print(f"| layers | checkpoint (GiB) | peak RSS (GiB) | RSS / checkpoint | RSS vs {base[0]} layers | wall (s) |")
    print("|---|---|---|---|---|---|")
    for n, size, rss, wall in rows:
        print(f"| {n} | {size / GIB:.2f} | {rss / GIB:.2f} | {rss / size:.2f} | {rss / base[2]:.2f}x | {wall:.0f} |")


if __name__ == "__main__":
    main()
