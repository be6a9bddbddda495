"""lowbit bench serve / bench mlperf against a real local HTTP server with known timing.

tests/fake_openai.py streams the first token TTFT = 50 ms after a request arrives and then one
token every ITL = 20 ms on an absolute schedule. Tolerances: a measurement can never be shorter
than the schedule (less GRAIN = 1 ms of clock granularity), and every request is held to that.
It can be longer by the client's own work (connecting, building the request, parsing chunks):
2-13 ms measured on an idle machine. On the shared 2-core test machine with five other busy
processes single requests were seen 400 ms late, so upper bounds are checked on medians, with
SLACK = 60 ms. A late first token shortens the first-to-last span by as much, so per-token
figures (TPOT) may be off by SLACK divided by the tokens of a request, either way.
"""

from __future__ import annotations

import json
import math
import random
import re
import time

import numpy as np
import pytest

from fake_openai import FakeServer
from lowbit.cli import main
from lowbit.data import Records, read_records, split
from lowbit.errors import LowbitError
from lowbit.serving import bench, loadgen
from lowbit.serving.workload import Request, sample

TTFT, ITL, SLACK, GRAIN = 50.0, 20.0, 60.0, 1.0  # ms


@pytest.fixture(scope="module")
def server():
    s = FakeServer()
    yield s
    s.close()


@pytest.fixture
def fake(server):
    server.state.reset()
    server.state.ttft, server.state.itl, server.state.slow_ttft = TTFT / 1000, ITL / 1000, 0.150
    return server


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from lowbit.checkpoint import load_tokenizer

    return load_tokenizer(smollm2_dir)


def _requests(n, tokens, marks=()):
    marks = dict(marks)
    return [Request(f"request {i} {marks.get(i, '')}", 3, tokens, f"tok0 tok1 reference {i}.")
            for i in range(n)]


def test_metrics_match_the_servers_known_timing(fake):
    n, tokens = 5, 11
    e2el = TTFT + (tokens - 1) * ITL
    r = bench.run(_requests(n, tokens), base_url=fake.url)
    m = r["metrics"]
    assert m["completed"] == n and m["failed"] == 0
    assert m["total_output_tokens"] == n * tokens  # from usage
    assert m["total_input_tokens"] == n * 7  # the server's usage.prompt_tokens replaces ours
    for rec in r["requests"]:
        assert rec["tokens_from"] == "usage" and len(rec["itl_ms"]) == tokens - 1
        assert rec["ttft_ms"] >= TTFT - GRAIN and rec["e2el_ms"] >= e2el - GRAIN  # never early
        decode = rec["e2el_ms"] - rec["ttft_ms"]
        assert rec["tpot_ms"] == pytest.approx(decode / (tokens - 1))  # vLLM's TPOT
        assert sum(rec["itl_ms"]) == pytest.approx(decode)  # one chunk per token
    assert m["ttft_ms"]["p50"] <= TTFT + SLACK
    assert m["e2el_ms"]["p50"] <= e2el + SLACK
    assert abs(m["tpot_ms"]["p50"] - ITL) <= SLACK / (tokens - 1)
    assert abs(m["itl_ms"]["p50"] - ITL) <= SLACK / 2
    # the ITLs of each request sum to its E2EL - TTFT, and all have tokens - 1 of them
    assert m["itl_ms"]["mean"] == pytest.approx(m["tpot_ms"]["mean"], rel=1e-9)
    for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        s = m[name]
        assert s["p50"] == s["median"] and s["p50"] <= s["p90"] <= s["p99"]
    # all sent at once: the run lasts one request, and throughput is work / that time
    assert e2el - GRAIN <= m["duration_s"] * 1000 <= max(x["e2el_ms"] for x in r["requests"]) + SLACK
    assert m["request_throughput"] == pytest.approx(n / m["duration_s"])
    assert m["output_throughput"] == pytest.approx(n * tokens / m["duration_s"])
    assert m["total_token_throughput"] == pytest.approx(n * (tokens + 7) / m["duration_s"])
    assert m["peak_concurrent_requests"] == n == fake.state.peak
    assert m["request_goodput"] is None  # no SLO given
    assert fake.state.warm_ups == 1 and len(fake.state.bodies) == n
    body = fake.state.bodies[0]
    assert body["stream"] and body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True and body["max_tokens"] == tokens


def test_output_tokens_fall_back_to_chunks_without_usage(fake):
    r = bench.run(_requests(1, 6, {0: "NOUSAGE"}), base_url=fake.url, model="fake-model")
    rec = r["requests"][0]
    assert rec["success"] and rec["tokens_from"] == "chunks" and rec["output_tokens"] == 6


def test_chat_role_announcement_is_not_the_first_token(fake):
    r = bench.run(_requests(2, 5), base_url=fake.url, endpoint="chat")
    for rec in r["requests"]:
        # the fake sends {"role": "assistant"} at once; counting it would make TTFT ~1 ms
        assert rec["ttft_ms"] >= TTFT - GRAIN and len(rec["itl_ms"]) == 4
        assert rec["output_tokens"] == 5 and rec["text"] == "tok0 tok1 tok2 tok3 tok4 "
    assert "messages" in fake.state.bodies[0]


def test_arrival_times_follow_vllms_gamma_rule():
    n, rate, seed = 50, 4.0, 7
    np.random.seed(seed)  # vLLM: np.random.seed(args.seed), then one gamma draw per request
    gaps = [np.random.gamma(shape=1.0, scale=1.0 / rate) for _ in range(n)]
    cumulative = np.cumsum(gaps)
    expected = cumulative * (n / rate) / cumulative[-1]
    got = bench.arrival_times(n, rate, seed)
    assert np.allclose(got, expected, rtol=1e-12, atol=0)
    assert got[-1] == pytest.approx(n / rate)
    assert bench.arrival_times(3, math.inf, seed) == [0.0, 0.0, 0.0]
    assert bench.arrival_times(n, rate, seed + 1) != got
    bursty = bench.arrival_times(n, rate, seed, burstiness=0.5)
    assert bursty != got and bursty[-1] == pytest.approx(n / rate)


def test_request_rate_paces_the_arrivals(fake):
    n, rate, seed = 8, 20.0, 3
    bench.run(_requests(n, 2), base_url=fake.url, request_rate=rate, seed=seed)
    planned = bench.arrival_times(n, rate, seed)
    arrived = sorted(fake.state.arrivals)
    # measured from the first arrival (which may itself be late); all at once would be 0.1-0.3 s off
    lag = [(got - arrived[0]) - (want - planned[0]) for want, got in zip(planned, arrived)]
    assert np.median(np.abs(lag)) <= SLACK / 1000
    assert planned[-1] - planned[0] > 0.2  # the plan spreads them out (n / rate = 0.4 s)


def test_max_concurrency_is_honored(fake):
    n, tokens, limit = 6, 5, 2
    r = bench.run(_requests(n, tokens), base_url=fake.url, max_concurrency=limit)
    assert fake.state.peak == limit  # what the server saw in flight
    assert r["metrics"]["peak_concurrent_requests"] == limit
    e2el = (TTFT + (tokens - 1) * ITL) / 1000
    assert r["metrics"]["duration_s"] >= (n / limit) * e2el - GRAIN / 1000  # three waves
    # clocks start at the gate: waiting for a slot (130 or 260 ms here) is not TTFT
    assert np.median([rec["ttft_ms"] for rec in r["requests"]]) <= TTFT + SLACK


def test_goodput_counts_only_requests_within_every_slo(fake):
    fake.state.slow_ttft = 0.300
    reqs = _requests(5, 4, {0: "SLOW", 3: "SLOW"})  # TTFT >= 300 ms for two of five
    r = bench.run(reqs, base_url=fake.url, slo=bench.parse_slo("ttft=250"))
    m, recs = r["metrics"], r["requests"]
    assert m["good_requests"] == sum(x["ttft_ms"] <= 250 for x in recs)
    assert not any(recs[i]["ttft_ms"] <= 250 for i in (0, 3))  # the slow ones never count
    assert m["request_goodput"] == pytest.approx(m["good_requests"] / m["duration_s"])
    r = bench.run(reqs, base_url=fake.url, slo=bench.parse_slo("ttft:100000 e2el:100000"))
    assert r["metrics"]["good_requests"] == 5
    r = bench.run(reqs, base_url=fake.url, slo=bench.parse_slo("ttft=100000,tpot=10"))
    assert r["metrics"]["good_requests"] == sum(x["tpot_ms"] <= 10 for x in r["requests"])
    for bad in ("ttft", "ttft=abc", "latency=5", "tpot=-1"):
        with pytest.raises(LowbitError, match="bad SLO"):
            bench.parse_slo(bad)


def test_failures_are_counted_and_the_run_goes_on(fake):
    reqs = _requests(5, 6, {1: "FAIL500", 2: "DROP", 3: "HANG"})
    t0 = time.monotonic()
    r = bench.run(reqs, base_url=fake.url, timeout=0.5, model="fake-model")
    assert time.monotonic() - t0 < 10  # the hung request is cut at its timeout, not after 30 s
    m = r["metrics"]
    assert (m["completed"], m["failed"]) == (2, 3)
    ok = [rec["success"] for rec in r["requests"]]
    assert ok == [True, False, False, False, True]
    errors = [rec["error"] for rec in r["requests"]]
    assert errors[1].startswith("HTTP 500") and "within 0.5 s" in errors[3] and errors[2]
    assert m["total_output_tokens"] == 12  # only the successful requests count
    assert len(m["errors"]) == 3


def _conversations_file(tmp_path, n=6):
    turns = [{"conversations": [{"from": "human", "value": f"Tell me about topic number {i}."},
                                {"from": "gpt", "value": f"Topic {i} is a fine topic to discuss."}]}
             for i in range(n)]
    path = tmp_path / "conv.json"
    path.write_text(json.dumps(turns))
    return path


def test_json_is_written_atomically_and_complete(fake, tmp_path, smollm2_dir, capsys, monkeypatch):
    out = tmp_path / "result.json"
    argv = ["bench", "serve", "--base-url", fake.url, "--tokenizer", str(smollm2_dir),
            "--dataset", str(_conversations_file(tmp_path)), "--num-prompts", "4",
            "--output-len", "5", "--slo", "ttft=2000,tpot=200", "--json", str(out)]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "Successful requests:" in table and re.search(r"TTFT\s+\d", table)
    r = json.loads(out.read_text())
    assert set(r) == {"config", "metrics", "requests", "machine"}
    assert r["config"]["model"] == "fake-model" and r["config"]["slo_ms"] == {"ttft": 2000, "tpot": 200}
    assert r["config"]["output_len"] == 5 and r["config"]["num_prompts"] == 4
    for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        assert set(r["metrics"][name]) == {"mean", "std", "median", "p50", "p90", "p99"}
    assert r["metrics"]["request_goodput"] > 0 and len(r["requests"]) == 4
    assert all(len(q["itl_ms"]) == 4 for q in r["requests"])
    assert r["machine"]["cpu_model"] and r["machine"]["cpus"] >= 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv.json", "result.json"]
    # a failure at the last step leaves the previous file whole and no temporary file behind
    before = out.read_text()

    def refuse(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("lowbit.serving.bench.os.replace", refuse)
    assert main(argv) == 2
    assert "cannot write" in capsys.readouterr().err
    assert out.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv.json", "result.json"]


@pytest.fixture(scope="module")
def sharegpt_eval():
    records = read_records("sharegpt")
    return Records(split(records, "eval"), 0, records.source)


def test_sharegpt_sampling_follows_vllms_rule(tokenizer, sharegpt_eval):
    got = sample(tokenizer, sharegpt_eval, 12, seed=5)
    # vLLM: random.seed(seed); random.shuffle(conversations with >= 2 turns); first two turns;
    # lengths by tokenizer(text).input_ids; keep 4 <= prompt <= 1024, reply >= 4, sum <= 2048
    state = random.getstate()
    try:
        conversations = [r for r in sharegpt_eval.items if isinstance(r, list) and len(r) >= 2]
        random.seed(5)
        random.shuffle(conversations)
    finally:
        random.setstate(state)
    want = []
    for conv in conversations:
        p, c = conv[0]["content"], conv[1]["content"]
        lp, lc = len(tokenizer(p).input_ids), len(tokenizer(c).input_ids)
        if 4 <= lp <= 1024 and lc >= 4 and lp + lc <= 2048:
            want.append((p, lp, lc, c))
        if len(want) == 12:
            break
    assert [(q.prompt, q.prompt_len, q.output_len, q.reference) for q in got] == want
    assert sample(tokenizer, sharegpt_eval, 12, seed=5) == got
    assert sample(tokenizer, sharegpt_eval, 12, seed=6) != got
    fixed = sample(tokenizer, sharegpt_eval, 4, seed=5, input_len=64, output_len=32)
    assert all(q.output_len == 32 and abs(q.prompt_len - 64) <= 3 for q in fixed)
    # --dataset sharegpt means the held-out part only
    assert {q.prompt for q in sample(tokenizer, "sharegpt", 3, seed=5)} <= \
        {r[0]["content"] for r in sharegpt_eval.items if isinstance(r, list)}


def _lg(fake, tokenizer, tmp_path, scenario, mode, reqs, **kw):
    return loadgen.run(reqs, tokenizer, base_url=fake.url, out=str(tmp_path / "logs"),
                       scenario=scenario, mode=mode, duration_ms=300, **kw)


def test_loadgen_offline_performance_writes_a_valid_summary(fake, tokenizer, tmp_path):
    reqs = _requests(6, 16, {4: "DROP"})  # 50 + 15 * 20 = 350 ms > the 300 ms minimum duration
    r = _lg(fake, tokenizer, tmp_path, "Offline", "performance", reqs, target_qps=5)
    logs = tmp_path / "logs"
    text = (logs / "mlperf_log_summary.txt").read_text()
    assert re.search(r"^Result is : VALID$", text, re.M) and "Scenario : Offline" in text
    assert (logs / "mlperf_log_detail.txt").stat().st_size > 0
    assert (logs / "mlperf_log_accuracy.json").exists()
    assert r["summary"]["valid"] and r["failed_requests"] == 1  # the dropped one, still completed
    assert len(fake.state.arrivals) == 6
    assert json.loads((logs / "mlperf_lowbit.json").read_text())["failed_requests"] == 1


def test_loadgen_server_reports_first_tokens_and_token_counts(fake, tokenizer, tmp_path):
    r = _lg(fake, tokenizer, tmp_path, "Server", "performance", _requests(8, 8), target_qps=20)
    text = (tmp_path / "logs" / "mlperf_log_summary.txt").read_text()
    assert re.search(r"^Result is : (VALID|INVALID)$", text, re.M) and "Scenario : Server" in text
    s = r["summary"]
    # LoadGen's own TTFT and TPOT come from FirstTokenComplete and the reported token counts
    ttft_ms = int(s["50.00 percentile first token latency (ns)"]) / 1e6
    tpot_ms = int(s["50.00 percentile time to output token (ns)"]) / 1e6
    assert TTFT - GRAIN <= ttft_ms <= TTFT + SLACK  # medians over 8 requests
    assert abs(tpot_ms - ITL) <= SLACK / 7
    assert s["ttft_latency (ns)"] == "2000000000" and s["tpot_latency (ns)"] == "200000000"
    body = fake.state.bodies[0]
    assert body["temperature"] == 0.0 and "ignore_eos" not in body  # greedy, stops at EOS


def test_loadgen_accuracy_rouge_equals_rouge_score(fake, tokenizer, tmp_path):
    from rouge_score import rouge_scorer

    reqs = [Request(f"q{i}", 3, 4 + i, ref) for i, ref in enumerate(
        ["tok0 tok1 tok2 tok3", "tok0 and tok1 then tok9", "nothing alike", "tok3 tok2 tok1 tok0"])]
    r = _lg(fake, tokenizer, tmp_path, "Offline", "accuracy", reqs, target_qps=5)
    entries = json.loads((tmp_path / "logs" / "mlperf_log_accuracy.json").read_text())
    assert sorted(e["qsl_idx"] for e in entries) == [0, 1, 2, 3]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = []
    for e in entries:
        ids = np.frombuffer(bytes.fromhex(e["data"]), np.int32)
        pred = tokenizer.decode(ids, skip_special_tokens=True)
        n = 4 + e["qsl_idx"]
        assert pred == "".join(f"tok{k} " for k in range(n))  # what the server streamed
        scores.append(scorer.score(reqs[e["qsl_idx"]].reference, pred.strip()))
    for key in ("rouge1", "rouge2", "rougeL"):
        want = 100 * np.mean([s[key].fmeasure for s in scores])
        assert r["rouge"][key] == pytest.approx(want, abs=1e-4)
    assert 0 < r["rouge"]["rouge1"] < 100


def test_mlperf_help_says_real_runs_need_the_official_settings(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "mlperf", "--help"])
    assert "official settings" in " ".join(capsys.readouterr().out.split())


def test_all_requests_failing_is_an_error_after_the_report(fake, tmp_path, smollm2_dir, capsys):
    path = tmp_path / "fail.jsonl"
    path.write_text("".join(json.dumps({"conversations": [
        {"from": "human", "value": f"please FAIL500 now, request {i}"},
        {"from": "gpt", "value": "this reply is long enough to keep"}]}) + "\n" for i in range(3)))
    out = tmp_path / "r.json"
    code = main(["bench", "serve", "--base-url", fake.url, "--tokenizer", str(smollm2_dir),
                 "--dataset", str(path), "--num-prompts", "3", "--json", str(out)])
    assert code == 2 and "all 3 requests failed" in capsys.readouterr().err
    assert json.loads(out.read_text())["metrics"]["failed"] == 3
