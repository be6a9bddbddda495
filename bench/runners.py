"""What bench/decode_speed.py measures besides lowbit and transformers: the machine's read
bandwidth, the bytes a decode step reads, a GGUF of our own weights for llama.cpp, and the
llama.cpp and vLLM CPU timings, each run in its own venv's Python as a subprocess:

    python bench/runners.py llama MODEL.gguf --ids 1,2,3 --new 128 --threads 1
    python bench/runners.py vllm CKPT_DIR --ids 1,2,3 --new 128 --threads 1 --dtype bfloat16

print one JSON line {"prefill": tok/s, "decode": tok/s} or {"error": "..."}. Timing is the same
as for the other rows: prefill is the prompt's forward (the time to the first new token);
decode is (new - 1) tokens over the rest of the time, greedy, EOS ignored.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

# ---------------------------------------------------------------- bandwidth and bytes per token


def read_bandwidth(gib: float = 2.0, repeats: int = 5, threads: int = 1) -> float:
    """Bytes/s a sum over a `gib` GiB float32 buffer reads, best of `repeats`: the buffer is
    many times the L3 (reported as 300-480 MiB here), so this is DRAM read bandwidth."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.ones(int(gib * 2**30) // 4)
        x.sum()  # first touch
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            x.sum()
            best = min(best, time.perf_counter() - start)
        return x.numel() * 4 / best
    finally:
        torch.set_num_threads(old)


def kv_bytes_per_token(cfg: dict, prompt: int, new: int, elem_bytes: float) -> float:
    """KV-cache bytes one decode step reads, averaged over the `new` steps after a `prompt`-token
    prompt: each step reads the keys and values of every earlier position in every layer."""
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    per_position = 2 * cfg["num_hidden_layers"] * cfg.get("num_key_value_heads", heads) * head_dim
    mean_positions = prompt + (new - 1) / 2
    return per_position * mean_positions * elem_bytes


def bandwidth_share(tok_s: float, bytes_per_token: float, bandwidth: float) -> float:
    """The fraction of the bandwidth limit (bandwidth / bytes per token) a row reaches."""
    return tok_s * bytes_per_token / bandwidth


def model_read_bytes(model) -> int:
    """Bytes of a loaded torch model's weights that a decode step reads: runtime/linear's
    resident_bytes (FBGEMM's packed copies included) less the input embedding table, of which
    one row is read per token (unless it is tied to the lm_head, read whole every token)."""
    sys.path.insert(0, str(Path(__file__).parents[1]))
    from lowbit.runtime.linear import resident_bytes

    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    tied = out is not None and out.weight.data_ptr() == emb.data_ptr()
    return resident_bytes(model) - (0 if tied else emb.untyped_storage().nbytes())


def gguf_read_bytes(path: Path) -> int:
    """Bytes of a GGUF's tensors a decode step reads: all but token_embd (one row a token),
    plus token_embd again when there is no output.weight (tied embeddings)."""
    from gguf import GGUFReader

    sizes = {t.name: int(t.n_bytes) for t in GGUFReader(str(path)).tensors}
    emb = sizes.pop("token_embd.weight")
    return sum(sizes.values()) + (0 if "output.weight" in sizes else emb)


# ---------------------------------------------------------------- GGUF writer


def _permute(w, heads: int):
    """HF's q/k row order -> llama.cpp's (convert_hf_to_gguf.py's LlamaModel.permute): the
    rotary halves of each head interleaved. transformers' GGUF reader undoes it."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
              "post_attention_layernorm": "ffn_norm"}


def write_gguf(ckpt: Path, template: Path, out: Path, dtype: str = "f32") -> Path:
    """Write the weights of Llama-architecture HF checkpoint `ckpt` as a GGUF at `out`, in f32
    or f16 (llama.cpp's quantizer then makes Q4_0/Q8_0 of the same weights). Every metadata key
    of the llama-architecture `template` GGUF (tokenizer, chat template) is copied; the model's
    hyperparameters come from ckpt's config.json, so the template needs only the same tokenizer."""
    import numpy as np
    import torch
    from gguf import GGUFReader, GGUFValueType, GGUFWriter
    from safetensors import safe_open

    cfg = json.loads((ckpt / "config.json").read_text())
    if cfg.get("model_type") != "llama":
        raise SystemExit(f"write_gguf: {ckpt} is {cfg.get('model_type')!r}, only llama is written")
    reader = GGUFReader(str(template))
    w = GGUFWriter(str(out), "llama")
    heads, kv_heads = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    ours = {"context_length": cfg["max_position_embeddings"], "embedding_length": cfg["hidden_size"],
            "block_count": cfg["num_hidden_layers"], "feed_forward_length": cfg["intermediate_size"],
            "attention.head_count": heads, "attention.head_count_kv": kv_heads,
            "rope.dimension_count": cfg.get("head_dim") or cfg["hidden_size"] // heads,
            "vocab_size": cfg["vocab_size"]}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key == "general.file_type" \
                or key.startswith("llama."):
            continue
        kind = field.types[0]
        if kind == GGUFValueType.ARRAY:
            sub = field.types[-1]
            vals = [bytes(field.parts[i]).decode() if sub == GGUFValueType.STRING
                    else field.parts[i].tolist()[0] for i in field.data]
            w.add_array(key, vals)
        elif kind == GGUFValueType.STRING:
            w.add_string(key, bytes(field.parts[field.data[0]]).decode())
        else:
            w.add_key_value(key, field.parts[field.data[0]].tolist()[0], kind)
    for key, value in ours.items():
        w.add_uint32(f"llama.{key}", int(value))
    w.add_float32("llama.rope.freq_base", float(cfg.get("rope_theta", 10000.0)))
    w.add_float32("llama.attention.layer_norm_rms_epsilon", float(cfg.get("rms_norm_eps", 1e-5)))
    w.add_file_type(0 if dtype == "f32" else 1)

    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(ckpt.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    for name, t in tensors.items():
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            if cfg.get("tie_word_embeddings"):
                continue
            gname = "output.weight"
        elif name.startswith("model.layers."):
            i, _, rest = name[len("model.layers."):].partition(".")
            mod, _, suffix = rest.rpartition(".")
            gname = f"blk.{i}.{GGUF_NAMES[mod]}.{suffix}"
        else:
            raise SystemExit(f"write_gguf: no GGUF name for {name}")
        t = t.float()
        if name.endswith("q_proj.weight"):
            t = _permute(t, heads)
        elif name.endswith("k_proj.weight"):
            t = _permute(t, kv_heads)
        a = t.numpy()
        if dtype == "f16" and a.ndim == 2:
            a = a.astype(np.float16)  # norms stay f32, as llama.cpp's converter keeps them
        w.add_tensor(gname, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def quantize_gguf(llama_python: str, src: Path, out: Path, ftype: str) -> Path:
    """llama.cpp's own quantizer (llama_model_quantize through llama-cpp-python) on `src`."""
    import subprocess

    code = ("import sys, llama_cpp as L\n"
            "p = L.llama_model_quantize_default_params()\n"
            f"p.ftype = L.LLAMA_FTYPE_MOSTLY_{ftype}\n"
            "p.nthread = 2\n"
            "sys.exit(L.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))\n")
    subprocess.run([llama_python, "-c", code, str(src), str(out)], check=True)
    return out


# ---------------------------------------------------------------- subprocess runners


def run_llama(gguf: str, ids: list[int], new: int, threads: int, repeats: int) -> dict:
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=gguf, n_ctx=len(ids) + new + 8, n_batch=len(ids), n_ubatch=len(ids),
                n_threads=threads, n_threads_batch=threads, verbose=False)
    vocab = llm.n_vocab()

    def last_logits():
        # llama-cpp-python 0.3.x fills `llm.scores` only with logits_all=True; without it the
        # context still holds the last position's logits, which is all greedy decoding needs.
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))

    best_p, best_d = 0.0, 0.0
    for _ in range(repeats):
        llm.reset()
        start = time.perf_counter()
        llm.eval(ids)
        prefill = time.perf_counter() - start
        token = int(np.argmax(last_logits()))
        start = time.perf_counter()
        for _ in range(new - 1):
            llm.eval([token])
            token = int(np.argmax(last_logits()))
        decode = time.perf_counter() - start
        best_p, best_d = max(best_p, len(ids) / prefill), max(best_d, (new - 1) / decode)
    return {"prefill": best_p, "decode": best_d}


def run_vllm(ckpt: str, ids: list[int], new: int, threads: int, repeats: int, dtype: str) -> dict:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import torch
    from vllm import LLM, SamplingParams

    torch.set_num_threads(threads)
    try:
        llm = LLM(model=ckpt, dtype=dtype, enforce_eager=True, max_model_len=len(ids) + new + 8,
                  seed=0, generation_config="vllm")
    except Exception as e:  # noqa: BLE001 - vLLM raises anything for a format it cannot run
        return {"error": (str(e).strip().splitlines() or [type(e).__name__])[-1][:200]}
    prompt = [{"prompt_token_ids": ids}]
    first = SamplingParams(max_tokens=1, temperature=0.0)
    full = SamplingParams(max_tokens=new, min_tokens=new, temperature=0.0, ignore_eos=True)
    llm.generate(prompt, first, use_tqdm=False)  # warm-up
    best_p, best_d = 0.0, 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        llm.generate(prompt, first, use_tqdm=False)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        out = llm.generate(prompt, full, use_tqdm=False)
        total = time.perf_counter() - start
        assert len(out[0].outputs[0].token_ids) == new
        best_p = max(best_p, len(ids) / prefill)
        best_d = max(best_d, (new - 1) / max(total - prefill, 1e-9))
    return {"prefill": best_p, "decode": best_d}


def subprocess_row(python: str, kind: str, target: str, ids: list[int], new: int, threads: int,
                   repeats: int, dtype: str = "bfloat16", timeout: float = 1800) -> dict:
    """Run one llama.cpp or vLLM row in `python`; its JSON result, or {"error": ...}."""
    import subprocess

    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    cmd = [python, __file__, kind, target, "--ids", ",".join(map(str, ids)), "--new", str(new),
           "--threads", str(threads), "--repeats", str(repeats), "--dtype", dtype]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if lines:
        return json.loads(lines[-1])
    tail = (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]
    return {"error": tail[:200]}


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=["llama", "vllm"])
    ap.add_argument("target")
    ap.add_argument("--ids", required=True)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16")
    a = ap.parse_args()
    ids = [int(t) for t in a.ids.split(",")]
    if a.kind == "llama":
        result = run_llama(a.target, ids, a.new, a.threads, a.repeats)
    else:
        result = run_vllm(a.target, ids, a.new, a.threads, a.repeats, a.dtype)
    sys.stdout.flush()
    print(json.dumps(result), flush=True)
