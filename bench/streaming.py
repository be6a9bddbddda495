"""Claim: `lowbit quantize` handles a checkpoint bigger than RAM in a few GiB, writing each
output byte once. Writes a synthetic checkpoint with a real architecture's shapes (random bf16
weights) and quantizes it with the real CLI, measuring peak RSS, wall time and the bytes the
process wrote (/proc/self/io) against the size of what it produced.

    # Llama-2-13B layer shapes, 44 layers (29 GB bf16): FP8, W4A16 with RTN on all of it, and
    # W4A16 with GPTQ on its first 4 layers
    python bench/streaming.py --tokenizer .cache/smollm2-135m-bf16 --shape llama-13b --layers 44 \\
        --runs FP8 W4A16/rtn W4A16:4
    # FP8 weight-only conversion of a Llama-7B-shaped model
    python bench/streaming.py --tokenizer .cache/smollm2-135m-bf16 --shape llama-7b --layers 32 \\
        --runs W8A16_FP8

Every layer holds the same random weights (drawing 29 GB of random numbers takes longer than
quantizing them); each is still read, quantized and written on its own.
A run `SCHEME:N` quantizes a view of the first N layers (a directory of links to the same
shard files, with num_hidden_layers=N): nothing is copied.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from measure import run_measured  # noqa: E402
from synthetic import LLAMA_7B, write_llama  # noqa: E402

GIB = 2**30
SHAPES = {"llama-7b": LLAMA_7B,
          "llama-13b": dict(hidden_size=5120, intermediate_size=13824, num_attention_heads=40,
                            num_key_value_heads=40, max_position_embeddings=4096)}
OUT_RATIO = {"FP8": 0.55, "W8A16_FP8": 0.55, "FP8_DYNAMIC": 0.55}  # output / bf16 source, with margin


def layer_bytes(shape: dict) -> int:
    h, f = shape["hidden_size"], shape["intermediate_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    return 2 * (2 * h * h + 2 * kv * h + 3 * h * f + 2 * h)


def prefix_view(src: Path, dst: Path, layers: int) -> Path:
    """A checkpoint of `src`'s first `layers` decoder layers, made of symlinks to its shards."""
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    index_name = "model.safetensors.index.json"
    index = json.loads((src / index_name).read_text())
    keep = {k: f for k, f in index["weight_map"].items()
            if not k.startswith("model.layers.") or int(k.split(".")[2]) < layers}
    for f in sorted(set(keep.values())):
        (dst / f).symlink_to((src / f).resolve())
    (dst / index_name).write_text(json.dumps({"metadata": {}, "weight_map": keep}))
    cfg = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(dict(cfg, num_hidden_layers=layers), indent=2))
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", index_name):
            shutil.copyfile(f, dst / f.name)
    return dst


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", type=Path, required=True, help="checkpoint dir whose tokenizer to reuse")
    ap.add_argument("--shape", choices=SHAPES, default="llama-13b")
    ap.add_argument("--layers", type=int, default=44)
    ap.add_argument("--runs", nargs="+", default=["FP8", "W4A16:4"],
                    help="SCHEME[/ALGORITHM][:LAYERS], e.g. FP8, W4A16/rtn, W4A16:2")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "lowbit-streaming")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint for another run")
    args = ap.parse_args()
    shape = SHAPES[args.shape]
    vocab = json.loads((args.tokenizer / "config.json").read_text())["vocab_size"]
    source = args.layers * layer_bytes(shape) + 2 * 2 * vocab * shape["hidden_size"]
    biggest_out = max(OUT_RATIO.get(r.split(":")[0], 0.35) for r in args.runs) * source
    need = source + biggest_out + 2 * GIB  # one output at a time: each is removed when measured
    args.workdir.mkdir(parents=True, exist_ok=True)
    src = args.workdir / f"{args.shape}-{args.layers}L"
    have = shutil.disk_usage(args.workdir).free + (_size(src) if src.is_dir() else 0)
    print(f"needs {need / GIB:.1f} GiB free under {args.workdir} ({source / GIB:.1f} GiB source + "
          f"{biggest_out / GIB:.1f} GiB output + 2 GiB margin); has {have / GIB:.1f} GiB", flush=True)
    if have < need:
        sys.exit("not enough free disk")
    if not (src / "config.json").is_file() or _size(src) < source * 0.99:
        write_llama(src, args.layers, args.tokenizer, dict(shape, vocab_size=vocab), distinct=False)
    size = _size(src)
    print(f"source: {src} {size / GIB:.2f} GiB ({size / 1e9:.1f} GB) bf16, {args.layers} layers", flush=True)
    rows = []
    for run in args.runs:
        scheme, _, n = run.partition(":")
        scheme, _, algorithm = scheme.partition("/")
        n = int(n) if n else args.layers
        model = src if n == args.layers else prefix_view(src, args.workdir / f"view-{n}L", n)
        model_bytes = sum((model / f).stat().st_size for f in set(json.loads(
            (model / "model.safetensors.index.json").read_text())["weight_map"].values()))
        out = args.workdir / f"out-{scheme}-{n}L"
        m = run_measured(["lowbit", "quantize", str(model), str(out), "--scheme", scheme,
                          *(["--algorithm", algorithm] if algorithm else []),
                          "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--overwrite"])
        out_bytes = _size(out)
        scheme = f"{scheme} ({algorithm})" if algorithm else scheme
        rows.append((scheme, n, model_bytes, out_bytes, m))
        print(f"{scheme} {n} layers: peak RSS {m['rss'] / GIB:.2f} GiB, wall {m['wall']:.0f} s, wrote "
              f"{m['write_bytes'] / GIB:.2f} GiB for {out_bytes / GIB:.2f} GiB of output", flush=True)
        shutil.rmtree(out)
        if model != src:
            shutil.rmtree(model)
    print("\n| scheme | layers | input (GiB) | peak RSS (GiB) | RSS / input | wall (s) | output (GiB) "
          "| bytes written / output |")
    print("|---|---|---|---|---|---|---|---|")
    for scheme, n, model_bytes, out_bytes, m in rows:
        print(f"| {scheme} | {n} | {model_bytes / GIB:.2f} | {m['rss'] / GIB:.2f} | "
              f"{m['rss'] / model_bytes:.3f} | {m['wall']:.0f} | {out_bytes / GIB:.2f} | "
              f"{m['write_bytes'] / out_bytes:.3f} |")
    if not args.keep:
        shutil.rmtree(src)


if __name__ == "__main__":
    main()
