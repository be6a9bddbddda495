"""Architectures as data: where the decoder layers are and which Linears read the same input.

A row per known family names the decoder-layer list; everything else is discovered by one
recorded forward of a layer (Linears fed the very same tensor form a fused set, in call order),
so an unseen family mostly works without a row.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from .errors import LowbitError


@dataclass(frozen=True)
class Arch:
    layers: str  # attribute path of the nn.ModuleList of decoder layers
    norm_offset: float = 0.0  # the norm multiplies by (offset + weight): Gemma's RMSNorm uses 1


ARCHS: dict[str, Arch] = {
    **{family: Arch("model.layers") for family in ("llama", "mistral", "qwen2", "qwen3", "phi3")},
    **{family: Arch("model.layers", norm_offset=1.0) for family in ("gemma", "gemma2", "gemma3_text")},
}


@dataclass(frozen=True)
class Layout:
    """What one recorded forward of a decoder layer shows.

    sets: Linears grouped by the input tensor they read, in call order.
    norms: for a set whose input is exactly a norm's output, that norm's name; smoothing can
    fold a per-channel scale into it.
    """

    sets: list[tuple[str, ...]]
    norms: dict[tuple[str, ...], str]


def _get(obj: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _find_layer_list(model: nn.Module) -> str | None:
    """The biggest ModuleList of same-class blocks that contain Linears (generic fallback)."""
    best, best_len = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > best_len:
            kinds = {type(m) for m in module}
            if len(kinds) == 1 and any(isinstance(m, nn.Linear) for m in module[0].modules()):
                best, best_len = name, len(module)
    return best


def arch_for(model: nn.Module) -> Arch:
    """The row for this model's family, or a discovered one; LowbitError if there is no layer list."""
    model_type = getattr(model.config, "model_type", "?")
    arch = ARCHS.get(model_type)
    if arch is None:
        path = _find_layer_list(model)
        if path is None:
            raise LowbitError(
                f"unsupported architecture {model_type!r}: no list of decoder layers "
                "(an nn.ModuleList of identical blocks containing nn.Linear) was found"
            )
        arch = Arch(path)
    return arch


def decoder_layers(model: nn.Module, arch: Arch) -> nn.ModuleList:
    try:
        return _get(model, arch.layers)
    except AttributeError:
        raise LowbitError(f"model has no decoder layer list at {arch.layers!r}") from None


def linears(layer: nn.Module) -> dict[str, nn.Linear]:
    """The layer's Linears by name; other weight-carrying leaf modules are refused."""
    found = {}
    for name, module in layer.named_modules():
        if isinstance(module, nn.Linear):
            found[name] = module
        elif type(module).__name__ in ("Conv1D",):
            raise LowbitError(
                f"layer module {name} is a {type(module).__name__}; lowbit quantizes nn.Linear only"
            )
    if not found:
        raise LowbitError("decoder layer contains no nn.Linear to quantize")
    return found


def _is_norm(module: nn.Module) -> bool:
    return type(module).__name__.endswith("Norm") and isinstance(getattr(module, "weight", None), torch.Tensor)


@torch.no_grad()
def layer_layout(layer: nn.Module, args: tuple, kwargs: dict) -> Layout:
    """Discover fused sets and their producing norms from one forward of `layer`.

    q/k/v read the same normed hidden state and gate/up the same MLP input, which is exactly
    what vLLM fuses into one matmul, so these sets must share one scheme and one scale.
    """
    seen: list[tuple[torch.Tensor, list[str]]] = []
    produced: list[tuple[torch.Tensor, str]] = []

    def record_input(name):
        def hook(_module, inputs):
            for x, names in seen:
                if x is inputs[0]:
                    names.append(name)
                    return
            seen.append((inputs[0], [name]))

        return hook

    def record_output(name):
        return lambda _module, _inputs, output: produced.append((output, name))

    with contextlib.ExitStack() as stack:
        for name, linear in linears(layer).items():
            stack.callback(linear.register_forward_pre_hook(record_input(name)).remove)
        for name, module in layer.named_modules():
            if _is_norm(module):
                stack.callback(module.register_forward_hook(record_output(name)).remove)
        layer(*args, **kwargs)
    sets = [tuple(names) for _, names in seen]
    norms = {tuple(names): n for x, names in seen for y, n in produced if y is x}
    missing = [n for n in linears(layer) if not any(n in s for s in sets)]
    return Layout(sets + [(n,) for n in missing], norms)  # uncalled Linears are still quantized
