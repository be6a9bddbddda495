"""A seam in the attention of transformers models: see (and change) the keys and values
that go into the KV cache, after RoPE and any q/k norm, exactly where a serving engine caches
them. Used to calibrate KV-cache scales and to simulate a quantized cache."""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator

import torch
from torch import nn

NAME = "lowbit_kv"
KVHook = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _inner(module: nn.Module, implementation: str) -> Callable:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if implementation == "eager":  # each family has its own eager function (Gemma's softcapping)
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[implementation]


def _attention(module, query, key, value, attention_mask, **kwargs):
    hook: KVHook | None = module.__dict__.get("_lowbit_kv_hook")
    if hook is not None:
        key, value = hook(module, key, value)
    return _inner(module, module.__dict__["_lowbit_kv_inner"])(module, query, key, value, attention_mask, **kwargs)


def _register(inner: str) -> str:
    """The implementation name standing in for `inner`: our function, `inner`'s mask builder
    (models build masks by implementation name, and eager and sdpa masks differ)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = f"{NAME}_{inner}"
    ALL_ATTENTION_FUNCTIONS.register(name, _attention)
    if inner in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[inner])
    return name


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules that call the attention function: those holding a k_proj or a fused qkv_proj."""
    return {name: m for name, m in model.named_modules()
            if isinstance(getattr(m, "k_proj", None) or getattr(m, "qkv_proj", None), nn.Linear)}


def install_kv_hooks(hooks: dict[nn.Module, KVHook]) -> Callable[[], None]:
    """Route attention of each module through `hooks[module](module, key, value)`; returns
    the function that undoes it (a loaded model keeps them for its lifetime). A module already
    routed (a loaded model's KV-cache simulation) has its hook replaced until the undo."""
    configs = {id(m.config): m.config for m in hooks if hasattr(m, "config")}
    before = {k: c._attn_implementation for k, c in configs.items()}
    previous = {m: {k: m.__dict__[k] for k in ("_lowbit_kv_hook", "_lowbit_kv_inner") if k in m.__dict__}
                for m in hooks}
    for m, hook in hooks.items():
        m.__dict__["_lowbit_kv_hook"] = hook
        m.__dict__.setdefault("_lowbit_kv_inner", before[id(m.config)])
    for c in configs.values():
        if not c._attn_implementation.startswith(f"{NAME}_"):
            c._attn_implementation = _register(c._attn_implementation)

    def undo() -> None:
        for k, c in configs.items():
            c._attn_implementation = before[k]
        for m in hooks:
            m.__dict__.pop("_lowbit_kv_hook", None)
            m.__dict__.pop("_lowbit_kv_inner", None)
            m.__dict__.update(previous[m])

    return undo


@contextlib.contextmanager
def kv_hooks(hooks: dict[nn.Module, KVHook]) -> Iterator[None]:
    """install_kv_hooks for the duration of a block."""
    undo = install_kv_hooks(hooks)
    try:
        yield
    finally:
        undo()
