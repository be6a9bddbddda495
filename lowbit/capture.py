"""Layer 0's inputs: the calibration batches, and a forward of the model that stops at the first
decoder layer, recording what every layer is called with."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .errors import LowbitError
from .progress import progress


class _Stop(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for decoder layer j during capture: records its call, passes hidden through."""

    def __init__(self, inner: nn.Module, j: int, record: list, last: bool):
        super().__init__()
        self.inner, self.j, self.record, self.last = inner, j, record, last

    def __getattr__(self, name):  # models read attributes such as attention_type off their layers
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise LowbitError("decoder layers called with extra positional arguments are not supported")
        self.record.append((self.j, hidden_states, kwargs))
        if self.last:
            raise _Stop
        return hidden_states


@torch.no_grad()
def capture_inputs(model: nn.Module, layers: nn.ModuleList, samples: list[torch.Tensor]):
    """Layer 0's hidden states per sample, and every layer's keyword arguments per sample.
    A sample is one sequence of token ids, or a [batch, length] stack of equal-length ones.

    Keyword arguments (masks, rotary embeddings) depend on positions only, and differ between
    layer types (Gemma's sliding-window layers), so each layer keeps its own.
    """
    record: list = []
    originals = list(layers)
    for j, layer in enumerate(originals):
        layers[j] = _Catcher(layer, j, record, last=j == len(originals) - 1)
    hidden: list[torch.Tensor] = []
    kwargs: list[list[dict]] = [[] for _ in originals]
    try:
        for ids in progress(samples, "capturing inputs"):
            record.clear()
            with contextlib.suppress(_Stop):
                model(input_ids=ids if ids.dim() == 2 else ids.reshape(1, -1), use_cache=False)
            for j, h, kw in record:
                if j == 0:
                    hidden.append(h)
                kwargs[j].append({k: v for k, v in kw.items() if k not in ("cache", "past_key_values")})
    finally:
        for j, layer in enumerate(originals):
            layers[j] = layer
    return hidden, kwargs


def plan_batches(lengths: list[int], size: int = 8) -> list[list[int]]:
    """Sample indices grouped into batches of up to `size` equal lengths (in first-seen order)."""
    groups: dict[int, list[int]] = {}
    for idx, n in enumerate(lengths):
        groups.setdefault(n, []).append(idx)
    return [idxs[c:c + size] for idxs in groups.values() for c in range(0, len(idxs), size)]


def stack_batches(samples: list[torch.Tensor], plan: list[list[int]]) -> list[torch.Tensor]:
    """Each batch of `plan` as one [batch, length] tensor of token ids.

    Batched matmuls run markedly faster on CPU, and samples of one length share their position
    embeddings and need no padding mask. Calibration samples are truncated to --seq-len, so
    most of them share that length. Capturing whole batches (rather than stacking captured
    samples) keeps a single copy of the activations.
    """
    return [torch.stack([samples[i] for i in chunk]) for chunk in plan]
