"""CPU kernels for FP8 (E4M3) and FP4 (NVFP4/MXFP4, two E2M1 codes a byte) weights kept as
stored: a small C library built on first use, with torch's dequantize-per-call as the fallback.

Why C (measured with bench/cpu_kernels.py, one thread, 576x1536; docs/benchmarks.md): torch
2.13 has no fast path for these codes on CPU. `float8_e4m3fn.to(bf16)` runs a scalar loop (6 ms
for 0.9 M weights, against 0.08 ms for the whole INT4 matmul), `torch._scaled_mm` on CPU took
49 ms at one row and 13 s at 256, and a 16-entry lookup by tensor indexing 4.6 ms. The C loops
below turn codes into float32 through a table (256 entries for FP8, 16 for E2M1; the compiler
vectorizes the lookups as gathers) one weight row at a time, in L1, and take dot products in
float32: each weight is read once, as the int4pack/int8pack kernels do.
- decode (fewer than DENSE_ROWS inputs): `*_gemv`, y = x @ codes.T in float32, scales applied
  per group inside, per channel / per tensor on the output.
- prefill: `*_to_bf16` writes the weights (codes times group scales: exact in bf16) for one
  dense GEMM (AMX), the per-channel / tensor factor applied to its output.
The library is compiled with the C compiler ($CC, default cc) for this machine (-march=native),
cached under $LOWBIT_KERNEL_CACHE (default ~/.cache/lowbit/kernels) by source and CPU flags;
without a compiler (or with LOWBIT_NO_C_KERNELS=1) every Linear dequantizes per call in torch,
computing exactly what the reference path loads.
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

import torch

from ..formats.fp4 import E2M1_VALUES

SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

/* One weight row as float32 values. FP8: w[k] = value of E4M3 byte c[k]. AVX512 makes each
   byte an FP16 with the same bits shifted (s eeee mmm -> s 0eeee mmm0000000: the value / 256,
   subnormals included) and converts 16 at a time; elsewhere a 256-entry table. */
static void fp8_row(const uint8_t *c, int64_t K, const float *lut, float *w) {
  int64_t k = 0;
#if defined(__AVX512F__)
  const __m256i mask = _mm256_set1_epi16((short)0xBF80);
  const __m512 k256 = _mm512_set1_ps(256.f);
  for (; k + 16 <= K; k += 16) {
    __m256i h = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(c + k)));
    h = _mm256_and_si256(_mm256_slli_epi16(h, 7), mask);
    _mm512_storeu_ps(w + k, _mm512_mul_ps(_mm512_cvtph_ps(h), k256));
  }
#endif
  for (; k < K; k++) w[k] = lut[c[k]];
}

/* FP4: bytes p[0..H) hold columns 2j (low nibble) and 2j+1 (high); we / wo get the even / odd
   columns times their group scale s[j / hg] (hg = group / 2 bytes a group). AVX512: the 16
   E2M1 values by a register permute, 32 weights a step, for hg 8 (NVFP4) or a multiple of 16. */
static void fp4_row(const uint8_t *p, int64_t H, const float *lut16, const float *s, int64_t hg,
                    float *we, float *wo) {
  int64_t j = 0;
#if defined(__AVX512F__)
  if (hg == 8 || hg % 16 == 0) {
    const __m512 table = _mm512_loadu_ps(lut16);
    const __m512i low = _mm512_set1_epi32(15);
    const __m512i pairs = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    for (; j + 16 <= H; j += 16) {
      __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + j)));
      __m512 sv = hg == 8 ? _mm512_permutexvar_ps(pairs, _mm512_maskz_loadu_ps(3, s + j / 8))
                          : _mm512_set1_ps(s[j / hg]);
      _mm512_storeu_ps(we + j, _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(b, low), table), sv));
      _mm512_storeu_ps(wo + j, _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table), sv));
    }
  }
#endif
  for (; j < H; j++) {
    float sc = s[j / hg];
    we[j] = lut16[p[j] & 15] * sc;
    wo[j] = lut16[p[j] >> 4] * sc;
  }
}

/* four independent accumulators: one would wait on each FMA's latency (4 cycles) */
static float dot(const float *a, const float *b, int64_t n) {
  int64_t i = 0;
  float acc = 0.f;
#if defined(__AVX512F__)
  __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  for (; i + 64 <= n; i += 64) {
    s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
    s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), s1);
    s2 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 32), _mm512_loadu_ps(b + i + 32), s2);
    s3 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 48), _mm512_loadu_ps(b + i + 48), s3);
  }
  for (; i + 16 <= n; i += 16) s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
  acc = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
#endif
  for (; i < n; i++) acc += a[i] * b[i];
  return acc;
}

/* y[m, n] = sum_k x[m, k] * value(codes[n, k]) */
void fp8_gemv(int64_t M, int64_t N, int64_t K, const float *x, const uint8_t *codes,
              const float *lut, float *y) {
  float *w = malloc(K * sizeof(float));
  for (int64_t n = 0; n < N; n++) {
    fp8_row(codes + n * K, K, lut, w);
    for (int64_t m = 0; m < M; m++) y[m * N + n] = dot(x + m * K, w, K);
  }
  free(w);
}

/* y[m, n] = sum_k x[m, k] * e2m1(n, k) * scale[n, k / group]; packed [N, K/2], scale
   [N, K/group] float32, xe / xo the even / odd columns of x, [M, K/2] each */
void fp4_gemv(int64_t M, int64_t N, int64_t K, const float *xe, const float *xo,
              const uint8_t *packed, const float *lut16, const float *scale, int64_t group,
              float *y) {
  int64_t H = K / 2;
  float *we = malloc(H * sizeof(float)), *wo = malloc(H * sizeof(float));
  for (int64_t n = 0; n < N; n++) {
    fp4_row(packed + n * H, H, lut16, scale + n * (K / group), group / 2, we, wo);
    for (int64_t m = 0; m < M; m++)
      y[m * N + n] = dot(xe + m * H, we, H) + dot(xo + m * H, wo, H);
  }
  free(we);
  free(wo);
}

/* out[i] = value of E4M3 byte codes[i] as float32 (FP4 group scales, per call) */
void fp8_to_f32(int64_t count, const uint8_t *codes, const float *lut, float *out) {
  fp8_row(codes, count, lut, out);
}

/* bf16 bits of float32 values bf16 holds exactly (truncation is then exact) */
static inline uint16_t bf16_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return (uint16_t)(u >> 16);
}

/* out [N, K] bf16 = FP8 values (every E4M3 value is a bf16 value) */
void fp8_to_bf16(int64_t N, int64_t K, const uint8_t *codes, const float *lut, uint16_t *out) {
  float *w = malloc(K * sizeof(float));
  for (int64_t n = 0; n < N; n++) {
    fp8_row(codes + n * K, K, lut, w);
    for (int64_t k = 0; k < K; k++) out[n * K + k] = bf16_bits(w[k]);
  }
  free(w);
}

/* out [N, K] bf16 = e2m1 * group scale (exact where the scale has <= 6 significant bits) */
void fp4_to_bf16(int64_t N, int64_t K, const uint8_t *packed, const float *lut16,
                 const float *scale, int64_t group, uint16_t *out) {
  int64_t H = K / 2;
  float *we = malloc(H * sizeof(float)), *wo = malloc(H * sizeof(float));
  for (int64_t n = 0; n < N; n++) {
    fp4_row(packed + n * H, H, lut16, scale + n * (K / group), group / 2, we, wo);
    uint16_t *o = out + n * K;
    for (int64_t j = 0; j < H; j++) {
      o[2 * j] = bf16_bits(we[j]);
      o[2 * j + 1] = bf16_bits(wo[j]);
    }
  }
  free(we);
  free(wo);
}
"""

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
    key = hashlib.sha256("\0".join([SOURCE, cc, *FLAGS, platform.machine(), _cpu_flags()]).encode())
    root = Path(os.environ.get("LOWBIT_KERNEL_CACHE", Path.home() / ".cache" / "lowbit" / "kernels"))
    so = root / f"fpkernels-{key.hexdigest()[:16]}.so"
    if not so.is_file():
        try:
            root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=root) as tmp:
                src, out = Path(tmp) / "k.c", Path(tmp) / "k.so"
                src.write_text(SOURCE)
                for arch in (["-march=native"], []):  # some compilers (or CPUs) take no -march=native
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
    lib.fp4_gemv.argtypes = [i64, i64, i64, ptr, ptr, ptr, ptr, ptr, i64, ptr]
    lib.fp8_to_bf16.argtypes = [i64, i64, ptr, ptr, ptr]
    lib.fp8_to_f32.argtypes = [i64, ptr, ptr, ptr]
    lib.fp4_to_bf16.argtypes = [i64, i64, ptr, ptr, ptr, i64, ptr]
    return lib


@functools.cache
def _tables() -> dict[str, torch.Tensor]:
    every_byte = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    e2m1 = torch.tensor(E2M1_VALUES)
    return {"fp8": every_byte.float(),
            "fp4": torch.cat([e2m1, -e2m1])}  # nibble: bit 3 the sign, bits 0-2 the magnitude


# The row kernels are custom ops (torch.library), not bare ctypes calls, so that torch.compile
# traces a decode step through them as opaque calls instead of breaking its graph at each one
# (runtime/compiled.py); each has a fake (shape-only) version for tracing.
@torch.library.custom_op("lowbit::fp8_gemv", mutates_args=())
def fp8_gemv(x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ codes.T as float32 [M, N] (codes float8_e4m3fn [N, K])."""
    x = x.float().contiguous()
    (m, k), n = x.shape, codes.shape[0]
    y = torch.empty(m, n)
    library().fp8_gemv(m, n, k, x.data_ptr(), codes.data_ptr(), _tables()["fp8"].data_ptr(), y.data_ptr())
    return y


@fp8_gemv.register_fake
def _(x, codes):
    return x.new_empty(x.shape[0], codes.shape[0], dtype=torch.float32)


def fp8_to_bf16(codes: torch.Tensor) -> torch.Tensor:
    out = torch.empty(codes.shape, dtype=torch.bfloat16)
    library().fp8_to_bf16(*codes.shape, codes.data_ptr(), _tables()["fp8"].data_ptr(), out.data_ptr())
    return out


@torch.library.custom_op("lowbit::fp4_gemv", mutates_args=())
def fp4_gemv(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
    """x [M, K] @ (E2M1 codes * group scales).T as float32 [M, N]; packed uint8 [N, K/2],
    scale float32 [N, K/group]."""
    x = x.float()
    xe, xo = x[:, 0::2].contiguous(), x[:, 1::2].contiguous()
    (m, k), n = x.shape, packed.shape[0]
    y = torch.empty(m, n)
    library().fp4_gemv(m, n, k, xe.data_ptr(), xo.data_ptr(), packed.data_ptr(),
                       _tables()["fp4"].data_ptr(), scale.data_ptr(), group, y.data_ptr())
    return y


@fp4_gemv.register_fake
def _(x, packed, scale, group):
    return x.new_empty(x.shape[0], packed.shape[0], dtype=torch.float32)


def fp4_to_bf16(packed: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
    n, k = packed.shape[0], packed.shape[1] * 2
    out = torch.empty(n, k, dtype=torch.bfloat16)
    library().fp4_to_bf16(n, k, packed.data_ptr(), _tables()["fp4"].data_ptr(), scale.data_ptr(),
                          group, out.data_ptr())
    return out


@torch.library.custom_op("lowbit::fp8_to_f32", mutates_args=())
def fp8_to_f32(codes: torch.Tensor) -> torch.Tensor:
    out = torch.empty(codes.shape)
    library().fp8_to_f32(codes.numel(), codes.data_ptr(), _tables()["fp8"].data_ptr(), out.data_ptr())
    return out


@fp8_to_f32.register_fake
def _(codes):
    return codes.new_empty(codes.shape, dtype=torch.float32)


# rows from which a dense GEMM on weights written out for the call beats the row kernels
# (bench/cpu_kernels.py, SmolLM2 shapes, docs/benchmarks.md)
DENSE_ROWS = 8


def dense_dtype(compute: torch.dtype) -> torch.dtype:
    """The dense path's GEMM dtype: bf16 only where the model computes in bf16 and the CPU
    multiplies it natively, else float32. Unlike the INT4/INT8 kernels (which take bf16 inputs
    whatever the compute dtype) the row kernels here are exact in float32, and rounding W8A8 /
    W4A4 inputs to bf16 moves later layers' inputs across their quantization grid: on a tiny
    FP8 model it moved the logits by a third of what quantization does, against 1e-5 in float32."""
    from .kernels_cpu import dense_dtype as native

    return torch.bfloat16 if compute == torch.bfloat16 and native() == torch.bfloat16 else torch.float32


def _finish(y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = y.to(x.dtype).reshape(*x.shape[:-1], -1)
    return y if bias is None else y + bias


def fp8_mm(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, dense_from: int,
           dtype: torch.dtype, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ (E4M3 codes [N, K] * scale).T, scale float32 [N] (per channel) or [1]
    (per tensor) applied to the float32 product; rows >= dense_from: one dense GEMM in `dtype`
    on the codes (exact in bf16)."""
    flat = x.reshape(-1, x.shape[-1])
    if flat.shape[0] >= dense_from:
        y = torch.nn.functional.linear(flat.to(dtype), fp8_to_bf16(codes).to(dtype)).float()
    else:
        y = fp8_gemv(flat, codes)
    return _finish(y * scale, x, bias)


def fp4_units(scale: torch.Tensor, kind: str) -> torch.Tensor:
    """Stored group scales -> float32: E4M3 values (NVFP4, the global scale left out), or
    E8M0 exponents u -> 2^(u - 127) (MXFP4) by placing u in float32's exponent field."""
    if kind == "e4m3":
        return fp8_to_f32(scale.view(torch.uint8))
    u = scale.to(torch.int32)
    return torch.where(u > 0, (u << 23).view(torch.float32), 2.0**-127)


def fp4_mm(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, kind: str, group: int,
           divide: torch.Tensor | None, dense_from: int, dtype: torch.dtype,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ (E2M1 codes * group scales / divide).T: packed uint8 [N, K/2] as stored,
    stored group scales [N, K/group], NVFP4's global scale `divide` ([1], applied to the
    float32 output) or None. Rows >= dense_from: one dense GEMM in `dtype` on codes times
    group scales, exact in bf16 (2 significant bits times 4, or times a power of two)."""
    flat = x.reshape(-1, x.shape[-1])
    units = fp4_units(scale, kind)
    if flat.shape[0] >= dense_from:
        w = fp4_to_bf16(packed, units, group).to(dtype)
        y = torch.nn.functional.linear(flat.to(dtype), w).float()
    else:
        y = fp4_gemv(flat, packed, units, group)
    return _finish(y if divide is None else y / divide, x, bias)
