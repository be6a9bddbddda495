"""Text generation on a loaded model, one request at batch 1, top to bottom:

    ids = encode(prompt)                              # chat messages through the chat template
    cache = static_cache(model, len(ids) + max_tokens)  # preallocated once
    logits = prefill(ids, in chunks)                  # bounded activation memory for long prompts
    loop: token = pick(logits) -> yield its text -> logits = forward(token)

Stop strings are matched on the decoded text, so a stop string split across tokens is found;
text that could still turn into a stop string (or is an unfinished UTF-8 character) is held back
until the next token decides it.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import LowbitError
from .compiled import cache_len, decode_step
from .kv_cache import static_cache

PREFILL_CHUNK = 256  # prompt tokens per forward during prefill


@dataclass
class Generation:
    """One request's result: the new text and tokens, why it ended, and where the time went."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)  # new tokens only (an ending EOS included)
    prompt_tokens: int = 0
    finish_reason: str = "length"  # "length" (max_tokens), "eos" or "stop" (a stop string)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0  # the forwards after the first new token
    decode_steps: int = 0
    compile_seconds: float = 0.0  # torch.compile of the decode step before this request (compile=True)


@dataclass(frozen=True)
class Options:
    """One request's sampling and ending rules, checked (see options())."""

    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: tuple[str, ...]
    ignore_eos: bool


def options(max_tokens, temperature=0.0, top_p=1.0, top_k=0, seed=None, stop=(),
            ignore_eos=False) -> Options:
    """Options from plain values; LowbitError naming the first one out of range."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise LowbitError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    if not temperature >= 0:  # also catches NaN
        raise LowbitError(f"temperature must be >= 0 (0 is greedy), got {temperature!r}")
    if not 0 < top_p <= 1:
        raise LowbitError(f"top_p must be in (0, 1], got {top_p!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise LowbitError(f"top_k must be a non-negative integer (0: no limit), got {top_k!r}")
    stop = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if any(not isinstance(s, str) or not s for s in stop):
        raise LowbitError(f"stop strings must be non-empty strings, got {list(stop)!r}")
    return Options(max_tokens, float(temperature), float(top_p), top_k, seed, stop, ignore_eos)


def model_and_tokenizer(model_or_path, tokenizer, dtype) -> tuple[nn.Module, object]:
    from ..checkpoint import Checkpoint, load_tokenizer

    if isinstance(model_or_path, nn.Module):
        if tokenizer is None:
            where = getattr(model_or_path.config, "_name_or_path", "")
            if not where or not (Path(where) / "config.json").is_file():
                raise LowbitError("pass tokenizer=: the model does not say which directory it came from")
            tokenizer = load_tokenizer(where)
        return model_or_path, tokenizer
    path = Path(model_or_path)
    if not (path / "config.json").is_file():
        raise LowbitError(f"model {path} has no config.json (not a checkpoint directory)")
    from ..hardware import compute_dtype
    from .load import load_model

    if isinstance(dtype, str):
        dtype = compute_dtype(Checkpoint(path, allow_quantized=True).dtype, dtype).dtype
    return load_model(path, dtype, packed=True), tokenizer or load_tokenizer(path)


def encode(tokenizer, prompt) -> list[int]:
    """A string as the tokenizer encodes it (with its BOS), token ids as they are, or chat
    messages through the chat template with the assistant's turn opened."""
    if isinstance(prompt, str):
        ids = tokenizer(prompt)["input_ids"]
    elif isinstance(prompt, Sequence) and prompt and all(type(t) is int for t in prompt):
        ids = prompt  # token ids, used as they are
    elif isinstance(prompt, Sequence) and all(isinstance(m, dict) and "role" in m and "content" in m
                                              for m in prompt) and prompt:
        if not getattr(tokenizer, "chat_template", None):
            raise LowbitError("this model's tokenizer has no chat template: pass the prompt as a string")
        text = tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # the template has its BOS
    else:
        raise LowbitError("prompt must be a string, a list of token ids or a list of chat "
                          "messages ({'role': ..., 'content': ...})")
    if not ids:
        raise LowbitError("the prompt encodes to no tokens")
    return list(ids)


def eos_ids(model: nn.Module, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        ids.update(value if isinstance(value, list) else [] if value is None else [value])
    return ids


def pick(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
         generator: torch.Generator | None) -> int:
    """The next token from last-position logits [vocab]: the argmax when temperature is 0, else
    a draw from softmax(logits / temperature) restricted to the top_k most likely tokens (0: all)
    and then to the smallest set whose probability reaches top_p (nucleus sampling)."""
    if temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if 0 < top_k < logits.numel():
        logits = logits.masked_fill(logits < torch.topk(logits, top_k).values[-1], float("-inf"))
    if top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # tokens after the set has reached top_p
        logits = logits.index_put((order[drop],), torch.tensor(float("-inf")))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters of `text` might still be the start of a stop string."""
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest


class StopText:
    """The text of a growing list of new tokens, released piece by piece once it is final.

    Stop strings are matched on the decoded text, so one split across tokens is found; text that
    could still become a stop string (or is an unfinished UTF-8 character) is held back until a
    later token decides it. Shared by generate() and the serving engine.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer, self.stop = tokenizer, stop
        self.text, self.emitted, self.stopped = "", 0, False

    def update(self, token_ids: list[int]) -> str:
        """Decode the tokens so far; the newly final text ("" if none). Sets `stopped` (and cuts
        `text` before it) when a stop string appears."""
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        hits = [i for i in (text.find(s, max(0, self.emitted - len(s))) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = text[:min(hits)], True
            return ""
        self.text = text
        final = len(text) - text.endswith("\ufffd")  # maybe an unfinished UTF-8 character, and
        final -= _held_back(text[:final], self.stop)  # before it maybe the start of a stop string
        if final <= self.emitted:
            return ""
        piece, self.emitted = text[self.emitted:final], final
        return piece

    def rest(self) -> str:
        """What is still held back, released at the end of the completion."""
        piece, self.emitted = self.text[self.emitted:], len(self.text)
        return piece


def ending(token_ids: list[int], eos: set[int], text: StopText, max_tokens: int) -> tuple[str | None, str]:
    """After a new token (the last of `token_ids`): why the request ends now ("eos", "stop",
    "length") or None, and the text that became final. One rule for generate(), the serving
    engine and generate_batch()."""
    if token_ids[-1] in eos:
        return "eos", ""
    piece = text.update(token_ids)
    if text.stopped:
        return "stop", ""
    return ("length" if len(token_ids) >= max_tokens else None), piece


def _cache_kwarg(model: nn.Module) -> str:
    # transformers 5 renamed past_key_values to cache in later releases
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _run(model: nn.Module, tokenizer, ids: list[int], o: Options, out: Generation,
         compiled: bool = False) -> Iterator[str]:
    """Generate into `out`, yielding each piece of text as soon as it is final; `compiled`:
    decode steps through torch.compile (runtime/compiled.py)."""
    generator = None
    if o.seed is not None:
        generator = torch.Generator().manual_seed(o.seed)
    eos = set() if o.ignore_eos else eos_ids(model, tokenizer)
    n = len(ids)
    length, one_token = n + o.max_tokens, model
    if compiled:
        length = cache_len(model, length)
        one_token, out.compile_seconds = decode_step(model, length)
    cache, key = static_cache(model, length), _cache_kwarg(model)

    def forward(chunk: list[int], start: int) -> torch.Tensor:
        positions = torch.arange(start, start + len(chunk)).unsqueeze(0)
        f = one_token if len(chunk) == 1 else model
        return f(input_ids=torch.tensor([chunk]), position_ids=positions, use_cache=True,
                 logits_to_keep=1, **{key: cache}).logits[0, -1]

    out.prompt_tokens = n
    clock = time.perf_counter()
    for start in range(0, n, PREFILL_CHUNK):
        logits = forward(ids[start:start + PREFILL_CHUNK], start)
    out.prefill_seconds = time.perf_counter() - clock
    clock, text = time.perf_counter(), StopText(tokenizer, o.stop)
    for step in range(o.max_tokens):
        token = pick(logits, o.temperature, o.top_k, o.top_p, generator)
        out.token_ids.append(token)
        reason, piece = ending(out.token_ids, eos, text, o.max_tokens)
        if piece:
            yield piece
        if reason:
            out.finish_reason = reason
            break
        logits = forward([token], n + step)
        out.decode_steps += 1
    out.decode_seconds = time.perf_counter() - clock
    out.text = text.text
    rest = text.rest()
    if rest:
        yield rest


def stream(model_or_path, prompt, *, max_tokens: int = 256, temperature: float = 0.0,
           top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
           stop: str | Sequence[str] = (), ignore_eos: bool = False, tokenizer=None,
           dtype: torch.dtype | str = "auto", result: Generation | None = None,
           compile: bool = False) -> Iterator[str]:
    """Yield the text of a completion piece by piece as it is generated. Arguments as for
    generate(); pass a Generation as `result` to have it filled in."""
    o = options(max_tokens, temperature, top_p, top_k, seed, stop, ignore_eos)
    model, tokenizer = model_and_tokenizer(model_or_path, tokenizer, dtype)
    ids = encode(tokenizer, prompt)
    with torch.inference_mode():
        yield from _run(model, tokenizer, ids, o, result if result is not None else Generation(), compile)


def generate(model_or_path, prompt, *, max_tokens: int = 256, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
             stop: str | Sequence[str] = (), ignore_eos: bool = False, tokenizer=None,
             dtype: torch.dtype | str = "auto", compile: bool = False) -> Generation:
    """Complete `prompt` (a string, token ids, or chat messages [{"role", "content"}] rendered
    with the model's chat template) with a loaded model or a checkpoint directory (loaded with
    lowbit.load in `dtype`). Greedy when `temperature` is 0; otherwise sampled with `top_k`
    (0: off) and `top_p`, reproducibly for a given `seed`. Ends after `max_tokens` new tokens,
    at an end-of-sequence token (unless `ignore_eos`) or before the first of the `stop` strings.
    `compile`: decode steps through torch.compile (faster per token after a compile of tens
    of seconds, once per model; runtime/compiled.py). Returns a Generation with `.text` and
    `.token_ids` (the new tokens)."""
    out = Generation()
    for _ in stream(model_or_path, prompt, max_tokens=max_tokens, temperature=temperature,
                    top_p=top_p, top_k=top_k, seed=seed, stop=stop, ignore_eos=ignore_eos,
                    tokenizer=tokenizer, dtype=dtype, result=out, compile=compile):
        pass
    return out
