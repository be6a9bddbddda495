"""Helpers for the serving tests: a server on 127.0.0.1 in a thread, SSE reading, metrics."""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time

import httpx2 as httpx
import uvicorn

from lowbit.serving.app import build_app


@contextlib.contextmanager
def running(engine, name: str = "m", api_key: str | None = None):
    """The app for `engine` served by uvicorn on a free port in a thread; yields its base URL."""
    server = uvicorn.Server(uvicorn.Config(build_app(engine, name, api_key), host="127.0.0.1",
                                           port=0, log_level="warning", timeout_keep_alive=5))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:  # uvicorn sets it once the socket listens
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def sse(lines) -> tuple[list[dict], bool]:
    """Parsed `data:` events of a server-sent event stream, and whether it ended in [DONE]."""
    events, done = [], False
    for line in lines:
        if not line.startswith("data: "):
            continue
        assert not done, "an event after [DONE]"
        if line == "data: [DONE]":
            done = True
        else:
            events.append(json.loads(line[6:]))
    return events, done


def metric(base: str, name: str) -> float:
    text = httpx.get(f"{base}/metrics").text
    found = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    assert found, f"{name} not in /metrics"
    return float(found.group(1))


def wait_for(condition, timeout: float = 20.0) -> bool:
    """Poll `condition` until it holds (True) or `timeout` passes (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False
