"""quantize_layers(): the one layer-sequential loop.

Layer i's inputs are captured once, the layer is read from disk, its statistics collected, its
Linears quantized, and the *quantized* layer is run to produce layer i+1's inputs; then its
weights go back to the meta device. Peak memory is one layer plus the calibration activations.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
from dataclasses import dataclass

import torch
from torch import nn

from . import distributed
from .algorithms.gptq import gptq
from .algorithms.kv_cache import kv_cache_scale
from .attention import attention_modules, kv_hooks
from .algorithms.rotation import online_input, once_per_input, rotate_input, rotate_weight
from .algorithms.rtn import rtn
from .algorithms.sparsegpt import sparsegpt
from .capture import capture_inputs, plan_batches, stack_batches
from .checkpoint import Checkpoint
from .errors import LowbitError
from .export import check_fused, check_shape
from .formats.grid import Quantized, activation_qdq, grid_for
from .hardware import compute_dtype
from .models import arch_for, decoder_layers, layer_layout, linears
from .memory import release_memory
from .progress import progress
from .runtime.load import stored_linear
from .schemes import Scheme, name_matches
from .smoothing import SAMPLE_TOKENS, smooth_set
from .stats import AbsMax, Hessian

log = logging.getLogger(__name__)


def needs_calibration(scheme: Scheme) -> bool:
    """Whether the scheme's result (or any override's) depends on calibration statistics at all."""
    return any(s.uses_gptq or s.static_inputs or s.smoothing is not None or s.kv_cache is not None
               or s.sparsity is not None for s in scheme.schemes)


def is_ignored(name: str, patterns: tuple[str, ...]) -> bool:
    """Whether `patterns` (an ignore list) name the module `name`: see schemes.name_matches."""
    return name_matches(name, patterns)


def _run(layer: nn.Module, h: torch.Tensor, kw: dict) -> torch.Tensor:
    out = layer(h, **kw)
    return out[0] if isinstance(out, tuple) else out


@contextlib.contextmanager
def _hooks(handles: list):
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@dataclass
class _SetStats:
    """What one fused set's shared input told us (members read the very same tensor)."""

    amax: AbsMax  # per input channel
    hessian: Hessian | None
    sample: list[torch.Tensor]  # a few calibration activations (AutoSmoothQuant)


@torch.no_grad()
def _collect(layer, targets, sets, hidden, kwargs, scheme: Scheme, later=(), kv_stats=None,
             forward: bool = False) -> dict[tuple, _SetStats]:
    """One forward of the layer over all samples with hooks on each fused set's input.
    Sets in `later` get no Hessian here (see _later_hessian). With `forward` (one-pass schemes)
    the layer's outputs replace `hidden` in place, and `kv_stats` collects the K/V ranges."""
    gptq_needed = scheme.uses_gptq or scheme.sparsity is not None  # both need a Hessian
    rot = scheme.rotation_block
    stats = {s: _SetStats(AbsMax(per_channel=True),
                          Hessian(targets[s[0]].in_features) if gptq_needed and s not in later else None, [])
             for s in sets}

    def observe(st: _SetStats):
        def hook(_module, args):
            # with MR-GPTQ the Linear reads x R: its Hessian (Rᵀ Hess R) and range are of x R
            x = rotate_input(args[0], rot) if rot else args[0]
            st.amax.update(x)
            if st.hessian is not None:
                st.hessian.update(x)
            if scheme.smoothing == "auto" and sum(t.shape[0] for t in st.sample) < SAMPLE_TOKENS:
                st.sample.append(x.reshape(-1, x.shape[-1]).float())
        return hook

    handles = [targets[s[0]].register_forward_pre_hook(observe(st)) for s, st in stats.items()]
    with _hooks(handles), kv_hooks(_kv_observers(kv_stats or {})):
        for b, (h, kw) in enumerate(zip(hidden, kwargs)):
            out = _run(layer, h, kw)
            if forward:
                hidden[b] = out
    _merge_kv(kv_stats or {})
    for st in stats.values():  # every rank saw its own batches: merge (no-op in one process)
        distributed.merge_absmax(st.amax)
        if st.hessian is not None:
            distributed.merge_hessian(st.hessian)
        if scheme.smoothing == "auto" and distributed.active():
            st.sample = [distributed.gather_rows(torch.cat(st.sample), SAMPLE_TOKENS)]
    return stats


# A Hessian (float32) above this size is collected in a forward of its own (_later_hessian): the
# extra pass costs a third more calibration time, worth it only where the memory is large.
LATER_HESSIAN_BYTES = 256 * 2**20


@torch.no_grad()
def _later_hessian(layer, linear: nn.Linear, hidden, kwargs, rot: int | None = None) -> Hessian:
    """The Hessian of one Linear's input, from a forward pass of its own.

    A Hessian is in_features^2 float32: the MLP down projection's is 485 MB at 7B (764 MB at
    13B). Collected after the other sets are solved and their Hessians freed, it never shares
    memory with them. The layer still holds its unquantized weights, so the inputs, and the
    sum, are exactly those of the shared pass.
    """
    hessian = Hessian(linear.in_features)
    def observe(_module, args):  # with MR-GPTQ, of the rotated input x R (as in _collect)
        hessian.update(rotate_input(args[0], rot) if rot else args[0])

    with _hooks([linear.register_forward_pre_hook(observe)]):
        for h, kw in zip(hidden, kwargs):
            _run(layer, h, kw)
    distributed.merge_hessian(hessian)
    return hessian


def _solve(weights: dict[str, torch.Tensor], stats: _SetStats | None, grid, scheme: Scheme
           ) -> dict[str, Quantized]:
    """Quantize a fused set. GPTQ treats output rows independently given the shared input
    Hessian, so the members run as one stacked matrix: one column sweep instead of three."""
    if scheme.sparsity is not None:
        stacked = _prune(weights, stats, grid, scheme)
    elif not scheme.uses_gptq:
        return {n: rtn(w, grid) for n, w in weights.items()}
    else:
        # both passed as temporaries: gptq frees them once it has its working copies
        stacked = gptq(torch.cat(list(weights.values())), stats.hessian.take_mean(), grid,
                       act_order=scheme.act_order, damp=scheme.damp)
    out, start = {}, 0
    for n, w in weights.items():
        out[n] = stacked.rows(start, start + w.shape[0])
        start += w.shape[0]
    return out


def _prune(weights: dict[str, torch.Tensor], stats: _SetStats, grid, scheme: Scheme) -> Quantized:
    """SparseGPT on a fused set's stacked weights. With GPTQ the survivors are quantized in the
    same column sweep (joint mode); with RTN the sweep prunes in float and the survivors are
    then rounded to nearest, a per-tensor scale re-bound on the pruned weights (compensation
    can move their maximum). Stack and Hessian go in as temporaries, for sparsegpt to free."""
    pruned, q = sparsegpt(torch.cat(list(weights.values())), stats.hessian.take_mean(),
                          grid if scheme.uses_gptq else None, sparsity=scheme.sparsity,
                          structure=scheme.sparsity_structure, damp=scheme.damp)
    if q is not None:
        return q
    q = rtn(pruned, grid.bind(pruned))
    q.mask = pruned == 0
    return q


@dataclass
class _ErrorSums:
    err: float = 0.0
    ref: float = 0.0


def _kv_observers(kv_stats: dict) -> dict:
    """KV hooks recording each attention module's cached K and V ranges in kv_stats[module]."""
    def observe_kv(module, k, v):
        kv_stats[module][0].update(k)
        kv_stats[module][1].update(v)
        return k, v
    return {m: observe_kv for m in kv_stats}


def _merge_kv(kv_stats: dict) -> None:
    for k, v in kv_stats.values():
        distributed.merge_absmax(k)
        distributed.merge_absmax(v)


def one_pass(scheme: Scheme) -> bool:
    """Whether one forward per layer calibrates the scheme: its statistics are ranges only
    (static input scales, KV-cache scales) and its weights are rounded without data.

    Such a layer's weights are quantized first; one forward of it then both records the ranges
    and hands its outputs to the next layer, so every range is that of the model with all
    weights up to that point quantized. Only the activations' own rounding is not propagated
    (their scales are not known until the pass ends), as in llm-compressor's calibration; a
    second, fully quantized forward would double the cost. GPTQ, SparseGPT, smoothing and
    rotations need the inputs before the weights and keep two forwards per layer.
    """
    return (needs_calibration(scheme) and not scheme.uses_gptq and scheme.sparsity is None
            and scheme.smoothing is None and not scheme.rotation_block)


@torch.no_grad()
def _propagate(layer, targets, originals, act_quant, hidden, kwargs, report_batches, kv_stats):
    """Run the quantized layer; measure each Linear's relative output error on the first batches
    and, when `kv_stats` maps attention modules to (AbsMax, AbsMax), the cached K and V ranges."""
    sums = {n: _ErrorSums() for n in targets}
    measuring = [True]
    handles = []
    for n, lin in targets.items():
        x_seen = {}

        def keep_input(m, a, x_seen=x_seen):
            if measuring[0]:
                x_seen["x"] = a[0]

        def compare(m, a, y, n=n, x_seen=x_seen):
            if measuring[0]:  # float32 sums of one batch: ample for a report, a third of float64's cost
                ref = nn.functional.linear(x_seen.pop("x"), originals[n], m.bias).float()
                sums[n].err += (y.float() - ref).square().sum().item()
                sums[n].ref += ref.square().sum().item()

        handles.append(lin.register_forward_pre_hook(keep_input))  # sees the unquantized input
        if n in act_quant:
            handles.append(lin.register_forward_pre_hook(lambda m, a, f=act_quant[n]: (f(a[0]),)))
        handles.append(lin.register_forward_hook(compare))
    with _hooks(handles), kv_hooks(_kv_observers(kv_stats)):
        for s, (h, kw) in enumerate(zip(hidden, kwargs)):
            measuring[0] = s < report_batches
            hidden[s] = _run(layer, h, kw)  # in place: one copy of the activations
    _merge_kv(kv_stats)
    totals = distributed.sum_floats([x for e in sums.values() for x in (e.err, e.ref)])
    for e, err, ref in zip(sums.values(), totals[0::2], totals[1::2]):
        e.err, e.ref = err, ref
    return {n: (e.err / e.ref) ** 0.5 if e.ref > 0 else 0.0 for n, e in sums.items()}


def _weight_error(original: torch.Tensor, dequantized: torch.Tensor, rows: int = 256) -> float:
    """||W - Q|| / ||W||: the report of a data-free run, which has no activations to compare.
    A block of rows at a time: whole-matrix float32 copies of a 13B MLP matrix are 0.28 GB each."""
    err = ref = 0.0
    for w, q in zip(original.split(rows), dequantized.split(rows)):
        w = w.float()
        ref += w.square().sum(dtype=torch.float64).item()
        err += (q.float() - w).square().sum(dtype=torch.float64).item()
    return (err / ref) ** 0.5 if ref > 0 else 0.0


def _input_scale(scheme: Scheme, amax: AbsMax, dtype: torch.dtype) -> torch.Tensor:
    """The static per-tensor input scale to store."""
    return grid_for(scheme.inputs, dtype).bind_amax(amax.value.max()).tensor_scale.reshape(1)


@torch.no_grad()
def _replay(layer, prefix: str, stored: dict[str, torch.Tensor], scheme: Scheme, hidden, kwargs,
            dtype: torch.dtype, compute: torch.dtype, device: torch.device | str = "cpu",
            quantize_inputs: bool = True) -> None:
    """Run layer i as an earlier run wrote it (resume): its parameters as stored (quantized
    Linears dequantized from their codes, smoothed norms as folded), its inputs quantized with
    the stored scales (not for one_pass schemes, which hand on the layer's outputs before
    their inputs are quantized), through the same forward as _propagate, so `hidden` becomes
    bit for bit what that run handed to layer i+1. Parameters are rounded to the stored `dtype`
    and run in `compute`, as quantize_layers does."""
    targets, act_quant = {}, {}
    for n, lin in linears(layer).items():
        if f"{prefix}{n}.weight_scale" in stored:
            targets[n] = lin
            quant = None
            if scheme.inputs is not None and quantize_inputs:
                scale = stored.get(f"{prefix}{n}.input_scale")
                quant = activation_qdq(scheme.inputs, scale.to(device) if scale is not None else None)
            if quant is not None or scheme.rotation_block:
                act_quant[n] = once_per_input(online_input(scheme.rotation_block, quant))
    for name, _ in list(layer.named_parameters()):
        owner, _, leaf = name.rpartition(".")
        module = layer.get_submodule(owner) if owner else layer
        if owner in targets and leaf == "weight":
            value = stored_linear(stored, prefix + owner, scheme.weights).dequantize().to(dtype)
        else:
            value = stored[prefix + name]
        setattr(module, leaf, nn.Parameter(value.to(device=device, dtype=compute), requires_grad=False))
    attn = attention_modules(layer) if scheme.kv_cache is not None else {}
    _propagate(layer, targets, {}, act_quant, hidden, kwargs, 0,
               {m: (AbsMax(), AbsMax()) for m in attn.values()})


VLLM_GROUP_SIZES = (128, 64, 32)  # what vLLM's Marlin/Machete WNA16 kernels take


def resolve_group_size(ckpt: Checkpoint, scheme: Scheme) -> tuple[Scheme, str | None]:
    """A scheme whose group size divides every quantized Linear's input width, and a notice.

    A group must not straddle the end of a row (vLLM rejects partial groups), so when the
    requested size does not divide some in_features (SmolLM2's 576 and 128), the largest
    vLLM-supported size below it that divides them all is used instead, and we say so.
    """
    if scheme.overrides:  # each override's group size is resolved as its own scheme's
        linears = [n[: -len(".weight")] for n, (_, shape, _, _) in ckpt.tensor_info().items()
                   if re.search(r"\.layers\.\d+\..*\.weight$", n) and len(shape) == 2]
        for p, s in scheme.overrides:  # a typo'd pattern would quietly quantize nothing differently
            if not any(name_matches(n, (p,)) for n in linears):
                raise LowbitError(f"override {p}={s.name} matches no Linear of a decoder layer "
                                  f"(e.g. {linears[0] if linears else '?'}); patterns look like 'layers.3.*'")
        done = [(p, *resolve_group_size(ckpt, s)) for p, s in scheme.overrides]
        base, notice = resolve_group_size(ckpt, dataclasses.replace(scheme, overrides=()))
        notices = [n for n in [notice, *(n for _, _, n in done)] if n]
        return (dataclasses.replace(base, overrides=tuple((p, s) for p, s, _ in done)),
                "; ".join(dict.fromkeys(notices)) or None)
    spec = scheme.weights
    if spec.granularity != "group":
        return scheme, None
    widths = {shape[1] for name, (_, shape, _, _) in ckpt.tensor_info().items()
              if re.search(r"\.layers\.\d+\..*\.weight$", name) and len(shape) == 2
              and not is_ignored(name[: -len(".weight")], scheme.ignore)}
    if all(w % spec.group_size == 0 for w in widths):
        return scheme, None
    if spec.format != "int":  # FP4 group sizes are fixed by the format
        raise LowbitError(f"{scheme.name} needs in_features divisible by its group size "
                          f"{spec.group_size}; this model has {sorted(w for w in widths if w % spec.group_size)}")
    fits = [g for g in VLLM_GROUP_SIZES if g < spec.group_size and all(w % g == 0 for w in widths)]
    if not fits:
        raise LowbitError(f"group size {spec.group_size} does not divide the Linear input widths "
                          f"{sorted(widths)}, and no vLLM group size ({VLLM_GROUP_SIZES}) does")
    odd = sorted(w for w in widths if w % spec.group_size)
    notice = (f"group size {spec.group_size} does not divide in_features {odd}; using {fits[0]}, "
              "the largest group size vLLM serves that does")
    return scheme.with_options(group_size=fits[0]), notice


def layer_scheme(scheme: Scheme, prefix: str, names) -> Scheme:
    """The one scheme of decoder layer `prefix` under `scheme`'s overrides. Overrides choose
    whole decoder layers: a layer's statistics, smoothing (which rescales its norms) and
    input quantization follow one scheme, and no fused q/k/v or gate/up set can be split
    (vLLM runs each as one matmul, so its shards must share a scheme)."""
    if not scheme.overrides:
        return scheme
    found = {n: scheme.scheme_for(prefix + n) for n in names}
    chosen = set(found.values())
    if len(chosen) > 1:
        raise LowbitError(f"the overrides give {prefix.rstrip('.')} several schemes ("
                          + ", ".join(f"{n}: {s.name}" for n, s in found.items())
                          + "); an override chooses whole decoder layers (e.g. 'layers.3.*')")
    return chosen.pop() if chosen else scheme


def _drop_outer(model: nn.Module, layers_path: str) -> None:
    """Put every parameter outside the decoder layers back on the meta device."""
    for name, module in model.named_modules():
        if name == layers_path or name.startswith(layers_path + "."):
            continue
        for pname, p in list(module.named_parameters(recurse=False)):
            setattr(module, pname, nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False))


@torch.no_grad()
def quantize_layers(ckpt: Checkpoint, scheme: Scheme, samples: list[torch.Tensor], writer,
                    report_batches: int = 2, device: torch.device | str = "cpu",
                    compute: torch.dtype | None = None) -> list[dict]:
    """Quantize every decoder layer of `ckpt` in turn, handing results to `writer`.

    Layers, activations, statistics and solvers live on `device` (a GPU, when there is one);
    the model outside the current layer stays on the meta device, and the writer gets CPU copies.

    Forwards run in `compute` (default: hardware.compute_dtype's choice for the checkpoint's
    dtype); weights and scales are quantized and stored in the checkpoint's own dtype.

    Returns the per-Linear error report: [{"name", "rel_error"}], in model order.
    Under torch.distributed each rank runs its contiguous share of the batches (the error
    report covers the first `report_batches` batches overall) and statistics are merged.
    """
    # Layers run in the checkpoint's own dtype (bf16 for most) where the hardware computes it
    # natively: that is what the served model computes. Where bf16 is emulated (AVX2 CPUs) they
    # run in float32, several times faster and exact for bf16 values (hardware.py).
    # Weights are quantized from their exact stored values; scales are made exact in the stored
    # dtype (`dtype`); statistics accumulate in float32+.
    dtype = ckpt.dtype
    compute = compute or compute_dtype(dtype, "auto", device).dtype
    model = ckpt.skeleton(compute)
    arch = arch_for(model)
    layers = decoder_layers(model, arch)
    ckpt.load_outer(model, arch.layers, compute, device)
    start, report = writer.layers_done, list(writer.resumed_report)
    # embeddings, final norm and lm_head: stored with layer 0 (see below) unless a resumed run has them
    outer = [] if start else sorted(n for n in ckpt.names() if not n.startswith(arch.layers + "."))
    if start == len(layers):  # the earlier run was stopped while finishing
        log.warning("resuming: all %d layers were written by an earlier run", start)
        return report
    if start:
        done = "layer 0 was" if start == 1 else f"layers 0-{start - 1} were"
        log.warning("resuming from layer %d of %d (%s written by an earlier run)", start, len(layers), done)
    # Data-free schemes get no samples: no forward runs, and the report is the weight error.
    data_free = not samples
    if data_free and needs_calibration(scheme):
        raise LowbitError(f"{scheme.name} with {scheme.algorithm} needs calibration samples")
    if data_free:  # a few dummy tokens still run once, through layer 0 only, to find its fused sets
        probe, plan, first = [torch.zeros(8, dtype=torch.long)], [[0]], 0
    else:
        # the batches one process would run, shared out whole, so each batch computes the same
        # activations whichever rank runs it
        probe = samples
        plan, first = distributed.share(plan_batches([s.numel() for s in samples]))
    hidden, kwargs = capture_inputs(model, layers, [b.to(device) for b in stack_batches(probe, plan)])
    report_batches = max(0, min(report_batches - first, len(hidden)))
    _drop_outer(model, arch.layers)  # embeddings and lm_head are not needed past this point
    mixed, sets = scheme, None
    for i in progress(range(len(layers)), "quantizing layers"):
        layer, prefix = layers[i], f"{arch.layers}.{i}."
        scheme = layer_scheme(mixed, prefix, linears(layer))  # mixed precision: one per layer
        static_inputs, single = scheme.static_inputs, one_pass(scheme)
        if i >= start or sets is None:  # a replayed layer is read from OUT, not from the input
            ckpt.materialize(layer, prefix, compute, device)
            layer.to(device)  # its buffers, if any
        if sets is None:
            layout = layer_layout(layer, (hidden[0],), kwargs[0][0])
            sets = layout.sets
        if i < start:
            if not data_free:  # a data-free run has no activations to carry forward
                _replay(layer, prefix, writer.stored(prefix), scheme, hidden, kwargs[i], dtype, compute,
                        device, quantize_inputs=not single)
            layer.to("meta")
            continue
        targets = {n: m for n, m in linears(layer).items() if not is_ignored(prefix + n, scheme.ignore)}
        for s in sets:
            if 0 < sum(n in targets for n in s) < len(s):
                raise LowbitError(f"--ignore splits the fused set {', '.join(prefix + n for n in s)}; "
                                  "vLLM runs them as one matmul, so ignore all of them or none")
        for n in linears(layer):
            if n not in targets:
                writer.skip_linear(prefix + n)
        mine = [s for s in sets if s[0] in targets]
        needs_stats = (static_inputs or scheme.uses_gptq or scheme.smoothing is not None
                       or scheme.sparsity is not None)
        # Large Hessians wider than the layer's input (the MLP down projection of a 7B model)
        # come in a pass of their own, unless smoothing must rescale them with the rest
        later = [s for s in mine if (scheme.uses_gptq or scheme.sparsity is not None)
                 and scheme.smoothing is None and targets[s[0]].in_features > hidden[0].shape[-1]
                 and targets[s[0]].in_features ** 2 * 4 > LATER_HESSIAN_BYTES]
        attn = attention_modules(layer) if scheme.kv_cache is not None else {}
        kv_stats = {m: (AbsMax(), AbsMax()) for m in attn.values()}
        stats = (_collect(layer, targets, mine, hidden, kwargs[i], scheme, later)
                 if needs_stats and not single else {})
        quantized: dict[str, Quantized] = {}
        act_quant, input_scales, originals, replaced = {}, {}, {}, {}
        rot = scheme.rotation_block
        for s in mine:
            # float32 working copies only where smoothing computes with them; rtn and gptq
            # widen the stored weights themselves (exactly), a matrix at a time
            weights = {n: targets[n].weight.float() if scheme.smoothing is not None
                       else targets[n].weight.data for n in s}
            if scheme.smoothing is not None:
                replaced.update(smooth_set(layer, prefix, s, weights, stats, layout.norms, scheme,
                                           arch.norm_offset, model.config, dtype))
            # binding on the concatenation is how q/k/v (and gate/up) share one per-tensor scale
            grid = grid_for(scheme.weights, dtype).bind(torch.cat(list(weights.values())))
            for n in s:
                check_shape(prefix + n, *weights[n].shape, scheme.weights)
                originals[n] = weights[n].to(compute)  # error-report reference (no copy unless smoothed)
            if s in later:
                stats[s].hessian = _later_hessian(layer, targets[s[0]], hidden, kwargs[i], rot)
            if rot:  # MR-GPTQ: solve for W R; the stored weights stay rotated, inputs rotate online
                weights = {n: rotate_weight(w, rot) for n, w in weights.items()}
                grid = grid_for(scheme.weights, dtype).bind(torch.cat(list(weights.values())))
            quantized.update(_solve(weights, stats.get(s), grid, scheme))
        originals.update({n: m.weight for n, m in targets.items() if n not in originals})
        for n, q in quantized.items():
            # the values a consumer computes in the stored dtype, held in the compute dtype
            targets[n].weight = nn.Parameter(q.dequantize().to(dtype).to(compute), requires_grad=False)
        if single:  # ranges of the layer with its weights already quantized (see one_pass)
            report_in = [h.clone() for h in hidden[:report_batches]]  # before `hidden` moves on
            stats = _collect(layer, targets, mine, hidden, kwargs[i], scheme, (), kv_stats, forward=True)
        for s in mine:
            if scheme.inputs is not None or rot:
                scale = _input_scale(scheme, stats[s].amax, dtype) if static_inputs else None
                quant = activation_qdq(scheme.inputs, scale) if scheme.inputs is not None else None
                shared = once_per_input(online_input(rot, quant))
                for n in s:
                    act_quant[n], input_scales[n] = shared, scale
        check_fused(prefix, sets, quantized, input_scales)
        if data_free:
            errors = {n: _weight_error(originals[n], targets[n].weight) for n in targets}
        elif single:  # the quantized layer runs on the report's batches only
            errors = _propagate(layer, targets, originals, act_quant, report_in,
                                kwargs[i][:report_batches], report_batches, {})
            del report_in
        else:
            errors = _propagate(layer, targets, originals, act_quant, hidden, kwargs[i],
                                report_batches, kv_stats)
        del originals  # the unquantized weights: a layer's worth (0.6 GB at 13B) freed before writing
        for name in sorted(n for n in ckpt.names() if n.startswith(prefix)):
            module = name[len(prefix):].rsplit(".", 1)[0]
            if module in quantized and name.endswith(".weight"):  # codes freed once packed
                writer.add_linear(prefix + module, quantized.pop(module), input_scales.get(module))
            else:
                writer.add(name, replaced[name] if name in replaced else ckpt.tensor(name))
        for name, m in attn.items():
            scale = kv_cache_scale(*kv_stats[m], scheme.kv_cache, scheme.kv_scale)
            writer.add(f"{prefix}{name}.k_scale", scale)
            writer.add(f"{prefix}{name}.v_scale", scale.clone())
        if i == 0:  # read only now, past the layer's solves: a 13B model's are 1 GB more at its peak
            for name in outer:
                writer.add(name, ckpt.tensor(name))
        rows = [{"name": prefix + n, "rel_error": errors[n]} for n in targets]
        writer.end_layer(i, rows)
        report += rows
        layer.to("meta")  # give the layer's memory back before reading the next one
        release_memory(collect=False)
    return report
