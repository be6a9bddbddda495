"""What 2:4 SparseGPT costs in KL on SmolLM2-135M: against the dense scheme, and against
magnitude pruning.

Rows (each: `lowbit quantize`, then `lowbit eval --baseline` against the bf16 original):
  W4A16 / W4A16 + 2:4           GPTQ, and SparseGPT joint with GPTQ in one sweep
  FP8 / FP8 + 2:4               static per-tensor FP8, and SparseGPT then FP8 rounding
  W8A16_FP8 + 2:4 SparseGPT     pruning methods compared under the same light quantization:
  W8A16_FP8 + 2:4 magnitude     the bf16 checkpoint 2:4-pruned by |w| here, then quantized
                                (FP8 keeps zeros, so the magnitude pattern survives)

    python bench/sparsity.py --model .cache/smollm2-135m-bf16
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

ROOT = Path(__file__).parents[1]
TWO_FOUR = ["--sparsity-structure", "2:4"]
RUNS = {  # name -> (source: "model" or "magnitude", lowbit quantize flags)
    "W4A16": ("model", ["--scheme", "W4A16", "--group-size", "{g}"]),
    "W4A16 + 2:4": ("model", ["--scheme", "W4A16", "--group-size", "{g}", *TWO_FOUR]),
    "FP8": ("model", ["--scheme", "FP8"]),
    "FP8 + 2:4": ("model", ["--scheme", "FP8", *TWO_FOUR]),
    "W8A16_FP8 + 2:4 SparseGPT": ("model", ["--scheme", "W8A16_FP8", *TWO_FOUR]),
    "W8A16_FP8 + 2:4 magnitude": ("magnitude", ["--scheme", "W8A16_FP8"]),
}
LINEAR = re.compile(r"\.layers\.\d+\..*_proj\.weight$")


def magnitude_2of4(src: Path, out: Path) -> Path:
    """A copy of checkpoint `src` whose decoder Linears keep the 2 largest |w| of every 4 inputs."""
    if (out / "config.json").exists():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.is_file():
            shutil.copyfile(f, tmp / f.name)
    for f in sorted(src.glob("*.safetensors")):
        tensors = {}
        with safe_open(f, "pt") as h:
            for k in h.keys():
                t = h.get_tensor(k)
                if LINEAR.search(k):
                    quads = t.reshape(t.shape[0], -1, 4)
                    drop = quads.float().abs().argsort(dim=-1, stable=True)[..., :2]
                    t = quads.scatter(-1, drop, torch.zeros_like(quads)).reshape(t.shape)
                tensors[k] = t.contiguous()
        save_file(tensors, str(tmp / f.name), metadata={"format": "pt"})
    tmp.rename(out)
    return out


def lowbit(*args: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "lowbit", *args, "--json"], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"lowbit {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--workdir", type=Path, default=ROOT / ".cache" / "bench-sparsity")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in args.runs:
        source, flags = RUNS[name]
        src = args.model if source == "model" else magnitude_2of4(args.model, args.workdir / "magnitude-2of4")
        out = args.workdir / re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")
        flags = [f.format(g=args.group_size) for f in flags]
        start = time.perf_counter()
        q = lowbit("quantize", str(src), str(out), *flags, "--samples", str(args.samples),
                   "--seq-len", str(args.seq_len), "--overwrite")
        wall = time.perf_counter() - start
        e = lowbit("eval", str(out), "--baseline", str(args.model), "--windows", str(args.windows))
        results[name] = dict(kl=e["kl"], ppl=e["ppl"], top1=e["top1"], wall=wall,
                             size=e["size_bytes"], worst=q["layers"][0])
        print(json.dumps({name: results[name]}), flush=True)
    (args.workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print("| run | KL | ppl | top-1 | quantize wall (s) |\n|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['kl']:.5f} | {r['ppl']:.4f} | {r['top1']:.2%} | {r['wall']:.0f} |")


if __name__ == "__main__":
    main()
