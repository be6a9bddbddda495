"""A small real OpenAI-style streaming server with known timing, for the serving benchmarks' tests.

Every streamed request gets its first token `ttft` seconds after it arrives and then one token
every `itl` seconds, on an absolute schedule (token k at arrival + ttft + k * itl), so sleep
overshoot does not accumulate. It streams exactly max_tokens tokens ("tok0 tok1 ..."), then the
usage chunk when asked for and `data: [DONE]`. Words in the prompt change its behaviour:
FAIL500 -> HTTP 500; DROP -> the connection is cut after 2 tokens; HANG -> it stops after one
token; SLOW -> TTFT is `slow_ttft`; NOUSAGE -> no usage chunk. It records arrivals, request
bodies and the peak number of requests in flight, apart from lowbit's warm-up request.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from dataclasses import dataclass, field

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from lowbit.serving.client import WARM_UP_PROMPT


@dataclass
class State:
    ttft: float = 0.050
    itl: float = 0.020
    slow_ttft: float = 0.150
    arrivals: list[float] = field(default_factory=list)  # time.perf_counter() at arrival
    bodies: list[dict] = field(default_factory=list)
    active: int = 0
    peak: int = 0
    warm_ups: int = 0  # lowbit's untimed warm-up requests: served, counted, not recorded above

    def reset(self) -> None:
        self.arrivals.clear()
        self.bodies.clear()
        self.active = self.peak = self.warm_ups = 0


def _app(state: State) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "fake-model", "object": "model", "created": 0,
                                            "owned_by": "test", "root": "fake-model"}]}

    async def handle(request: Request, chat: bool):
        arrived = time.perf_counter()
        loop_t0 = asyncio.get_running_loop().time()
        body = await request.json()
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        if prompt == WARM_UP_PROMPT:
            state.warm_ups += 1
        else:
            state.arrivals.append(arrived)
            state.bodies.append(body)
        if "FAIL500" in prompt:
            return JSONResponse({"error": {"message": "injected failure", "type": "server_error",
                                           "code": 500}}, status_code=500)
        n = body.get("max_tokens") or 16
        ttft = state.slow_ttft if "SLOW" in prompt else state.ttft
        usage = (body.get("stream_options") or {}).get("include_usage") and "NOUSAGE" not in prompt
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text, finish=None, role=False):
            if chat:
                delta = {"role": "assistant", "content": ""} if role else {"content": text}
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            return "data: " + json.dumps({"id": "x", "object": kind, "created": 0,
                                          "model": body["model"], "choices": [choice]}) + "\n\n"

        async def events():
            state.active += 1
            state.peak = max(state.peak, state.active)
            loop = asyncio.get_running_loop()
            try:
                if chat:
                    yield chunk("", role=True)  # the role announcement comes at once
                for k in range(n):
                    await asyncio.sleep(max(0.0, loop_t0 + ttft + k * state.itl - loop.time()))
                    if "DROP" in prompt and k == 2:
                        raise ConnectionAbortedError("injected: connection dropped mid-stream")
                    if "HANG" in prompt and k == 1:
                        await asyncio.sleep(30)
                    yield chunk(f"tok{k} ", "length" if k == n - 1 else None)
                if usage:
                    u = {"prompt_tokens": 7, "completion_tokens": n, "total_tokens": 7 + n}
                    yield "data: " + json.dumps({"id": "x", "object": kind, "created": 0,
                                                 "model": body["model"], "choices": [],
                                                 "usage": u}) + "\n\n"
                yield "data: [DONE]\n\n"
            finally:
                state.active -= 1

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, chat=True)

    return app


class FakeServer:
    """Runs the app with uvicorn on 127.0.0.1 (a free port) in a thread; `url`, `state`, `close()`."""

    def __init__(self) -> None:
        self.state = State()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        config = uvicorn.Config(_app(self.state), log_level="critical", timeout_graceful_shutdown=1)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the fake server did not start")
            time.sleep(0.01)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)
