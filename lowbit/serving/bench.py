"""`lowbit bench serve`: load an OpenAI-compatible server and measure it as `vllm bench serve` does.

Arrivals, metrics and goodput follow vllm/benchmarks/serve.py so the two tools' figures can be
compared on one server:
- arrivals: with a finite --request-rate R, gaps are drawn from a gamma distribution of shape
  `burstiness` (1: exponential, a Poisson process) and scale 1/(R * burstiness) from NumPy's
  legacy generator seeded with --seed (vLLM calls np.random.seed(seed) and np.random.gamma, so
  the draws are the same), summed, and rescaled so the last request arrives at N/R; `inf` sends
  everything at time 0. --max-concurrency gates requests after arrival; their clocks start
  when they pass the gate.
- TTFT, ITL and end-to-end latency (E2EL) per request as in serving/client.py;
  TPOT = (E2EL - TTFT) / (output tokens - 1), over requests with more than one output token.
- throughputs divide by the wall time from the first arrival to the last response; only
  successful requests count.
- goodput: successful requests per second whose TTFT, TPOT and E2EL are all within the SLOs
  given (a one-token request has TPOT 0 there).
Percentiles are NumPy's default (linear interpolation), as in vLLM.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np

from ..errors import LowbitError
from ..hardware import cpu_name
from ..outdir import writing
from .client import Response, connect, resolve_model, stream, warm_up
from .workload import Request

PERCENTILES = (50, 90, 99)
SLO_KEYS = ("ttft", "tpot", "e2el")
METRICS = ("ttft", "tpot", "itl", "e2el")


def parse_slo(text: str | None) -> dict[str, float]:
    """"ttft=2000,tpot=200" (milliseconds; vLLM's "ttft:2000" also works) -> {"ttft": 2000.0, ...}."""
    slo: dict[str, float] = {}
    for item in filter(None, (text or "").replace(" ", ",").split(",")):
        key, sep, value = item.replace(":", "=").partition("=")
        try:
            number = float(value)
        except ValueError:
            number = -1.0
        if not sep or key not in SLO_KEYS or not number > 0:
            raise LowbitError(f"bad SLO {item!r}: use KEY=MILLISECONDS with KEY one of "
                              f"{', '.join(SLO_KEYS)}, e.g. --slo ttft=2000,tpot=200")
        slo[key] = number
    return slo


def arrival_times(n: int, rate: float, seed: int, burstiness: float = 1.0) -> list[float]:
    """When each of `n` requests is sent, in seconds from the start (vLLM's get_request)."""
    if math.isinf(rate):
        return [0.0] * n
    if not rate > 0 or not burstiness > 0:
        raise LowbitError(f"--request-rate and burstiness must be positive (got {rate}, {burstiness})")
    # the legacy RandomState, not default_rng: it draws what np.random.seed(seed) + np.random.gamma do
    gaps = np.random.RandomState(seed).gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)
    times = np.cumsum(gaps)
    # vLLM rescales so the last arrival is at n / rate: throughput then does not depend on the seed
    return (times * (n / rate) / times[-1]).tolist()


def run(requests: list[Request], *, base_url: str, model: str | None = None,
        endpoint: str = "completions", request_rate: float = math.inf,
        max_concurrency: int | None = None, seed: int = 0, burstiness: float = 1.0,
        timeout: float = 600.0, api_key: str | None = None, slo: dict[str, float] | None = None,
        ignore_eos: bool = True) -> dict:
    """Send `requests` to the server at `base_url` and return the measurements.

    The result holds "config", "metrics" (see metrics()), "requests" (one record each) and
    "machine" (the client's CPU). Each request is bounded by `timeout` seconds, so the run ends.
    """
    if endpoint not in ("completions", "chat"):
        raise LowbitError(f"unknown endpoint {endpoint!r}: use completions or chat")
    if max_concurrency is not None and max_concurrency < 1:
        raise LowbitError(f"--max-concurrency must be at least 1 (got {max_concurrency})")
    times = arrival_times(len(requests), request_rate, seed, burstiness)
    model, responses, duration = asyncio.run(_send_all(
        requests, times, base_url=base_url, model=model, endpoint=endpoint,
        max_concurrency=max_concurrency, timeout=timeout, api_key=api_key, ignore_eos=ignore_eos))
    config = dict(base_url=base_url, model=model, endpoint=endpoint, num_prompts=len(requests),
                  request_rate=request_rate if math.isfinite(request_rate) else "inf",
                  burstiness=burstiness, max_concurrency=max_concurrency, seed=seed,
                  timeout_s=timeout, ignore_eos=ignore_eos, slo_ms=slo or {})
    t0 = min((r.start for r in responses), default=0.0)
    return {"config": config, "metrics": metrics(responses, duration, slo or {}),
            "requests": [_record(r, t0) for r in responses], "machine": machine()}


async def _send_all(requests, times, *, base_url, model, endpoint, max_concurrency, timeout,
                    api_key, ignore_eos) -> tuple[str, list[Response], float]:
    client = connect(base_url, api_key, timeout)
    try:
        model = await resolve_model(client, base_url, model, timeout)
        await warm_up(client, model, endpoint, timeout)  # a failure shows again when measured
        gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None

        async def one(req: Request) -> Response:
            call = dict(model=model, prompt=req.prompt, prompt_len=req.prompt_len,
                        max_tokens=req.output_len, endpoint=endpoint, ignore_eos=ignore_eos,
                        timeout=timeout)
            async with gate or contextlib.nullcontext():
                return await stream(client, **call)

        # as vLLM: what exists now is never garbage; fewer collector pauses inside the timings
        gc.collect()
        gc.freeze()
        start, tasks = time.perf_counter(), []
        for req, at in zip(requests, times):
            if (delay := start + at - time.perf_counter()) > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(req)))
        responses = await asyncio.gather(*tasks)
        return model, responses, time.perf_counter() - start
    finally:
        gc.unfreeze()
        await client.close()


def _stats(values_s: list[float]) -> dict[str, float]:
    """mean, std and percentiles in milliseconds; zeros when there is nothing (as vLLM)."""
    v = np.asarray(values_s or [0.0], dtype=np.float64) * 1000.0
    out = {"mean": float(v.mean()), "std": float(v.std()), "median": float(np.median(v))}
    out.update({f"p{p}": float(np.percentile(v, p)) for p in PERCENTILES})
    return out


def metrics(responses: list[Response], duration: float, slo: dict[str, float]) -> dict:
    """vLLM's calculate_metrics over `responses`, `duration` seconds of wall time."""
    ok = [r for r in responses if r.success]
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0 for r in ok]
    good = sum(all(value * 1000.0 <= slo[key] for key, value in
                   (("ttft", r.ttft), ("tpot", t), ("e2el", r.latency)) if key in slo)
               for r, t in zip(ok, tpot)) if slo else 0
    total_in, total_out = sum(r.prompt_len for r in ok), sum(r.output_tokens for r in ok)
    # peak concurrency: sweep over [start, end) of successful requests, ends before starts on ties
    events = sorted([(r.start, 1) for r in ok] + [(r.start + r.latency, -1) for r in ok])
    peak = max(np.cumsum([d for _, d in events]).tolist(), default=0)
    return {
        "completed": len(ok), "failed": len(responses) - len(ok), "duration_s": duration,
        "total_input_tokens": total_in, "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration,
        "request_goodput": good / duration if slo else None, "good_requests": good if slo else None,
        "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
        "peak_concurrent_requests": int(peak),
        "ttft_ms": _stats([r.ttft for r in ok]),
        "tpot_ms": _stats([t for r, t in zip(ok, tpot) if r.output_tokens > 1]),
        "itl_ms": _stats([x for r in ok for x in r.itl]),
        "e2el_ms": _stats([r.latency for r in ok]),
        "errors": sorted({r.error for r in responses if not r.success})[:10],
    }


def _record(r: Response, t0: float) -> dict:
    tpot = (r.latency - r.ttft) / (r.output_tokens - 1) if r.success and r.output_tokens > 1 else None
    return {"success": r.success, "error": r.error, "start_s": r.start - t0,
            "prompt_len": r.prompt_len, "max_tokens": r.max_tokens,
            "output_tokens": r.output_tokens, "tokens_from": r.tokens_from,
            "finish_reason": r.finish_reason, "ttft_ms": r.ttft * 1000.0,
            "tpot_ms": None if tpot is None else tpot * 1000.0, "e2el_ms": r.latency * 1000.0,
            "itl_ms": [x * 1000.0 for x in r.itl], "text": r.text}


def machine() -> dict:
    """The client machine: its CPU model and cores."""
    return {"cpu_model": cpu_name(), "cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version()}


def table(result: dict) -> str:
    """The result as the text table `lowbit bench serve` prints (vLLM's layout)."""
    m, c = result["metrics"], result["config"]
    rows = [("Successful requests", m["completed"]), ("Failed requests", m["failed"])]
    if c["max_concurrency"]:
        rows.append(("Maximum request concurrency", c["max_concurrency"]))
    if c["request_rate"] != "inf":
        rows.append(("Request rate configured (RPS)", f"{c['request_rate']:.2f}"))
    rows += [("Benchmark duration (s)", f"{m['duration_s']:.2f}"),
             ("Total input tokens", m["total_input_tokens"]),
             ("Total generated tokens", m["total_output_tokens"]),
             ("Request throughput (req/s)", f"{m['request_throughput']:.2f}")]
    if m["request_goodput"] is not None:
        slo = ", ".join(f"{k} <= {v:g} ms" for k, v in c["slo_ms"].items())
        rows.append((f"Request goodput (req/s; {slo})", f"{m['request_goodput']:.2f}"))
    rows += [("Output token throughput (tok/s)", f"{m['output_throughput']:.2f}"),
             ("Total token throughput (tok/s)", f"{m['total_token_throughput']:.2f}"),
             ("Peak concurrent requests", m["peak_concurrent_requests"])]
    lines = [" Serving Benchmark Result ".center(60, "=")]
    lines += [f"{k + ':':<44} {v}" for k, v in rows]
    lines.append(f"{'(ms)':<8}" + "".join(f"{h:>10}" for h in ("mean", "p50", "p90", "p99")))
    for name in METRICS:
        s = m[f"{name}_ms"]
        lines.append(f"{name.upper():<8}" + "".join(f"{s[k]:>10.2f}" for k in ("mean", "p50", "p90", "p99")))
    lines += [f"error: {e}" for e in m["errors"]]
    lines.append(f"client CPU: {result['machine']['cpu_model']} ({result['machine']['cpus']} cores)")
    return "\n".join(lines)


def write_json(path: str | os.PathLike, result: dict) -> None:
    """Write `result` to `path` whole or not at all: a temporary sibling renamed at the end."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with writing(path):
        try:
            tmp.write_text(json.dumps(result, indent=2) + "\n")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
