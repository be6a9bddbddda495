"""Smoothing edges on a real decoder layer preserve its function before any quantization."""

import dataclasses

import pytest
import torch

from lowbit.models import layer_layout
from lowbit.capture import capture_inputs
from lowbit.schemes import PRESETS
from lowbit.smoothing import smooth_set
from lowbit.stats import AbsMax
from tiny import tiny_model


@dataclasses.dataclass
class Stats:
    amax: AbsMax
    hessian: None = None
    sample: list = dataclasses.field(default_factory=list)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_norm_and_v_to_o_smoothing_keep_the_layer_output(family):
    model = tiny_model(family)
    layer = model.model.layers[0]
    ids = torch.randint(7, 200, (40,), generator=torch.Generator().manual_seed(0))
    hidden, kwargs = capture_inputs(model, model.model.layers, [ids])
    h, kw = hidden[0], kwargs[0][0]
    before = layer(h, **kw)
    layout = layer_layout(layer, (h,), kw)
    stats = {s: Stats(AbsMax(per_channel=True)) for s in layout.sets}
    hooks = [layer.get_submodule(s[0]).register_forward_pre_hook(
        lambda m, a, st=stats[s]: st.amax.update(a[0])) for s in layout.sets]
    layer(h, **kw)
    for hook in hooks:
        hook.remove()
    scheme = dataclasses.replace(PRESETS["W8A8_INT8"], smoothing=0.5)
    offset = 1.0 if family.startswith("gemma") else 0.0
    changed = {}
    for s in layout.sets:
        weights = {n: layer.get_submodule(n).weight.float() for n in s}
        changed.update(smooth_set(layer, "", s, weights, stats, layout.norms, scheme, offset,
                                  model.config, torch.float32))
        for n, w in weights.items():
            layer.get_submodule(n).weight = torch.nn.Parameter(w, requires_grad=False)
    assert "input_layernorm.weight" in changed  # the norm edge ran
    v = layer.get_submodule("self_attn.v_proj").weight
    assert not torch.equal(v, tiny_model(family).model.layers[0].self_attn.v_proj.weight)  # and V -> o
    after = layer(h, **kw)
    assert torch.allclose(after, before, rtol=1e-3, atol=1e-4 * before.abs().max().item())
