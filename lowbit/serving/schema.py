"""OpenAI's wire format: request bodies read into plain parameters, with a 4xx ApiError naming
the first field that is wrong, and the response objects (whole and streamed). Written out by
hand, not as pydantic models, so that every error is OpenAI's shape with the offending `param`,
and types are strict (a string max_tokens is an error, not coerced)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

# the engine's reasons as OpenAI's finish_reason
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "abort", "error": "abort"}


class ApiError(Exception):
    """An HTTP error in OpenAI's JSON shape."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.kind, self.param, self.code, self.headers = status, kind, param, code, headers


@dataclass(frozen=True)
class Params:
    """What a completion request asks for, checked."""

    prompt: object  # a string, token ids, or chat messages
    max_tokens: int | None  # None: the rest of the context (chat's default)
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: tuple[str, ...]
    ignore_eos: bool
    stream: bool
    include_usage: bool
    logprobs: bool


def _bad(param: str, what: str) -> ApiError:
    return ApiError(400, f"'{param}' must be {what}", param=param)


def _number(body: dict, name: str, default, low: float, high: float):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise _bad(name, f"a number in [{low}, {high}]")
    return value


def _int(body: dict, name: str, default, low: int = 0, high: int | None = None):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        raise _bad(name, f"an integer >= {low}" + (f" and <= {high}" if high is not None else ""))
    return value


def _bool(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _bad(name, "true or false")
    return value


def _common(body: dict, model: str, prompt, max_tokens, logprobs: bool) -> Params:
    name = body.get("model")
    if not isinstance(name, str):
        raise _bad("model", "a string")
    if name != model:
        raise ApiError(404, f"model {name!r} does not exist; this server serves {model!r}",
                       param="model", code="model_not_found")
    if _int(body, "n", 1, low=1) != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    stop = body.get("stop")
    stop = (stop,) if isinstance(stop, str) else stop
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop)):
        raise _bad("stop", "a non-empty string or a list of them")
    top_k = body.get("top_k")
    top_k = 0 if top_k == -1 else _int(body, "top_k", 0)  # vLLM's extension; -1 is off
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _bad("stream_options", "an object")
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise _bad("top_p", "in (0, 1]")
    return Params(prompt, max_tokens, float(_number(body, "temperature", 1.0, 0.0, 2.0)), float(top_p),
                  top_k, _int(body, "seed", None, -(2**63), 2**64 - 1), tuple(stop or ()),
                  _bool(body, "ignore_eos"), _bool(body, "stream"),
                  bool(options and _bool(options, "include_usage")), logprobs)


def completion_params(body: dict, model: str) -> Params:
    """POST /v1/completions: `prompt` is a string, one string in a list, or token ids."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    tokens = isinstance(prompt, list) and prompt and all(type(t) is int and t >= 0 for t in prompt)
    if not (isinstance(prompt, str) and prompt) and not tokens:
        raise _bad("prompt", "a non-empty string or a list of token ids (one prompt per request)")
    logprobs = body.get("logprobs")
    if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)
                                 or not 0 <= logprobs <= 5):
        raise _bad("logprobs", "an integer in [0, 5]")
    return _common(body, model, prompt, _int(body, "max_tokens", 16, low=1), logprobs is not None)


def chat_params(body: dict, model: str) -> Params:
    """POST /v1/chat/completions: `messages` with string (or text-part) contents."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "a non-empty list of {role, content} objects")
    plain = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _bad("messages", "a list of objects with a string 'role'")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str)
                       for c in content):
                raise _bad("messages", "text content (string, or parts of type 'text')")
            content = "".join(c["text"] for c in content)
        if not isinstance(content, str):
            raise _bad("messages", "objects whose 'content' is a string")
        plain.append({"role": m["role"], "content": content})
    max_tokens = _int(body, "max_completion_tokens", None, low=1)
    max_tokens = _int(body, "max_tokens", max_tokens, low=1)
    return _common(body, model, plain, max_tokens, _bool(body, "logprobs"))


class Shape:
    """OpenAI's response objects for one request (completion or chat, whole or streamed)."""

    def __init__(self, rid: str, model: str, chat: bool, tokenizer):
        self.rid, self.model, self.chat, self.tokenizer = rid, model, chat, tokenizer
        self.created, self.offset = int(time.time()), 0
        self.object = "chat.completion" if chat else "text_completion"

    @staticmethod
    def sse(obj: dict) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    @staticmethod
    def usage(req) -> dict:
        n, m = len(req.ids), len(req.token_ids)
        return {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m}

    def chunk(self, text: str, finish: str | None, role: bool = False, lp: dict | None = None) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": lp, "finish_reason": finish}
        return {"id": self.rid, "object": self.object + ".chunk" if self.chat else self.object,
                "created": self.created, "model": self.model, "choices": [choice]}

    def logprobs(self, req, start: int, end: int) -> dict:
        """Log-probs of new tokens start..end-1 (the chosen ones only, under the model's own,
        untempered distribution), as chat's `content` list or completions' parallel lists."""
        tokens = [self.tokenizer.decode([t]) for t in req.token_ids[start:end]]
        values = req.logprobs[start:end]
        if self.chat:
            return {"content": [{"token": t, "logprob": v, "bytes": list(t.encode()), "top_logprobs": []}
                                for t, v in zip(tokens, values)]}
        offsets = []
        for t in tokens:  # offsets into the whole completion's text
            offsets.append(self.offset)
            self.offset += len(t)
        return {"tokens": tokens, "token_logprobs": values, "text_offset": offsets,
                "top_logprobs": [{t: v} for t, v in zip(tokens, values)]}

    def whole(self, req, text: str, logprobs: bool) -> dict:
        finish = FINISH[req.finish_reason]
        lp = self.logprobs(req, 0, len(req.token_ids)) if logprobs else None
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": lp, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": lp, "finish_reason": finish}
        return {"id": self.rid, "object": self.object, "created": self.created, "model": self.model,
                "choices": [choice], "usage": self.usage(req)}
