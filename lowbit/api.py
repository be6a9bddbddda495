"""The Python surface the CLI mirrors: quantize(), evaluate(), load()."""

from __future__ import annotations

import ctypes
import gc
import hashlib
import json
import logging
import time
from pathlib import Path

import torch

from . import data
from .checkpoint import Checkpoint, load_tokenizer
from .errors import LowbitError
from .export import CheckpointWriter
from .outdir import check_output
from .partial import software_fingerprint, source_fingerprint
from .pipeline import REPORT_SAMPLES, needs_calibration, quantize_layers, resolve_group_size
from .schemes import Scheme, get_scheme

log = logging.getLogger(__name__)

REPORT_FILE = "lowbit_report.json"


def _release_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise), so memory that held
    the parsed dataset does not add to the peak of calibration."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def _check_seq_len(ckpt: Checkpoint, seq_len: int) -> None:
    limit = ckpt.config_dict.get("max_position_embeddings")
    if limit and seq_len > limit:
        raise LowbitError(f"--seq-len {seq_len} exceeds the model's maximum of {limit} positions")


def _fingerprint(ckpt: Checkpoint, scheme: Scheme, batches: list[torch.Tensor], source: str,
                 dropped: int) -> dict:
    """What a resumed run must share with the run it continues: everything the bytes depend on."""
    tokens = hashlib.sha256()
    for b in batches:
        tokens.update(len(b).to_bytes(8, "little") + b.numpy().tobytes())
    return {"software": software_fingerprint(), "input checkpoint": source_fingerprint(ckpt.path),
            "scheme and options": repr(scheme),
            "calibration data": {"dataset": source, "dropped": dropped, "tokens": tokens.hexdigest()}}


def quantize(model: str | Path, out: str | Path, scheme: str | Scheme = "FP8", *,
             dataset: str = "sharegpt", samples: int = 128, seq_len: int = 512,
             ignore: tuple[str, ...] | list[str] = (), seed: int = 0,
             group_size: int | None = None, algorithm: str | None = None,
             kv_cache: str | None = None, kv_scale: str | None = None,
             smoothquant: str | None = None, overwrite: bool = False) -> dict:
    """Quantize the checkpoint directory `model` with `scheme` and write a compressed-tensors
    checkpoint to `out`.

    Calibration uses `samples` records of at most `seq_len` tokens from `dataset` (its
    calibration split), chosen by `seed`. `group_size` and `algorithm` ("rtn" or "gptq")
    override the scheme's defaults. Returns a summary: scheme, timings, output size
    and the per-Linear relative output errors, worst first (also saved as OUT/lowbit_report.json).
    """
    start = time.perf_counter()
    scheme = get_scheme(scheme) if isinstance(scheme, str) else scheme
    scheme = scheme.with_ignore(tuple(ignore)).with_options(
        group_size=group_size, algorithm=algorithm, kv_cache=kv_cache, kv_scale=kv_scale,
        smoothing=smoothquant)
    check_output(out, overwrite)
    ckpt = Checkpoint(model)
    try:
        scheme, notice = resolve_group_size(ckpt, scheme)
        notices = [notice] if notice else []
        if not needs_calibration(scheme) and samples > REPORT_SAMPLES:
            # data-free (RTN weights, dynamic or no activations, no KV cache, no smoothing):
            # samples only feed the error report, so a report's worth is enough
            notices.append(f"{scheme.name} with {scheme.algorithm} needs no calibration data; "
                           f"{REPORT_SAMPLES} samples run for the error report only")
            samples = REPORT_SAMPLES
        for n in notices:
            log.warning(n)
        _check_seq_len(ckpt, seq_len)
        tokenizer = ckpt.tokenizer()
        records = data.read_records(dataset)
        batches = data.calibration_samples(tokenizer, records, samples=samples, seq_len=seq_len, seed=seed)
        source, dropped = records.source, records.dropped
        del records  # the parsed dataset (hundreds of MB for ShareGPT) is not needed past here
        _release_memory()
        # resumable: a rerun with the same fingerprint continues where a killed run stopped
        fingerprint = _fingerprint(ckpt, scheme, batches, source, dropped)
        with CheckpointWriter(out, ckpt.path, scheme, overwrite=overwrite, fingerprint=fingerprint) as writer:
            layers = quantize_layers(ckpt, scheme, batches, writer)
            worst = sorted(layers, key=lambda r: -r["rel_error"])
            summary = {
                "scheme": scheme.name,
                "algorithm": scheme.algorithm,
                "group_size": scheme.weights.group_size,
                "kv_cache": "fp8" if scheme.kv_cache else None,
                "smoothquant": scheme.smoothing,
                "notices": notices,
                "model": str(ckpt.path.resolve()),
                "dataset": source,
                "records_dropped": dropped,
                "samples": len(batches),
                "calibration_tokens": int(sum(b.numel() for b in batches)),
                "layers": worst,
            }
            writer.add_file(REPORT_FILE, json.dumps(summary, indent=2) + "\n")
    finally:
        ckpt.close()
    summary["out"] = str(out)
    summary["seconds"] = time.perf_counter() - start
    summary["size_bytes"] = _dir_size(Path(out))
    summary["source_size_bytes"] = _dir_size(ckpt.path)
    return summary


def load(path: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A model ready to run on CPU: unquantized checkpoints as they are; lowbit/compressed-tensors
    checkpoints with weights dequantized exactly as stored and input activations quantized
    in the forward pass, as vLLM computes them."""
    from .runtime.load import load_model

    return load_model(Path(path), dtype)


def evaluate(model: str | Path, baseline: str | Path | None = None, *, dataset: str = "sharegpt",
             windows: int = 32, seq_len: int = 512) -> dict:
    """Perplexity of `model` on held-out windows of `dataset` (its evaluation split); with a
    `baseline`, also mean next-token KL(baseline || model) and top-1 agreement."""
    from .metrics import compare

    start = time.perf_counter()
    path = Path(model)
    for p in (path, baseline):
        if p is not None and not (Path(p) / "config.json").is_file():
            raise LowbitError(f"model {p} has no config.json (not a checkpoint directory)")
    tokenizer = load_tokenizer(path)
    texts = data.read_records(dataset)
    wins = data.eval_windows(tokenizer, texts, windows=windows, seq_len=seq_len)
    net = load(path)
    base = load(baseline) if baseline is not None else None
    result = compare(net, wins, base)
    result.update(model=str(path), baseline=str(baseline) if baseline else None,
                  windows=len(wins), seq_len=seq_len, size_bytes=_dir_size(path),
                  seconds=time.perf_counter() - start)
    return result
