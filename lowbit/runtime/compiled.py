"""The decode step compiled by torch.compile (Inductor), for batch-1 generation.

At batch 1 a small model's decode step is mostly per-op cost, not arithmetic: SmolLM2-135M
runs about 25 framework ops per decoder layer (norms, casts, RoPE, reshapes around the packed
Linears), each a Python call and a dispatch. Inductor fuses the elementwise ones into generated
C++ loops and calls the Linear kernels (int4pack, FBGEMM, torch.mv) as they are.

What it costs and how it is kept from costing twice:
- compiling takes tens of seconds (a minute or more for a 30-layer model on 2 cores), once per
  model and cache length, so it is opt-in (`lowbit generate --compile`, `compile=True`); Inductor
  also keeps its compiled code on disk, so a later process compiles faster;
- shapes are static (one graph, no symbolic sizes), and the KV cache's length is part of the
  graph: caches are rounded up to a multiple of BUCKET positions, so requests of different
  lengths share a graph (the extra positions are masked, and cost memory only);
- only the one-token step is compiled; prompts are prefilled eagerly, in chunks of any length.
Numerics: in float32 the compiled step matches eager up to float rounding order; in bf16
Inductor keeps fused intermediates in float32 where eager rounds every op to bf16, so logits
differ by bf16 noise (tests/test_generate.py compares them in float32).
"""

from __future__ import annotations

import torch
from torch import nn

BUCKET = 256  # cache positions are allocated in multiples of this when the step is compiled
_graphs = 0  # (model, cache length) graphs made in this process


def cache_len(model: nn.Module, needed: int) -> int:
    """`needed` rounded up to a multiple of BUCKET, but not past the model's position limit."""
    limit = getattr(model.config, "max_position_embeddings", None) or needed
    return max(needed, min(-(-needed // BUCKET) * BUCKET, limit))


def _decode_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' SDPA attention, except for a one-token step. That runs through lowbit's C
    kernel (kernels_cpu.attention_decode) where it fits: it reads only the cache positions the
    mask leaves, each key and value row once for the query heads sharing it; torch's flash
    kernel reads the whole static cache (SmolLM2, 512 positions, float32: 0.11 ms a layer,
    ~3 ms a step, against 0.06 for the C kernel; at Llama-3.2-1B's four query heads per KV head
    the C kernel is 8 % slower a layer, its dot products' horizontal sums: docs/benchmarks.md,
    bench/cpu_kernels.py --attention). Elsewhere grouped-query attention runs as [kv_heads,
    queries per kv head] rows (transformers' `pack_gqa`) under torch.compile too: transformers
    packs only when not compiling, and otherwise repeats the keys and values per query head,
    where torch's CPU flash kernel took 1.9 ms a layer for Llama-3.2-1B's 32 one-row heads over a
    512-position cache, against 0.26 ms packed."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from .kernels_cpu import attention_decode, attention_decode_fits

    if getattr(module, "_lowbit_c_attention", False) and dropout == 0.0 \
            and kwargs.get("position_bias") is None and kwargs.get("softcap") is None \
            and attention_decode_fits(query, key, value, attention_mask):
        _, heads, _, d = query.shape
        mask = None if attention_mask is None else attention_mask.reshape(-1)
        out = attention_decode(query.reshape(heads, d), key[0], value[0], mask,
                               d**-0.5 if scaling is None else float(scaling))
        return out.to(query.dtype).reshape(1, 1, heads, d), None
    rep = getattr(module, "num_key_value_groups", 1)
    if query.shape[2] != 1 or rep == 1 or kwargs.get("position_bias") is not None \
            or (attention_mask is not None and attention_mask.shape[1] != 1):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    b, heads, _, d = query.shape
    out = torch.nn.functional.scaled_dot_product_attention(
        query.reshape(b, heads // rep, rep, d), key, value, attn_mask=attention_mask,
        dropout_p=dropout, scale=scaling)
    return out.reshape(out.shape[0], heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


def _pack_gqa(model: nn.Module) -> None:
    """Route the model's SDPA attention through _decode_sdpa (eager steps compute the same: the
    packing is transformers' own, the C kernel tested against float64), directly or under
    lowbit's KV-cache seam (attention.py)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from .clib import library

    ALL_ATTENTION_FUNCTIONS.register("lowbit_sdpa", _decode_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register("lowbit_sdpa", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    c = library() is not None  # asked here: a traced step cannot call into ctypes
    for m in model.modules():
        m.__dict__["_lowbit_c_attention"] = c  # read by _decode_sdpa from the attention module
        config = m.__dict__.get("config")
        if config is not None and getattr(config, "_attn_implementation", None) == "sdpa":
            config._attn_implementation = "lowbit_sdpa"
        if m.__dict__.get("_lowbit_kv_inner") == "sdpa":
            m.__dict__["_lowbit_kv_inner"] = "lowbit_sdpa"


def decode_step(model: nn.Module, length: int):
    """model's forward compiled for the one-token step over a cache of `length` positions, and
    the seconds spent compiling it now (0.0 when an earlier request did). The graph is made by
    one step on a throwaway cache, so the request's own timings hold no compile time."""
    import time

    from .generate import _cache_kwarg
    from .kv_cache import static_cache

    state = model.__dict__.setdefault("_lowbit_compiled", {"step": None, "lengths": set()})
    if state["step"] is None:  # set in __dict__: an nn.Module attribute would register it
        _pack_gqa(model)
        state["step"] = torch.compile(model, dynamic=False)
    if length in state["lengths"]:
        return state["step"], 0.0
    # Dynamo keeps a graph per (code object, guards), and every model shares the top-level
    # forward's code object: past its recompile limit (8) it stops compiling that frame and
    # instead compiles each decoder layer's frame on its own, per layer, which ran slower than
    # eager (measured in bench/decode_speed.py with nine models in one process). Two slots per
    # graph this process makes (a whole graph needs one; the other is headroom) keep every
    # model whole.
    global _graphs
    _graphs += 1
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * _graphs + 8)
    clock = time.perf_counter()
    # as in a request: the first position fills the cache eagerly (a fresh cache's layers
    # initialise on their first write, and a graph made on one would not serve a filled cache)
    kw = dict(use_cache=True, logits_to_keep=1, **{_cache_kwarg(model): static_cache(model, length)})
    token = torch.zeros(1, 1, dtype=torch.long)
    model(input_ids=token, position_ids=torch.tensor([[0]]), **kw)
    state["step"](input_ids=token, position_ids=torch.tensor([[1]]), **kw)
    state["lengths"].add(length)
    return state["step"], time.perf_counter() - clock
