"""Run checkpoints in real vLLM, teacher-forced, and write what it computed as JSON.

Run as a script by the Python that has vLLM (`lowbit verify` starts it in a subprocess): it
imports only vLLM and the standard library, so that Python needs neither lowbit nor its pins.

    python vllm_probe.py REQUEST.json RESULT.json

REQUEST: {"models": [dir, ...], "prompts": [[token ids], ...], "linears": FILE,
"dtype": "float32"}. RESULT, per
model: either
"positions" (per prompt, per predicted position: log p of the reference token and vLLM's own
top-1 id) or "error" (where it stopped: the stage, the layer, the exception's last line), and
"schemes" (which vLLM scheme class its compressed-tensors parser picked for each layer). With
"linears", the first model's decoder Linears' inputs and outputs go to FILE (torch.save).
"""

from __future__ import annotations

import json
import os
import sys
import traceback

# in-process engine core: an exception keeps its frames (the layer being processed, the kernel
# that refused) instead of arriving as "Engine core initialization failed"; and monkeypatched
# recorders below see the loader's calls
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB; the default takes a large share of RAM
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # shared machines: no pinning
# vLLM's default (envs.py:915) runs INT4 weight-only checkpoints as W4A8 on AMX CPUs in bf16,
# quantizing activations the checkpoint keeps in 16 bits (kernels/linear/mixed_precision/cpu.py:170);
# verify what the checkpoint declares (set VLLM_CPU_INT4_W4A8=1 to see vLLM's default: ~2 % per
# Linear on SmolLM2 W4A16)
os.environ.setdefault("VLLM_CPU_INT4_W4A8", "0")

# LOWBIT_VLLM_ISA=avx2 makes vLLM see an AVX2-only CPU on an AVX-512 machine (which extension it
# loads, which kernels it picks), to reproduce an AVX2 machine's results; torch's own kernels
# are unchanged
SIMULATED_ISA = os.environ.get("LOWBIT_VLLM_ISA", "").lower()

# loading stages, in the order vLLM goes through them; the deepest frame of a traceback that
# lies in one of these functions says how far loading got
STAGES = [
    ("create_weights", "config parsed, scheme chosen, creating the layer's parameters"),
    ("load_weights", "parameters created, loading checkpoint tensors"),
    ("process_weights_after_loading", "checkpoint tensors loaded, converting them for the kernel"),
    ("apply_weights", "weights converted, running the kernel"),
]


def _record_schemes(schemes: dict) -> None:
    """Wrap CompressedTensorsConfig.get_scheme to note which scheme class each layer gets."""
    from vllm.model_executor.layers.quantization.compressed_tensors import compressed_tensors as ct

    original = ct.CompressedTensorsConfig.get_scheme

    def get_scheme(self, layer, layer_name=None, *args, **kwargs):
        scheme = original(self, layer, layer_name, *args, **kwargs)
        schemes[layer_name or type(layer).__name__] = type(scheme).__name__ if scheme else None
        return scheme

    ct.CompressedTensorsConfig.get_scheme = get_scheme


def _where(exc: BaseException) -> dict:
    """The deepest loading stage and layer name found in the traceback's frames."""
    stage, layer, frames = None, None, traceback.extract_tb(exc.__traceback__)
    tb = exc.__traceback__
    while tb is not None:
        f = tb.tb_frame
        for name, what in STAGES:
            if f.f_code.co_name == name:
                stage = what
        for key in ("layer_name", "prefix"):
            value = f.f_locals.get(key)
            if isinstance(value, str) and value:
                layer = value
        module = f.f_locals.get("module") or f.f_locals.get("layer")
        if layer is None and getattr(module, "prefix", None):
            layer = module.prefix
        tb = tb.tb_next
    last = frames[-1] if frames else None
    return {"stage": stage, "layer": layer, "type": type(exc).__name__,
            "message": str(exc).strip().splitlines()[-1] if str(exc).strip() else "",
            "raised_at": f"{last.filename}:{last.lineno} ({last.name})" if last else None,
            "traceback": "".join(traceback.format_exception(exc))[-6000:]}


LINEAR_ROWS = 64  # token rows kept per Linear: enough to compare, small enough to write


def _record_linears(model) -> None:
    """Forward hooks on every Linear of the decoder layers keeping its first LINEAR_ROWS input
    and output rows, so each can be checked alone against lowbit's on the same input."""
    from vllm.model_executor.layers.linear import LinearBase

    store = model._lowbit_linears = {}

    def hook(name):
        def keep(module, args, out):
            if name not in store:
                out = out[0] if isinstance(out, tuple) else out
                store[name] = (args[0][:LINEAR_ROWS].detach().float().clone(),
                               out[:LINEAR_ROWS].detach().float().clone())
        return keep

    for name, module in model.named_modules():
        if isinstance(module, LinearBase) and ".layers." in name:
            module.register_forward_hook(hook(name))


def _recorded(model) -> dict:
    return {"linears": model._lowbit_linears,
            "packed": {k: list(v) for k, v in getattr(model, "packed_modules_mapping", {}).items()}}


def _run(model: str, prompts: list[list[int]], schemes: dict, linears_file: str | None,
         dtype: str) -> dict:
    from vllm import LLM, SamplingParams

    schemes.clear()
    try:
        llm = LLM(model=model, dtype=dtype, enforce_eager=True, max_model_len=1024,
                  generation_config="vllm", seed=0)
    except Exception as e:  # noqa: BLE001 - vLLM raises anything; the caller classifies it
        return {"model": model, "schemes": dict(schemes), "error": _where(e)}
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)
    if linears_file:
        llm.apply_model(_record_linears)
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    except Exception as e:  # noqa: BLE001
        return {"model": model, "schemes": dict(schemes), "error": _where(e)}
    if linears_file:
        import torch

        torch.save(llm.apply_model(_recorded)[0], linears_file)
    positions = []
    for prompt, out in zip(prompts, outs):
        rows = []
        # entry i holds log p(prompt[i] | prompt[:i]); entry 0 is None (nothing predicts it)
        for i in range(1, len(prompt)):
            entry = out.prompt_logprobs[i]
            # vLLM's own top-1: the larger of the two log-probs it returns (not the `rank`
            # field, whose value differed between its AVX2 and AVX-512 paths)
            top = max(entry.items(), key=lambda kv: kv[1].logprob)
            rows.append([entry[prompt[i]].logprob, top[0]])
        positions.append(rows)
    del llm
    return {"model": model, "schemes": dict(schemes), "positions": positions}


def main(request_path: str, result_path: str) -> None:
    import torch

    if SIMULATED_ISA == "avx2":
        for probe in ("_is_avx512_supported", "_is_avx512_bf16_supported", "_is_amx_tile_supported"):
            setattr(torch.cpu, probe, lambda: False)
    import vllm

    request = json.loads(open(request_path).read())
    schemes: dict = {}
    _record_schemes(schemes)
    # Linear inputs/outputs of the first model only (the one being verified)
    results = [_run(m, request["prompts"], schemes, request.get("linears") if i == 0 else None,
                    request.get("dtype", "float32")) for i, m in enumerate(request["models"])]
    with open(result_path, "w") as f:
        json.dump({"vllm": vllm.__version__, "isa": f"{SIMULATED_ISA.upper()}, simulated" if SIMULATED_ISA
                   else torch.backends.cpu.get_cpu_capability(),
                   "device": "cuda" if torch.cuda.is_available() else "cpu",
                   "results": results}, f)


if __name__ == "__main__":  # vLLM may spawn workers, which re-import this file
    main(sys.argv[1], sys.argv[2])
