"""The OpenAI-compatible HTTP surface over an Engine: requests are checked here and turned into
token ids and options; the engine does the rest. Nothing here touches a tensor.

Routes: GET /v1/models, POST /v1/completions and /v1/chat/completions (stream: true as
server-sent events ending in `data: [DONE]`), GET /health, GET /metrics (Prometheus).
Every error is OpenAI's JSON shape, {"error": {"message", "type", "param", "code"}}, with a 4xx
status for what the client can fix and 429/503 with Retry-After when the server is full or
shutting down; an exception inside a request never takes the server down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import socket
import time
import uuid

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException

from ..errors import LowbitError
from ..runtime.generate import options
from .engine import Draining, Engine, QueueFull, TooLong
from .schema import FINISH, ApiError, Shape, chat_params, completion_params

MAX_BODY = 1_000_000  # bytes; a request body beyond this is refused with 413 before it is parsed
RETRY_AFTER = "1"  # seconds; a full queue drains at decode speed


class _Metrics:
    """Prometheus series in a registry of this app's own (two servers in one process, as in the
    tests, must not share counters)."""

    def __init__(self, engine: Engine):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("lowbit_requests", "Finished requests by outcome", ["outcome"], registry=r)
        self.errors = Counter("lowbit_request_errors", "Requests refused, by HTTP status", ["status"],
                              registry=r)
        self.prompt_tokens = Counter("lowbit_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("lowbit_generation_tokens", "Tokens generated", registry=r)
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.ttft = Histogram("lowbit_time_to_first_token_seconds", "Time to first token",
                              buckets=buckets, registry=r)
        self.itl = Histogram("lowbit_inter_token_latency_seconds", "Time between output tokens",
                             buckets=buckets, registry=r)
        self.e2e = Histogram("lowbit_e2e_request_latency_seconds", "Arrival to last token",
                             buckets=buckets, registry=r)
        Gauge("lowbit_num_requests_running", "Requests holding a batch slot",
              registry=r).set_function(lambda: engine.running)
        Gauge("lowbit_num_requests_waiting", "Requests queued for a slot",
              registry=r).set_function(lambda: engine.waiting)

    def finished(self, req) -> None:
        self.requests.labels(req.finish_reason).inc()
        self.prompt_tokens.inc(len(req.ids))
        self.generation_tokens.inc(len(req.token_ids))
        if req.ttft is not None:
            self.ttft.observe(req.ttft)
            self.e2e.observe(req.token_times[-1] - req.arrived)
        for gap in req.itl:
            self.itl.observe(gap)


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
           code: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


async def _json_body(request: Request) -> dict:
    """The body as a JSON object: 413 past MAX_BODY (counted as it arrives), 400 when it is not
    UTF-8, not JSON, or not an object."""
    declared = request.headers.get("content-length", "0")
    if not declared.isdigit():
        raise ApiError(400, "Content-Length is not a number")
    if int(declared) > MAX_BODY:
        raise ApiError(413, f"request body is {declared} bytes; the limit is {MAX_BODY}")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY:
            raise ApiError(413, f"request body is over the {MAX_BODY}-byte limit")
    try:
        body = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ApiError(400, "request body is not UTF-8") from None
    except ValueError as e:
        raise ApiError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read: receive() waits for that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def build_app(engine: Engine, model_name: str, api_key: str | None = None) -> FastAPI:
    """The FastAPI application serving `engine` as model `model_name`; with `api_key`, /v1
    routes need `Authorization: Bearer <api_key>`."""
    @contextlib.asynccontextmanager
    async def lifespan(_):
        yield
        # uvicorn has stopped accepting and finished its connections: let the engine empty out
        await asyncio.to_thread(engine.drain, 60)

    app = FastAPI(title="lowbit serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    metrics = _Metrics(engine)
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(_, e: ApiError):
        metrics.errors.labels(str(e.status)).inc()
        return _error(e.status, str(e), e.kind, e.param, e.code, e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(_, e: HTTPException):  # 404 and 405 in OpenAI's shape too
        return _error(e.status_code, str(e.detail), "invalid_request_error")

    @app.exception_handler(Exception)
    async def bug(_, e: Exception):
        return _error(500, f"internal error: {type(e).__name__}: {e}", "internal_error")

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise ApiError(401, "missing or wrong API key (Authorization: Bearer <key>)",
                           "authentication_error", code="invalid_api_key")

    @app.get("/health")
    async def health():
        return {"status": "ok", "running": engine.running, "waiting": engine.waiting}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "lowbit", "max_model_len": engine.max_len}]}

    async def complete(request: Request, chat: bool):
        authorize(request)
        body = await _json_body(request)
        p = (chat_params if chat else completion_params)(body, model_name)
        try:
            ids = await asyncio.to_thread(engine.encode, p.prompt)  # a long prompt blocks no stream
            max_tokens = p.max_tokens or max(1, engine.max_len - len(ids))  # chat: the rest
            opts = options(max_tokens, p.temperature, p.top_p, p.top_k, p.seed, p.stop, p.ignore_eos)
        except LowbitError as e:
            raise ApiError(400, str(e)) from None
        except Exception as e:  # the chat template's own checks (roles, alternation) raise
            raise ApiError(400, f"the prompt could not be encoded: {type(e).__name__}: {e}") from None
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        # (text, ended, tokens so far) read on the engine thread, when they are true
        on_event = lambda r, piece: loop.call_soon_threadsafe(
            queue.put_nowait, (piece, r.state == "done", len(r.token_ids)))
        try:
            req = engine.submit(ids, opts, on_event)
        except QueueFull as e:
            raise ApiError(429, str(e), "rate_limit_error", headers={"Retry-After": RETRY_AFTER}) from None
        except Draining as e:
            raise ApiError(503, str(e), "service_unavailable", headers={"Retry-After": RETRY_AFTER}) from None
        except TooLong as e:
            raise ApiError(400, str(e), code="context_length_exceeded") from None
        except LowbitError as e:
            raise ApiError(400, str(e)) from None
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        shape = Shape(rid, model_name, chat, engine.tokenizer)
        if p.stream:
            return StreamingResponse(_events(engine, req, queue, shape, p, metrics),
                                     media_type="text/event-stream")
        collect = asyncio.ensure_future(_collect(queue))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not collect.done():  # the client left (or we are cancelled): free the slot now
                collect.cancel()
                engine.cancel(req)
                metrics.requests.labels("cancelled").inc()
        if collect.cancelled():
            return Response(status_code=499)  # nobody is listening
        metrics.finished(req)
        return shape.whole(req, collect.result(), p.logprobs)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    return app


async def _collect(queue: asyncio.Queue) -> str:
    text = []
    while True:
        piece, done, _ = await queue.get()
        text.append(piece)
        if done:
            return "".join(text)


async def _events(engine: Engine, req, queue: asyncio.Queue, shape, p, metrics):
    """Server-sent events: a chunk per released piece, the finish reason, [DONE]. A client that
    disconnects cancels this generator (Starlette), and the finally frees its slot."""
    try:
        if shape.chat:
            yield shape.sse(shape.chunk("", None, role=True))
        sent = 0  # tokens whose log-probs went out with earlier pieces
        while True:
            piece, done, n = await queue.get()
            if piece:
                yield shape.sse(shape.chunk(piece, None, lp=shape.logprobs(req, sent, n) if p.logprobs else None))
                sent = n
            if done:
                break
        rest = shape.logprobs(req, sent, n) if p.logprobs and n > sent else None  # e.g. an EOS
        yield shape.sse(shape.chunk("", FINISH[req.finish_reason], lp=rest))
        if p.include_usage:
            yield shape.sse({**shape.chunk("", None), "choices": [], "usage": shape.usage(req)})
        yield "data: [DONE]\n\n"
    finally:
        if req.state != "done":
            engine.cancel(req)
            metrics.requests.labels("cancelled").inc()
        else:
            metrics.finished(req)


def check_address(host: str, port: int) -> None:
    """LowbitError now, before a model is loaded, if nothing can listen on host:port."""
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        raise LowbitError(f"cannot listen on {host}:{port}: {e.strerror or e} (another server there? "
                          "choose --port)") from None


def run(app: FastAPI, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until SIGINT/SIGTERM; then stop accepting, finish in-flight requests, exit."""
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_keep_alive=5)
