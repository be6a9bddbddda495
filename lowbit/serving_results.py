"""Serving numbers for `lowbit compare --serving FILE`: output throughput, TTFT and TPOT per
checkpoint from a `lowbit bench serve` (or vLLM `bench serve`) JSON.

The schema is not final, so this reads defensively and records which key each number came from:
a single result, a list of results naming their model, or an object keyed by checkpoint name or
path; the numbers at the top of a result or one level down (e.g. under "metrics"), a latency
given as a number or as {"mean"|"median"|"p50": ...}.
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


def read_serving(file: str | Path, rows: dict[str, Path]) -> dict[str, dict]:
    """Serving numbers by row name (rows: name -> checkpoint directory) from FILE; rows the file
    does not mention get none. LowbitError when the file names none of them."""
    try:
        data = json.loads(Path(file).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LowbitError(f"--serving {file}: cannot read it as JSON ({e})") from None
    keyed = isinstance(data, dict) and all(isinstance(v, dict) for v in data.values()) \
        and numbers({k: v for k, v in data.items() if not isinstance(v, dict)}) is None
    if keyed:
        labelled = list(data.items())  # {checkpoint: result}
    else:
        results = data if isinstance(data, list) else [data]
        labelled = [(next((str(r[k]) for k in MODEL_KEYS if k in r), None), r)
                    for r in results if isinstance(r, dict)]
    found: dict[str, dict] = {}
    for label, result in labelled:
        if label is None and len(labelled) == 1 and len(rows) == 2:  # one checkpoint and the base
            label = next(n for n in rows if n != "base")
        for name, path in rows.items():
            if label is not None and _matches(label, name, path) and numbers(result):
                found[name] = numbers(result)
    if not found:
        raise LowbitError(f"--serving {file}: no result names one of the compared checkpoints "
                          f"({', '.join(rows)}) with an output_throughput, ttft or tpot")
    return found
