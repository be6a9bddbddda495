"""How fast a checkpoint generates in lowbit's runtime at batch 1, and what it holds in memory:
the measurement behind `lowbit compare --speed`."""

from __future__ import annotations

from pathlib import Path

# a fixed prompt for --speed, repeated to the requested length (its content does not matter at
# batch 1 with EOS ignored: every step costs the same)
PROMPT = ("The history of computing is a story of ever smaller switches doing ever more work. "
          "Early machines filled rooms with relays and vacuum tubes; transistors shrank them to "
          "cabinets, and integrated circuits to a single chip. ")


def _peak_rss_reset() -> None:
    try:  # Linux: "5" resets the VmHWM high-water mark of this process
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_rss() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def measure_speed(path: Path, *, prompt_tokens: int, new_tokens: int, repeats: int,
                  compute: str) -> dict:
    """Prefill and decode tok/s of lowbit.generate at batch 1 (best of `repeats`: the machine may
    be shared), resident weights + KV cache bytes, and the process's peak RSS meanwhile."""
    from ..memory import release_memory
    from .generate import generate, model_and_tokenizer
    from .kv_cache import kv_bytes
    from .linear import resident_bytes

    release_memory()
    _peak_rss_reset()
    model, tokenizer = model_and_tokenizer(path, None, compute)  # packed kernels, as deployed on CPU
    ids = tokenizer(PROMPT)["input_ids"]
    body = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    ids = (ids + body * (prompt_tokens // max(1, len(body)) + 1))[:prompt_tokens]
    # one short untimed run first: the first forward allocates and packs what later ones reuse
    generate(model, ids[:8], max_tokens=2, ignore_eos=True, tokenizer=tokenizer)
    prefill = decode = 0.0
    for _ in range(repeats):
        g = generate(model, ids, max_tokens=new_tokens, ignore_eos=True, tokenizer=tokenizer)
        prefill = max(prefill, len(ids) / g.prefill_seconds)
        decode = max(decode, g.decode_steps / g.decode_seconds if g.decode_seconds else 0.0)
    weights, dtype = resident_bytes(model), str(next(model.parameters()).dtype).removeprefix("torch.")
    kv = kv_bytes(model, prompt_tokens + new_tokens, next(model.parameters()).element_size())
    del model
    return {"prefill_tok_s": prefill, "decode_tok_s": decode, "weights_bytes": weights,
            "kv_cache_bytes": kv, "memory_bytes": weights + kv, "peak_rss_bytes": _peak_rss(),
            "dtype": dtype}
