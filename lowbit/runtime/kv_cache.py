"""The KV cache generation preallocates: transformers' StaticCache (one [1, kv_heads, max_len,
head_dim] key and value tensor per layer, written in place), sized once per request so no
decode step allocates or copies the cache (gpt-fast's design)."""

from __future__ import annotations

from torch import nn

from ..errors import LowbitError


def static_cache(model: nn.Module, max_len: int):
    """A cache for `max_len` positions of `model` at batch 1; LowbitError past the model's
    position limit (RoPE tables and trained lengths end there)."""
    from transformers import StaticCache

    config = model.config
    limit = getattr(config, "max_position_embeddings", None)
    if limit and max_len > limit:
        raise LowbitError(f"prompt plus max_tokens is {max_len} positions; the model handles at most "
                          f"{limit}: shorten the prompt or lower max_tokens")
    return StaticCache(config=config, max_cache_len=max_len)


def kv_bytes(model: nn.Module, max_len: int, itemsize: int) -> int:
    """Bytes the cache for `max_len` positions holds (keys and values, every layer)."""
    c = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return 2 * c.num_hidden_layers * kv_heads * head_dim * max_len * itemsize
