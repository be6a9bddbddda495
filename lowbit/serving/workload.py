"""The requests a serving benchmark sends: ShareGPT conversations sampled as vLLM samples them.

vLLM's rule (vllm/benchmarks/datasets.py, ShareGPTDataset): keep conversations of two or more
turns, shuffle them with `random.seed(seed)`, take each one's first turn as the prompt and the
token length of its second turn (the reply) as the output length, and skip a pair whose prompt
or reply is under 4 tokens, whose prompt is over 1024, or whose prompt + reply is over 2048
(`is_valid_sequence`). Lengths are counted with the model's tokenizer called as vLLM calls it
(`tokenizer(text).input_ids`, special tokens included). With the same records, seed and
tokenizer, the same requests come out in the same order.

`--dataset sharegpt` uses only the held-out "eval" part (lowbit.data's fixed split), so a
benchmark never replays calibration data; a FILE uses all its usable records.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

from ..data import Records, read_records, split
from ..errors import LowbitError

log = logging.getLogger(__name__)

MIN_LEN, MAX_PROMPT_LEN, MAX_TOTAL_LEN = 4, 1024, 2048  # vLLM's is_valid_sequence defaults


@dataclass(frozen=True)
class Request:
    """One benchmark request: the prompt, its length in tokens, the tokens to ask for, and the
    dataset's own reply (MLPerf's accuracy mode scores against it)."""

    prompt: str
    prompt_len: int
    output_len: int
    reference: str


def _length(tokenizer, text: str) -> int:
    # verbose=False: long replies exceed model_max_length on purpose, they are only counted
    return len(tokenizer(text, verbose=False).input_ids)


def _fixed_prompt(tokenizer, text: str, input_len: int) -> str:
    """`text`'s tokens repeated or cut to `input_len`, decoded: real text of the asked length
    (re-encoding may merge a token or two at the seams; the measured length is what is reported)."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False).input_ids
    ids = (ids * (input_len // max(len(ids), 1) + 1))[:input_len]
    return tokenizer.decode(ids)


def sample(tokenizer, dataset: str | Records, num: int, *, seed: int = 0, input_len: int | None = None,
           output_len: int | None = None) -> list[Request]:
    """`num` requests from `dataset` by vLLM's rule: "sharegpt" (its eval part), a path
    lowbit.data reads (all of it), or Records already read (all of them).

    `input_len` / `output_len` replace the conversation's own lengths (the prompt's tokens are
    repeated or cut to `input_len`; the length filters then apply only to what is not fixed).
    Fewer usable pairs than `num` are repeated in order, as vLLM oversamples, with a warning.
    """
    if num < 1:
        raise LowbitError(f"--num-prompts must be at least 1 (got {num})")
    records = dataset if isinstance(dataset, Records) else read_records(dataset)
    pool = split(records, "eval") if dataset == "sharegpt" else list(records.items)
    conversations = [r for r in pool if isinstance(r, list) and len(r) >= 2]
    random.Random(seed).shuffle(conversations)  # = random.seed(seed); random.shuffle(...)
    requests: list[Request] = []
    for turns in conversations:
        if len(requests) == num:
            break
        prompt, reply = turns[0]["content"], turns[1]["content"]
        if input_len is not None:
            prompt = _fixed_prompt(tokenizer, prompt, input_len)
        prompt_len = _length(tokenizer, prompt)
        out_len = output_len if output_len is not None else _length(tokenizer, reply)
        too_short = (input_len is None and prompt_len < MIN_LEN) or \
            (output_len is None and out_len < MIN_LEN)
        too_long = (input_len is None and prompt_len > MAX_PROMPT_LEN) or \
            (None in (input_len, output_len) and prompt_len + out_len > MAX_TOTAL_LEN)
        if not (too_short or too_long):
            requests.append(Request(prompt, prompt_len, out_len, reply))
    if not requests:
        raise LowbitError(f"no usable conversations in {records.source}: a prompt and reply of "
                          f"{MIN_LEN}-{MAX_PROMPT_LEN} tokens are needed")
    if len(requests) < num:
        log.warning("only %d usable conversations in %s; repeating them to make %d requests",
                    len(requests), records.source, num)
        requests = [requests[i % len(requests)] for i in range(num)]
    return requests
