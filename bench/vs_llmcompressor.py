"""Side by side with llm-compressor on the same model and the same calibration samples.

For each scheme, both tools quantize SmolLM2-135M (wall time and peak RSS measured from
outside), then `lowbit eval` scores both checkpoints against the original on the held-out
split. llm-compressor runs from its own venv (created here on first use, torch pinned).

    python bench/vs_llmcompressor.py --model .cache/smollm2-135m-bf16 --schemes FP8 W4A16
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from measure import peak_rss_of  # noqa: E402

ROOT = Path(__file__).parents[1]
LLMC_VENV = ROOT / ".cache" / "llmc-venv"
GIB = 2**30

# scheme -> lowbit quantize flags (llm-compressor's recipe of the same name is in _llmc_run.py)
LOWBIT = {
    "W4A16": ["--scheme", "W4A16", "--group-size", "{g}"],
    "W4A16_RTN": ["--scheme", "W4A16", "--group-size", "{g}", "--algorithm", "rtn"],
    "W8A8_INT8": ["--scheme", "W8A8_INT8", "--algorithm", "gptq"],  # AutoSmoothQuant + GPTQ
    "FP8": ["--scheme", "FP8"],
    "FP8_KV": ["--scheme", "FP8", "--kv-cache", "fp8"],
    "NVFP4": ["--scheme", "NVFP4", "--algorithm", "gptq"],  # W4A4, GPTQ on both sides
    "NVFP4A16": ["--scheme", "NVFP4A16", "--algorithm", "gptq"],
}


def ensure_llmc() -> Path:
    py = LLMC_VENV / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(LLMC_VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "torch==2.13.0"], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "llmcompressor", "torch==2.13.0"], check=True)
    return py


def evaluate(model: Path, baseline: Path, windows: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "lowbit", "eval", str(model), "--baseline", str(baseline),
                          "--windows", str(windows), "--json"], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--schemes", nargs="+", default=list(LOWBIT), choices=list(LOWBIT))
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--workdir", type=Path, default=ROOT / ".cache" / "bench-vs")
    ap.add_argument("--tools", nargs="+", default=["lowbit", "llm-compressor"],
                    choices=["lowbit", "llm-compressor"], help="rerun one side only")
    args = ap.parse_args()

    from lowbit import data
    from lowbit.checkpoint import load_tokenizer

    args.workdir.mkdir(parents=True, exist_ok=True)
    tokens = data.calibration_samples(load_tokenizer(args.model), "sharegpt", samples=args.samples,
                                      seq_len=args.seq_len, seed=0)
    tokens_file = args.workdir / "tokens.json"
    tokens_file.write_text(json.dumps([t.tolist() for t in tokens]))
    llmc = ensure_llmc() if "llm-compressor" in args.tools else None
    rows = []
    for scheme in args.schemes:
        ours, theirs = args.workdir / f"lowbit-{scheme}", args.workdir / f"llmc-{scheme}"
        flags = [f.format(g=args.group_size) for f in LOWBIT[scheme]]
        runs = []
        if "lowbit" in args.tools:
            runs.append(("lowbit", ours, peak_rss_of(
                [sys.executable, "-m", "lowbit", "quantize", str(args.model), str(ours), *flags,
                 "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--overwrite"])))
        if llmc is not None:
            runs.append(("llm-compressor", theirs, peak_rss_of(
                [str(llmc), str(Path(__file__).parent / "_llmc_run.py"), str(args.model),
                 str(theirs), scheme, str(tokens_file), str(args.group_size)])))
        for tool, path, (rss, wall) in runs:
            r = evaluate(path, args.model, args.windows)
            rows.append((scheme, tool, r["kl"], r["ppl"], r["top1"], wall, rss))
            print(rows[-1], flush=True)
    print(f"\nsamples {args.samples} x {args.seq_len} tokens, group size {args.group_size}, "
          f"eval {args.windows} windows\n")
    print("| scheme | tool | KL | ppl | top-1 | wall (s) | peak RSS (GiB) |")
    print("|---|---|---|---|---|---|---|")
    for scheme, tool, kl, ppl, top1, wall, rss in rows:
        print(f"| {scheme} | {tool} | {kl:.5f} | {ppl:.4f} | {top1:.2%} | {wall:.0f} | {rss / GIB:.2f} |")


if __name__ == "__main__":
    main()
