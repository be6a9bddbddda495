"""Claim: packed INT4/INT8 Linears decode faster than the dequantizing reference path and than
transformers on the original model, at batch 1 on CPU.

One run measures, side by side, prefill tok/s (a 256-token prompt) and decode tok/s (128 new
tokens, EOS ignored) for: transformers' own generate on the original checkpoint in float32 and
in bf16, lowbit's generate on the original, and lowbit's reference (dequantized) and packed
paths on each quantized checkpoint; plus the resident bytes of the weights. Rows take turns
for `--repeats` rounds and each keeps its best (the machine may be shared); ratios are against
the fastest transformers row (decode and prefill each).

    python bench/decode_speed.py .cache/smollm2-135m-bf16 \\
        --quantized W4A16=.cache/smollm2-135m-w4a16 W8A8_INT8=.cache/smollm2-135m-w8a8_int8
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
import lowbit  # noqa: E402
from lowbit.checkpoint import load_tokenizer  # noqa: E402
from lowbit.hardware import cpu_isa  # noqa: E402
from lowbit.runtime.generate import Generation, stream  # noqa: E402
from lowbit.runtime.linear import resident_bytes  # noqa: E402
from lowbit.runtime.load import load_model  # noqa: E402

TEXT = ("The history of computing is a story of ever smaller switches doing ever more work. "
        "Early machines filled rooms with relays and vacuum tubes; transistors shrank them to "
        "cabinets, and integrated circuits to a single chip. ")


def prompt_ids(path: Path, n: int) -> list[int]:
    ids = load_tokenizer(path)(TEXT * 64)["input_ids"]
    if len(ids) < n:
        raise SystemExit(f"the prompt text has only {len(ids)} tokens")
    return ids[:n]


def transformers_runner(path: Path, dtype: torch.dtype, ids: list[int], new: int):
    """() -> (prefill tok/s, decode tok/s) of transformers' generate, greedy, `new` tokens."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    return lambda: _transformers_run(model, ids, new)


def _transformers_run(model, ids: list[int], new: int) -> tuple[float, float]:
    x = torch.tensor([ids])
    with torch.inference_mode():
        start = time.perf_counter()
        model(input_ids=x, logits_to_keep=1)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        out = model.generate(x, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        total = time.perf_counter() - start
    assert out.shape[1] == len(ids) + new
    # generate's own prefill is the same forward; the rest is new - 1 decode steps
    return len(ids) / prefill, (new - 1) / max(total - prefill, 1e-9)


def lowbit_runner(model, tokenizer, ids: list[int], new: int):
    return lambda: _lowbit_run(model, tokenizer, ids, new)


def _lowbit_run(model, tokenizer, ids: list[int], new: int) -> tuple[float, float]:
    r = Generation()
    for _ in stream(model, ids, max_tokens=new, ignore_eos=True, tokenizer=tokenizer, result=r):
        pass
    assert len(r.token_ids) == new
    return len(ids) / r.prefill_seconds, r.decode_steps / r.decode_seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("original", type=Path, help="the unquantized checkpoint")
    ap.add_argument("--quantized", nargs="*", default=[], metavar="NAME=DIR")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtype", default="auto", help="lowbit's compute dtype (default: auto)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared 2-core machine two threads wait on "
                    "each other, measured 20x slower per decode step)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ids = prompt_ids(a.original, a.prompt_tokens)
    tokenizer = load_tokenizer(a.original)
    print(f"CPU ISA {cpu_isa()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"prompt {len(ids)} tokens, {a.new_tokens} new, best of {a.repeats}", flush=True)
    runners = []  # (name, run, resident weight bytes); every model is loaded first
    for dtype in (torch.float32, torch.bfloat16):
        runners.append((f"transformers {str(dtype)[6:]} (original)",
                        transformers_runner(a.original, dtype, ids, a.new_tokens), None))
    model = lowbit.load(a.original, a.dtype)
    runners.append((f"lowbit (original, {str(next(model.parameters()).dtype)[6:]})",
                    lowbit_runner(model, tokenizer, ids, a.new_tokens), resident_bytes(model)))
    for spec in a.quantized:
        name, _, path = spec.partition("=")
        for packed in (False, True):
            model = lowbit.load(path, a.dtype, packed=packed)
            kernels = sorted({getattr(m, "kernel", "") for m in model.modules()} - {""})
            label = f"{name} {'packed ' + '+'.join(kernels) if packed else 'reference'}"
            runners.append((label, lowbit_runner(model, tokenizer, ids, a.new_tokens), resident_bytes(model)))
    # rows take turns, repeat after repeat, so a change in the machine's load hits them alike
    results: dict[str, list[tuple[float, float]]] = {}
    for r in range(a.repeats):
        for name, run, _ in runners:
            prefill, decode = run()
            results.setdefault(name, []).append((prefill, decode))
            print(f"  [{r + 1}] {name:<34} prefill {prefill:8.1f} tok/s  decode {decode:7.2f} tok/s",
                  flush=True)
    rows = [(name, max(p for p, _ in results[name]), max(d for _, d in results[name]), weights)
            for name, _, weights in runners]
    hf_best = max(d for name, _, d, _ in rows if name.startswith("transformers"))
    hf_prefill = max(p for name, p, _, _ in rows if name.startswith("transformers"))

    print(f"\n| row | prefill tok/s | decode tok/s | decode vs transformers | prefill vs transformers "
          f"| weights resident (MiB) |\n|---|---|---|---|---|---|")
    for name, prefill, decode, weights in rows:
        mib = f"{weights / 2**20:.0f}" if weights else ""
        print(f"| {name} | {prefill:.0f} | {decode:.1f} | {decode / hf_best:.2f}x "
              f"| {prefill / hf_prefill:.2f}x | {mib} |")


if __name__ == "__main__":
    main()
