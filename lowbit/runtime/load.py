"""Load a checkpoint for running on CPU: compressed-tensors Linears are dequantized with the
same Grid that produced them, and their inputs are quantized in the forward pass (static scale
or per token) exactly as a serving engine computes them."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from ..attention import attention_modules, install_kv_hooks
from ..checkpoint import Checkpoint
from ..errors import LowbitError
from ..algorithms.rotation import once_per_input, online_input
from ..formats.grid import Quantized, activation_qdq, grid_for
from ..formats.pack import unpack_fp4, unpack_int32
from ..schemes import QuantSpec
from .linear import dense_linear, packed_linear


def spec_from_args(args: dict) -> QuantSpec:
    """A compressed-tensors QuantizationArgs dict as our QuantSpec."""
    kind = {"float": "fp8", "int": "int"}.get(args.get("type"))
    if kind == "fp8" and args.get("num_bits") == 4:  # microscaling FP4: the group size names it
        kind = {16: "nvfp4", 32: "mxfp4"}.get(args.get("group_size"))
        if kind is None:
            raise LowbitError(f"unsupported FP4 quantization args in checkpoint: {args}")
        # NVFP4 inputs are "local": run-time group scales under a stored global scale
        return QuantSpec(kind, 4, "group", args["group_size"], True, args.get("dynamic") is True)
    if kind is None or (kind == "fp8" and args.get("num_bits") != 8):
        raise LowbitError(f"unsupported quantization args in checkpoint: {args}")
    if args.get("actorder") in ("group", "dynamic"):
        # groups indexed through weight_g_idx: not a layout lowbit reads (or writes)
        raise LowbitError("checkpoints with group activation ordering (weight_g_idx) are not supported")
    return QuantSpec(kind, args["num_bits"], args["strategy"], args.get("group_size"),
                     args.get("symmetric", True), bool(args.get("dynamic", False)))


def _scheme_for(name: str, module: nn.Module, qcfg: dict) -> dict | None:
    """The config group quantizing module `name`, matched as compressed-tensors matches it
    (match_targets): exact names first, then `re:` patterns, then the class name "Linear",
    so a group naming some layers beats the group targeting every Linear."""
    if any(name == p or (p.startswith("re:") and re.match(p[3:], name)) for p in qcfg.get("ignore", [])):
        return None
    targets = [(t, g) for g in qcfg["config_groups"].values() for t in g["targets"]]
    for hit in (lambda t: t == name, lambda t: t.startswith("re:") and re.match(t[3:], name),
                lambda t: t == "Linear" and isinstance(module, nn.Linear)):
        group = next((g for t, g in sorted(targets, key=lambda tg: tg[0]) if hit(t)), None)
        if group is not None:
            return group
    return None


def _rotation_block(name: str, module: nn.Module, qcfg: dict) -> int | None:
    """The Hadamard block a runtime applies online to this Linear's input (transform_config's
    "input" transforms; the "weight_input" ones are already fused into the stored weights)."""
    block = None
    for scheme in (qcfg.get("transform_config") or {}).get("config_groups", {}).values():
        for args in scheme.get("apply", []):
            if args["location"] != "input" or not isinstance(module, nn.Linear):
                continue
            if _matches(name, module, args.get("ignore", [])) or not _matches(name, module, args["targets"]):
                continue
            if scheme["type"] != "hadamard" or args.get("inverse") or not scheme.get("head_dim") or block:
                raise LowbitError(f"{name}: unsupported transform in transform_config: {scheme}")
            block = scheme["head_dim"]
    return block


def _matches(name: str, module: nn.Module, patterns: list[str]) -> bool:
    return any(p == name or (p == "Linear" and isinstance(module, nn.Linear))
               or (p.startswith("re:") and re.match(p[3:], name)) for p in patterns)


class _Tensors(Mapping):
    """A checkpoint's tensors as a read-on-access mapping."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.ckpt.tensor(name)

    def __contains__(self, name) -> bool:
        return name in self.ckpt.files

    def __iter__(self):
        return iter(self.ckpt.files)

    def __len__(self) -> int:
        return len(self.ckpt.files)


def stored_linear(tensors: Mapping[str, torch.Tensor], name: str, spec: QuantSpec) -> Quantized:
    """A Linear's codes and parameters as written (plain, or pack-quantized into int32), from
    a mapping of checkpoint names to tensors (a Checkpoint's or a writer's)."""
    scale = tensors[f"{name}.weight_scale"]
    if spec.format in ("nvfp4", "mxfp4"):
        grid = grid_for(spec)
        if f"{name}.weight_global_scale" in tensors:
            grid = dataclasses.replace(grid, tensor_scale=tensors[f"{name}.weight_global_scale"].float())
        return Quantized(unpack_fp4(tensors[f"{name}.weight_packed"]), scale, grid)
    if f"{name}.weight_packed" not in tensors:
        return Quantized(tensors[f"{name}.weight"], scale, grid_for(spec))
    shape = tuple(tensors[f"{name}.weight_shape"].tolist())
    codes = unpack_int32(tensors[f"{name}.weight_packed"], spec.bits, shape)
    zero = None
    if f"{name}.weight_zero_point" in tensors:
        zero = unpack_int32(tensors[f"{name}.weight_zero_point"], spec.bits, tuple(scale.shape), dim=0)
    return Quantized(codes, scale, grid_for(spec), zero)


def simulate_kv_cache(model: nn.Module, ckpt: Checkpoint,
                      qdq: Callable[[torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]) -> None:
    """Route cached keys and values through `qdq(stored scale)`: quantize-dequantize with each
    attention's k_scale / v_scale (a model already simulating a cache has its hooks replaced)."""
    hooks = {}
    for name, module in attention_modules(model).items():
        if f"{name}.k_scale" in ckpt.files:
            fk, fv = qdq(ckpt.tensor(f"{name}.k_scale")), qdq(ckpt.tensor(f"{name}.v_scale"))
            hooks[module] = lambda m, k, v, fk=fk, fv=fv: (fk(k), fv(v))
    install_kv_hooks(hooks)


def store_kv_as_fp8(model: nn.Module, ckpt: Checkpoint) -> None:
    """Have the runtime's caches (kv_cache.py) store keys and values as FP8 codes under each
    attention's k_scale / v_scale: what the simulation above rounds them to, in a byte each."""
    for name, module in attention_modules(model).items():
        if f"{name}.k_scale" in ckpt.files:
            module.lowbit_kv_scales = (ckpt.tensor(f"{name}.k_scale").float().reshape(()),
                                       ckpt.tensor(f"{name}.v_scale").float().reshape(()))


@torch.no_grad()
def load_model(path: Path, dtype: torch.dtype = torch.float32, packed: bool = False,
               fast: bool = True) -> nn.Module:
    """The reference model (every Linear dequantized), or with `packed` the INT4/INT8 Linears
    kept packed (runtime/linear.py; `fast=False` forces their portable kernel)."""
    ckpt = Checkpoint(path, allow_quantized=True)
    swaps: dict[str, nn.Module] = {}
    qcfg = ckpt.config_dict.get("quantization_config")
    if qcfg is not None and qcfg.get("quant_method") != "compressed-tensors":
        raise LowbitError(f"{path} uses {qcfg.get('quant_method')!r}; lowbit runs compressed-tensors checkpoints")
    model = ckpt.skeleton(dtype)
    tied = getattr(model.config, "tie_word_embeddings", False) and "lm_head.weight" not in ckpt.files
    shared: dict[tuple, object] = {}
    for name, module in model.named_modules():
        group = _scheme_for(name, module, qcfg) if qcfg else None
        for pname, _ in list(module.named_parameters(recurse=False)):
            full = f"{name}.{pname}" if name else pname
            if tied and full == "lm_head.weight":
                continue
            if group is not None and pname == "weight":
                q = stored_linear(_Tensors(ckpt), name, spec_from_args(group["weights"]))
                inputs = group.get("input_activations")
                fast_linear = packed_linear(q, inputs and spec_from_args(inputs), dtype, fast) \
                    if packed else None
                if fast_linear is not None:
                    swaps[name] = fast_linear
                    continue
                module.weight = nn.Parameter(q.exact().dequantize().to(dtype), requires_grad=False)
            else:
                ckpt.materialize_param(module, pname, full, dtype)
        if packed and type(module) is nn.Linear and name not in swaps:
            swaps[name] = dense_linear(module, fast)  # its weight now (a tied one is set below)
        spec, scale, target = None, None, swaps.get(name, module)
        if name in swaps:
            target.bias = module.bias
        if group is not None and group.get("input_activations") and not getattr(
                target, "quantizes_inputs", False):  # FBGEMM's W8A8 quantizes its own
            spec = spec_from_args(group["input_activations"])
            stored = "input_global_scale" if spec.format == "nvfp4" else "input_scale"
            scale = None if spec.dynamic else ckpt.tensor(f"{name}.{stored}")
        rot = _rotation_block(name, module, qcfg) if qcfg else None
        if spec is None and rot is None:
            continue
        # Linears that read one tensor (q/k/v, gate/up) with the same input quantization share
        # one memo, so that tensor is rotated and quantized once, not once per Linear
        key = (spec, rot, None if scale is None else tuple(scale.flatten().tolist()))
        if key not in shared:
            shared[key] = once_per_input(online_input(rot, activation_qdq(spec, scale) if spec else None))
        target.register_forward_pre_hook(lambda m, a, f=shared[key]: (f(a[0]),))
    if qcfg and qcfg.get("kv_cache_scheme"):
        kv_spec = spec_from_args(qcfg["kv_cache_scheme"])
        simulate_kv_cache(model, ckpt, lambda scale: activation_qdq(kv_spec, scale))
        if packed and kv_spec.format == "fp8" and kv_spec.granularity == "tensor" and not kv_spec.dynamic:
            store_kv_as_fp8(model, ckpt)
    for name, linear in swaps.items():  # after the KV hooks, which look for nn.Linear k_proj
        model.set_submodule(name, linear)
    if tied:  # after the swaps: the lm_head may now be a DenseLinear
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    return model.eval()
