"""`lowbit serve`: the OpenAI API over the continuous-batching engine, spoken to by the real
`openai` client and raw HTTP on 127.0.0.1. Answers equal lowbit.generate's; bad requests get
OpenAI-shaped 4xx errors and the server keeps answering; requests join a running batch without
waiting; a client that leaves frees its slot; a full queue is 429 with Retry-After."""

from __future__ import annotations

import json
import socket
import threading

import httpx2 as httpx
import openai
import pytest
import torch

import lowbit
from lowbit.checkpoint import load_tokenizer
from lowbit.runtime.generate import options
from lowbit.runtime.load import load_model
from lowbit.serving.app import MAX_BODY
from lowbit.serving.engine import Engine
from serving import metric, running, sse, wait_for

PROMPT = "the quick brown fox"
CHAT = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    path = tiny_dir("llama")
    # float64: random tiny models have near-flat next-token distributions, where float32
    # rounding differences between batched and single forwards would flip near-ties
    model, tok = load_model(path, torch.float64), load_tokenizer(path)
    engine = Engine(model, tok, max_batch=4, max_len=256, max_waiting=4)
    with running(engine, "tiny") as base:
        yield base, engine, model, tok
    engine.close()


@pytest.fixture
def client(tiny):
    return openai.OpenAI(base_url=tiny[0] + "/v1", api_key="unused", max_retries=0)


def _post(base: str, body, path: str = "/v1/completions", **kw) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(base + path, content=content, headers={"content-type": "application/json"},
                      timeout=30, **kw)


def test_models_lists_the_served_name(client, tiny):
    (model,) = client.models.list().data
    assert model.id == "tiny" and model.max_model_len == tiny[1].max_len


def test_completion_equals_generate_with_usage_counts(client, tiny):
    _, _, model, tok = tiny
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    alone = lowbit.generate(model, PROMPT, max_tokens=12, tokenizer=tok, ignore_eos=True)
    assert r.choices[0].text == alone.text and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (alone.prompt_tokens, 12)
    assert r.usage.total_tokens == alone.prompt_tokens + 12


def test_chat_uses_the_chat_template(client, tiny):
    _, _, model, tok = tiny
    r = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=10, temperature=0,
                                       extra_body={"ignore_eos": True})
    alone = lowbit.generate(model, CHAT, max_tokens=10, tokenizer=tok, ignore_eos=True)
    assert r.choices[0].message.content == alone.text and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == alone.prompt_tokens


def test_a_stream_is_the_whole_answer_in_pieces_ending_with_done(client, tiny):
    base = tiny[0]
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 20, "temperature": 0, "ignore_eos": True}
    whole = _post(base, body).json()["choices"][0]["text"]
    with httpx.stream("POST", base + "/v1/completions", json={**body, "stream": True}, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events, done = sse(r.iter_lines())
    assert done and len(events) > 2
    assert "".join(e["choices"][0]["text"] for e in events) == whole
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    chunks = list(client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].usage.completion_tokens == 8


def test_logprobs_are_the_models_log_probabilities_of_the_chosen_tokens(client, tiny):
    _, _, model, tok = tiny
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=1,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    ids = tok(PROMPT)["input_ids"]
    new = lowbit.generate(model, PROMPT, max_tokens=6, tokenizer=tok, ignore_eos=True).token_ids
    with torch.no_grad():  # teacher-forced: log p(token | everything before it)
        logp = model(torch.tensor([ids + new])).logits[0, len(ids) - 1:-1].double().log_softmax(-1)
    expected = logp[torch.arange(6), torch.tensor(new)]
    assert torch.allclose(torch.tensor(lp.token_logprobs, dtype=torch.float64), expected, atol=1e-4)
    assert lp.tokens == [tok.decode([t]) for t in new] and len(lp.text_offset) == 6
    chat = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=4, temperature=0,
                                          logprobs=True, extra_body={"ignore_eos": True})
    assert len(chat.choices[0].logprobs.content) == 4
    streamed = [c.choices[0].logprobs for c in client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=1, stream=True,
        extra_body={"ignore_eos": True}) if c.choices[0].logprobs]
    assert sum((c.token_logprobs for c in streamed), []) == lp.token_logprobs  # each token once
    assert sum((c.text_offset for c in streamed), []) == lp.text_offset


def test_a_seed_makes_sampling_reproducible(client):
    run = lambda seed: client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=1.0,
                                                 seed=seed, extra_body={"ignore_eos": True}).choices[0].text
    assert run(7) == run(7) and run(7) != run(8)


def test_a_stop_string_ends_the_text_before_it(client, tiny):
    _, _, model, tok = tiny
    full = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0]
    # two whole characters from the middle (random tiny weights also emit stray UTF-8 bytes)
    stop = next(full.text[i:i + 2] for i in range(3, len(full.text)) if "\ufffd" not in full.text[i:i + 2])
    cut = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True}).choices[0]
    alone = lowbit.generate(model, PROMPT, max_tokens=24, tokenizer=tok, ignore_eos=True, stop=[stop])
    assert cut.finish_reason == "stop" and alone.finish_reason == "stop"
    assert cut.text == alone.text and stop not in cut.text and len(cut.text) < len(full.text)


BAD = [  # (body, status, the param named in the error)
    (b"{\"model\": \"tiny\", \"prompt\": ", 400, None),  # malformed JSON
    (b"[1, 2]", 400, None),
    (b"\xff\xfe{\"model\": \"tiny\"}", 400, None),  # not UTF-8
    ({"model": "tiny", "prompt": PROMPT, "max_tokens": "5"}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": PROMPT, "temperature": "hot"}, 400, "temperature"),
    ({"model": "tiny", "prompt": PROMPT, "stream": "yes"}, 400, "stream"),
    ({"model": "tiny", "prompt": 42}, 400, "prompt"),
    ({"model": "tiny", "prompt": PROMPT, "n": 2}, 400, "n"),
    ({"model": "tiny", "prompt": PROMPT, "stop": [1]}, 400, "stop"),
    ({"model": "tiny", "prompt": PROMPT, "seed": 2**70}, 400, "seed"),
    ({"prompt": PROMPT}, 400, "model"),
    ({"model": "gpt-4", "prompt": PROMPT}, 404, "model"),
    ({"model": "tiny", "prompt": PROMPT, "max_tokens": 1000}, 400, None),  # beyond the context
    ({"model": "tiny", "prompt": [5, 10**6]}, 400, None),  # a token id past the vocabulary
]


@pytest.mark.parametrize("body,status,param", BAD)
def test_bad_requests_get_an_openai_error(tiny, body, status, param):
    r = _post(tiny[0], body)
    assert r.status_code == status
    error = r.json()["error"]
    assert error["message"] and error["type"] and error["param"] == param


def test_bad_chat_messages_and_oversized_bodies(tiny):
    base = tiny[0]
    r = _post(base, {"model": "tiny", "messages": "hi"}, "/v1/chat/completions")
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = _post(base, {"model": "tiny", "messages": [{"role": "user"}]}, "/v1/chat/completions")
    assert r.status_code == 400
    long = _post(base, {"model": "tiny", "prompt": PROMPT, "max_tokens": 1000}).json()["error"]
    assert long["code"] == "context_length_exceeded"  # what OpenAI clients look for
    assert _post(base, {"model": "tiny", "prompt": [5, 10**6]}).json()["error"]["code"] is None
    big = json.dumps({"model": "tiny", "prompt": "x" * MAX_BODY}).encode()  # > 1 MB of valid JSON
    assert _post(base, big).status_code == 413
    assert httpx.get(base + "/v1/nothing").json()["error"]["message"]  # 404 in OpenAI's shape too
    assert _post(base, {"model": "tiny", "prompt": PROMPT, "max_tokens": 2}).status_code == 200
    assert metric(base, 'lowbit_request_errors_total{status="413"}') >= 1


def test_an_api_key_is_required_when_set(tiny):
    engine = Engine(tiny[2], tiny[3], max_batch=1, max_len=64)  # a server's shutdown drains its engine
    with running(engine, "tiny", api_key="sesame") as base:
        assert httpx.get(base + "/v1/models").status_code == 401
        wrong = httpx.get(base + "/v1/models", headers={"authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base + "/v1", api_key="nope").completions.create(model="tiny", prompt="a")
        good = openai.OpenAI(base_url=base + "/v1", api_key="sesame")
        assert good.completions.create(model="tiny", prompt="a", max_tokens=2).usage.completion_tokens >= 1
        assert httpx.get(base + "/health").status_code == 200  # health needs no key
    engine.close()


def _recording(monkeypatch, engine) -> list:
    """The engine's Request objects as they are submitted."""
    seen, submit = [], engine.submit
    monkeypatch.setattr(engine, "submit", lambda *a, **k: seen.append(submit(*a, **k)) or seen[-1])
    return seen


def _hold(monkeypatch, engine, until) -> None:
    """Decode steps after the first few wait for `until()`, so a long request cannot finish
    before the event under test (however fast this machine is)."""
    decode, steps = engine.decoder.decode, []

    def held(*a):
        steps.append(1)
        if len(steps) > 3:
            assert wait_for(until, 30)
        return decode(*a)

    monkeypatch.setattr(engine.decoder, "decode", held)


def test_a_short_request_joins_a_running_long_one_and_finishes_first(tiny, monkeypatch):
    base, engine = tiny[0], tiny[1]
    seen = _recording(monkeypatch, engine)
    _hold(monkeypatch, engine, lambda: len(seen) == 2)  # the short one has come
    long_body = {"model": "tiny", "prompt": "a", "max_tokens": 240, "temperature": 0, "ignore_eos": True,
                 "stream": True}
    with httpx.stream("POST", base + "/v1/completions", json=long_body, timeout=60) as r:
        lines = r.iter_lines()
        next(line for line in lines if line.startswith("data: "))  # the long one is decoding
        short = _post(base, {"model": "tiny", "prompt": "b", "max_tokens": 3, "ignore_eos": True})
        assert short.status_code == 200 and short.json()["usage"]["completion_tokens"] == 3
        events, done = sse(lines)
    long, short = seen
    assert done and long.finish_reason == "length" and len(long.token_ids) == 240
    # admitted while the long one ran, decoded in the same steps, done long before it
    assert long.admitted_step < short.admitted_step < short.finished_step < long.finished_step


def test_a_client_that_disconnects_frees_its_slot(tiny, monkeypatch):
    base, engine = tiny[0], tiny[1]
    seen = _recording(monkeypatch, engine)
    _hold(monkeypatch, engine, lambda: seen[0].cancelled)
    body = {"model": "tiny", "prompt": "a", "max_tokens": 240, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break
    # closed after the first event: the slot comes back long before 240 tokens
    assert wait_for(lambda: metric(base, "lowbit_num_requests_running") == 0)
    assert seen[0].finish_reason == "cancelled" and len(seen[0].token_ids) < 240
    assert engine.running == 0 and len(engine._free) == engine.max_batch
    assert _post(base, {"model": "tiny", "prompt": PROMPT, "max_tokens": 2}).status_code == 200


def test_a_client_that_leaves_before_a_whole_answer_frees_its_slot(tiny, monkeypatch):
    base, engine = tiny[0], tiny[1]
    seen = _recording(monkeypatch, engine)
    _hold(monkeypatch, engine, lambda: seen[0].cancelled)
    body = json.dumps({"model": "tiny", "prompt": "a", "max_tokens": 240, "ignore_eos": True}).encode()
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:  # a non-streaming request, then gone
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                  b"content-length: %d\r\n\r\n%s" % (len(body), body))
        assert wait_for(lambda: seen and len(seen[0].token_ids) > 0)
    assert wait_for(lambda: seen[0].state == "done")
    assert seen[0].finish_reason == "cancelled" and len(seen[0].token_ids) < 240
    assert wait_for(lambda: engine.running == 0)


def test_a_full_queue_gets_429_and_a_draining_server_503_with_retry_after(tiny_dir, monkeypatch):
    path = tiny_dir("llama")
    engine = Engine(load_model(path, torch.float32), load_tokenizer(path), max_batch=1, max_len=64,
                    max_waiting=1)
    gate, decode = threading.Event(), engine.decoder.decode
    monkeypatch.setattr(engine.decoder, "decode", lambda *a: gate.wait(30) and decode(*a))
    try:
        with running(engine, "tiny") as base:
            busy = engine.submit([5, 6], options(4, ignore_eos=True))  # holds the one slot
            assert wait_for(lambda: engine.running == 1)
            queued = engine.submit([7, 8], options(4, ignore_eos=True))  # fills the queue
            r = _post(base, {"model": "tiny", "prompt": PROMPT, "max_tokens": 2})
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "rate_limit_error"
            assert metric(base, "lowbit_num_requests_waiting") == 1
            gate.set()
            assert _post(base, {"model": "tiny", "prompt": PROMPT, "max_tokens": 2}).status_code == 200
            assert busy.finish_reason == queued.finish_reason == "length"
            assert engine.drain(10)  # what SIGTERM does: in-flight requests done, no new ones
            r = _post(base, {"model": "tiny", "prompt": PROMPT, "max_tokens": 2})
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
    finally:
        gate.set()
        engine.close()


def test_an_engine_failure_ends_its_requests_and_the_server_goes_on(tiny, monkeypatch):
    base, engine = tiny[0], tiny[1]
    decode, calls = engine.decoder.decode, []

    def broken_once(*a):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("simulated kernel failure")
        return decode(*a)

    monkeypatch.setattr(engine.decoder, "decode", broken_once)
    r = _post(base, {"model": "tiny", "prompt": PROMPT, "max_tokens": 4, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "abort"
    r = _post(base, {"model": "tiny", "prompt": PROMPT, "max_tokens": 4, "ignore_eos": True})
    assert r.json()["choices"][0]["finish_reason"] == "length"
