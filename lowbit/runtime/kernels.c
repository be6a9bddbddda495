/* lowbit's CPU kernels: built and loaded by lowbit/runtime/clib.py (see its docstring). */
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#if defined(__AVX2__)
static inline float hsum256(__m256 v) {  /* the sum of a register's eight floats */
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)));
}
#endif

/* ---- FP8 (E4M3) and FP4 (E2M1) weights, runtime/kernels_fp.py ---- */

#if defined(__AVX512F__)
/* The values of the 16 E4M3 bytes at c, divided by 256, as float32: each byte becomes an FP16
   with the same bits shifted (s eeee mmm -> s 0eeee mmm0000000: the value / 256, subnormals
   included), widened by the AVX512 instruction. Callers scale by 256 (exact) where they need
   the values themselves, a dot product once at the end. */
static inline __m512 e4m3x16_256th(const uint8_t *c) {
  __m256i h = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)c));
  return _mm512_cvtph_ps(_mm256_and_si256(_mm256_slli_epi16(h, 7), _mm256_set1_epi16((short)0xBF80)));
}
#endif

/* One weight row as float32 values. FP8: w[k] = value of E4M3 byte c[k]. AVX512 converts 16 at
   a time (e4m3x16_256th); elsewhere a 256-entry table. */
static void fp8_row(const uint8_t *c, int64_t K, const float *lut, float *w) {
  int64_t k = 0;
#if defined(__AVX512F__)
  const __m512 k256 = _mm512_set1_ps(256.f);
  for (; k + 16 <= K; k += 16) _mm512_storeu_ps(w + k, _mm512_mul_ps(e4m3x16_256th(c + k), k256));
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

/* x . values of E4M3 bytes c, the conversion fused into the dot product (no row written out
   and read back): each byte becomes an FP16 with its bits shifted (e4m3x16_256th: the value
   / 256, subnormals included) and widened to float32 by the F16C / AVX512 instruction; the sum
   is scaled back by 256 (exact) at the end. Four accumulators: one would wait on each FMA's
   latency (4 cycles). */
static float fp8_dot(const float *x, const uint8_t *c, int64_t K, const float *lut) {
  int64_t k = 0;
  float acc = 0.f;
#if defined(__AVX512F__)
  __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
#define F16(o) e4m3x16_256th(c + k + (o))
  for (; k + 64 <= K; k += 64) {
    s0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), F16(0), s0);
    s1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 16), F16(16), s1);
    s2 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 32), F16(32), s2);
    s3 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 48), F16(48), s3);
  }
  for (; k + 16 <= K; k += 16) s0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), F16(0), s0);
  acc = 256.f * _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
#elif defined(__AVX2__) && defined(__F16C__)
  const __m128i mask = _mm_set1_epi16((short)0xBF80);
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
#define F8(o) _mm256_cvtph_ps(_mm_and_si128(_mm_slli_epi16(_mm_cvtepi8_epi16( \
    _mm_loadl_epi64((const __m128i *)(c + k + (o)))), 7), mask))
  for (; k + 32 <= K; k += 32) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), F8(0), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8), F8(8), s1);
    s2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 16), F8(16), s2);
    s3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 24), F8(24), s3);
  }
  for (; k + 8 <= K; k += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), F8(0), s0);
  acc = 256.f * hsum256(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
#endif
  for (; k < K; k++) acc += x[k] * lut[c[k]];
  return acc;
}

#if defined(__AVX512F__)
/* Four weight rows at once (rows ld bytes apart) for inputs of TILE_K or more: each load of x
   feeds all four, so a long x (K = 8192 is 32 KB, an L1) comes from L2 once per four rows, not
   once per row. Measured from DRAM (bench/cpu_kernels.py --dram, AMD EPYC, one thread): one row
   at a time read 8192-wide FP8 rows at 8.7 GB/s and 2048-wide ones at 17.5; four at a time
   12.5 and 8.7, so shorter rows keep the one-row loop. */
#define TILE_K 4096
static void fp8_dot4(const float *x, const uint8_t *c, int64_t ld, int64_t K, const float *lut,
                     float *out) {
  __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 xv = _mm512_loadu_ps(x + k);
    for (int r = 0; r < 4; r++) a[r] = _mm512_fmadd_ps(xv, e4m3x16_256th(c + r * ld + k), a[r]);
  }
  for (int r = 0; r < 4; r++) {
    out[r] = 256.f * _mm512_reduce_add_ps(a[r]);
    for (int64_t t = k; t < K; t++) out[r] += x[t] * lut[c[r * ld + t]];
  }
}
#endif

/* y[m, n] = sum_k x[m, k] * value(codes[n, k]) */
void fp8_gemv(int64_t M, int64_t N, int64_t K, const float *x, const uint8_t *codes,
              const float *lut, float *y) {
  int64_t n = 0;
#if defined(__AVX512F__)
  float out[4];
  for (; K >= TILE_K && n + 4 <= N; n += 4)
    for (int64_t m = 0; m < M; m++) {
      fp8_dot4(x + m * K, codes + n * K, K, K, lut, out);
      for (int r = 0; r < 4; r++) y[m * N + n + r] = out[r];
    }
#endif
  for (; n < N; n++)
    for (int64_t m = 0; m < M; m++) y[m * N + n] = fp8_dot(x + m * K, codes + n * K, K, lut);
}

/* the value of stored FP4 group scale byte b: E4M3 (e8m0 = 0, by the 256-entry table) or an
   E8M0 exponent, 2^(b - 127) (b = 0: 2^-127, float32's subnormal 0x00400000) */
static inline float fp4_scale(uint8_t b, int e8m0, const float *lut) {
  if (!e8m0) return lut[b];
  uint32_t u = b ? (uint32_t)b << 23 : 0x00400000u;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

/* xe . even and xo . odd columns of one FP4 row (bytes p[0..H), stored group scale bytes s
   (fp4_scale), hg bytes a group), fused as fp8_dot is: the codes' values from a register
   table, times the group scale after the pair's sum. The scales are read as stored (1 byte a
   group) and converted here: NVFP4's 16 at a time, 256 weights' worth, MXFP4's one a step. */
static float fp4_dot(const float *xe, const float *xo, const uint8_t *p, int64_t H,
                     const float *lut16, const uint8_t *s, int e8m0, const float *lut, int64_t hg) {
  int64_t j = 0;
  float acc = 0.f;
#if defined(__AVX512F__)
  if (hg == 8 || hg % 16 == 0) {
    const __m512 table = _mm512_loadu_ps(lut16);
    const __m512i low = _mm512_set1_epi32(15);
    const __m512i pairs = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    __m512 a0 = _mm512_setzero_ps(), a1 = a0;
#define FP4_STEP(o, acc, sv)                                                                   \
      {                                                                                       \
        __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + j + (o))));    \
        __m512 t = _mm512_mul_ps(_mm512_loadu_ps(xe + j + (o)),                                 \
                                 _mm512_permutexvar_ps(_mm512_and_si512(b, low), table));      \
        t = _mm512_fmadd_ps(_mm512_loadu_ps(xo + j + (o)),                                      \
                            _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table), t);         \
        acc = _mm512_fmadd_ps(t, sv, acc);                                                     \
      }
    /* a step's 16 bytes are two NVFP4 groups (lanes 0-7 and 8-15), or within one wider group */
#define STEP_SCALES(o) (hg == 8 ? _mm512_permutexvar_ps(pairs, _mm512_set_ps(                  \
      0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, fp4_scale(s[(j + (o)) / 8 + 1], e8m0, lut),      \
      fp4_scale(s[(j + (o)) / 8], e8m0, lut))) : _mm512_set1_ps(fp4_scale(s[(j + (o)) / hg], e8m0, lut)))
    if (hg == 8 && !e8m0)
      for (; j + 128 <= H; j += 128) {  /* 16 groups: their scales in one register */
        __m512 s16 = _mm512_mul_ps(e4m3x16_256th(s + j / 8), _mm512_set1_ps(256.f));
        for (int o = 0; o < 128; o += 32) {
          FP4_STEP(o, a0, _mm512_permutexvar_ps(_mm512_add_epi32(pairs, _mm512_set1_epi32(o / 8)), s16))
          FP4_STEP(o + 16, a1, _mm512_permutexvar_ps(_mm512_add_epi32(pairs, _mm512_set1_epi32(o / 8 + 2)), s16))
        }
      }
    for (; j + 32 <= H; j += 32) {
      FP4_STEP(0, a0, STEP_SCALES(0))
      FP4_STEP(16, a1, STEP_SCALES(16))
    }
    for (; j + 16 <= H; j += 16) FP4_STEP(0, a0, STEP_SCALES(0))
#undef STEP_SCALES
#undef FP4_STEP
    acc = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
  }
#endif
  for (; j < H; j++)
    acc += (xe[j] * lut16[p[j] & 15] + xo[j] * lut16[p[j] >> 4]) * fp4_scale(s[j / hg], e8m0, lut);
  return acc;
}

/* y[m, n] = sum_k x[m, k] * e2m1(n, k) * scale(n, k / group); packed [N, K/2], scale [N,
   K/group] the stored bytes (fp4_scale: E4M3 by lut, or E8M0 where e8m0), xe / xo the even /
   odd columns of x, [M, K/2] each */
void fp4_gemv(int64_t M, int64_t N, int64_t K, const float *xe, const float *xo,
              const uint8_t *packed, const float *lut16, const uint8_t *scale, int e8m0,
              const float *lut, int64_t group, float *y) {
  int64_t H = K / 2;
  for (int64_t n = 0; n < N; n++)
    for (int64_t m = 0; m < M; m++)
      y[m * N + n] = fp4_dot(xe + m * H, xo + m * H, packed + n * H, H, lut16,
                             scale + n * (K / group), e8m0, lut, group / 2);
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

/* ---- bf16 weights (the lm_head, unquantized Linears): y = x @ w.T, x float32 ----
   bf16 bits shifted into float32's upper half are the same value, so each product is exact
   and the sum is float32, as torch's own bf16 matmuls accumulate. */
static inline float bf16_value(uint16_t bits) {
  uint32_t u = (uint32_t)bits << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

static float bf16_dot(const float *x, const uint16_t *w, int64_t K) {
  int64_t k = 0;
  float acc = 0.f;
#if defined(__AVX512F__)
  __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
#define W16(o) _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32( \
    _mm256_loadu_si256((const __m256i *)(w + k + (o)))), 16))
  for (; k + 64 <= K; k += 64) {
    s0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), W16(0), s0);
    s1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 16), W16(16), s1);
    s2 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 32), W16(32), s2);
    s3 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 48), W16(48), s3);
  }
  for (; k + 16 <= K; k += 16) s0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), W16(0), s0);
  acc = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
#elif defined(__AVX2__)
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
#define W8(o) _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32( \
    _mm_loadu_si128((const __m128i *)(w + k + (o)))), 16))
  for (; k + 32 <= K; k += 32) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), W8(0), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8), W8(8), s1);
    s2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 16), W8(16), s2);
    s3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 24), W8(24), s3);
  }
  for (; k + 8 <= K; k += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), W8(0), s0);
  acc = hsum256(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
#endif
  for (; k < K; k++) acc += x[k] * bf16_value(w[k]);
  return acc;
}

#if defined(__AVX512F__)
/* four rows at once, as fp8_dot4 */
static void bf16_dot4(const float *x, const uint16_t *w, int64_t ld, int64_t K, float *out) {
  __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 xv = _mm512_loadu_ps(x + k);
    for (int r = 0; r < 4; r++)
      a[r] = _mm512_fmadd_ps(xv, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
          _mm256_loadu_si256((const __m256i *)(w + r * ld + k))), 16)), a[r]);
  }
  for (int r = 0; r < 4; r++) {
    out[r] = _mm512_reduce_add_ps(a[r]);
    for (int64_t t = k; t < K; t++) out[r] += x[t] * bf16_value(w[r * ld + t]);
  }
}
#endif

/* y[m, n] = sum_k x[m, k] * w[n, k]; a weight row is read from memory once for all M rows */
void bf16_gemv(int64_t M, int64_t N, int64_t K, const float *x, const uint16_t *w, float *y) {
  int64_t n = 0;
#if defined(__AVX512F__)
  float out[4];
  for (; K >= TILE_K && n + 4 <= N; n += 4)
    for (int64_t m = 0; m < M; m++) {
      bf16_dot4(x + m * K, w + n * K, K, K, out);
      for (int r = 0; r < 4; r++) y[m * N + n + r] = out[r];
    }
#endif
  for (; n < N; n++)
    for (int64_t m = 0; m < M; m++) y[m * N + n] = bf16_dot(x + m * K, w + n * K, K);
}

/* ---- INT4 weights times 16-bit integer activations: integer dot products ----
   Weights: u = code + 8 in [0, 15]. Each 64 weights of a row are 16 little-endian 16-bit
   lanes, lane l holding u_l, u_(l+16), u_(l+32), u_(l+48) in its four nibbles, so one load,
   three shifts and three masks give four vectors of 16-bit codes, 16 columns each in order,
   ready for 16-bit multiply-adds. w = s * (u - c), c = 8 + zero point, per (row, group): float
   s, integer c; groups are multiples of 64. Rows are stored in pairs, group by group (row 2q's
   group j, then row 2q+1's, then group j+1), an odd last row on its own: the kernel takes two
   rows a pass, sharing its input loads, and still reads one sequential stream (two rows a pass
   from two streams read slower than one row a pass did).
   Inputs: per row and weight group, int16 a = round(x / t), t = max|x| / 32767, so
   sum_k w_k x_k ~= sum_g s_g t_g (sum_k u_k a_k - c_g sum_k a_k), all but the last product in
   int32: |u a| <= 15 * 32767, and |c sum(a)| <= 23 * 512 * 32767 < 2^29 for groups up to 512.
   AVX512 takes two such 64-column blocks of one group a step (groups of 128 or more): lanes
   0-15 the first, 16-31 the second, so its inputs are stored in the order that pairs them.
   (Groups of 64 taken two a step the same way ran 7-10 % slower than AVX2's 64 columns a
   step, SmolLM2 and 1B shapes, AMD EPYC: the halves' loads and the scales' shuffles.) */
#ifndef PREFETCH
#define PREFETCH 2048
#endif

static int paired(int64_t g) {
#if defined(__AVX512BW__)
  return g % 128 == 0;
#else
  (void)g;
  return 0;
#endif
}

static void quantize_inputs(int64_t K, int64_t g, const float *x, int16_t *a, float *t, int32_t *asum) {
  int pair = paired(g);
  for (int64_t j = 0; j < K / g; j++) {
    const float *xg = x + j * g;
    float amax = 0.f;
    for (int64_t k = 0; k < g; k++) amax = fmaxf(amax, fabsf(xg[k]));
    float inv = amax > 0.f ? 32767.f / amax : 0.f;
    int32_t sum = 0;
    for (int64_t k = j * g; k < (j + 1) * g; k++) {
      /* paired: column 64h + 16r + l of a block (h its half) goes to 32r + 16h + l */
      int64_t at = pair ? (k & ~127) + ((k & 48) << 1) + ((k & 64) >> 2) + (k & 15) : k;
      int32_t v = (int32_t)nearbyintf(x[k] * inv);  /* round half to even; |v| <= 32767 */
      a[at] = (int16_t)v;
      sum += v;
    }
    t[j] = amax / 32767.f;
    asum[j] = sum;
  }
}

#if defined(__AVX2__)
/* acc + the 16-bit products of 64 weights' codes (b, one block) with their inputs x, summed
   in pairs into eight int32 lanes */
static inline __m256i dot64(__m256i b, const int16_t *x, __m256i acc) {
  const __m256i m = _mm256_set1_epi16(15);
  const __m256i *v = (const __m256i *)x;
#define MADD2(u, q) acc = _mm256_add_epi32(acc, _mm256_madd_epi16(u, _mm256_loadu_si256(v + q)))
  MADD2(_mm256_and_si256(b, m), 0);
  MADD2(_mm256_and_si256(_mm256_srli_epi16(b, 4), m), 1);
  MADD2(_mm256_and_si256(_mm256_srli_epi16(b, 8), m), 2);
  MADD2(_mm256_srli_epi16(b, 12), 3);
#undef MADD2
  return acc;
}
#endif

#if defined(__AVX512BW__)
#if defined(__AVX512VNNI__)
#define MADD(acc, u, v) _mm512_dpwssd_epi32(acc, u, v)
#else
#define MADD(acc, u, v) _mm512_add_epi32(acc, _mm512_madd_epi16(u, v))
#endif
/* acc + the products of a 128-column step (b: two blocks, lanes 0-15 and 16-31) with its
   paired inputs x0..x3, in 16 int32 lanes. Four independent multiply-adds; nibbles 1 and 2
   masked in place are 16 u and 256 u, whose sums come out times 16 and 256, exactly, and are
   shifted back (one shift fewer a nibble). */
static inline __m512i dot128(__m512i b, __m512i x0, __m512i x1, __m512i x2, __m512i x3, __m512i acc) {
  const __m512i m = _mm512_set1_epi16(15), m1 = _mm512_set1_epi16(0xF0), m2 = _mm512_set1_epi16(0xF00);
  const __m512i z = _mm512_setzero_si512();
  __m512i i0 = MADD(acc, _mm512_and_si512(b, m), x0), i1 = MADD(z, _mm512_and_si512(b, m1), x1);
  __m512i i2 = MADD(z, _mm512_and_si512(b, m2), x2), i3 = MADD(z, _mm512_srli_epi16(b, 12), x3);
  return _mm512_add_epi32(_mm512_add_epi32(i0, _mm512_srai_epi32(i1, 4)),
                          _mm512_add_epi32(_mm512_srai_epi32(i2, 8), i3));
}
#undef MADD
#endif

/* where row n of N starts: rows 0 .. 2 (N / 2) - 1 in pairs (the pair's bytes from there), an
   odd last row on its own */
static inline const uint8_t *row_at(const uint8_t *packed, int64_t n, int64_t N, int64_t K) {
  return packed + (n - (n < N - N % 2 ? n % 2 : 0)) * (K / 2);
}

/* group j's g / 2 bytes of row r (0 or 1) of the pair at p, or of a lone row (lone = 1, r = 0) */
static inline const uint8_t *group_of(const uint8_t *p, int lone, int r, int64_t g, int64_t j) {
  return p + j * (lone ? g / 2 : g) + r * (g / 2);
}

/* The dot products of one input row with a row pair (R = 2) or a lone last row (R = 1) at p
   (row_at), into out[r]; s and c point at the first row's, the second's follow a row on. */
static inline __attribute__((always_inline)) void int4_rows(
    int R, const uint8_t *p, const int16_t *a, const float *t, const int32_t *asum,
    const float *s, const int32_t *c, int64_t K, int64_t g, float *out) {
  int64_t G = K / g;
  /* row r's bytes of weights k.. (k in a group, a multiple of 64) */
#define AT(r, k) (group_of(p, R == 1, r, g, (k) / g) + ((k) % g) / 2)
  /* the rows are streams: asking for each 2 KB ahead, into L2, read 8192x2048 from DRAM at
     14 GB/s against 11-12 without (AMD EPYC, one thread; into L1 or further ahead no better) */
#define FETCH(r, k) _mm_prefetch((const char *)AT(r, k) + PREFETCH, _MM_HINT_T1)
#define INIT(r, j) _mm_cvtsi32_si128(-c[(r) * G + (j)] * asum[j])  /* the group's -c sum(a), exact */
#if defined(__AVX512BW__)
  if (paired(g)) {
    __m512 f[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t j = 0; j < G; j++) {
      __m512i i[2];
      for (int r = 0; r < R; r++) i[r] = _mm512_zextsi128_si512(INIT(r, j));
      for (int64_t k = j * g; k < (j + 1) * g; k += 128) {
        const int16_t *x = a + k;
        __m512i x0 = _mm512_loadu_si512(x), x1 = _mm512_loadu_si512(x + 32);
        __m512i x2 = _mm512_loadu_si512(x + 64), x3 = _mm512_loadu_si512(x + 96);
        for (int r = 0; r < R; r++) {
          FETCH(r, k);
          i[r] = dot128(_mm512_loadu_si512(AT(r, k)), x0, x1, x2, x3, i[r]);
        }
      }
      for (int r = 0; r < R; r++)
        f[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i[r]), _mm512_set1_ps(s[r * G + j] * t[j]), f[r]);
    }
    for (int r = 0; r < R; r++) out[r] = _mm512_reduce_add_ps(f[r]);
    return;
  }
#endif
#if defined(__AVX2__)
  __m256 f[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  for (int64_t j = 0; j < G; j++) {
    __m256i i[2];
    for (int r = 0; r < R; r++) i[r] = _mm256_zextsi128_si256(INIT(r, j));
    for (int64_t k = j * g; k < (j + 1) * g; k += 64)
      for (int r = 0; r < R; r++) {
        FETCH(r, k);
        i[r] = dot64(_mm256_loadu_si256((const __m256i *)AT(r, k)), a + k, i[r]);
      }
    for (int r = 0; r < R; r++)
      f[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i[r]), _mm256_set1_ps(s[r * G + j] * t[j]), f[r]);
  }
  for (int r = 0; r < R; r++) out[r] = hsum256(f[r]);
#else
  for (int r = 0; r < R; r++) {
    float acc = 0.f;
    for (int64_t j = 0; j < G; j++) {
      int32_t i = -c[r * G + j] * asum[j];
      for (int64_t k = j * g; k < (j + 1) * g; k += 64)
        for (int64_t l = 0; l < 16; l++) {
          const uint8_t *q = AT(r, k);
          uint32_t lane = q[2 * l] | (uint32_t)q[2 * l + 1] << 8;
          for (int b = 0; b < 4; b++) i += (int32_t)((lane >> (4 * b)) & 15) * a[k + 16 * b + l];
        }
      acc += s[r * G + j] * t[j] * (float)i;
    }
    out[r] = acc;
  }
#endif
#undef AT
#undef FETCH
#undef INIT
}

/* out [N, K] = s * (u - c), the reference path's float32 weights, as float32 or rounded to
   the nearest bf16 (ties to even; these are finite): a prefill-sized call's dense GEMM */
void int4_dequant(int64_t N, int64_t K, int64_t g, const uint8_t *packed, const float *s,
                  const int32_t *c, int bf16, void *out) {
  float *row = malloc(K * sizeof(float));
  for (int64_t n = 0; n < N; n++) {
    for (int64_t j = 0; j < K / g; j++) {
      int lone = n == N - 1 && N % 2;
      const uint16_t *p = (const uint16_t *)group_of(row_at(packed, n, N, K), lone, lone ? 0 : n % 2,
                                                     g, j);  /* little-endian lanes */
      float sj = s[n * (K / g) + j];
      int32_t cj = c[n * (K / g) + j];
      for (int64_t k = 0; k < g; k += 64)  /* the inner loop vectorizes over l */
        for (int r = 0; r < 4; r++)
          for (int64_t l = 0; l < 16; l++)
            row[j * g + k + 16 * r + l] = sj * (float)((int32_t)((p[k / 4 + l] >> (4 * r)) & 15) - cj);
    }
    if (bf16) {
      uint16_t *o = (uint16_t *)out + n * K;
      for (int64_t k = 0; k < K; k++) {
        uint32_t u;
        memcpy(&u, row + k, 4);
        o[k] = (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
      }
    } else {
      memcpy((float *)out + n * K, row, K * sizeof(float));
    }
  }
  free(row);
}

/* the widest integer vector path compiled in: 512, 256 (AVX2) or 0 (plain C, ~10x slower) */
int int4_vector_bits(void) {
#if defined(__AVX512BW__)
  return 512;
#elif defined(__AVX2__)
  return 256;
#else
  return 0;
#endif
}

/* y[m, n] = x[m] . dequantized row n: packed [N, K/2], s float32 and c int32 [N, K/g] */
void int4_gemv(int64_t M, int64_t N, int64_t K, int64_t g, const float *x, const uint8_t *packed,
               const float *s, const int32_t *c, float *y) {
  int64_t G = K / g;
  int16_t *a = malloc(M * K * sizeof(int16_t));
  float *t = malloc(M * G * sizeof(float));
  int32_t *asum = malloc(M * G * sizeof(int32_t));
  for (int64_t m = 0; m < M; m++) quantize_inputs(K, g, x + m * K, a + m * K, t + m * G, asum + m * G);
  float out[2];
  int64_t n = 0;
  for (; n + 2 <= N; n += 2)
    for (int64_t m = 0; m < M; m++) {
      int4_rows(2, row_at(packed, n, N, K), a + m * K, t + m * G, asum + m * G, s + n * G, c + n * G,
                K, g, out);
      y[m * N + n] = out[0];
      y[m * N + n + 1] = out[1];
    }
  for (; n < N; n++)
    for (int64_t m = 0; m < M; m++)
      int4_rows(1, row_at(packed, n, N, K), a + m * K, t + m * G, asum + m * G, s + n * G, c + n * G,
                K, g, y + m * N + n);
  free(a);
  free(t);
  free(asum);
}

/* ---- INT8 weights, float32 inputs (W8A16): y[m, n] = scale[n] * sum_k x[m, k] codes[n, k] ----
   Each code widens to int32 and converts to float32 exactly (|code| <= 128), so the products
   are the reference path's x * (code * scale) up to where the scale is applied: one float32
   rounding of the sum, not of each product. Float32 inputs as they come (torch's int8pack
   kernel takes bf16 inputs only, a 2^-9 rounding of each). Four accumulators, as fp8_dot. */
static float int8_dot(const float *x, const int8_t *c, int64_t K) {
  int64_t k = 0;
  float acc = 0.f;
#if defined(__AVX512F__)
  __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
#define I8(o) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(c + k + (o)))))
  for (; k + 64 <= K; k += 64) {
    s0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), I8(0), s0);
    s1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 16), I8(16), s1);
    s2 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 32), I8(32), s2);
    s3 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 48), I8(48), s3);
  }
  for (; k + 16 <= K; k += 16) s0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), I8(0), s0);
#undef I8
  acc = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
#elif defined(__AVX2__)
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
#define I8(o) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(c + k + (o)))))
  for (; k + 32 <= K; k += 32) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), I8(0), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8), I8(8), s1);
    s2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 16), I8(16), s2);
    s3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 24), I8(24), s3);
  }
  for (; k + 8 <= K; k += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), I8(0), s0);
#undef I8
  acc = hsum256(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
#endif
  for (; k < K; k++) acc += x[k] * (float)c[k];
  return acc;
}

#if defined(__AVX512F__)
/* Four rows a pass (rows K bytes apart), each load of x shared by the four, for inputs of
   TILE_K or more, as fp8_dot4: one row at a time re-read a 32 KB x from L2 for every row
   (8.5 GB/s at 2048x8192 from DRAM, AMD EPYC, one thread; four rows 15.8), while at K <= 2048
   four streams read slower than one (49152x576: 7.4 GB/s against 14.0). */
static void int8_dot4(const float *x, const int8_t *c, int64_t K, float *out) {
  __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 xv = _mm512_loadu_ps(x + k);
    for (int r = 0; r < 4; r++)
      a[r] = _mm512_fmadd_ps(xv, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
          _mm_loadu_si128((const __m128i *)(c + r * K + k)))), a[r]);
  }
  for (int r = 0; r < 4; r++) {
    out[r] = _mm512_reduce_add_ps(a[r]);
    for (int64_t t = k; t < K; t++) out[r] += x[t] * (float)c[r * K + t];
  }
}
#endif

void int8_gemv(int64_t M, int64_t N, int64_t K, const float *x, const int8_t *codes,
               const float *scale, float *y) {
  int64_t n = 0;
#if defined(__AVX512F__)
  float out[4];
  for (; K >= TILE_K && n + 4 <= N; n += 4)
    for (int64_t m = 0; m < M; m++) {
      int8_dot4(x + m * K, codes + n * K, K, out);
      for (int r = 0; r < 4; r++) y[m * N + n + r] = scale[n + r] * out[r];
    }
#endif
  for (; n < N; n++)
    for (int64_t m = 0; m < M; m++) y[m * N + n] = scale[n] * int8_dot(x + m * K, codes + n * K, K);
}

/* ---- per-token INT8 input codes (W8A8 dynamic): the reference path's rule, one pass ----
   For each row of x [M, K]: amax = max|x| (NaN propagates: a NaN row gets a NaN scale, as
   torch's amax gives), scale = amax / 127 in float32 (1 for an all-zero row, at least 2^-126,
   formats/grid.py's _scale_from_amax), codes = x / scale in float32 rounded half to even
   (nearbyintf in the default rounding mode) onto [-128, 127], written as float32 for FBGEMM.
   A division, not a product with the reciprocal: that is how torch computes x / scale. */
void int8_token_codes(int64_t M, int64_t K, const float *x, float *codes, float *scale) {
  for (int64_t m = 0; m < M; m++) {
    const float *r = x + m * K;
    float amax = 0.f;
    for (int64_t k = 0; k < K; k++) {
      float a = fabsf(r[k]);
      amax = (a > amax || a != a) ? a : amax;
    }
    float s = amax > 0.f ? amax / 127.f : (amax == 0.f ? 1.f : amax);
    s = s < 1.17549435e-38f ? 1.17549435e-38f : s;  /* 2^-126 (NaN compares false: kept) */
    scale[m] = s;
    float *c = codes + m * K;
    for (int64_t k = 0; k < K; k++) {
      float q = nearbyintf(r[k] / s);
      c[k] = q < -128.f ? -128.f : q > 127.f ? 127.f : q;
    }
  }
}

/* ---- one-token attention over a KV cache (runtime/compiled.py's decode step) ---- */

/* x[0..n) = softmax(x), in place (n >= 1). AVX2 computes e^(x - max) itself, 8 at a time:
   e^y = 2^m e^r, y = m ln2 + r, |r| <= ln2 / 2, e^r by its degree-6 Taylor polynomial
   (relative error below 2e-7, float32's own rounding), y clamped at -87 (a weight below 1e-38
   of the largest, nothing in a float32 sum); elsewhere libm's expf. */
static void softmax(float *x, int64_t n) {
  float mx = x[0], sum = 0.f;
  for (int64_t i = 1; i < n; i++) mx = fmaxf(mx, x[i]);
  int64_t i = 0;
#if defined(__AVX2__)
  const __m256 lo = _mm256_set1_ps(-87.f), log2e = _mm256_set1_ps(1.44269504088896341f);
  const __m256 ln2a = _mm256_set1_ps(-0.693145751953125f), ln2b = _mm256_set1_ps(-1.428606820309417e-06f);
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    __m256 y = _mm256_max_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), _mm256_set1_ps(mx)), lo);
    __m256 m = _mm256_round_ps(_mm256_mul_ps(y, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fmadd_ps(m, ln2b, _mm256_fmadd_ps(m, ln2a, y));  /* ln2a * m is exact */
    __m256 p = _mm256_set1_ps(1.f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    __m256i two_m = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(m), _mm256_set1_epi32(127)), 23);
    p = _mm256_mul_ps(p, _mm256_castsi256_ps(two_m));
    _mm256_storeu_ps(x + i, p);
    acc = _mm256_add_ps(acc, p);
  }
  sum = hsum256(acc);
#endif
  for (; i < n; i++) sum += x[i] = expf(x[i] - mx);
  float inv = 1.f / sum;
  for (i = 0; i < n; i++) x[i] *= inv;
}

static inline float kv_value(const void *kv, int bf16, int64_t i) {
  return bf16 ? bf16_value(((const uint16_t *)kv)[i]) : ((const float *)kv)[i];
}

/* out [H, D] = softmax(scale q k^T + mask) v for one query token: q [H, D] float32, query head
   h attending to KV head h / (H / KVH); k and v [KVH, L, D] float32 or bf16 (kv_bf16), row l
   of head j at j * ld + l * D; mask NULL, bool (mask_kind 1: attend where nonzero) or additive
   float32 (mask_kind 2), [L], shared by all heads. Positions the mask rules out (false or
   -inf) are never read, so a static cache costs only its filled positions. Each key and value
   row is read once for all the query heads that share it. */
void attn_decode(int64_t H, int64_t KVH, int64_t L, int64_t D, int64_t ld, const float *q,
                 const void *k, const void *v, int kv_bf16, const void *mask, int mask_kind,
                 float scale, float *out) {
  int64_t rep = H / KVH;
  int64_t *keep = malloc(L * sizeof(int64_t));
  float *add = malloc(L * sizeof(float));
  int64_t n = 0;
  for (int64_t l = 0; l < L; l++) {
    float m = mask_kind == 2 ? ((const float *)mask)[l] : 0.f;
    if ((mask_kind == 1 && !((const uint8_t *)mask)[l]) || (mask_kind == 2 && isinf(m) && m < 0))
      continue;
    keep[n] = l;
    add[n++] = m;
  }
  float *s = malloc((n ? n : 1) * rep * sizeof(float));  /* [rep, n] scores, then weights */
  for (int64_t j = 0; j < KVH; j++) {
    const float *qj = q + j * rep * D;
    for (int64_t i = 0; i < n; i++) {
      int64_t row = j * ld + keep[i] * D;
      for (int64_t r = 0; r < rep; r++) {
        float acc = 0.f;
        for (int64_t d = 0; d < D; d++) acc += qj[r * D + d] * kv_value(k, kv_bf16, row + d);
        s[r * n + i] = acc * scale + add[i];
      }
    }
    for (int64_t r = 0; n && r < rep; r++) softmax(s + r * n, n);
    float *o = out + j * rep * D;
    for (int64_t e = 0; e < rep * D; e++) o[e] = 0.f;
    for (int64_t i = 0; i < n; i++) {
      int64_t row = j * ld + keep[i] * D;
      for (int64_t r = 0; r < rep; r++) {
        float p = s[r * n + i];
        for (int64_t d = 0; d < D; d++) o[r * D + d] += p * kv_value(v, kv_bf16, row + d);
      }
    }
  }
  free(keep);
  free(add);
  free(s);
}
