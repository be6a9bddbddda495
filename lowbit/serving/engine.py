"""The continuous-batching step loop (vLLM's shape, in one thread): a request is a small object
with state, and each step of the scheduler

    admits waiting requests into free cache slots    (at a token boundary, never mid-step)
    drops cancelled ones, freeing their slots at once
    runs one padded forward of admitted prompts' next chunks (at most 2 x prefill_chunk
                                                     tokens, so a long prompt stalls no one long)
    runs ONE decode forward for every running request (runtime/batch.py, mixed positions)
    samples each row with its own options, releases text, ends finished requests

so a new request never waits for another to finish. Sampling, stop strings and the UTF-8
hold-back are runtime/generate.py's (pick, StopText): the server and `lowbit generate` agree.
Nothing here parses HTTP: callers get text through `on_event(request, piece)`, called on the
engine thread after each of the request's tokens and once more when it ends.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import LowbitError
from ..runtime.batch import PREFILL_CHUNK, BatchDecoder
from ..runtime.generate import Options, StopText, encode, ending, eos_ids, model_and_tokenizer, pick

log = logging.getLogger("lowbit.serving")
_ids = itertools.count()


class QueueFull(LowbitError):
    """Every slot is busy and the waiting queue is at its limit: retry later."""


class TooLong(LowbitError):
    """The prompt plus max_tokens does not fit the positions a request may hold."""


class Draining(LowbitError):
    """The engine is finishing its requests before shutting down and takes no new ones."""


@dataclass(eq=False)
class Request:
    """One completion in flight: its prompt, options, state and what it has produced so far."""

    ids: list[int]
    options: Options
    on_event: Callable[[Request, str], None] | None = None
    id: int = field(default_factory=lambda: next(_ids))
    state: str = "waiting"  # waiting -> prefill -> running -> done
    slot: int | None = None
    prefilled: int = 0  # prompt tokens already in the cache
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # log p of each chosen token, unsampled model
    text: StopText | None = None
    finish_reason: str | None = None  # length, eos, stop, cancelled, error
    arrived: float = field(default_factory=time.perf_counter)
    token_times: list[float] = field(default_factory=list)
    admitted_step: int | None = None
    finished_step: int | None = None
    cancelled: bool = False
    generator: torch.Generator | None = None

    @property
    def ttft(self) -> float | None:
        """Seconds from arrival to the first new token."""
        return self.token_times[0] - self.arrived if self.token_times else None

    @property
    def itl(self) -> list[float]:
        """Seconds between consecutive new tokens."""
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]


class Engine:
    """A model served to many requests at once: submit() from any thread; a scheduler thread
    runs steps while there is work."""

    def __init__(self, model, tokenizer, *, max_batch: int = 8, max_len: int = 2048,
                 max_waiting: int = 64, prefill_chunk: int = PREFILL_CHUNK):
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        limit = getattr(config, "max_position_embeddings", None) or max_len
        self.decoder = BatchDecoder(model, max_batch, min(max_len, limit))
        self.tokenizer, self.max_len = tokenizer, self.decoder.max_len
        self.max_batch, self.max_waiting, self.prefill_chunk = max_batch, max_waiting, prefill_chunk
        self.eos = eos_ids(model, tokenizer)
        self.vocab_size = self.decoder.base.embed_tokens.num_embeddings
        self.steps = 0
        self._cond = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()
        self._active: list[Request] = []  # holding a slot: prefill or running
        self._free = list(range(max_batch))
        self._accepting, self._stopping = True, False
        self._thread = threading.Thread(target=self._loop, name="lowbit-engine", daemon=True)
        self._thread.start()

    @classmethod
    def load(cls, path, dtype: torch.dtype | str = "auto", **kwargs) -> Engine:
        """An engine on a checkpoint directory, loaded with lowbit's runtime (packed Linears)."""
        model, tokenizer = model_and_tokenizer(path, None, dtype)
        return cls(model, tokenizer, **kwargs)

    def encode(self, prompt) -> list[int]:
        """A string, token ids, or chat messages (through the chat template) as token ids."""
        return encode(self.tokenizer, prompt)

    @property
    def running(self) -> int:
        return len(self._active)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(self, ids: list[int], options: Options,
               on_event: Callable[[Request, str], None] | None = None) -> Request:
        """Queue a completion of token ids; QueueFull, Draining, TooLong, or LowbitError for ids
        outside the vocabulary."""
        if any(not 0 <= t < self.vocab_size for t in ids):
            raise LowbitError(f"token ids must be in [0, {self.vocab_size}): the model's vocabulary")
        if len(ids) + options.max_tokens > self.max_len:
            raise TooLong(f"the prompt ({len(ids)} tokens) plus max_tokens ({options.max_tokens}) "
                              f"is beyond the {self.max_len} positions this server holds per "
                              "request: shorten the prompt or lower max_tokens")
        r = Request(list(ids), options, on_event)
        if options.seed is not None:
            r.generator = torch.Generator().manual_seed(options.seed)
        r.text = StopText(self.tokenizer, options.stop)
        with self._cond:
            if not self._accepting:
                raise Draining("the server is shutting down and takes no new requests")
            if len(self._waiting) >= self.max_waiting + len(self._free):  # free slots take some
                raise QueueFull(f"{len(self._waiting)} requests are waiting already: retry later")
            self._waiting.append(r)
            self._cond.notify_all()
        return r

    def cancel(self, r: Request) -> None:
        """Stop a request (its client went away): a waiting one leaves the queue now, a running
        one gives its slot back at the next token boundary."""
        with self._cond:
            if r.state == "done":
                return
            r.cancelled = True
            if r in self._waiting:
                self._waiting.remove(r)
                self._finish(r, "cancelled")
            self._cond.notify_all()

    def drain(self, timeout: float | None = None) -> bool:
        """Take no new requests; wait until the queued and running ones are done (True) or
        `timeout` passes (False)."""
        with self._cond:
            self._accepting = False
            return self._cond.wait_for(lambda: not self._waiting and not self._active, timeout)

    def close(self) -> None:
        """Stop the scheduler thread (requests still in flight end as cancelled)."""
        with self._cond:
            self._accepting, self._stopping = False, True
            self._cond.notify_all()
        self._thread.join()

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._waiting or self._active or self._stopping)
                if self._stopping:
                    for r in [*self._waiting, *self._active]:
                        self._finish(r, "cancelled")
                    return
                for r in [r for r in self._active if r.cancelled]:
                    self._finish(r, "cancelled")
                while self._waiting and self._free:
                    r = self._waiting.popleft()
                    r.slot, r.state, r.admitted_step = self._free.pop(), "prefill", self.steps
                    self._active.append(r)
                batch = list(self._active)
            try:
                self._step(batch)
            except Exception:  # a bug or an out-of-memory: fail these requests, keep serving
                log.exception("engine step failed; ending the %d requests in it", len(batch))
                with self._cond:
                    for r in batch:
                        self._finish(r, "error")
            self.steps += 1

    def _step(self, batch: list[Request]) -> None:
        running = [r for r in batch if r.state == "running"]
        take, width = [], 0  # prompt pieces for one padded forward, within the token budget
        for r in (r for r in batch if r.state == "prefill"):
            piece = r.ids[r.prefilled:r.prefilled + self.prefill_chunk]
            if take and (len(take) + 1) * max(width, len(piece)) > self.prefill_chunk * 2:
                break
            take.append((r, piece))
            width = max(width, len(piece))
        if take:  # so running requests keep their pace while long prompts come in
            logits = self.decoder.prefill_many([r.slot for r, _ in take], [p for _, p in take],
                                               [r.prefilled for r, _ in take])
            for (r, piece), row in zip(take, logits):
                r.prefilled += len(piece)
                if r.prefilled == len(r.ids):
                    r.state = "running"
                    self._emit(r, row)
        if running:
            logits = self.decoder.decode([r.slot for r in running], [r.token_ids[-1] for r in running],
                                         [len(r.ids) + len(r.token_ids) - 1 for r in running])
            for r, row in zip(running, logits):
                self._emit(r, row)

    def _emit(self, r: Request, logits: torch.Tensor) -> None:
        """Sample the request's next token, release its text, end it if it is done."""
        o = r.options
        token = pick(logits, o.temperature, o.top_k, o.top_p, r.generator)
        r.token_times.append(time.perf_counter())
        r.token_ids.append(token)
        r.logprobs.append(float(torch.log_softmax(logits.float(), -1)[token]))
        reason, piece = ending(r.token_ids, set() if o.ignore_eos else self.eos, r.text, o.max_tokens)
        if reason is None and piece:
            _notify(r, piece)
        if reason is not None:
            with self._cond:
                self._finish(r, reason, piece)

    def _finish(self, r: Request, reason: str, piece: str = "") -> None:
        """End a request (the lock held): free its slot, deliver `piece` (the last token's text)
        and whatever was held back."""
        if r.state == "done":
            return
        if r in self._active:
            self._active.remove(r)
            self._free.append(r.slot)
        r.state, r.finish_reason, r.finished_step = "done", reason, self.steps
        self._cond.notify_all()
        _notify(r, piece + r.text.rest() if reason in ("eos", "stop", "length") else "")


def _notify(r: Request, piece: str) -> None:
    if r.on_event is None:
        return
    try:
        r.on_event(r, piece)
    except Exception:  # the caller's problem must not stop the engine
        log.exception("on_event failed for request %d", r.id)
