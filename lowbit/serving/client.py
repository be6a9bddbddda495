"""One streamed request to an OpenAI-compatible server, timed as vLLM's benchmark client times it.

The definitions follow `vllm bench serve` (vllm/benchmarks/lib/endpoint_request_func.py), so the
two tools agree on the same server:
- the clock starts when the request is sent (after any client-side concurrency gate);
- every streamed chunk that carries a choice is one token event: the first gives TTFT, each
  later one an inter-token latency (ITL);
- the request ends at the last token event, not at the usage chunk or `[DONE]`;
- the output length is the server's `usage.completion_tokens` (asked for with
  `stream_options.include_usage`); without usage, the number of token events.
One deliberate difference: on the chat endpoint, the opening chunk that only announces
`role: assistant` is not a token (vLLM counts it; it arrives with the first token on vLLM's own
server, and lowbit's server may send it before prefill).
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field

import openai

from ..errors import LowbitError


@dataclass
class Response:
    """What one request did; times in seconds (time.perf_counter)."""

    prompt_len: int  # from the server's usage when it reports it
    max_tokens: int
    success: bool = False
    error: str = ""
    start: float = 0.0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0  # start -> last token event
    output_tokens: int = 0
    tokens_from: str = ""  # "usage" or "chunks"
    finish_reason: str | None = None
    text: str = ""


def connect(base_url: str, api_key: str | None = None, timeout: float = 600.0) -> openai.AsyncOpenAI:
    """An async client for `base_url` (with or without a trailing /v1) that never retries:
    a failed request is a measurement, and a retry would hide it and skew the timings."""
    url = base_url.rstrip("/")
    url = url if url.endswith("/v1") else url + "/v1"
    key = api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"  # servers without auth ignore it
    return openai.AsyncOpenAI(base_url=url, api_key=key, max_retries=0, timeout=timeout)


async def first_model(client: openai.AsyncOpenAI) -> str:
    """The id of the first model the server lists (what `vllm bench serve` uses without --model)."""
    page = await client.models.list()
    return page.data[0].id


WARM_UP_PROMPT = "Hi"


async def warm_up(client: openai.AsyncOpenAI, model: str, endpoint: str,
                  timeout: float = 60.0) -> Response:
    """One untimed one-token request before a measured run. The client's first request of each
    kind pays a one-time cost (the SDK resolves its request types, measured 50 ms here) that
    would otherwise land in the first measured TTFT (vLLM's aiohttp client has no such cost; its
    benchmark can also send a test request first, --ready-check-timeout-sec). A short fixed
    prompt, so no measured prompt is already in a prefix cache."""
    return await stream(client, model=model, prompt=WARM_UP_PROMPT, prompt_len=1, max_tokens=1,
                        endpoint=endpoint, ignore_eos=False, timeout=timeout)


async def resolve_model(client: openai.AsyncOpenAI, base_url: str, model: str | None,
                        timeout: float) -> str:
    """`model`, or the server's first model id; a LowbitError when the server cannot be asked."""
    if model is not None:
        return model
    try:
        return await asyncio.wait_for(first_model(client), timeout)
    except Exception as e:  # noqa: BLE001 -- without a model name nothing can be sent
        raise LowbitError(f"cannot list the models at {base_url}/v1/models ({type(e).__name__}: "
                          f"{str(e)[:200]}): is the server up? pass --model to skip the lookup") from None


def served_model(base_url: str, api_key: str | None = None, timeout: float = 60.0) -> str:
    """The server's first model id (what `vllm bench serve` uses without --model)."""
    async def ask() -> str:
        client = connect(base_url, api_key, timeout)
        try:
            return await resolve_model(client, base_url, None, timeout)
        finally:
            await client.close()

    return asyncio.run(ask())


async def stream(client: openai.AsyncOpenAI, *, model: str, prompt: str, prompt_len: int,
                 max_tokens: int, endpoint: str = "completions", ignore_eos: bool = True,
                 sampling: dict | None = None, timeout: float = 600.0,
                 on_first_token=None) -> Response:
    """Send one streaming request and time it; never raises for a failed request.

    `ignore_eos` (a vLLM extension, sent in the body) makes the server produce exactly
    `max_tokens`. `timeout` bounds the whole request, not just each read. `on_first_token(text)`
    is called once, when the first token arrives (LoadGen's FirstTokenComplete).
    """
    out = Response(prompt_len=prompt_len, max_tokens=max_tokens)
    out.start = time.perf_counter()
    try:
        await asyncio.wait_for(_consume(client, out, model, prompt, endpoint, ignore_eos,
                                        sampling or {}, on_first_token), timeout)
    except (asyncio.TimeoutError, TimeoutError):
        out.error = f"no complete response within {timeout:g} s"
    except openai.APIStatusError as e:
        out.error = f"HTTP {e.status_code}: {str(e.message)[:200]}"
    # any other failure of one request (a dropped connection, a refused socket, a garbled
    # stream) is a data point: it is counted and reported, and the benchmark goes on
    except Exception as e:  # noqa: BLE001
        out.error = f"{type(e).__name__}: {str(e)[:200]}"
    if out.error:
        out.success = False
    elif not out.success:
        out.error = "the stream ended without a single token"
    return out


async def _consume(client, out: Response, model, prompt, endpoint, ignore_eos, sampling,
                   on_first_token) -> None:
    body = dict(model=model, max_tokens=out.max_tokens, stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True} if ignore_eos else None, **sampling)
    if endpoint == "chat":
        chunks = await client.chat.completions.create(
            messages=[{"role": "user", "content": prompt}], **body)
    else:
        chunks = await client.completions.create(prompt=prompt, **body)
    last, events = out.start, 0
    async for chunk in chunks:
        now = time.perf_counter()
        if chunk.usage is not None:
            out.output_tokens, out.tokens_from = chunk.usage.completion_tokens, "usage"
            out.prompt_len = chunk.usage.prompt_tokens or out.prompt_len
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        piece = choice.delta.content if endpoint == "chat" else choice.text
        if endpoint == "chat" and not events and not piece and not choice.finish_reason:
            continue  # the role announcement, not a token
        if events:
            out.itl.append(now - last)
        else:
            out.ttft = now - out.start
            if on_first_token is not None:
                on_first_token(piece or "")
        events, last = events + 1, now
        out.text += piece or ""
        out.finish_reason = choice.finish_reason or out.finish_reason
    out.latency = last - out.start
    out.success = events > 0
    if out.tokens_from != "usage":
        out.output_tokens, out.tokens_from = events, "chunks"
