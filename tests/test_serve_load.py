"""The server on the real SmolLM2 under load and faults (issue #12, item 4), all on 127.0.0.1 and
bounded: concurrent requests decode together with the tokens each would get alone; 64 streaming
clients x 4 requests finish whole; clients that leave mid-stream disturb no one and give their
slots back; oversized, non-UTF-8 and 1,000 malformed requests are 4xx and the server still
answers."""

from __future__ import annotations

import asyncio
import json
import random

import httpx2 as httpx
import pytest
import torch

import lowbit
from lowbit.runtime.generate import options
from lowbit.serving.engine import Engine
from serving import metric, running, sse, wait_for

pytestmark = pytest.mark.e2e
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "Water boils at"]


def test_concurrent_requests_get_the_tokens_each_gets_alone(smollm2_dir):
    # float32: batched and single forwards round differently in bf16, enough to flip a near-tie
    engine = Engine.load(smollm2_dir, torch.float32, max_batch=4, max_len=256)
    try:
        chat = [{"role": "user", "content": "Name three colours."}]
        first = engine.submit(engine.encode(PROMPTS[0]), options(16, ignore_eos=True))
        assert wait_for(lambda: len(first.token_ids) >= 3, 60)  # the others join mid-way
        later = [engine.submit(engine.encode(p), options(16, ignore_eos=True)) for p in (chat, PROMPTS[1])]
        assert engine.drain(120)
        for prompt, r in zip([PROMPTS[0], chat, PROMPTS[1]], [first, *later]):
            alone = lowbit.generate(engine.decoder.model, prompt, max_tokens=16, ignore_eos=True,
                                    tokenizer=engine.tokenizer)
            assert r.token_ids == alone.token_ids and r.text.text == alone.text
        assert max(r.admitted_step for r in later) > first.admitted_step  # they did join late
    finally:
        engine.close()


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    engine = Engine.load(smollm2_dir, max_batch=64, max_len=128, max_waiting=256)
    with running(engine, "smol") as base:
        yield base, engine
    engine.close()


async def _stream(client: httpx.AsyncClient, prompt: str, leave: bool = False) -> dict | None:
    """One streamed completion: its events, or None when this client leaves after the first."""
    body = {"model": "smol", "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        lines = []
        async for line in r.aiter_lines():
            lines.append(line)
            if leave and line.startswith("data: "):
                return None  # closing the response drops the connection mid-stream
    events, done = sse(lines)
    assert done, "stream did not end with [DONE]"
    return {"text": "".join(e["choices"][0]["text"] for e in events if e["choices"]),
            "finish": [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1],
            "tokens": events[-1]["usage"]["completion_tokens"]}


async def _clients(base: str, n: int, rounds: int, leaving: set[int]) -> list:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:
        async def one(i: int):
            return [await _stream(client, PROMPTS[(i + k) % len(PROMPTS)], leave=i in leaving and k == 1)
                    for k in range(rounds)]
        return await asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)


def test_64_streaming_clients_x_4_requests_all_finish_whole(smol):
    base, engine = smol
    results = asyncio.run(_clients(base, 64, 4, leaving=set()))
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    done = [x for r in results for x in r]
    assert len(done) == 256
    assert all(x["tokens"] == 8 and x["finish"] == "length" and x["text"] for x in done)
    # greedy: one prompt, one answer, whichever batch it decoded in; a request reading another's
    # slot would answer differently. Not all: in bf16 another batch may round a near-tie the other way
    for p in range(len(PROMPTS)):
        texts = [x["text"] for i, r in enumerate(results) for k, x in enumerate(r) if (i + k) % 4 == p]
        assert max(texts.count(t) for t in set(texts)) > 0.5 * len(texts)
    assert metric(base, "lowbit_num_requests_running") == 0
    assert metric(base, "lowbit_generation_tokens_total") >= 256 * 8


def test_clients_leaving_mid_stream_disturb_no_one_and_free_their_slots(smol):
    base, engine = smol
    leaving = set(random.Random(0).sample(range(64), 7))  # ~10 % leave during their second request
    results = asyncio.run(_clients(base, 64, 2, leaving))
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    for i, r in enumerate(results):
        assert r[1] is None if i in leaving else r[1]["tokens"] == 8
        assert r[0]["tokens"] == 8
    assert wait_for(lambda: metric(base, "lowbit_num_requests_running") == 0, 30)
    assert metric(base, 'lowbit_requests_total{outcome="cancelled"}') >= 1
    assert len(engine._free) == engine.max_batch


MALFORMED = [
    b"", b"{", b"null", b"[]", b'"text"', b"{\"model\": \"smol\"}", b"{\"model\": 1, \"prompt\": \"a\"}",
    b"{\"model\": \"smol\", \"prompt\": \"a\", \"max_tokens\": -1}",
    b"{\"model\": \"smol\", \"prompt\": \"a\", \"max_tokens\": 1e9}",
    b"{\"model\": \"smol\", \"prompt\": \"a\", \"top_p\": 7}",
    b"{\"model\": \"smol\", \"prompt\": [\"a\", \"b\"]}", b"{\"model\": \"smol\", \"prompt\": [-3]}",
    b"{\"model\": \"other\", \"prompt\": \"a\"}", b"{\"model\": \"smol\", \"prompt\": \"a\", \"seed\": \"x\"}",
]


def test_oversized_non_utf8_and_1000_malformed_requests_get_4xx_and_the_server_answers(smol):
    base, _ = smol
    ok = {"model": "smol", "prompt": "Hello", "max_tokens": 2}
    with httpx.Client(base_url=base, timeout=30) as client:
        post = lambda path, content: client.post(path, content=content,
                                                 headers={"content-type": "application/json"})
        shell = len(json.dumps({"model": "smol", "prompt": ""}))
        mib = json.dumps({"model": "smol", "prompt": "a" * (2**20 - shell)}).encode()
        assert len(mib) == 2**20 and post("/v1/completions", mib).status_code == 413
        assert post("/v1/completions", "{\"model\": \"smol\", \"prompt\": \"é\"}".encode("latin-1")).status_code == 400
        rng = random.Random(0)
        statuses = []
        for i in range(1000):
            body = MALFORMED[i % len(MALFORMED)]
            if i % 7 == 0:  # and some random bytes
                body = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
            path = "/v1/chat/completions" if i % 2 else "/v1/completions"
            r = post(path, body)
            statuses.append(r.status_code)
            assert "error" in r.json()
        assert all(400 <= s < 500 for s in statuses), sorted(set(statuses))
        assert post("/v1/completions", json.dumps(ok).encode()).status_code == 200
