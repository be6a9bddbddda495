"""SmoothQuant applied to a decoder layer: the edges where a per-channel scale can move.

norm -> fused set: 1/s folds into the norm that produces the set's input (exactly: the scale
the stored norm weight realises is the one applied to the weights).
v_proj -> o_proj: attention output is linear in V, so dividing V's channels by s and scaling
o_proj's matching input columns by s changes nothing; with grouped-query attention every query
head that reads a KV head uses that head's scale, so s is chosen per KV-head channel.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .algorithms.rtn import rtn
from .algorithms.smoothquant import fold_into_norm, search_alpha, smoothing_scales, weight_range
from .formats.grid import activation_qdq, grid_for
from .schemes import Scheme

SAMPLE_TOKENS = 1024  # activations kept per fused set for the AutoSmoothQuant search


def _alpha(scheme: Scheme, st, weights: list[torch.Tensor], scales, dtype) -> float:
    if scheme.smoothing != "auto":
        return scheme.smoothing
    # plain amax ranges while comparing strengths: the clipped-range search would cost 16x
    # per candidate and barely changes which strength wins
    wgrid = dataclasses.replace(grid_for(scheme.weights, dtype), shrink=(1.0,))
    x = torch.cat(st.sample)[:SAMPLE_TOKENS]
    return search_alpha(x, weights, scales, lambda w: rtn(w, wgrid.bind(w)).dequantize().float(),
                        activation_qdq(scheme.inputs) if scheme.inputs else (lambda t: t))


def _rescale_stats(st, s: torch.Tensor) -> None:
    """Statistics of X become those of X / s."""
    st.amax.value = st.amax.value / s
    if st.hessian is not None:
        st.hessian.sum /= s.double()[:, None] * s.double()[None, :]
    st.sample = [x / s for x in st.sample]


def _divided(param: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """param / s rounded to the stored `dtype`; the module keeps it in its own (compute) dtype."""
    stored = (param.float() / s).to(dtype)
    param.data = stored.to(param.dtype)
    return stored


def smooth_into_norm(norm: nn.Module, weights: dict[str, torch.Tensor], st, scheme: Scheme,
                     offset: float, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Scale a fused set's weights by s and fold 1/s into the norm producing its input.
    Returns the norm's new parameters in the stored `dtype`, by parameter name."""
    ws = list(weights.values())
    x_amax, w_amax = st.amax.value, weight_range(ws)
    scales = lambda a: smoothing_scales(x_amax, w_amax, a)  # noqa: E731
    # rounded to the stored dtype, not the (possibly wider) dtype the layer computes in
    stored, s = fold_into_norm(norm.weight.data.to(dtype), scales(_alpha(scheme, st, ws, scales, dtype)), offset)
    norm.weight.data = stored.to(norm.weight.dtype)
    changed = {"weight": stored}
    if getattr(norm, "bias", None) is not None:
        changed["bias"] = _divided(norm.bias, s, dtype)
    for n in weights:
        weights[n] = weights[n] * s
    _rescale_stats(st, s)
    return changed


def smooth_v_into_o(v: nn.Linear, v_weight: torch.Tensor, o: nn.Linear, st_o, scheme: Scheme,
                    heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Divide V's output channels by s, scale o_proj's input columns by s (in place on
    o.weight, as float32 until o_proj is quantized). Returns v_weight / s and V's new bias
    in the stored `dtype` (None without one)."""
    rep = heads // kv_heads
    grouped = lambda t: t.reshape(kv_heads, rep, head_dim).amax(1).flatten()  # noqa: E731
    x_amax, w_amax = grouped(st_o.amax.value), grouped(o.weight.float().abs().amax(0))
    expand = lambda s: s.reshape(kv_heads, 1, head_dim).expand(kv_heads, rep, head_dim).flatten()  # noqa: E731
    scales = lambda a: expand(smoothing_scales(x_amax, w_amax, a))  # noqa: E731
    s_v = smoothing_scales(x_amax, w_amax, _alpha(scheme, st_o, [o.weight.float()], scales, dtype))
    s_o = expand(s_v)
    o.weight = nn.Parameter(o.weight.float() * s_o, requires_grad=False)
    bias = _divided(v.bias, s_v, dtype) if v.bias is not None else None
    _rescale_stats(st_o, s_o)
    return v_weight / s_v[:, None], bias


def smooth_set(layer: nn.Module, prefix: str, members: tuple[str, ...], weights: dict[str, torch.Tensor],
               stats: dict, norms: dict, scheme: Scheme, offset: float, config, dtype: torch.dtype
               ) -> dict[str, torch.Tensor]:
    """Apply the smoothing edges that start at this fused set (its producing norm, and V -> o
    when the set holds v_proj). Updates `weights` and `stats` in place; returns the checkpoint
    tensors (norm weights, v bias) that changed, by full name."""
    changed = {}
    if members in norms:
        norm = layer.get_submodule(norms[members])
        stored = smooth_into_norm(norm, weights, stats[members], scheme, offset, dtype)
        changed.update({f"{prefix}{norms[members]}.{p}": t for p, t in stored.items()})
    v_name = next((n for n in members if n.endswith("v_proj")), None)
    o_set = next((s for s in stats if len(s) == 1 and s[0].endswith("o_proj")), None)
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if v_name and o_set and kv_heads and heads % kv_heads == 0:
        v, o = layer.get_submodule(v_name), layer.get_submodule(o_set[0])
        if v.out_features == kv_heads * head_dim and o.in_features == heads * head_dim:
            weights[v_name], bias = smooth_v_into_o(v, weights[v_name], o, stats[o_set], scheme,
                                                    heads, kv_heads, head_dim, dtype)
            if bias is not None:
                changed[f"{prefix}{v_name}.bias"] = bias
    return changed
