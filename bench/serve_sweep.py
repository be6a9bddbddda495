"""Claim (issue #12 item 5): what FP8, W8A8_INT8 and W4A16 buy under load on SmolLM2, served by
lowbit's engine and, where vLLM's CPU build has a kernel here, by vLLM, measured in one run.

For each format: quantize the model (or reuse CACHE/FORMAT when it holds a checkpoint; a small
calibration, 32 samples x 256 tokens, and RTN for W4A16: the sweep measures speed, which GPTQ
does not change), start `lowbit serve --engine lowbit` and then `lowbit serve --engine vllm` on
127.0.0.1, warm each server up, and load it with `lowbit bench serve` (fixed --input-len and
--output-len, ignore_eos):
  (a) request rate inf at --max-concurrency 1, 2, 4, 8, 16: throughput, TTFT, TPOT;
  (b) Poisson arrivals at a few request rates, no concurrency gate: TTFT p99, TPOT p99.
A format vLLM cannot run here gets a "no vLLM run: <reason>" row from
lowbit.serving.vllm.cpu_plan (static FP8 is a known vLLM CPU bug). Every bench call sends
prompts no earlier call on that server sent (disjoint held-out ShareGPT conversations, the same
ones for every server), so vLLM's prefix cache cannot serve one from an earlier run.
Writes a JSON of everything, a markdown table and a PNG; every server is stopped on the way out,
failure or not.

    PYTHONPATH=. LOWBIT_VLLM_PYTHON=.venv-vllm/bin/python .venv/bin/python bench/serve_sweep.py
    ... bench/serve_sweep.py --tiny      # a minute-scale smoke run of the whole path
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
MODEL_NAME = "model"  # --served-model-name, the same on every server
FORMATS = ("FP8", "W8A8_INT8", "W4A16")
ENGINES = ("lowbit", "vllm")
QUANTIZE_ARGS = {"W4A16": ["--algorithm", "rtn"]}  # RTN: seconds instead of GPTQ's minutes, same kernels
T0 = time.monotonic()


def say(message: str) -> None:
    print(f"[{time.monotonic() - T0:6.0f} s] {message}", flush=True)


def lowbit(*args: str) -> list[str]:
    return [sys.executable, "-m", "lowbit", *args]


def checkpoint(base: Path, cache: Path, fmt: str, samples: int, seq_len: int) -> Path:
    """CACHE/FORMAT, quantized from `base` unless it already holds a checkpoint."""
    if fmt == "BF16":
        return base
    out = cache / fmt
    if (out / "config.json").is_file():
        say(f"{fmt}: reusing {out}")
        return out
    say(f"{fmt}: quantizing into {out} ({samples} samples x {seq_len} tokens"
        f"{', RTN' if fmt in QUANTIZE_ARGS else ''})")
    subprocess.run(lowbit("quantize", str(base), str(out), "--scheme", fmt, "--samples", str(samples),
                          "--seq-len", str(seq_len), *QUANTIZE_ARGS.get(fmt, [])), check=True)
    return out


def vllm_gap(ckpt: Path) -> str | None:
    """Why vLLM cannot serve `ckpt` on this CPU (lowbit.serving.vllm's own decision), or None."""
    from lowbit.hardware import cpu_isa
    from lowbit.serving.vllm import cpu_plan, find_python

    if find_python() is None:
        return "vLLM is not importable (set LOWBIT_VLLM_PYTHON)"
    qcfg = json.loads((ckpt / "config.json").read_text()).get("quantization_config")
    return cpu_plan(qcfg, cpu_isa())[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Server:
    """`lowbit serve CKPT --engine E` on 127.0.0.1 in its own process group, so that stopping it
    also stops what it started (vLLM and vLLM's engine process)."""

    def __init__(self, ckpt: Path, engine: str, log: Path, max_batch: int, max_len: int, threads: int):
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.argv = lowbit("serve", str(ckpt), "--engine", engine, "--host", HOST, "--port", str(self.port),
                           "--served-model-name", MODEL_NAME, "--max-batch", str(max_batch),
                           "--max-len", str(max_len))
        self.log, self.proc, self.threads = log, None, threads

    def __enter__(self) -> "Server":
        # vLLM's CPU server drops to 1 torch thread "for serving" unless OMP_NUM_THREADS is set:
        # both engines get the same count, and the client keeps a core on a 2-core machine
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
               "OMP_NUM_THREADS": str(self.threads)}
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        return self

    def wait_healthy(self, limit: float) -> float:
        start = time.monotonic()
        while time.monotonic() - start < limit:
            if self.proc.poll() is not None:
                tail = self.log.read_text()[-1500:]
                raise RuntimeError(f"server exited with status {self.proc.returncode}:\n{tail}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return time.monotonic() - start
            except OSError:
                pass
            time.sleep(1)
        raise RuntimeError(f"server not healthy within {limit:.0f} s (log: {self.log})")

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """SIGTERM to `lowbit serve` (it finishes in-flight requests and passes the signal to
        vLLM), then SIGKILL to whatever of its process group is left."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its group: our server's own children only
        except ProcessLookupError:
            pass
        self.proc.wait()


class Prompts:
    """Held-out ShareGPT conversations handed out in disjoint slices, one slice per bench call,
    written as a ShareGPT file that `lowbit bench serve --dataset` reads. `reset()` starts
    again from the first slice, so every server is sent the same prompts in the same order."""

    def __init__(self, tmp: Path):
        from lowbit.data import read_records, split

        held_out = split(read_records("sharegpt"), "eval")
        self.pool = [r for r in held_out if isinstance(r, list) and len(r) >= 2]
        self.tmp, self.next, self.files = tmp, 0, 0

    def reset(self) -> None:
        self.next = 0

    def take(self, n: int) -> Path:
        names = {"user": "human", "assistant": "gpt", "system": "system"}
        chosen = [self.pool[(self.next + i) % len(self.pool)] for i in range(n)]
        self.next += n
        self.files += 1
        path = self.tmp / f"prompts{self.files}.json"
        path.write_text(json.dumps([{"id": str(i), "conversations": [
            {"from": names[m["role"]], "value": m["content"]} for m in r]} for i, r in enumerate(chosen)]))
        return path


def bench(server: Server, tokenizer: Path, prompts: Prompts, tmp: Path, a: argparse.Namespace, *,
          num: int, concurrency: int | None = None, rate: float = math.inf) -> dict:
    """One `lowbit bench serve` run; its config and metrics (per-request records dropped), plus
    the load average when it started."""
    out = tmp / "bench.json"
    argv = lowbit("bench", "serve", "--base-url", server.url, "--model", MODEL_NAME, "--tokenizer",
                  str(tokenizer), "--dataset", str(prompts.take(num)), "--num-prompts", str(num),
                  "--input-len", str(a.input_len), "--output-len", str(a.output_len),
                  "--request-rate", str(rate), "--seed", "0", "--timeout", str(a.request_timeout),
                  "--json", str(out))
    if concurrency:
        argv += ["--max-concurrency", str(concurrency)]
    load = os.getloadavg()[0]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=a.request_timeout + 300)
    if done.returncode != 0:
        raise RuntimeError(f"lowbit bench serve failed ({done.returncode}): {done.stderr[-800:]}")
    result = json.loads(out.read_text())
    m = result["metrics"]
    say(f"  {'C=' + str(concurrency) if concurrency else f'rate={rate:g}/s':>11}  {num:3d} requests "
        f"{m['output_throughput']:7.1f} tok/s  TTFT mean {m['ttft_ms']['mean']:7.0f} p99 "
        f"{m['ttft_ms']['p99']:7.0f} ms  TPOT mean {m['tpot_ms']['mean']:6.1f} p99 "
        f"{m['tpot_ms']['p99']:6.1f} ms  failed {m['failed']}  load {load:.1f}")
    return {"max_concurrency": concurrency, "request_rate": "inf" if math.isinf(rate) else rate,
            "num_prompts": num, "load_average_1m": load, "metrics": m, "client": result["machine"]}


def measure(ckpt: Path, fmt: str, engine: str, base: Path, prompts: Prompts, tmp: Path,
            a: argparse.Namespace) -> dict:
    """One server's row: (a) the concurrency sweep, (b) the request-rate sweep."""
    row = {"format": fmt, "engine": engine, "checkpoint": str(ckpt), "status": "ok", "reason": None,
           "concurrency": [], "rates": []}
    if engine == "vllm" and (gap := vllm_gap(ckpt)):
        row.update(status="skipped", reason=f"no vLLM run: {gap}")
        say(f"{fmt} on {engine}: {row['reason'][:160]}")
        return row
    prompts.reset()
    log = Path(a.logs) / f"serve-{fmt}-{engine}.log"
    say(f"{fmt} on {engine}: starting the server (log {log})")
    try:
        with Server(ckpt, engine, log, max(a.concurrency, default=8), a.input_len + a.output_len + 64,
                    a.threads) as server:
            row["server_start_s"] = server.wait_healthy(a.start_timeout)
            say(f"  healthy after {row['server_start_s']:.0f} s; warming up (not recorded)")
            # staggered arrivals: running batches grow and shrink through many sizes, so one-time
            # costs of a new batch shape are paid before the measured runs (a --tiny trial warmed
            # at C=1 only saw vLLM's first C=2 batch take ~1 s)
            bench(server, base, prompts, tmp, a, num=a.warmup, rate=a.warmup_rate)
            for c in a.concurrency:
                row["concurrency"].append(bench(server, base, prompts, tmp, a, concurrency=c,
                                                num=max(a.min_prompts, a.rounds * c)))
            for r in a.rates:
                row["rates"].append(bench(server, base, prompts, tmp, a, rate=r,
                                          num=max(a.min_prompts, math.ceil(r * a.rate_seconds))))
    except (RuntimeError, subprocess.SubprocessError, OSError) as e:
        row.update(status="failed", reason=f"{type(e).__name__}: {e}"[:2000])
        say(f"  FAILED: {row['reason'][:300]}")
    return row


def machine() -> dict:
    import torch

    from lowbit.hardware import cpu_isa
    from lowbit.serving.bench import machine as client_machine

    return {**client_machine(), "torch": torch.__version__,
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "isa": cpu_isa()}


# ---- pure: results dict -> markdown, PNG -------------------------------------------------------

def _label(row: dict) -> str:
    return f"{row['format']} · {'vLLM' if row['engine'] == 'vllm' else 'lowbit'}"


def table(results: dict) -> str:
    """Markdown: output throughput and mean TTFT/TPOT per concurrency, p99 TTFT/TPOT per rate,
    then one line per server that did not run and why."""
    rows = results["runs"]
    ran = [r for r in rows if r["status"] == "ok"]
    concs = sorted({p["max_concurrency"] for r in ran for p in r["concurrency"]})
    rates = sorted({p["request_rate"] for r in ran for p in r["rates"]})

    def grid(title, part, x, points, head, cell):
        if not points:
            return None
        lines = [f"| {title} | " + " | ".join(head(k) for k in points) + " |",
                 "|---|" + "---|" * len(points)]
        for r in ran:
            found = {p[x]: p["metrics"] for p in r[part]}
            lines.append(f"| {_label(r)} | " + " | ".join(
                cell(found[k]) + _failed(found[k]) if k in found else "" for k in points) + " |")
        return "\n".join(lines)

    by_c = ("concurrency", "max_concurrency", concs, lambda k: f"C={k}")
    parts = [grid("output tok/s (req/s) at max concurrency", *by_c,
                  lambda m: f"{m['output_throughput']:.1f} ({m['request_throughput']:.2f})"),
             grid("mean TTFT / mean TPOT (ms) at max concurrency", *by_c,
                  lambda m: f"{m['ttft_ms']['mean']:.0f} / {m['tpot_ms']['mean']:.1f}"),
             grid("p99 TTFT / p99 TPOT (ms) at request rate", "rates", "request_rate", rates,
                  lambda k: f"{k:g}/s", lambda m: f"{m['ttft_ms']['p99']:.0f} / {m['tpot_ms']['p99']:.1f}")]
    notes = [f"- {_label(r)}: {r['reason']}" for r in rows if r["status"] != "ok"]
    return "\n\n".join([p for p in parts if p] + (["\n".join(notes)] if notes else [])) + "\n"


def _failed(m: dict) -> str:
    return f" ({m['failed']} failed)" if m["failed"] else ""


def plot(results: dict, path: str | Path) -> None:
    """Three panels: output throughput vs max concurrency, and TTFT p99 and TPOT p99 vs request
    rate; one line per format x engine (colour: format, dashes: vLLM)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    formats = sorted({r["format"] for r in results["runs"]})
    colours = {f: plt.get_cmap("tab10")(i) for i, f in enumerate(formats)}
    panels = [(axes[0], "concurrency", "max_concurrency", lambda m: m["output_throughput"],
               "max concurrency (request rate inf)", "output tokens/s"),
              (axes[1], "rates", "request_rate", lambda m: m["ttft_ms"]["p99"],
               "request rate (req/s, Poisson)", "TTFT p99 (ms)"),
              (axes[2], "rates", "request_rate", lambda m: m["tpot_ms"]["p99"],
               "request rate (req/s, Poisson)", "TPOT p99 (ms)")]
    for ax, part, x, y, xlabel, ylabel in panels:
        for r in results["runs"]:
            points = sorted((p[x], y(p["metrics"])) for p in r[part] if p["metrics"]["completed"])
            if r["status"] == "ok" and points:
                ax.plot(*zip(*points), marker="o", color=colours[r["format"]],
                        linestyle="--" if r["engine"] == "vllm" else "-", label=_label(r))
        xs = sorted({p[x] for r in results["runs"] for p in r[part]})
        if part == "concurrency":
            ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [f"{v:g}" for v in xs])
        ax.set_ylim(bottom=0)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    s = results.get("settings", {})
    fig.suptitle(f"SmolLM2-135M served on {results.get('machine', {}).get('cpus', '?')} CPU cores: "
                 f"{s.get('input_len', '?')} prompt + {s.get('output_len', '?')} output tokens per request")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=str(ROOT / ".cache" / "smollm2-135m-bf16"))
    p.add_argument("--cache", default=str(ROOT / ".cache" / "serve-sweep"), help="checkpoints, reused")
    p.add_argument("--formats", default=",".join(FORMATS), help="presets (and BF16: the base model)")
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--concurrency", default="1,2,4,8,16")
    p.add_argument("--rates", default="1,2,4", help="requests per second for the latency sweep")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2, help="concurrency sweep: ROUNDS x C requests")
    p.add_argument("--min-prompts", type=int, default=4)
    p.add_argument("--rate-seconds", type=float, default=8.0, help="rate sweep: rate x this requests")
    p.add_argument("--warmup", type=int, default=32, help="discarded requests after a server starts")
    p.add_argument("--warmup-rate", type=float, default=8.0, help="their arrival rate (req/s)")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every server")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--start-timeout", type=float, default=600.0)
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--out", default=str(ROOT / "docs" / "serve-sweep"),
                   help="writes OUT.json, OUT.md and OUT.png")
    p.add_argument("--logs", default=tempfile.gettempdir(), help="server logs go here")
    p.add_argument("--tiny", action="store_true", help="smoke test: C=1,2, one rate, 16+4 tokens")
    a = p.parse_args()
    if a.tiny:
        a.concurrency, a.rates, a.input_len, a.output_len, a.min_prompts, a.rate_seconds, a.warmup = \
            "1,2", "2", 16, 4, 2, 1.0, 4
    a.concurrency = [int(c) for c in a.concurrency.split(",") if c]
    a.rates = [float(r) for r in a.rates.split(",") if r]
    base, cache = Path(a.base), Path(a.cache)
    settings = {k: v for k, v in vars(a).items() if k not in ("logs",)}
    results = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "settings": settings,
               "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(),
               "runs": []}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the servers' `with` blocks unwind
    with tempfile.TemporaryDirectory(prefix="lowbit-serve-sweep-") as tmp:
        tmp = Path(tmp)
        prompts = Prompts(tmp)
        ckpts = {f: checkpoint(base, cache, f, a.samples, a.seq_len) for f in a.formats.split(",")}
        for fmt, ckpt in ckpts.items():
            for engine in a.engines.split(","):
                results["runs"].append(measure(ckpt, fmt, engine, base, prompts, tmp, a))
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    results["wall_s"] = time.monotonic() - T0
    loads = [p["load_average_1m"] for r in results["runs"] for p in r["concurrency"] + r["rates"]]
    results["machine"]["load_average_1m_during"] = [min(loads), max(loads)] if loads else None
    out = Path(a.out)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(table(results))
    plot(results, out.with_suffix(".png"))
    print("\n" + table(results))
    say(f"wrote {out}.json, .md, .png")


if __name__ == "__main__":
    main()
