"""`lowbit bench mlperf`: MLPerf LoadGen drives an OpenAI-compatible server through a thin SUT.

The load generator owns time: LoadGen decides when each query is issued (all at once in Offline,
Poisson arrivals at --target-qps in Server), timestamps the completions and writes its own logs
(mlperf_log_summary.txt with VALID/INVALID, mlperf_log_detail.txt, mlperf_log_accuracy.json).
The SUT is an adapter over serving/client.py: each query sample becomes one streaming request;
the first streamed token is reported with FirstTokenComplete (what LoadGen's TTFT is measured
by) and the finished reply with QuerySamplesComplete, as token ids of the model's tokenizer
(int32), with the server's token count.

As MLPerf's Llama-2-70B harness: greedy decoding that stops at end-of-sequence, token latencies
on, and in Server the p99 constraints TTFT <= 2000 ms and TPOT <= 200 ms (--ttft-ms/--tpot-ms
scale them). Accuracy mode decodes the accuracy log and scores ROUGE-1/2/L/Lsum (rouge-score,
stemmed, F-measure, mean over samples, x100) against the dataset's replies, as
language/llama2-70b/evaluate-accuracy.py does. The defaults are sized for a short CPU run
(seconds, a few samples; replies capped by --max-tokens); a real MLPerf run needs the official
settings (24,576 OpenOrca samples, 10-minute minimum duration, mlperf.conf and user.conf).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import re
import threading
from pathlib import Path

import numpy as np

from ..errors import LowbitError
from ..outdir import atomic_dir
from .client import connect, served_model, stream, warm_up
from .workload import Request

TTFT_MS, TPOT_MS = 2000.0, 200.0  # MLPerf Llama-2-70B Server latency constraints (p99)
SUMMARY_KEYS = ("Result is", "Samples per second", "Tokens per second", "Completed samples per second",
                "Completed tokens per second", "Min duration satisfied", "Min queries satisfied",
                "Early stopping satisfied", "Performance constraints satisfied",
                "99.00 percentile first token latency (ns)", "99.00 percentile time to output token (ns)")
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
TOKEN_DTYPE = np.int32  # what the accuracy log holds (evaluate-accuracy.py --dtype int32)


class _SUT:
    """LoadGen's callbacks over the streaming client; requests run on an event loop in a thread."""

    def __init__(self, lg, requests, tokenizer, *, base_url, model, api_key, endpoint,
                 max_tokens, timeout, max_concurrency):
        self.lg, self.requests, self.tokenizer = lg, requests, tokenizer
        self.call = dict(model=model, endpoint=endpoint, ignore_eos=False, timeout=timeout,
                         sampling={"temperature": 0.0})  # greedy, as MLPerf's reference
        self.max_tokens, self.failures, self.errors = max_tokens, 0, []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.client = connect(base_url, api_key, timeout)
        self.gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        self._run(warm_up(self.client, model, endpoint, timeout))  # before LoadGen's clock starts

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def issue(self, samples) -> None:  # LoadGen's IssueQuery: hand over and return at once
        for s in samples:
            asyncio.run_coroutine_threadsafe(self._one(s.id, s.index), self.loop)

    def flush(self) -> None:
        pass

    def _ids(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer(text, add_special_tokens=False).input_ids, TOKEN_DTYPE)

    def _respond(self, complete, sample_id: int, ids: np.ndarray, *n_tokens: int) -> None:
        buf = array.array("B", ids.tobytes())  # alive until LoadGen has copied it
        address, size = buf.buffer_info()
        complete([self.lg.QuerySampleResponse(sample_id, address, size * buf.itemsize, *n_tokens)])

    async def _one(self, sample_id: int, index: int) -> None:
        req: Request = self.requests[index]
        first, r, ids = [], None, np.zeros(0, TOKEN_DTYPE)

        def on_first(text):
            first.append(True)
            self._respond(self.lg.FirstTokenComplete, sample_id, self._ids(text)[:1])

        try:
            async with self.gate or contextlib.nullcontext():
                r = await stream(self.client, prompt=req.prompt, prompt_len=req.prompt_len,
                                 max_tokens=min(req.output_len, self.max_tokens),
                                 on_first_token=on_first, **self.call)
            if r.success:
                ids = self._ids(r.text)
        finally:  # LoadGen waits for every sample: a failure still completes it, empty
            if r is None or not r.success:
                self.failures += 1
                self.errors.append(r.error if r is not None else "the SUT failed (a lowbit bug)")
                ids = np.zeros(0, TOKEN_DTYPE)
            if not first:
                self._respond(self.lg.FirstTokenComplete, sample_id, ids[:1])
            n_tokens = r.output_tokens if r is not None and r.success else 0
            self._respond(self.lg.QuerySamplesComplete, sample_id, ids, max(n_tokens, 1))

    def close(self) -> None:
        self._run(self.client.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


def settings(lg, scenario: str, mode: str, *, num_samples: int, target_qps: float,
             duration_ms: int, ttft_ms: float, tpot_ms: float):
    """LoadGen TestSettings: Llama-2-70B's rules, durations for a short local run."""
    s = lg.TestSettings()
    s.scenario = {"Offline": lg.TestScenario.Offline, "Server": lg.TestScenario.Server}[scenario]
    s.mode = {"performance": lg.TestMode.PerformanceOnly, "accuracy": lg.TestMode.AccuracyOnly}[mode]
    s.use_token_latencies = True
    s.min_query_count = num_samples
    s.min_duration_ms = duration_ms
    s.max_duration_ms = max(10 * duration_ms, 60_000)  # a bound, not a goal: a run always ends
    s.performance_sample_count_override = num_samples
    if scenario == "Offline":
        # LoadGen sizes the one Offline query from the expected throughput and min_duration
        s.offline_expected_qps = target_qps
    else:
        s.server_target_qps = target_qps
        s.ttft_latency = int(ttft_ms * 1e6)  # nanoseconds
        s.tpot_latency = int(tpot_ms * 1e6)
        s.server_target_latency_percentile = 0.99
    return s


def run(requests: list[Request], tokenizer, *, base_url: str, out: str, scenario: str = "Offline",
        mode: str = "performance", model: str | None = None, api_key: str | None = None,
        endpoint: str = "completions", target_qps: float = 1.0, duration_ms: int = 2000,
        ttft_ms: float = TTFT_MS, tpot_ms: float = TPOT_MS, max_tokens: int = 128,
        timeout: float = 300.0, max_concurrency: int | None = None, overwrite: bool = False) -> dict:
    """Run LoadGen on `requests` against the server; its logs and mlperf_lowbit.json go to `out`.

    Returns the summary LoadGen wrote (result VALID/INVALID and its key figures), the count of
    failed requests, and in accuracy mode the ROUGE scores.
    """
    try:
        import mlperf_loadgen as lg
    except ImportError:
        raise LowbitError("MLPerf LoadGen is not installed: pip install 'lowbit[mlperf]' "
                          "(mlcommons-loadgen)") from None
    if scenario not in ("Offline", "Server") or mode not in ("performance", "accuracy"):
        raise LowbitError(f"unknown scenario/mode {scenario}/{mode}: use Offline or Server, "
                          "performance or accuracy")
    if model is None:
        model = served_model(base_url, api_key, timeout)
    n = len(requests)
    with atomic_dir(out, overwrite) as tmp:
        sut = _SUT(lg, requests, tokenizer, base_url=base_url, model=model, api_key=api_key,
                   endpoint=endpoint, max_tokens=max_tokens, timeout=timeout,
                   max_concurrency=max_concurrency)
        log = lg.LogSettings()
        log.log_output.outdir = str(tmp)
        log.log_output.copy_summary_to_stdout = False
        handles = lg.ConstructSUT(sut.issue, sut.flush), lg.ConstructQSL(n, n, _noop, _noop)
        try:
            test = settings(lg, scenario, mode, num_samples=n, target_qps=target_qps,
                            duration_ms=duration_ms, ttft_ms=ttft_ms, tpot_ms=tpot_ms)
            # a path that does not exist: an audit.config in the working directory must not
            # silently turn this run into a compliance test
            lg.StartTestWithLogSettings(handles[0], handles[1], test, log, str(tmp / "no-audit.config"))
        finally:
            lg.DestroyQSL(handles[1])
            lg.DestroySUT(handles[0])
            sut.close()
        result = {"scenario": scenario, "mode": mode, "model": model, "base_url": base_url,
                  "samples": n, "failed_requests": sut.failures, "errors": sorted(set(sut.errors))[:10],
                  "settings": {"target_qps": target_qps, "duration_ms": duration_ms,
                               "ttft_ms": ttft_ms, "tpot_ms": tpot_ms, "max_tokens": max_tokens},
                  "summary": summary(tmp / "mlperf_log_summary.txt") if mode == "performance" else None}
        if mode == "accuracy":
            result["rouge"] = accuracy(tmp / "mlperf_log_accuracy.json", requests, tokenizer)
        (tmp / "mlperf_lowbit.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _noop(_indices) -> None:  # the QSL's load/unload: the samples are already in memory
    pass


def summary(path: Path) -> dict:
    """The "key : value" lines of LoadGen's summary (result, scenario, throughput, latencies)."""
    out = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() and value.strip() and not line.startswith(("=", "*")):
            out.setdefault(key.strip(), value.strip())
    out["valid"] = out.get("Result is") == "VALID"
    return out


def accuracy(log_path: Path, requests: list[Request], tokenizer) -> dict:
    """ROUGE of the decoded accuracy log against the dataset's replies (MLPerf Llama-2's rules:
    first entry per sample, special tokens skipped, stripped, one sentence per line, stemmed
    F-measure, mean x 100)."""
    from rouge_score import rouge_scorer

    seen, preds, refs = set(), [], []
    for entry in json.loads(log_path.read_text()):
        if entry["qsl_idx"] in seen:
            continue
        seen.add(entry["qsl_idx"])
        ids = np.frombuffer(bytes.fromhex(entry["data"]), TOKEN_DTYPE)
        preds.append(tokenizer.decode(ids, skip_special_tokens=True))
        refs.append(requests[entry["qsl_idx"]].reference)
    if not preds:
        raise LowbitError(f"{log_path} holds no samples: the accuracy run produced nothing")
    splitter = _sentences()
    preds = ["\n".join(splitter(p.strip())) for p in preds]
    refs = ["\n".join(splitter(r.strip())) for r in refs]
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    scores = [scorer.score(r, p) for r, p in zip(refs, preds)]  # score(target, prediction)
    out = {k: round(100.0 * float(np.mean([s[k].fmeasure for s in scores])), 4) for k in ROUGE_TYPES}
    return {**out, "samples": len(preds), "sentence_splitter": splitter.__name__}


def _sentences():
    """nltk's sent_tokenize (what MLPerf uses) when its punkt data is installed, else a plain
    split after ., ! and ?. Only rougeLsum reads sentence boundaries; ROUGE-1/2/L do not."""
    import nltk

    try:
        nltk.sent_tokenize("A test. Another one.")
        return nltk.sent_tokenize
    except LookupError:
        def regex_split(text: str) -> list[str]:
            return [s for s in re.split(r"(?<=[.!?])\s+", text) if s]
        return regex_split
