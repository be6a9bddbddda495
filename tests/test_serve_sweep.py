"""bench/serve_sweep.py's pure part: a results dict -> the markdown table and the PNG. The sweep
itself (servers, minutes of load) is run by hand; its numbers are in docs/benchmarks.md."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "serve_sweep.py"


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("serve_sweep", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _metrics(tok_s: float, ttft: float, tpot: float, failed: int = 0) -> dict:
    return {"output_throughput": tok_s, "request_throughput": tok_s / 32, "completed": 4,
            "failed": failed, "ttft_ms": {"mean": ttft, "p99": 2 * ttft},
            "tpot_ms": {"mean": tpot, "p99": 2 * tpot}}


def _run(fmt: str, engine: str, scale: float) -> dict:
    return {"format": fmt, "engine": engine, "status": "ok", "reason": None,
            "concurrency": [{"max_concurrency": c, "metrics": _metrics(10 * c * scale, 100 * c, 50)}
                            for c in (1, 2, 4)],
            "rates": [{"request_rate": r, "metrics": _metrics(5 * r, 300 * r, 60 + r, failed=int(r == 4))}
                      for r in (1.0, 4.0)]}


RESULTS = {"settings": {"input_len": 128, "output_len": 32}, "machine": {"cpus": 2},
           "runs": [_run("W4A16", "lowbit", 1.0), _run("W4A16", "vllm", 1.5),
                    {"format": "FP8", "engine": "vllm", "status": "skipped",
                     "reason": "no vLLM run: VLLM_BUG: static_scaled_fp8_quant", "concurrency": [],
                     "rates": []}]}


def test_table_has_every_point_and_the_reason_a_server_did_not_run(sweep):
    text = sweep.table(RESULTS)
    lines = text.splitlines()
    assert "| output tok/s (req/s) at max concurrency | C=1 | C=2 | C=4 |" in lines
    assert "| W4A16 · vLLM | 15.0 (0.47) | 30.0 (0.94) | 60.0 (1.88) |" in lines
    assert "| W4A16 · lowbit | 100 / 50.0 | 200 / 50.0 | 400 / 50.0 |" in lines  # mean TTFT / TPOT
    assert "| p99 TTFT / p99 TPOT (ms) at request rate | 1/s | 4/s |" in lines
    assert "| W4A16 · lowbit | 600 / 122.0 | 2400 / 128.0 (1 failed) |" in lines
    assert "- FP8 · vLLM: no vLLM run: VLLM_BUG: static_scaled_fp8_quant" in lines
    assert not any(line.startswith("| FP8") for line in lines)  # no empty row for it


def test_plot_writes_a_png(sweep, tmp_path):
    path = tmp_path / "sweep.png"
    sweep.plot(RESULTS, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
