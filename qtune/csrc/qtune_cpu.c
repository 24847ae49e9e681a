/* qtune native CPU kernels: NF4/FP4 quantize and dequantize, int8 quantize (per row) and dequantize
 * (symmetric and zero-point), GPTQ dequantize.
 *
 * Plain C (no PyTorch headers) so it compiles in about a second with the system C compiler; loaded
 * through ctypes by qtune/ops/cpu_native.py and registered as the "cpu" kernel of the qtune:: ops.
 * Every function reproduces the pure-PyTorch reference in qtune/formats bit for bit (IEEE fp32
 * arithmetic in the same order; no -ffast-math), which the tests check.
 *
 * Input/output kinds: 0 = fp32, 1 = bf16 (round to nearest even, as torch casts), 2 = fp16.
 */
#include <stdint.h>
#include <math.h>
#include <string.h>

static inline uint16_t f32_to_bf16(float v) {
    uint32_t u;
    memcpy(&u, &v, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline void store(void *out, int kind, int64_t i, float v) {
    if (kind == 0) ((float *)out)[i] = v;
    else if (kind == 1) ((uint16_t *)out)[i] = f32_to_bf16(v);
    else ((_Float16 *)out)[i] = (_Float16)v;
}

/* W[e] = code[nibble(e)] * absmax[e / blocksize] for e in [0, n); nibble(e) is the high nibble of byte
 * e/2 for even e, the low one for odd e. The 16 products of a block are formed once in fp32 and
 * converted to the output type into a per-block table, so the inner loop is two table loads and two
 * stores per byte (the same values as multiplying element by element). Blocks start at even e:
 * block sizes are even (configs allow powers of two >= 32). */
#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define QT_AVX512 1
/* Nibble indices of 16 bytes in element order, as 32 16-bit lanes: lane 2i = high nibble of byte i,
 * lane 2i+1 = its low nibble (one 32-bit lane per byte, little endian). */
static inline __m512i nibbles_epi16(const uint8_t *p) {
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm512_or_si512(_mm512_srli_epi32(b, 4), _mm512_slli_epi32(_mm512_and_si512(b, _mm512_set1_epi32(15)), 16));
}
/* The same for 8 bytes as 16 32-bit lanes (fp32 output). */
static inline __m512i nibbles_epi32(const uint8_t *p) {
    const __m128i b = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)p));
    const __m128i w = _mm_or_si128(_mm_srli_epi16(b, 4), _mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(15)), 8));
    return _mm512_cvtepu8_epi32(w);
}
#endif

/* One block: the 16 products code[j] * a are formed in fp32 and converted once into a table; then
 * every element is a table look-up (AVX-512 permutes where available, 32 or 16 elements per step). */
#define QT_DEQUANT_4BIT(NAME, T, CONVERT, SIMD_BODY, LUT_BUILD)                                                \
    static void NAME(const uint8_t *packed, const float *absmax, const uint8_t *qabs, const float *ncode, \
                     const float *nabs, float offset, const float *code, int64_t n, int64_t blocksize, \
                     T *out, int threads) {                                                         \
        int64_t nblocks = (n + blocksize - 1) / blocksize;                                          \
        _Pragma("omp parallel for num_threads(threads) schedule(static)")                           \
        for (int64_t b = 0; b < nblocks; b++) {                                                     \
            T lut[32];                                                                              \
            const float a = qabs ? ncode[qabs[b]] * nabs[b / 256] + offset : absmax[b];            \
            LUT_BUILD(CONVERT)                                                                      \
            const int64_t start = b * blocksize;                                                    \
            const int64_t end = start + blocksize < n ? start + blocksize : n;                      \
            const uint8_t *p = packed + (start >> 1);                                               \
            T *o = out + start;                                                                     \
            const int64_t pairs = (end - start) >> 1;                                               \
            int64_t i = 0;                                                                          \
            SIMD_BODY                                                                               \
            for (; i < pairs; i++) {                                                                \
                const uint8_t byte = p[i];                                                          \
                o[2 * i] = lut[byte >> 4];                                                          \
                o[2 * i + 1] = lut[byte & 15];                                                      \
            }                                                                                       \
            if ((end - start) & 1) o[2 * pairs] = lut[p[pairs] >> 4];                               \
        }                                                                                           \
    }

#ifdef QT_AVX512
#define SIMD16                                                                                      \
    {                                                                                               \
        const __m512i t = _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i *)lut));         \
        for (; i + 16 <= pairs; i += 16)                                                            \
            _mm512_storeu_si512((void *)(o + 2 * i), _mm512_permutexvar_epi16(nibbles_epi16(p + i), t)); \
    }
#define SIMD32                                                                                      \
    {                                                                                               \
        const __m512 t = _mm512_loadu_ps(lut);                                                      \
        for (; i + 8 <= pairs; i += 8)                                                              \
            _mm512_storeu_ps(o + 2 * i, _mm512_permutexvar_ps(nibbles_epi32(p + i), t));           \
    }
/* The 16 products in one vector multiply, converted with the same rounding as the scalar code:
 * bf16 by round-to-nearest-even on the bits (NaN kept quiet), fp16 by vcvtps2ph (nearest even). */
#define LUT_BF16(CONVERT)                                                                           \
    {                                                                                               \
        const __m512i u = _mm512_castps_si512(_mm512_mul_ps(_mm512_loadu_ps(code), _mm512_set1_ps(a))); \
        const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), \
                                            _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))), 16); \
        const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)), \
                                                      _mm512_set1_epi32(0x7f800000));               \
        const __m512i q = _mm512_mask_blend_epi32(nan, r, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40))); \
        _mm256_storeu_si256((__m256i *)lut, _mm512_cvtepi32_epi16(q));                             \
    }
#define LUT_F16(CONVERT)                                                                            \
    _mm256_storeu_si256((__m256i *)lut, _mm512_cvtps_ph(_mm512_mul_ps(_mm512_loadu_ps(code), _mm512_set1_ps(a)), \
                                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
#define SIMD16
#define SIMD32
#define LUT_BF16 LUT_SCALAR
#define LUT_F16 LUT_SCALAR
#endif
#define LUT_SCALAR(CONVERT) for (int j = 0; j < 16; j++) lut[j] = CONVERT(code[j] * a);

static inline float as_f32(float v) { return v; }
static inline _Float16 as_f16(float v) { return (_Float16)v; }
QT_DEQUANT_4BIT(dequant_4bit_f32, float, as_f32, SIMD32, LUT_SCALAR)
QT_DEQUANT_4BIT(dequant_4bit_bf16, uint16_t, f32_to_bf16, SIMD16, LUT_BF16)
QT_DEQUANT_4BIT(dequant_4bit_f16, _Float16, as_f16, SIMD16, LUT_F16)

/* absmax is fp32 [nblocks], or with double quantization (qabs != NULL) it is formed per block as
 * a_b = ncode[qabs[b]] * nabs[b / 256] + offset (fp32, in that order), as nf4.dequantize_absmax. */
void qt_dequant_4bit(const uint8_t *packed, const float *absmax, const uint8_t *qabs, const float *ncode,
                     const float *nabs, float offset, const float *code, int64_t n, int64_t blocksize, void *out,
                     int kind, int threads) {
    if (kind == 0) dequant_4bit_f32(packed, absmax, qabs, ncode, nabs, offset, code, n, blocksize, (float *)out, threads);
    else if (kind == 1) dequant_4bit_bf16(packed, absmax, qabs, ncode, nabs, offset, code, n, blocksize, (uint16_t *)out, threads);
    else dequant_4bit_f16(packed, absmax, qabs, ncode, nabs, offset, code, n, blocksize, (_Float16 *)out, threads);
}

/* Blockwise absmax + nearest code, packed two per byte (bitsandbytes' arithmetic):
 *   a_b = max |w| over the block;  x = clamp(w * (1/max(a_b, 1e-38)), -1, 1)  (w / a_b in a partial last block)
 *   q = order[#{j : mids[j] < x}]   (torch.bucketize with right=False over the 15 sorted midpoints)
 * The pad nibble of an odd element count encodes x = 0. */
static inline uint8_t nearest(float x, const float *mids, const uint8_t *order) {
    int q = 0;
    for (int j = 0; j < 15; j++) q += mids[j] < x;
    return order[q];
}

void qt_quant_4bit(const float *w, int64_t n, int64_t blocksize, const float *mids, const uint8_t *order,
                   uint8_t *packed, float *absmax, int threads) {
    int64_t nblocks = (n + blocksize - 1) / blocksize;
    int64_t full = n - n % blocksize;
    uint8_t zero_code = nearest(0.0f, mids, order);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < nblocks; b++) {
        const int64_t start = b * blocksize;
        const int64_t end = start + blocksize < n ? start + blocksize : n;
        float am = 0.0f;
        for (int64_t e = start; e < end; e++) {
            float v = w[e] < 0 ? -w[e] : w[e];
            am = v > am ? v : am;
        }
        const int partial = start >= full;
        const float amc = am > 1e-38f ? am : 1e-38f;
        absmax[b] = partial ? amc : am;  /* torch/bitsandbytes keep the clamped absmax of a partial block */
        const float r = 1.0f / amc;
        for (int64_t e = start; e < end; e += 2) {
            uint8_t c[2];
            for (int t = 0; t < 2; t++) {
                if (e + t < end) {
                    float x = partial ? w[e + t] / amc : w[e + t] * r;
                    x = x < -1.0f ? -1.0f : (x > 1.0f ? 1.0f : x);
                    c[t] = nearest(x, mids, order);
                } else {
                    c[t] = zero_code;
                }
            }
            /* a block of odd length starts mid-byte only if blocksize is odd, which configs forbid */
            packed[e >> 1] = (uint8_t)((c[0] << 4) | c[1]);
        }
    }
}

static inline float load(const void *in, int kind, int64_t i) {
    if (kind == 0) return ((const float *)in)[i];
    if (kind == 1) {
        uint32_t u = (uint32_t)((const uint16_t *)in)[i] << 16;
        float v;
        memcpy(&v, &u, 4);
        return v;
    }
    return (float)((const _Float16 *)in)[i];
}

/* int8 dequantize per row/per group, in fp32 then converted:
 *   symmetric (zero == NULL):  W[r, k] = q[r, k] * (s[r, k / g] / 127)
 *   zero-point (uint8 codes):  W[r, k] = (q[r, k] - z[r, k / g]) * s[r, k / g]          */
void qt_dequant_int8(const void *q, const float *s, const uint8_t *zero, int64_t rows, int64_t cols,
                     int64_t g, int64_t ngroups, void *out, int kind, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t k0 = 0; k0 < cols; k0 += g) {
            const int64_t gi = r * ngroups + k0 / g;
            const int64_t k1 = k0 + g < cols ? k0 + g : cols;
            if (zero == NULL) {
                const float step = s[gi] / 127.0f;
                const int8_t *qr = (const int8_t *)q + r * cols;
                if (kind == 1) {
                    uint16_t *o = (uint16_t *)out + r * cols;
                    for (int64_t k = k0; k < k1; k++) o[k] = f32_to_bf16((float)qr[k] * step);
                } else {
                    for (int64_t k = k0; k < k1; k++) store(out, kind, r * cols + k, (float)qr[k] * step);
                }
            } else {
                const float sc = s[gi], z = (float)zero[gi];
                const uint8_t *qr = (const uint8_t *)q + r * cols;
                for (int64_t k = k0; k < k1; k++) store(out, kind, r * cols + k, ((float)qr[k] - z) * sc);
            }
        }
    }
}

/* bitsandbytes' int8_vectorwise_quant arithmetic, per row r of an fp32/bf16/fp16 [rows, cols] weight:
 *   a_r = max_k |w[r, k]|;  q[r, k] = round_half_even(w[r, k] * ((1 / max(a_r, 1e-12)) * 127))   */
void qt_quant_int8_rows(const void *w, int in_kind, int64_t rows, int64_t cols, int8_t *q, float *absmax,
                        int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        float am = 0.0f;
        for (int64_t k = 0; k < cols; k++) {
            float v = load(w, in_kind, r * cols + k);
            v = v < 0 ? -v : v;
            am = v > am ? v : am;
        }
        absmax[r] = am;
        /* torch evaluates 127.0 / t as reciprocal(t) * 127: two roundings, reproduced here */
        const float scale = (1.0f / (am > 1e-12f ? am : 1e-12f)) * 127.0f;
        for (int64_t k = 0; k < cols; k++) q[r * cols + k] = (int8_t)nearbyintf(load(w, in_kind, r * cols + k) * scale);
    }
}

/* GPTQ v1 dequantize, W[n, k] = s[g, n] * (code(k, n) - z[g, n]) with g = g_idx[k], in fp32:
 *   code(k, n) = bits [bits*(k%32), +bits) of the little-endian stream of words
 *                qweight[(k/32)*bits .. +bits, n]   (3-bit codes may straddle two words)
 * qweight int32 [ceil(K/32)*bits, N]; z int32 [G, N] (stored zero + 1); s fp32 [G, N]; out [N, K].
 * Tiles of 16 output rows by 32 input columns keep reads and writes in cache lines. */
void qt_dequant_gptq(const int32_t *qweight, const int32_t *z, const float *s, const int32_t *g_idx,
                     int64_t K, int64_t N, int bits, void *out, int kind, int threads) {
    const int64_t kblocks = (K + 31) / 32;
    const int64_t ntiles = (N + 15) / 16;
    const uint32_t mask = (1u << bits) - 1u;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < ntiles; t++) {
        const int64_t n0 = t * 16;
        const int nt = N - n0 < 16 ? (int)(N - n0) : 16;
        uint32_t words[8][16];
        float vals[16][32];
        for (int64_t kb = 0; kb < kblocks; kb++) {
            for (int wd = 0; wd < bits; wd++)
                for (int j = 0; j < nt; j++) words[wd][j] = (uint32_t)qweight[(kb * bits + wd) * N + n0 + j];
            const int kt = K - kb * 32 < 32 ? (int)(K - kb * 32) : 32;
            for (int i = 0; i < kt; i++) {
                const int off = i * bits, wd = off >> 5, sh = off & 31;
                const int64_t g = g_idx[kb * 32 + i];
                for (int j = 0; j < nt; j++) {
                    uint32_t c = words[wd][j] >> sh;
                    if (sh + bits > 32) c |= words[wd + 1][j] << (32 - sh);
                    c &= mask;
                    vals[j][i] = s[g * N + n0 + j] * (float)((int32_t)c - z[g * N + n0 + j]);
                }
            }
            for (int j = 0; j < nt; j++)
                for (int i = 0; i < kt; i++) store(out, kind, (n0 + j) * K + kb * 32 + i, vals[j][i]);
        }
    }
}

/* LLM.int8 epilogue (bitsandbytes' int8_mm_dequant arithmetic), one pass over the int32 product:
 *   y[m, n] = (acc[m, n] * (sx[m] * scb[n])) * c [+ bias[n]]   in fp32, then converted;
 * c = fp32(1/127^2) for qtune, fp32(6.200124e-05) for bitsandbytes' own constant. */
void qt_int8_mm_dequant(const int32_t *acc, const float *sx, const float *scb, const float *bias, int64_t M,
                        int64_t N, float c, void *out, int kind, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t m = 0; m < M; m++) {
        const float s = sx[m];
        for (int64_t n = 0; n < N; n++) {
            float y = ((float)acc[m * N + n] * (s * scb[n])) * c;
            if (bias) y = y + bias[n];
            store(out, kind, m * N + n, y);
        }
    }
}
