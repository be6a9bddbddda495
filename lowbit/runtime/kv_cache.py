"""The KV cache generation preallocates: transformers' StaticCache (one [1, kv_heads, max_len,
head_dim] key and value tensor per layer, written in place), sized once per request so no
decode step allocates or copies the cache (gpt-fast's design). A checkpoint with an FP8 KV
cache (kv_cache_scheme, per-tensor k_scale / v_scale) keeps its keys and values as FP8 codes,
one byte each, and widens them for attention."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import LowbitError

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max


def kv_scales(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Each decoder layer's (k_scale, v_scale) where the loader set the model to store its KV
    cache as FP8 (load.store_kv_as_fp8), in layer order; None otherwise."""
    found = [m.lowbit_kv_scales for m in model.modules() if hasattr(m, "lowbit_kv_scales")]
    c = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return found if found and len(found) == c.num_hidden_layers else None


def fp8_encode(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """FP8 E4M3 codes of x / scale, rounded to nearest even (torch's cast) after clamping to
    the finite range. The loader's KV simulation has already put x on this grid, up to one
    rounding to the compute dtype, far below half a code step: the codes are the simulation's."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def fp8_decode(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes * scale in float32, then `dtype`: the simulation's own arithmetic."""
    return (codes.float() * scale).to(dtype)


def _fp8_static_layer():
    from transformers.cache_utils import StaticLayer

    class Fp8StaticLayer(StaticLayer):
        """A StaticLayer holding FP8 codes; update() writes the new positions' codes in place
        and returns the whole cache widened to the input's dtype (attention masks the rest)."""

        def __init__(self, max_cache_len: int, k_scale: torch.Tensor, v_scale: torch.Tensor):
            super().__init__(max_cache_len=max_cache_len)
            self.k_scale, self.v_scale = k_scale, v_scale

        def lazy_initialization(self, key_states, value_states) -> None:
            super().lazy_initialization(key_states[..., :0, :].to(FP8), value_states[..., :0, :].to(FP8))

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            at = torch.arange(key_states.shape[-2]) + self.cumulative_length
            self.cumulative_length.add_(key_states.shape[-2])
            # index_copy_ has no float8 kernel on CPU: copy the codes' bytes
            self.keys.view(torch.uint8).index_copy_(2, at, fp8_encode(key_states, self.k_scale).view(torch.uint8))
            self.values.view(torch.uint8).index_copy_(2, at, fp8_encode(value_states, self.v_scale).view(torch.uint8))
            return (fp8_decode(self.keys, self.k_scale, key_states.dtype),
                    fp8_decode(self.values, self.v_scale, value_states.dtype))

    return Fp8StaticLayer


def static_cache(model: nn.Module, max_len: int):
    """A cache for `max_len` positions of `model` at batch 1 (FP8 codes where the model stores
    its KV cache so); LowbitError past the model's position limit (RoPE tables and trained
    lengths end there)."""
    from transformers import StaticCache

    config = model.config
    limit = getattr(config, "max_position_embeddings", None)
    if limit and max_len > limit:
        raise LowbitError(f"prompt plus max_tokens is {max_len} positions; the model handles at most "
                          f"{limit}: shorten the prompt or lower max_tokens")
    cache = StaticCache(config=config, max_cache_len=max_len)
    scales = kv_scales(model)
    if scales is not None:
        if len(scales) != len(cache.layers) or any(layer.is_sliding for layer in cache.layers):
            raise LowbitError("an FP8 KV cache is kept for full-attention layers only")  # none we write
        layer = _fp8_static_layer()
        cache.layers = [layer(max_len, k, v) for k, v in scales]
    return cache


def kv_bytes(model: nn.Module, max_len: int, itemsize: int) -> int:
    """Bytes the cache for `max_len` positions holds (keys and values, every layer): one a value
    where the model stores an FP8 cache, else `itemsize`."""
    c = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    itemsize = 1 if kv_scales(model) is not None else itemsize
    return 2 * c.num_hidden_layers * kv_heads * head_dim * max_len * itemsize
