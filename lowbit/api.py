"""The Python surface the CLI mirrors: quantize(), evaluate(), load()."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import torch

from . import data, distributed
from .checkpoint import Checkpoint, load_tokenizer
from .errors import LowbitError
from .export import CheckpointWriter
from .hardware import Compute, compute_dtype
from .memory import release_memory
from .outdir import check_output
from .partial import software_fingerprint, source_fingerprint
from .pipeline import needs_calibration, quantize_layers, resolve_group_size
from .schemes import Scheme, get_scheme

log = logging.getLogger(__name__)

REPORT_FILE = "lowbit_report.json"


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def resolve_device(name: str = "auto") -> torch.device:
    """"auto": the GPU when torch sees one, else the CPU; or cpu, cuda, cuda:N."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LowbitError(f"unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise LowbitError(f"device {name!r} is not supported (use auto, cpu, cuda or cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LowbitError(f"--device {name}: torch sees no CUDA GPU on this machine")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise LowbitError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return device


def _check_seq_len(ckpt: Checkpoint, seq_len: int) -> None:
    limit = ckpt.config_dict.get("max_position_embeddings")
    if limit and seq_len > limit:
        raise LowbitError(f"--seq-len {seq_len} exceeds the model's maximum of {limit} positions")


def _fingerprint(ckpt: Checkpoint, scheme: Scheme, batches: list[torch.Tensor], source: str,
                 dropped: int, device: torch.device, compute: Compute) -> dict:
    """What a resumed run must share with the run it continues: everything the bytes depend on."""
    tokens = hashlib.sha256()
    for b in batches:
        tokens.update(len(b).to_bytes(8, "little") + b.numpy().tobytes())
    return {"software": software_fingerprint(), "input checkpoint": source_fingerprint(ckpt.path),
            "scheme and options": repr(scheme), "device": device.type,  # GPU bf16 matmuls differ
            "compute dtype": compute.name,  # so do bf16 and float32 forwards
            "calibration data": {"dataset": source, "dropped": dropped, "tokens": tokens.hexdigest()}}


def quantize(model: str | Path, out: str | Path, scheme: str | Scheme = "FP8", *,
             dataset: str = "sharegpt", samples: int = 128, seq_len: int = 512,
             ignore: tuple[str, ...] | list[str] = (), seed: int = 0,
             group_size: int | None = None, algorithm: str | None = None,
             kv_cache: str | None = None, kv_scale: str | None = None,
             smoothquant: str | None = None, sparsity: float | None = None,
             sparsity_structure: str | None = None, device: str = "auto",
             compute: str = "auto", overwrite: bool = False,
             overrides: dict[str, str | Scheme] | None = None) -> dict:
    """Quantize the checkpoint directory `model` with `scheme` and write a compressed-tensors
    checkpoint to `out`.

    `overrides` (mixed precision) maps module patterns naming whole decoder layers (as
    `ignore` takes them: "layers.3.*") to another scheme (a preset name or a Scheme) for
    those layers; the checkpoint gets a config group per scheme.

    Calibration uses `samples` records of at most `seq_len` tokens from `dataset` (its
    calibration split), chosen by `seed`. `group_size` and `algorithm` ("rtn", "gptq" or "mr-gptq")
    override the scheme's defaults. `sparsity` (a fraction in (0, 1)) with `sparsity_structure`
    ("unstructured" or "2:4") prunes every quantized Linear with SparseGPT first. `device` runs
    the layers, statistics and solvers on a GPU ("auto": a GPU when torch sees one). `compute`
    is the dtype forwards run in: "auto" (the checkpoint's dtype where the hardware computes it
    natively, else float32), "float32" or "bfloat16"; stored weights and scales keep the
    checkpoint's dtype either way. Returns a
    summary: scheme, timings, output size and the per-Linear relative errors, worst first (also
    saved as OUT/lowbit_report.json): output errors on calibration data, or weight errors for
    data-free schemes, which read no data.
    """
    start = time.perf_counter()
    scheme = get_scheme(scheme) if isinstance(scheme, str) else scheme
    scheme = scheme.with_ignore(tuple(ignore)).with_options(
        group_size=group_size, algorithm=algorithm, kv_cache=kv_cache, kv_scale=kv_scale,
        smoothing=smoothquant, sparsity=sparsity, sparsity_structure=sparsity_structure)
    if overrides:
        scheme = scheme.with_overrides({p: get_scheme(s) if isinstance(s, str) else s
                                        for p, s in overrides.items()})
    check_output(out, overwrite)
    where = resolve_device(device)
    if where.type == "cuda" and distributed.active():  # torchrun: one GPU per local rank
        where = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    ckpt = Checkpoint(model)
    forward = compute_dtype(ckpt.dtype, compute, where)
    if distributed.is_main():
        log.info("computing in %s: %s", forward.name, forward.reason)
    scheme, notice = resolve_group_size(ckpt, scheme)
    notices = [notice] if notice else []
    data_free = not needs_calibration(scheme)
    if data_free:
        # RTN weights with dynamic or no activation quantization, no KV cache, no smoothing:
        # data cannot change the result, so none is read and no forward runs
        notices.append(f"{scheme.name} with {scheme.algorithm} is data-free: no calibration; "
                       "the report gives each Linear's relative weight error")
    for n in notices if distributed.is_main() else ():
        log.warning(n)
    if not data_free:  # a data-free run reads no samples: their length cannot be wrong
        _check_seq_len(ckpt, seq_len)
    batches, source, dropped = [], None, 0
    if not data_free:
        tokenizer = ckpt.tokenizer()
        records = data.read_records(dataset)
        batches = data.calibration_samples(tokenizer, records, samples=samples, seq_len=seq_len,
                                           seed=seed)
        source, dropped = records.source, records.dropped
        del records  # the parsed dataset (hundreds of MB for ShareGPT) is not needed past here
        release_memory()  # the parsed dataset's pages must not add to calibration's peak
    # under torchrun every rank calibrates on its share of the samples; rank 0 writes
    # resumable: a rerun with the same fingerprint continues where a killed run stopped
    # (not under torchrun, whose ranks would have to agree on where; nor with pruning,
    # whose global sparsity is counted over the whole run)
    resumable = not distributed.active() and scheme.sparsity is None
    fingerprint = _fingerprint(ckpt, scheme, batches, source, dropped, where, forward) if resumable else None
    writer = CheckpointWriter(out, ckpt.path, scheme, overwrite=overwrite, fingerprint=fingerprint) \
        if distributed.is_main() else distributed.Discard()
    with writer:
        layers = quantize_layers(ckpt, scheme, batches, writer, device=where, compute=forward.dtype)
        worst = sorted(layers, key=lambda r: -r["rel_error"])
        summary = {
            "scheme": scheme.name,
            "algorithm": scheme.algorithm,
            "group_size": scheme.weights.group_size,
            "kv_cache": "fp8" if scheme.kv_cache else None,
            "smoothquant": scheme.smoothing,
            "sparsity": scheme.sparsity,
            "sparsity_structure": scheme.sparsity_structure if scheme.sparsity else None,
            "overrides": {p: {"scheme": s.name, "algorithm": s.algorithm} for p, s in scheme.overrides},
            "notices": notices,
            "model": str(ckpt.path.resolve()),
            "dataset": source,
            "records_dropped": dropped,
            "device": str(where),
            "compute_dtype": forward.as_dict(),
            "samples": len(batches),
            "error": "weight" if data_free else "output",
            "calibration_tokens": int(sum(b.numel() for b in batches)),
            "layers": worst,
        }
        writer.add_file(REPORT_FILE, json.dumps(summary, indent=2) + "\n")
    summary["out"] = str(out)
    summary["seconds"] = time.perf_counter() - start
    summary["size_bytes"] = _dir_size(Path(out))
    summary["source_size_bytes"] = _dir_size(ckpt.path)
    return summary


def load(path: str | Path, dtype: torch.dtype | str = "auto", packed: bool = True) -> torch.nn.Module:
    """A model ready to run on CPU: unquantized checkpoints as they are; lowbit/compressed-tensors
    checkpoints with weights dequantized exactly as stored and input activations quantized
    in the forward pass, as vLLM computes them. `dtype` is what it computes in: a torch dtype,
    or "auto" (the checkpoint's dtype where this CPU computes it natively, else float32),
    "float32" or "bfloat16". With `packed` (the default), INT4 group, INT8 per-channel, FP8 and
    NVFP4/MXFP4 weights stay as stored and run their own kernels (lowbit/runtime/linear.py);
    packed=False is the dequantized reference."""
    from .runtime.load import load_model

    if isinstance(dtype, str):
        dtype = _compute_for(Path(path), dtype).dtype
    return load_model(Path(path), dtype, packed=packed)


def _compute_for(path: Path, choice: str, device: torch.device | str = "cpu") -> Compute:
    """The compute dtype for a checkpoint directory, from its config's dtype."""
    return compute_dtype(Checkpoint(path, allow_quantized=True).dtype, choice, device)


def evaluate(model: str | Path, baseline: str | Path | None = None, *, dataset: str = "sharegpt",
             windows: int = 32, seq_len: int = 512, device: str = "auto",
             compute: str = "auto", generate: int = 0, max_new_tokens: int = 64,
             tasks: str | list[str] | tuple[str, ...] = (), limit: int | None = None,
             num_fewshot: int | None = None, reuse: dict | None = None,
             packed: bool = False) -> dict:
    """Perplexity of `model` on held-out windows of `dataset` (its evaluation split); with a
    `baseline`, also mean next-token KL(baseline || model) and top-1 agreement. Both models run
    in one `compute` dtype, chosen for `model`'s stored dtype as in quantize().

    `generate` > 0 also answers that many held-out chat prompts greedily (at most
    `max_new_tokens` each) and reports ROUGE against the dataset's replies and, with a
    baseline, against the baseline's answers, exact matches and recovery (lowbit/quality.py).
    `tasks` (lm-eval names or task YAML paths; needs the lm-eval extra) adds lm-eval's scores,
    on at most `limit` documents per task with `num_fewshot` examples (lowbit/harness.py).
    Both run lowbit's CPU runtime, packed kernels included. `reuse`: a dict shared by several
    calls, in which each model's answers and task scores are kept (quality.remembered), so a
    baseline common to them is answered and scored once. `packed` runs `model`'s perplexity and
    KL through the packed CPU kernels (lowbit.load's default) instead of the dequantizing
    reference path; docs/benchmarks.md has the KL of both for every scheme."""
    from .metrics import compare

    start = time.perf_counter()
    path = Path(model)
    for p in (path, baseline):
        if p is not None and not (Path(p) / "config.json").is_file():
            raise LowbitError(f"model {p} has no config.json (not a checkpoint directory)")
    for name, n, least in (("generate", generate, 0), ("max_new_tokens", max_new_tokens, 1),
                           ("limit", limit, 1), ("num_fewshot", num_fewshot, 0)):
        if n is not None and n < least:
            raise LowbitError(f"{name} must be at least {least}, got {n}")
    resolved = None
    if tasks:  # before the long part: a missing lm-eval or an unknown task fails now
        from . import harness

        resolved = harness.task_names(tasks)  # a list, or "a,b" as the CLI takes it
    tokenizer = load_tokenizer(path)
    texts = data.read_records(dataset)
    wins = data.eval_windows(tokenizer, texts, windows=windows, seq_len=seq_len)
    if generate:  # chosen now, with the evaluated model's tokenizer: a dataset without prompts fails early
        from . import quality

        positions = Checkpoint(path, allow_quantized=True).config_dict.get("max_position_embeddings")
        prompts = quality.held_out_prompts(tokenizer, texts, generate,
                                           max_tokens=quality.prompt_budget(positions, max_new_tokens))
    where = resolve_device(device)
    forward = _compute_for(path, compute, where)
    log.info("computing in %s: %s", forward.name, forward.reason)
    # by default the reference path: packed kernels are CPU-only, and their KL is checked against it
    if packed and where.type != "cpu":
        raise LowbitError(f"packed kernels run on the CPU; evaluate with device='cpu', not {where}")
    net = load(path, forward.dtype, packed=packed).to(where)
    base = load(baseline, forward.dtype, packed=False).to(where) if baseline is not None else None
    result = compare(net, wins, base)
    del net, base
    release_memory()
    result.update(model=str(path), baseline=str(baseline) if baseline else None,
                  windows=len(wins), seq_len=seq_len, size_bytes=_dir_size(path), device=str(where),
                  compute_dtype=forward.as_dict(), packed=packed)
    if generate:
        result["generation"] = quality.generation_quality(path, baseline, prompts, max_new_tokens=max_new_tokens,
                                                          dtype=forward.dtype, reuse=reuse)
    if tasks:
        from . import harness
        from .quality import remembered

        run = dict(limit=limit, num_fewshot=num_fewshot, dtype=forward.dtype)
        scores = [None if p is None else remembered(
            reuse, ("tasks", str(Path(p).resolve()), repr(resolved[0]), repr(run)),
            lambda p=p: harness.scores(p, *resolved, **run)) for p in (path, baseline)]
        result["tasks"] = harness.table(*scores)
        result["tasks_options"] = {"limit": limit, "num_fewshot": num_fewshot}
    result["seconds"] = time.perf_counter() - start
    return result
