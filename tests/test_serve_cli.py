"""`lowbit serve` as a command: the vLLM launcher's command line, its kernel checks and signal
forwarding (with a stand-in server: vLLM is not installed here), the "not installed" message,
and SIGTERM on lowbit's own server finishing the request in flight."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2 as httpx
import pytest

from lowbit.errors import LowbitError
from lowbit.serving import vllm
from serving import sse, wait_for
from test_cli import run_cli

AVX512 = "AVX512+AVX512-BF16+AMX"
FP8_DYNAMIC = {"weights": {"type": "float", "num_bits": 8, "strategy": "channel"},
               "input_activations": {"type": "float", "num_bits": 8, "strategy": "token", "dynamic": True}}
FP8_STATIC = {"weights": {"type": "float", "num_bits": 8, "strategy": "tensor"},
              "input_activations": {"type": "float", "num_bits": 8, "strategy": "tensor", "dynamic": False}}
W4A16 = {"weights": {"type": "int", "num_bits": 4, "strategy": "group", "group_size": 128},
         "input_activations": None}
KV_FP8 = {"type": "float", "num_bits": 8, "strategy": "tensor", "dynamic": False}


def _ckpt(tmp_path: Path, group: dict | None, kv: dict | None = None) -> Path:
    config = {"model_type": "llama"}
    if group is not None:
        config["quantization_config"] = {"quant_method": "compressed-tensors", "kv_cache_scheme": kv,
                                         "config_groups": {"group_0": {"targets": ["Linear"], **group}}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def _command(path, on_gpu=False, isa=AVX512):
    return vllm.command(path, python="py", host="127.0.0.1", port=8001, api_key="k", max_batch=4,
                        served_model_name="m", max_len=512, on_gpu=on_gpu, isa=isa)


def test_vllm_gets_the_flags_the_checkpoint_needs(tmp_path):
    argv, env = _command(_ckpt(tmp_path, FP8_DYNAMIC, KV_FP8))
    assert argv[:2] == ["py", "-c"] and argv[3:5] == ["serve", str(tmp_path)]
    assert "vllm.entrypoints.cli.main" in argv[2] and env["VLLM_TARGET_DEVICE"] == "cpu"
    joined = " ".join(argv)
    for flags in ("--kv-cache-dtype fp8", "--dtype float32 --enforce-eager", "--port 8001",
                  "--served-model-name m", "--api-key k", "--max-num-seqs 4", "--max-model-len 512"):
        assert flags in joined
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind" and int(env["VLLM_CPU_KVCACHE_SPACE"]) > 0
    gpu_argv, gpu_env = _command(tmp_path, on_gpu=True)
    assert "--dtype" not in gpu_argv and "--enforce-eager" not in gpu_argv and gpu_env == {}
    plain, _ = _command(_ckpt(tmp_path, None))
    assert "--kv-cache-dtype" not in plain


def test_vllm_cpu_kernel_gaps_are_named_before_starting_it(tmp_path):
    argv, _ = _command(_ckpt(tmp_path, W4A16))  # cpu_gemm_wna16: bfloat16 only, AVX-512 only
    assert "--dtype bfloat16" in " ".join(argv)
    with pytest.raises(LowbitError, match="NO_KERNEL.*cpu_gemm_wna16.*--engine lowbit"):
        _command(tmp_path, isa="AVX2")
    with pytest.raises(LowbitError, match="VLLM_BUG.*static_scaled_fp8_quant"):
        _command(_ckpt(tmp_path, FP8_STATIC))
    with pytest.raises(LowbitError, match="NO_KERNEL.*FP8 KV cache only with AVX-512"):
        _command(_ckpt(tmp_path, FP8_DYNAMIC, KV_FP8), isa="AVX2")
    assert vllm.cpu_plan(None, "AVX2") == ("float32", None)


@pytest.fixture
def no_vllm(monkeypatch):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed in this Python")
    monkeypatch.delenv("LOWBIT_VLLM_PYTHON", raising=False)


def test_a_missing_vllm_is_said_in_one_line(tiny_dir, no_vllm):
    code, out, err = run_cli("serve", tiny_dir("llama"), "--engine", "vllm")
    assert code == 2 and out == ""
    assert err.startswith("lowbit: error: vLLM is not installed") and err.count("\n") == 1
    assert vllm.vllm_python("auto", tiny_dir("llama"), AVX512, False) is None  # auto: lowbit's engine


def test_a_port_in_use_is_said_in_one_line_before_loading(tiny_dir):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        code, _, err = run_cli("serve", tiny_dir("llama"), "--engine", "lowbit", "--port", port)
    assert code == 2 and err.startswith(f"lowbit: error: cannot listen on 127.0.0.1:{port}")
    assert err.count("\n") == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


STAND_IN = """
import http.server, signal, sys, threading
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
    def log_message(self, *a):
        pass
server = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health)
signal.signal(signal.SIGTERM, lambda *a: threading.Thread(target=server.shutdown).start())
server.serve_forever()
sys.exit(3)  # only reached through the SIGTERM handler
"""


def test_the_launcher_waits_for_health_and_forwards_sigterm(tmp_path):
    port = _free_port()
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    url = f"http://127.0.0.1:{port}/health"

    def terminate_us_once_healthy():
        if wait_for(lambda: vllm._healthy(url), 30):
            os.kill(os.getpid(), signal.SIGTERM)  # what a process manager does to `lowbit serve`

    threading.Thread(target=terminate_us_once_healthy, daemon=True).start()
    assert vllm.serve([sys.executable, str(script), str(port)], {}, url, timeout=60) == 3
    with pytest.raises(LowbitError, match="exited with status 5 before it was ready"):
        vllm.serve([sys.executable, "-c", "import sys; sys.exit(5)"], {}, url + "x", timeout=60)


def test_sigterm_finishes_the_request_in_flight_then_exits(tiny_dir):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lowbit", "serve", str(tiny_dir("llama")), "--port",
                             str(port), "--served-model-name", "tiny", "--compute-dtype", "float32",
                             "--max-len", "256"], env=env, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        assert wait_for(lambda: proc.poll() is None and _answers(base), 90), proc.stderr.read()
        body = {"model": "tiny", "prompt": "a", "max_tokens": 240, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            proc.send_signal(signal.SIGTERM)
            assert wait_for(lambda: not _answers(base), 30)  # takes no new requests...
            rest, done = sse(lines)
        # ...and the one in flight went on to the end, whole
        assert done and len(rest) > 10 and rest[-1]["usage"]["completion_tokens"] == 240
        # uvicorn re-raises the signal once it has shut down, so a parent sees how it ended
        assert proc.wait(60) in (0, -signal.SIGTERM)
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _answers(base: str) -> bool:
    try:
        return httpx.get(base + "/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                    reason="vllm is not importable here: run `make test-vllm`")
def test_lowbit_serve_engine_vllm_answers_the_openai_client(smollm2_dir):
    """The real vLLM CPU server, started by `lowbit serve --engine vllm`, stopped by SIGTERM."""
    import openai

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "lowbit", "serve", str(smollm2_dir), "--engine", "vllm",
                             "--port", str(port), "--max-len", "512", "--served-model-name", "smol"],
                            env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        deadline = time.monotonic() + 600
        while True:
            assert proc.poll() is None, "lowbit serve --engine vllm exited"
            try:
                models = client.models.list()
                break
            except openai.APIConnectionError:
                assert time.monotonic() < deadline, "vLLM did not come up in 600 s"
                time.sleep(2)
        assert [m.id for m in models.data] == ["smol"]
        r = client.completions.create(model="smol", prompt="The capital of France is", max_tokens=4,
                                      temperature=0)
        assert "Paris" in r.choices[0].text and r.usage.completion_tokens == 4
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        finally:
            if proc.poll() is None:
                proc.kill()
