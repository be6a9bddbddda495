"""Serving numbers for `lowbit compare --serving FILE`: output throughput, TTFT and TPOT per
checkpoint from a `lowbit bench serve` (or vLLM `bench serve`) JSON.

Read defensively, recording which key each number came from: one result per file (`lowbit bench
serve --json`: {"config": {"model": ...}, "metrics": {"output_throughput", "ttft_ms": {"mean",
...}, ...}}), a list of results naming their model, or an object keyed by checkpoint name or
path; the numbers at the top of a result or one level down, a latency given as a number or as
{"mean"|"median"|"p50": ...}.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import LowbitError

ALIASES = {
    "output_throughput": ["output_throughput", "output_tokens_per_second", "output_tok_s",
                          "output_throughput_tok_s", "tokens_per_second", "throughput"],
    "ttft": ["mean_ttft_ms", "median_ttft_ms", "ttft_ms", "mean_ttft_s", "ttft_s", "ttft"],
    "tpot": ["mean_tpot_ms", "median_tpot_ms", "tpot_ms", "mean_tpot_s", "tpot_s", "tpot"],
}
MODEL_KEYS = ("model", "model_id", "checkpoint", "name", "path")


def _scalar(value, key: str) -> tuple[float, str] | None:
    if isinstance(value, dict):
        for stat in ("mean", "median", "p50"):
            if isinstance(value.get(stat), (int, float)):
                return float(value[stat]), f"{key}.{stat}"
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value), key
    return None


def numbers(result: dict) -> dict | None:
    """{output_throughput (tok/s), ttft (ms), tpot (ms), keys: {name: source key}} from one
    result; latencies in seconds (a key ending _s) become ms, unit-less ones are taken as ms."""
    out: dict = {"keys": {}}
    scopes = [result] + [v for v in result.values() if isinstance(v, dict)]
    for name, aliases in ALIASES.items():
        for key in aliases:
            found = next((s for s in (_scalar(sc.get(key), key) for sc in scopes if key in sc) if s), None)
            if found:
                value, source = found
                if name != "output_throughput" and key.endswith("_s"):
                    value, source = value * 1000, f"{source} (s, as ms)"
                elif name != "output_throughput" and not key.endswith("_ms"):
                    source += " (unit not given, taken as ms)"
                out[name], out["keys"][name] = value, source
                break
    return out if out["keys"] else None


def _matches(label: str, name: str, path: Path) -> bool:
    return label == name or Path(label).name == path.name or Path(label).resolve() == path.resolve()


def _label(result: dict) -> str | None:
    """The model a result names, at its top or in its "config" (`lowbit bench serve`)."""
    for scope in (result, result.get("config") or {}):
        for k in MODEL_KEYS:
            if isinstance(scope.get(k), str):
                return scope[k]
    return None


def _results(data, rows: dict[str, Path]) -> list[tuple[str | None, dict]]:
    if isinstance(data, list):
        return [(_label(r), r) for r in data if isinstance(r, dict)]
    if isinstance(data, dict) and any(isinstance(v, dict) and any(_matches(k, n, p) for n, p in rows.items())
                                      for k, v in data.items()):
        return [(k, v) for k, v in data.items() if isinstance(v, dict)]  # {checkpoint: result}
    return [(_label(data), data)] if isinstance(data, dict) else []


def read_serving(files, rows: dict[str, Path]) -> dict[str, dict]:
    """Serving numbers by row name (rows: name -> checkpoint directory) from one or more FILEs;
    rows no file mentions get none. LowbitError for a file that names none of them."""
    files = [files] if isinstance(files, (str, Path)) else list(files)
    found: dict[str, dict] = {}
    for file in files:
        try:
            labelled = _results(json.loads(Path(file).read_text()), rows)
        except (OSError, json.JSONDecodeError) as e:
            raise LowbitError(f"--serving {file}: cannot read it as JSON ({e})") from None
        if len(files) == 1 and len(labelled) == 1 and len(rows) == 2 and labelled[0][0] is None:
            labelled = [(next(n for n in rows if n != "base"), labelled[0][1])]  # the one checkpoint
        matched = False
        for label, result in labelled:
            for name, path in rows.items():
                if label is not None and _matches(label, name, path) and numbers(result):
                    found[name], matched = numbers(result), True
        if not matched:
            raise LowbitError(f"--serving {file}: no result names one of the compared checkpoints "
                              f"({', '.join(rows)}) with an output_throughput, ttft or tpot")
    return found
