"""The C kernels of the CPU runtime (kernels.c beside this file), in one small library built on
first use: FP8/FP4 weight rows (kernels_fp.py), bf16 weight rows and INT4 dot products
(kernels_cpu.py).

It is compiled with the C compiler ($CC, default cc) for this machine (-march=native, or
$LOWBIT_KERNEL_MARCH: the preprocessor picks AVX512 / AVX512-VNNI / AVX2 code, or plain C),
cached under $LOWBIT_KERNEL_CACHE (default ~/.cache/lowbit/kernels) by source, compiler, -march
and CPU flags. Without a compiler (or with LOWBIT_NO_C_KERNELS=1) `library()` is None and every
Linear that would use it takes its torch fallback. Each kernel runs on one thread (the callers' batch-1 shapes are bound by
memory reads, and a second OpenMP runtime beside torch's is asking for trouble).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
from pathlib import Path

SOURCE = (Path(__file__).parent / "kernels.c").read_text()


# reassociation lets the compiler vectorize the float32 dot products (a different summation
# order: float32 rounding, ~K * 2^-24 relative, far below the bf16 bounds the tests hold)
FLAGS = ["-O3", "-shared", "-fPIC", "-fno-math-errno", "-fno-trapping-math", "-fassociative-math",
         "-fno-signed-zeros"]


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, built once per source, compiler and CPU; None where they cannot be
    built (no compiler) or are turned off (LOWBIT_NO_C_KERNELS=1)."""
    if os.environ.get("LOWBIT_NO_C_KERNELS") == "1":
        return None
    cc = os.environ.get("CC", "cc")
    # -march=native by default; LOWBIT_KERNEL_MARCH=x86-64-v3 (AVX2) or x86-64 (no vector ISA
    # beyond SSE2) builds the code another CPU would run, so one machine tests every path
    march = os.environ.get("LOWBIT_KERNEL_MARCH", "native")
    key = hashlib.sha256("\0".join([SOURCE, cc, *FLAGS, march, platform.machine(), _cpu_flags()]).encode())
    root = Path(os.environ.get("LOWBIT_KERNEL_CACHE", Path.home() / ".cache" / "lowbit" / "kernels"))
    so = root / f"lowbit-kernels-{key.hexdigest()[:16]}.so"
    if not so.is_file():
        try:
            root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=root) as tmp:
                src, out = Path(tmp) / "k.c", Path(tmp) / "k.so"
                src.write_text(SOURCE)
                for arch in ([f"-march={march}"], []):  # some compilers (or CPUs) take no -march=native
                    done = subprocess.run([cc, *FLAGS, *arch, str(src), "-o", str(out)],
                                          capture_output=True).returncode == 0
                    if done:
                        break
                if not done:
                    return None
                os.replace(out, so)  # atomic: a concurrent build finds a whole file or none
        except OSError:  # no compiler, or a read-only cache
            return None
    lib = ctypes.CDLL(str(so))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.fp8_gemv.argtypes = [i64, i64, i64, ptr, ptr, ptr, ptr]
    lib.fp4_gemv.argtypes = [i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ctypes.c_int, ptr, i64, ptr]
    lib.fp8_to_bf16.argtypes = [i64, i64, ptr, ptr, ptr]
    lib.fp8_to_f32.argtypes = [i64, ptr, ptr, ptr]
    lib.fp4_to_bf16.argtypes = [i64, i64, ptr, ptr, ptr, i64, ptr]
    lib.bf16_gemv.argtypes = [i64, i64, i64, ptr, ptr, ptr]
    lib.int4_gemv.argtypes = [i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr]
    lib.int8_gemv.argtypes = [i64, i64, i64, ptr, ptr, ptr, ptr]
    lib.int8_token_codes.argtypes = [i64, i64, ptr, ptr, ptr]
    lib.int4_vector_bits.restype = ctypes.c_int
    lib.int4_dequant.argtypes = [i64, i64, i64, ptr, ptr, ptr, ctypes.c_int, ptr]
    lib.attn_decode.argtypes = [i64, i64, i64, i64, i64, ptr, ptr, ptr, ctypes.c_int, ptr, ctypes.c_int,
                                ctypes.c_float, ptr]
    return lib
