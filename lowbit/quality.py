"""Generation quality: greedy answers to held-out prompts, scored with ROUGE against the
baseline's answers and the dataset's reference replies, and recovery with a bootstrap interval.

    prompts = held_out_prompts(tokenizer, records, n)      # first user turn + the reply it got
    answers = complete(model, tokenizer, prompts.messages)  # greedy, batched
    result  = score(answers, base_answers, prompts.references)

ROUGE is rouge-score's F-measure with Porter stemming, as MLPerf scores Llama-2-70B. Recovery is
mean(model) / mean(baseline) of a reference-based metric; its 95 % interval resamples prompts
with replacement (the same prompts for both models: a paired bootstrap) with a fixed seed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import data
from .errors import LowbitError
from .progress import progress

log = logging.getLogger(__name__)

ROUGE = ("rouge1", "rouge2", "rougeL")
RESAMPLES = 1000  # bootstrap resamples of the prompts
SEED = 0  # the bootstrap's generator: the same answers always give the same interval
CONFIDENCE = 0.95
MAX_PROMPT_TOKENS = 512  # longer first turns are skipped: they would dominate CPU time
BATCH = 8  # requests decoding together in complete()


@dataclass(frozen=True)
class Prompts:
    """Held-out prompts: each a one-message chat, and the reply the dataset gave it."""

    messages: list[list[dict[str, str]]]
    references: list[str]
    skipped: int  # eval records passed over: no user->assistant pair, too long, template refused


def held_out_prompts(tokenizer, records: data.Records, n: int, *,
                     max_tokens: int = MAX_PROMPT_TOKENS) -> Prompts:
    """The first `n` usable records of the eval split, in file order (fixed by the dataset alone,
    so every model answers the same prompts): the first user turn, when the assistant replied to
    it and it fits in `max_tokens` tokens through the chat template (generation prompt included)."""
    if not getattr(tokenizer, "chat_template", None):
        raise LowbitError("--generate answers chat prompts: this model's tokenizer has no chat template")
    messages, references, skipped = [], [], 0
    for record in data.split(records, "eval"):
        if len(messages) == n:
            break
        turn = _first_exchange(record)
        if turn is None or _prompt_tokens(tokenizer, turn[0]) > max_tokens:
            skipped += 1
            continue
        messages.append([turn[0]])
        references.append(turn[1])
    if not messages:
        raise LowbitError(f"no held-out prompts in {records.source}: --generate needs conversations "
                          f"with a user turn answered by the assistant, of at most {max_tokens} tokens")
    if len(messages) < n:
        log.warning("only %d of %d held-out prompts available in %s", len(messages), n, records.source)
    return Prompts(messages, references, skipped)


def _first_exchange(record: data.Record) -> tuple[dict[str, str], str] | None:
    """The first user message and the assistant reply right after it, if the record has them."""
    if isinstance(record, str):
        return None
    for i, m in enumerate(record[:-1]):
        if m["role"] == "user":
            reply = record[i + 1]
            return (m, reply["content"]) if reply["role"] == "assistant" else None
    return None


def _prompt_tokens(tokenizer, message: dict[str, str]) -> int:
    """The prompt's length as lowbit.generate will encode it; "infinite" when the template refuses."""
    try:
        text = tokenizer.apply_chat_template([message], tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 -- a chat template is the model author's code
        return 1 << 30
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def prompt_budget(max_positions: int | None, max_new_tokens: int) -> int:
    """The longest prompt that leaves room for `max_new_tokens` in the model's positions."""
    room = (max_positions or 1 << 30) - max_new_tokens
    if room < 1:
        raise LowbitError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the "
                          f"model's {max_positions} positions")
    return min(MAX_PROMPT_TOKENS, room)


def remembered(reuse: dict | None, key: tuple, compute):
    """compute(), or what it returned for `key` before in `reuse`: a dict several evaluate()
    calls share (lowbit compare passes one), so a baseline they have in common is answered
    and scored once. Keys name the model's path and every setting the value depends on."""
    if reuse is None:
        return compute()
    if key not in reuse:
        reuse[key] = compute()
    return reuse[key]


def generation_quality(model: str | Path, baseline: str | Path | None, prompts: Prompts, *,
                       max_new_tokens: int, dtype: torch.dtype, reuse: dict | None = None) -> dict:
    """Answer `prompts` greedily with `model` and `baseline` (one loaded at a time, each through
    lowbit's runtime in `dtype`) and score() the answers; answers already in `reuse` (see
    remembered()) are not generated again."""
    start = time.perf_counter()
    answers = {}
    for name, path in (("model", model), ("baseline", baseline)):
        if path is not None:
            key = ("answers", str(Path(path).resolve()), str(dtype), max_new_tokens, repr(prompts.messages))
            answers[name] = remembered(reuse, key, lambda: _answers(path, prompts, max_new_tokens, dtype, name))
    out = score(answers["model"], answers.get("baseline"), prompts.references)
    out.update(max_new_tokens=max_new_tokens, prompts_skipped=prompts.skipped,
               seconds=time.perf_counter() - start)
    return out


def _answers(path: str | Path, prompts: Prompts, max_new_tokens: int, dtype: torch.dtype,
             name: str) -> list[str]:
    from .memory import release_memory
    from .runtime.generate import model_and_tokenizer

    net, tokenizer = model_and_tokenizer(path, None, dtype)
    try:
        return complete(net, tokenizer, prompts.messages, max_tokens=max_new_tokens,
                        desc=f"answering ({name})")
    finally:
        del net
        release_memory()


def complete(model, tokenizer, prompts: Sequence, *, max_tokens: int, stop: Sequence[str] = (),
             desc: str = "generating", batch: int = BATCH) -> list[str]:
    """Greedy completions of `prompts` (strings, token ids or chat messages, as lowbit.generate
    takes them). The one place requests meet the runtime: up to `batch` decoding together in
    lowbit's batched runtime (runtime/batch.py), the texts batch-1 lowbit.generate gives (in
    float32/64; bf16 may flip a greedy near-tie); families it does not run go one at a time."""
    from .runtime.batch import generate_batch, unsupported
    from .runtime.generate import generate

    reason = unsupported(model) if batch > 1 else "batch 1"
    if reason is None:
        bar = progress([], desc, total=len(prompts))
        try:
            done = generate_batch(model, tokenizer, prompts, max_tokens=max_tokens, stop=stop,
                                  batch=batch, on_done=lambda: bar.update(1))
        finally:
            bar.close()
        return [g.text for g in done]
    if batch > 1:
        log.warning("%s: answering %d prompts one at a time", reason, len(prompts))
    return [generate(model, p, max_tokens=max_tokens, stop=stop, tokenizer=tokenizer).text
            for p in progress(prompts, desc)]


def rouge(predictions: Sequence[str], targets: Sequence[str]) -> dict[str, np.ndarray]:
    """Per-pair ROUGE-1/2/L F-measures (rouge-score, Porter stemming as in MLPerf's Llama-2
    harness). Identical texts score 1 even when empty, where rouge-score would say 0."""
    from rouge_score.rouge_scorer import RougeScorer

    scorer = RougeScorer(list(ROUGE), use_stemmer=True)
    out = {k: np.zeros(len(predictions)) for k in ROUGE}
    for i, (p, t) in enumerate(zip(predictions, targets, strict=True)):
        scores = scorer.score(t, p)  # (target, prediction)
        for k in ROUGE:
            out[k][i] = 1.0 if p == t else scores[k].fmeasure
    return out


def _indices(n: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _interval(values: np.ndarray) -> list[float] | None:
    values = values[np.isfinite(values)]
    if not len(values):
        return None
    tail = (1 - CONFIDENCE) / 2 * 100
    return [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]


def mean_interval(x: np.ndarray, *, resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """The mean of per-prompt values and its percentile-bootstrap interval."""
    means = x[_indices(len(x), resamples, seed)].mean(axis=1)
    return {"mean": float(x.mean()), "ci95": _interval(means)}


def recovery(model: np.ndarray, base: np.ndarray, *, resamples: int = RESAMPLES,
             seed: int = SEED) -> dict:
    """mean(model) / mean(base) over paired per-prompt values, with a paired percentile-bootstrap
    interval: each resample draws prompts with replacement and takes the ratio of the two means
    over the same draw. None where the baseline's mean is 0 (a ratio to nothing)."""
    out = {"model": float(model.mean()), "baseline": float(base.mean()), "recovery": None, "ci95": None}
    if base.mean() == 0:
        return out
    idx = _indices(len(model), resamples, seed)
    with np.errstate(divide="ignore", invalid="ignore"):  # a resample of all-zero baselines
        ratios = model[idx].mean(axis=1) / base[idx].mean(axis=1)
    out.update(recovery=float(model.mean() / base.mean()), ci95=_interval(ratios))
    return out


def score(answers: Sequence[str], base_answers: Sequence[str] | None,
          references: Sequence[str]) -> dict:
    """The generation-quality block of `lowbit eval`: ROUGE of `answers` against the dataset's
    `references` and, with a baseline, against `base_answers` (plus the exact-match rate) and
    the recovery of every reference-based metric."""
    ref = rouge(answers, references)
    out: dict = {"prompts": len(answers),
                 "bootstrap": {"resamples": RESAMPLES, "seed": SEED, "confidence": CONFIDENCE,
                               "method": "percentile, paired resampling of prompts"}}
    if base_answers is None:
        out["vs_reference"] = {k: mean_interval(v) for k, v in ref.items()}
        return out
    same = rouge(answers, base_answers)
    exact = np.array([a == b for a, b in zip(answers, base_answers, strict=True)], dtype=float)
    out["vs_baseline"] = {**{k: mean_interval(v) for k, v in same.items()},
                          "exact_match": mean_interval(exact)}
    base_ref = rouge(base_answers, references)
    out["vs_reference"] = {k: recovery(ref[k], base_ref[k]) for k in ROUGE}
    return out
