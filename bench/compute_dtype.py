"""What the compute dtype buys: `lowbit quantize` and `lowbit eval` with bf16 forwards (what every
run did before --compute-dtype) and float32 forwards, side by side on one machine, as ratios,
with the accuracy (KL against the original) of each checkpoint.

`--isa avx2` runs every command with PyTorch, oneDNN and MKL limited to AVX2
(ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS): on an AVX-512/AMX machine
that emulates an AVX2-only CPU's kernels (not its clock or memory), where bf16 is emulated.
`--threads 1` (OMP_NUM_THREADS) makes CPU seconds meaningful on a machine shared with other
jobs: with 2 threads on 2 busy cores every parallel region waits for a descheduled thread.

    python bench/compute_dtype.py --model .cache/smollm2-135m-bf16 --schemes FP8 --isa avx2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from measure import peak_rss_of  # noqa: E402

ROOT = Path(__file__).parents[1]
LOWBIT = [sys.executable, "-m", "lowbit"]
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def isa(env: dict) -> str:
    code = "from lowbit.hardware import cpu_isa; print(cpu_isa())"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / ".cache" / "smollm2-135m-bf16"))
    p.add_argument("--schemes", nargs="+", default=["FP8"])
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--isa", choices=["native", "avx2"], default="native")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS for every command")
    p.add_argument("--out", default=str(ROOT / ".cache" / "bench-compute-dtype"))
    a = p.parse_args()
    os.environ.update(AVX2 if a.isa == "avx2" else {})
    if a.threads:
        os.environ["OMP_NUM_THREADS"] = str(a.threads)
    env = dict(os.environ)
    print(f"CPU: {cpu_model()}; ISA as run: {isa(env)}; threads: {a.threads or 'default'}; "
          f"load average before: {load()}")
    rows = []
    for scheme in a.schemes:
        for dtype in ("bfloat16", "float32"):
            out = Path(a.out) / f"{scheme}-{dtype}"
            cpu0 = os.times()
            rss, wall = peak_rss_of([*LOWBIT, "quantize", a.model, str(out), "--scheme", scheme,
                                     "--samples", str(a.samples), "--seq-len", str(a.seq_len),
                                     "--compute-dtype", dtype, "--overwrite"])
            cpu1 = os.times()
            cpu = (cpu1.children_user - cpu0.children_user) + (cpu1.children_system - cpu0.children_system)
            start = time.perf_counter()
            # every checkpoint is scored the same way (float32, the exact reference), so the KL
            # compares the checkpoints and not the evaluation's own dtype
            ev = json.loads(subprocess.run(
                [*LOWBIT, "eval", str(out), "--baseline", a.model, "--windows", str(a.windows),
                 "--compute-dtype", "float32", "--json"], capture_output=True, text=True, check=True).stdout)
            rows.append(dict(scheme=scheme, compute=dtype, wall=wall, cpu=cpu, rss=rss / 2**30,
                             kl=ev["kl"], top1=ev["top1"], eval_wall=time.perf_counter() - start))
            r = rows[-1]
            print(f"{scheme:10} {dtype:9} quantize wall {wall:7.1f} s  cpu {cpu:7.1f} s  "
                  f"peak {r['rss']:.2f} GiB  KL {r['kl']:.5f}  top-1 {r['top1']:.4f}  (load {load()})",
                  flush=True)
    print("\nratio float32 / bfloat16 forwards:")
    for scheme in a.schemes:
        bf, f32 = (next(r for r in rows if r["scheme"] == scheme and r["compute"] == d)
                   for d in ("bfloat16", "float32"))
        print(f"{scheme:10} wall {f32['wall'] / bf['wall']:.3f}x  cpu {f32['cpu'] / bf['cpu']:.3f}x  "
              f"peak RSS {f32['rss'] / bf['rss']:.2f}x  KL {f32['kl'] / bf['kl']:.4f}x")
    print(f"load average after: {load()}")


if __name__ == "__main__":
    main()
