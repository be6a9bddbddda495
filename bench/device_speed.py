"""Claim: `--device cuda` quantizes the same checkpoint as the CPU, many times faster.

Writes a synthetic Llama-7B-shaped checkpoint (random weights, a few layers), quantizes it with
the real pipeline on each device from the same random-token calibration samples, and prints,
per scheme, seconds per decoder layer on each device, their ratio, and how far the devices'
dequantized weights are apart relative to the quantization error itself.

    python bench/device_speed.py --layers 4 --samples 32 --seq-len 512 --schemes FP8 W4A16
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))
from synthetic import write_llama  # noqa: E402

from lowbit.checkpoint import Checkpoint  # noqa: E402
from lowbit.export import CheckpointWriter  # noqa: E402
from lowbit.pipeline import quantize_layers  # noqa: E402
from lowbit.runtime.load import load_model  # noqa: E402
from lowbit.schemes import PRESETS  # noqa: E402


def timed_run(src: Path, out: Path, scheme: str, device: str, samples: list[torch.Tensor]) -> float:
    s = PRESETS[scheme]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    with CheckpointWriter(out, src, s, overwrite=True) as w:
        quantize_layers(Checkpoint(src), s, samples, w, device=device)
    return time.perf_counter() - start


def spread(a: Path, b: Path, src: Path) -> float:
    """max over Linears of ||W_a - W_b|| / ||W_b - W||: device disagreement per unit of error."""
    wa, wb = load_model(a).state_dict(), load_model(b).state_dict()
    ref = load_model(src).state_dict()
    worst = 0.0
    for name, w in ref.items():
        if name.endswith("proj.weight"):
            worst = max(worst, ((wa[name] - wb[name]).norm() / (wb[name] - w).norm()).item())
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--schemes", nargs="+", default=["FP8", "W4A16"])
    ap.add_argument("--devices", nargs="+", default=["cpu", "cuda"])
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "lowbit-device")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    if any(d.startswith("cuda") for d in args.devices) and not torch.cuda.is_available():
        sys.exit("no CUDA GPU: run on a GPU machine, or pass --devices cpu")
    args.workdir.mkdir(parents=True, exist_ok=True)
    vocab = args.workdir / "vocab"
    vocab.mkdir(exist_ok=True)
    (vocab / "config.json").write_text(json.dumps({"vocab_size": 32000}))
    src = args.workdir / "llama7b"
    write_llama(src, args.layers, vocab)
    gen = torch.Generator().manual_seed(0)
    samples = [torch.randint(0, 32000, (args.seq_len,), generator=gen) for _ in range(args.samples)]
    if any(d.startswith("cuda") for d in args.devices):
        torch.ones(1, device="cuda").sum().item()  # CUDA context creation is not quantization
    rows = []
    for scheme in args.schemes:
        secs = {d: timed_run(src, args.workdir / f"{scheme}-{d}", scheme, d, samples) for d in args.devices}
        base = args.devices[0]
        for d in args.devices:
            far = spread(args.workdir / f"{scheme}-{d}", args.workdir / f"{scheme}-{base}", src)
            rows.append(dict(scheme=scheme, device=d, s_per_layer=secs[d] / args.layers,
                             speedup=secs[base] / secs[d], spread=far))
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    print(f"{args.layers} Llama-7B-shaped layers, {args.samples} x {args.seq_len} tokens, "
          f"{torch.get_num_threads()} CPU threads, {name}")
    print("| scheme | device | s / layer | speed-up vs " + args.devices[0] + " | weight spread |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['scheme']} | {r['device']} | {r['s_per_layer']:.2f} | {r['speedup']:.1f}x | {r['spread']:.4f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    shutil.rmtree(args.workdir)


if __name__ == "__main__":
    main()
