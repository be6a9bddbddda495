"""`lowbit bench serve` computes what `vllm bench serve` computes, checked against vLLM's own code.

Same records in, same figures out: the metrics (vllm.benchmarks.serve.calculate_metrics), the
arrival schedule (get_request, with its clock and sleep replaced so it runs instantly) and the
ShareGPT sample (ShareGPTDataset.sample on one file). A live comparison on one server still
needs both tools run against it; these pin the definitions. Runs under `make test-vllm`.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import random

import numpy as np
import pytest

from lowbit.serving import bench
from lowbit.serving.client import Response
from lowbit.serving.workload import sample

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vllm not importable (make test-vllm)")
pytestmark = [needs_vllm, pytest.mark.vllm]


def _responses(seed=0, n=40):
    rng = random.Random(seed)
    out, t = [], 100.0
    for i in range(n):
        tokens = rng.choice([0, 1, 2, 7, 30])
        r = Response(prompt_len=rng.randint(4, 300), max_tokens=max(tokens, 1))
        r.start = t = t + rng.expovariate(5.0)
        if tokens == 0:  # a failed request
            r.error = "HTTP 500"
        else:
            r.success, r.output_tokens = True, tokens
            r.ttft = rng.uniform(0.01, 2.0)
            r.itl = [rng.uniform(0.001, 0.3) for _ in range(tokens - 1)]
            r.latency = r.ttft + sum(r.itl)
        out.append(r)
    return out


def test_metrics_equal_vllms_calculate_metrics():
    from vllm.benchmarks.lib.endpoint_request_func import RequestFuncOutput
    from vllm.benchmarks.serve import calculate_metrics

    ours = _responses()
    theirs = [RequestFuncOutput(success=r.success, latency=r.latency, output_tokens=r.output_tokens,
                                ttft=r.ttft, itl=list(r.itl), prompt_len=r.prompt_len,
                                start_time=r.start, error=r.error) for r in ours]
    slo = {"ttft": 1000.0, "tpot": 150.0, "e2el": 4000.0}
    duration = 12.5
    v, _ = calculate_metrics([], theirs, duration, None, [50.0, 90.0, 99.0], slo)
    m = bench.metrics(ours, duration, slo)
    assert (m["completed"], m["failed"]) == (v.completed, v.failed)
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (v.total_input, v.total_output)
    for mine, vllm_name in (("request_throughput", "request_throughput"),
                            ("request_goodput", "request_goodput"),
                            ("output_throughput", "output_throughput"),
                            ("total_token_throughput", "total_token_throughput")):
        assert m[mine] == pytest.approx(getattr(v, vllm_name), rel=1e-12)
    assert 0 < m["good_requests"] < m["completed"]  # the SLOs cut somewhere in the middle
    for name in ("ttft", "tpot", "itl", "e2el"):
        s = m[f"{name}_ms"]
        assert s["mean"] == pytest.approx(getattr(v, f"mean_{name}_ms"), rel=1e-12)
        assert s["median"] == pytest.approx(getattr(v, f"median_{name}_ms"), rel=1e-12)
        assert s["std"] == pytest.approx(getattr(v, f"std_{name}_ms"), rel=1e-12)
        for p, value in getattr(v, f"percentiles_{name}_ms"):
            assert s[f"p{int(p)}"] == pytest.approx(value, rel=1e-12)
    # not compared: peak concurrency, which vLLM 0.32 counts per one-second bucket (later vLLM,
    # like lowbit, sweeps the exact intervals)


@pytest.mark.parametrize("rate,burstiness", [(4.0, 1.0), (0.5, 0.3), (20.0, 3.0), (float("inf"), 1.0)])
def test_arrivals_equal_vllms_get_request(monkeypatch, rate, burstiness):
    from vllm.benchmarks import serve

    clock = [1000.0]

    async def sleep(seconds):
        clock[0] += seconds

    monkeypatch.setattr(serve.time, "time", lambda: clock[0])
    monkeypatch.setattr(serve.asyncio, "sleep", sleep)
    seed, n = 11, 30

    async def arrivals():
        return [clock[0] - 1000.0 async for _ in serve.get_request(list(range(n)), rate, burstiness)]

    np.random.seed(seed)  # what vllm bench serve's main does first
    theirs = asyncio.run(arrivals())
    ours = bench.arrival_times(n, rate, seed, burstiness)
    assert np.allclose(ours, theirs, rtol=1e-9, atol=1e-9)


def test_sharegpt_sample_equals_vllms(tmp_path, smollm2_dir):
    from vllm.benchmarks.datasets import ShareGPTDataset

    from lowbit.checkpoint import load_tokenizer
    from lowbit.data import read_records, split

    # the held-out part written as a ShareGPT file: both tools then read the same conversations
    names = {"user": "human", "assistant": "gpt", "system": "system"}
    held_out = [r for r in split(read_records("sharegpt"), "eval") if isinstance(r, list)]
    path = tmp_path / "eval.json"
    path.write_text(json.dumps([{"id": str(i), "conversations": [
        {"from": names[m["role"]], "value": m["content"]} for m in r]} for i, r in enumerate(held_out)]))
    tokenizer = load_tokenizer(smollm2_dir)
    for seed, output_len in ((0, None), (3, 64)):
        theirs = ShareGPTDataset(dataset_path=str(path), random_seed=seed).sample(
            tokenizer=tokenizer, num_requests=25, output_len=output_len)
        ours = sample(tokenizer, str(path), 25, seed=seed, output_len=output_len)
        assert [(q.prompt, q.prompt_len, q.output_len) for q in ours] == \
            [(q.prompt, q.prompt_len, q.expected_output_len) for q in theirs]
