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

/* x . values of E4M3 bytes c, the conversion fused into the dot product (no row written out
   and read back): each byte becomes an FP16 with its bits shifted (fp8_row's trick: the value
   / 256, subnormals included) and widened to float32 by the F16C / AVX512 instruction; the sum
   is scaled back by 256 (exact) at the end. Four accumulators: one would wait on each FMA's
   latency (4 cycles). */
static float fp8_dot(const float *x, const uint8_t *c, int64_t K, const float *lut) {
  int64_t k = 0;
  float acc = 0.f;
#if defined(__AVX512F__)
  const __m256i mask = _mm256_set1_epi16((short)0xBF80);
  __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
#define F16(o) _mm512_cvtph_ps(_mm256_and_si256(_mm256_slli_epi16(_mm256_cvtepi8_epi16( \
    _mm_loadu_si128((const __m128i *)(c + k + (o)))), 7), mask))
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
  const __m256i mask = _mm256_set1_epi16((short)0xBF80);
  __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 xv = _mm512_loadu_ps(x + k);
    for (int r = 0; r < 4; r++)
      a[r] = _mm512_fmadd_ps(xv, _mm512_cvtph_ps(_mm256_and_si256(_mm256_slli_epi16(
          _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(c + r * ld + k))), 7), mask)), a[r]);
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

/* xe . even and xo . odd columns of one FP4 row (bytes p[0..H), group scales s, hg bytes a
   group), fused as fp8_dot is: the codes' values from a register table, times the group scale
   after the pair's sum. Scalar fallback as fp4_row. */
static float fp4_dot(const float *xe, const float *xo, const uint8_t *p, int64_t H,
                     const float *lut16, const float *s, int64_t hg) {
  int64_t j = 0;
  float acc = 0.f;
#if defined(__AVX512F__)
  if (hg == 8 || hg % 16 == 0) {
    const __m512 table = _mm512_loadu_ps(lut16);
    const __m512i low = _mm512_set1_epi32(15);
    const __m512i pairs = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    __m512 a0 = _mm512_setzero_ps(), a1 = a0;
    for (; j + 32 <= H; j += 32) {
#define FP4_STEP(o, acc)                                                                       \
      {                                                                                       \
        __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + j + (o))));    \
        __m512 sv = hg == 8 ? _mm512_permutexvar_ps(pairs, _mm512_maskz_loadu_ps(3, s + (j + (o)) / 8)) \
                            : _mm512_set1_ps(s[(j + (o)) / hg]);                               \
        __m512 t = _mm512_mul_ps(_mm512_loadu_ps(xe + j + (o)),                                 \
                                 _mm512_permutexvar_ps(_mm512_and_si512(b, low), table));      \
        t = _mm512_fmadd_ps(_mm512_loadu_ps(xo + j + (o)),                                      \
                            _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table), t);         \
        acc = _mm512_fmadd_ps(t, sv, acc);                                                     \
      }
      FP4_STEP(0, a0)
      FP4_STEP(16, a1)
    }
    for (; j + 16 <= H; j += 16) FP4_STEP(0, a0)
    acc = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
  }
#endif
  for (; j < H; j++)
    acc += (xe[j] * lut16[p[j] & 15] + xo[j] * lut16[p[j] >> 4]) * s[j / hg];
  return acc;
}

/* y[m, n] = sum_k x[m, k] * e2m1(n, k) * scale[n, k / group]; packed [N, K/2], scale
   [N, K/group] float32, xe / xo the even / odd columns of x, [M, K/2] each */
void fp4_gemv(int64_t M, int64_t N, int64_t K, const float *xe, const float *xo,
              const uint8_t *packed, const float *lut16, const float *scale, int64_t group,
              float *y) {
  int64_t H = K / 2;
  for (int64_t n = 0; n < N; n++)
    for (int64_t m = 0; m < M; m++)
      y[m * N + n] = fp4_dot(xe + m * H, xo + m * H, packed + n * H, H, lut16,
                             scale + n * (K / group), group / 2);
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
   s, integer c; groups are multiples of 64.
   Inputs: per row and weight group, int16 a = round(x / t), t = max|x| / 32767, so
   sum_k w_k x_k ~= sum_g s_g t_g (sum_k u_k a_k - c_g sum_k a_k), all but the last product in
   int32: |u a| <= 15 * 32767 (AVX512 sums a quarter of a group's products times 256: for groups
   up to 512, below 2^30).
   AVX512 takes two such 64-column blocks of one group a step (groups of 128 or more): lanes
   0-15 the first, 16-31 the second, so its inputs are stored in the order that pairs them. */
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
    for (int64_t k = 0; k < g; k++) {
      /* paired: column 64h + 16r + l (h the block of the pair) goes to 32r + 16h + l */
      int64_t at = pair ? (k & ~127) + ((k & 48) << 1) + ((k & 64) >> 2) + (k & 15) : k;
      int32_t v = (int32_t)nearbyintf(xg[k] * inv);  /* round half to even; |v| <= 32767 */
      a[j * g + at] = (int16_t)v;
      sum += v;
    }
    t[j] = amax / 32767.f;
    asum[j] = sum;
  }
}

static float int4_row_dot(const uint8_t *p, const int16_t *a, const float *t, const int32_t *asum,
                          const float *s, const int32_t *c, int64_t K, int64_t g) {
  int64_t G = K / g;
#if defined(__AVX512BW__)
  if (paired(g)) {
    const __m512i m = _mm512_set1_epi16(15), m1 = _mm512_set1_epi16(0xF0), m2 = _mm512_set1_epi16(0xF00);
    __m512 f = _mm512_setzero_ps();
    for (int64_t j = 0; j < G; j++) {
      /* the group's -c * sum(a) starts in lane 0, so its sum stays an exact integer; four
         accumulators, since each multiply-add waits on the last one into its register */
      __m512i i = _mm512_zextsi128_si512(_mm_cvtsi32_si128(-c[j] * asum[j]));
      __m512i i1 = _mm512_setzero_si512(), i2 = i1, i3 = i1;
      for (int64_t k = j * g; k < (j + 1) * g; k += 128) {
        /* the rows are one stream: asking for it 2 KB ahead, into L2, read 8192x2048 from
           DRAM at 14 GB/s against 11-12 without (AMD EPYC, one thread; into L1 or further
           ahead no better) */
        _mm_prefetch((const char *)(p + k / 2) + PREFETCH, _MM_HINT_T1);
        __m512i b = _mm512_loadu_si512(p + k / 2);
        const int16_t *x = a + k;
#if defined(__AVX512VNNI__)
#define MADD(acc, u, v) _mm512_dpwssd_epi32(acc, u, v)
#else
#define MADD(acc, u, v) _mm512_add_epi32(acc, _mm512_madd_epi16(u, v))
#endif
        /* nibbles 1 and 2 masked in place are 16 u and 256 u: their sums come out times 16
           and 256, exactly, and are shifted back once a group (one shift fewer a nibble) */
        i = MADD(i, _mm512_and_si512(b, m), _mm512_loadu_si512(x));
        i1 = MADD(i1, _mm512_and_si512(b, m1), _mm512_loadu_si512(x + 32));
        i2 = MADD(i2, _mm512_and_si512(b, m2), _mm512_loadu_si512(x + 64));
        i3 = MADD(i3, _mm512_srli_epi16(b, 12), _mm512_loadu_si512(x + 96));
      }
      i = _mm512_add_epi32(_mm512_add_epi32(i, _mm512_srai_epi32(i1, 4)),
                           _mm512_add_epi32(_mm512_srai_epi32(i2, 8), i3));
      f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), _mm512_set1_ps(s[j] * t[j]), f);
    }
    return _mm512_reduce_add_ps(f);
  }
#endif
#if defined(__AVX2__)
  const __m256i m = _mm256_set1_epi16(15);
  __m256 f = _mm256_setzero_ps();
  for (int64_t j = 0; j < G; j++) {
    __m256i i = _mm256_zextsi128_si256(_mm_cvtsi32_si128(-c[j] * asum[j]));
    for (int64_t k = j * g; k < (j + 1) * g; k += 64) {
      _mm_prefetch((const char *)(p + k / 2) + PREFETCH, _MM_HINT_T1);
      __m256i b = _mm256_loadu_si256((const __m256i *)(p + k / 2));
      const __m256i *x = (const __m256i *)(a + k);
#define MADD2(u, q) i = _mm256_add_epi32(i, _mm256_madd_epi16(u, _mm256_loadu_si256(x + q)))
      MADD2(_mm256_and_si256(b, m), 0);
      MADD2(_mm256_and_si256(_mm256_srli_epi16(b, 4), m), 1);
      MADD2(_mm256_and_si256(_mm256_srli_epi16(b, 8), m), 2);
      MADD2(_mm256_srli_epi16(b, 12), 3);
    }
    f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), _mm256_set1_ps(s[j] * t[j]), f);
  }
  return hsum256(f);
#else
  float acc = 0.f;
  for (int64_t j = 0; j < G; j++) {
    int32_t i = -c[j] * asum[j];
    for (int64_t k = j * g; k < (j + 1) * g; k += 64)
      for (int64_t l = 0; l < 16; l++) {
        uint32_t lane = p[k / 2 + 2 * l] | (uint32_t)p[k / 2 + 2 * l + 1] << 8;
        for (int r = 0; r < 4; r++) i += (int32_t)((lane >> (4 * r)) & 15) * a[k + 16 * r + l];
      }
    acc += s[j] * t[j] * (float)i;
  }
  return acc;
#endif
}

/* out [N, K] = s * (u - c), the reference path's float32 weights, as float32 or rounded to
   the nearest bf16 (ties to even; these are finite): a prefill-sized call's dense GEMM */
void int4_dequant(int64_t N, int64_t K, int64_t g, const uint8_t *packed, const float *s,
                  const int32_t *c, int bf16, void *out) {
  float *row = malloc(K * sizeof(float));
  for (int64_t n = 0; n < N; n++) {
    const uint16_t *p = (const uint16_t *)(packed + n * (K / 2));  /* little-endian lanes */
    for (int64_t j = 0; j < K / g; j++) {
      float sj = s[n * (K / g) + j];
      int32_t cj = c[n * (K / g) + j];
      for (int64_t k = j * g; k < (j + 1) * g; k += 64)  /* the inner loop vectorizes over l */
        for (int r = 0; r < 4; r++)
          for (int64_t l = 0; l < 16; l++)
            row[k + 16 * r + l] = sj * (float)((int32_t)((p[k / 4 + l] >> (4 * r)) & 15) - cj);
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
  for (int64_t n = 0; n < N; n++)
    for (int64_t m = 0; m < M; m++)
      y[m * N + n] = int4_row_dot(packed + n * (K / 2), a + m * K, t + m * G, asum + m * G,
                                  s + n * G, c + n * G, K, g);
  free(a);
  free(t);
  free(asum);
}
