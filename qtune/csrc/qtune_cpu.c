/* qtune native CPU kernels: NF4/FP4 quantize and dequantize, int8 dequantize.
 *
 * Plain C (no PyTorch headers) so it compiles in about a second with the system C compiler; loaded
 * through ctypes by qtune/ops/cpu_native.py and registered as the "cpu" kernel of the qtune:: ops.
 * Every function reproduces the pure-PyTorch reference in qtune/formats bit for bit (IEEE fp32
 * arithmetic in the same order; no -ffast-math), which the tests check.
 *
 * Output kinds: 0 = fp32, 1 = bf16 (round to nearest even, as torch casts), 2 = fp16.
 */
#include <stdint.h>
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
 * e/2 for even e, the low one for odd e. */
void qt_dequant_4bit(const uint8_t *packed, const float *absmax, const float *code, int64_t n,
                     int64_t blocksize, void *out, int kind, int threads) {
    int64_t nblocks = (n + blocksize - 1) / blocksize;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < nblocks; b++) {
        const float a = absmax[b];
        const int64_t start = b * blocksize;
        const int64_t end = start + blocksize < n ? start + blocksize : n;
        int64_t e = start;
        if (e & 1) { store(out, kind, e, code[packed[e >> 1] & 15] * a); e++; }
        for (; e + 1 < end; e += 2) {
            const uint8_t byte = packed[e >> 1];
            store(out, kind, e, code[byte >> 4] * a);
            store(out, kind, e + 1, code[byte & 15] * a);
        }
        if (e < end) store(out, kind, e, code[packed[e >> 1] >> 4] * a);
    }
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

/* int8 symmetric per-row/per-group: W[r, k] = q[r, k] * (s[r, k / g] / 127), computed in fp32. */
void qt_dequant_int8_sym(const int8_t *q, const float *s, int64_t rows, int64_t cols, int64_t g,
                         int64_t ngroups, void *out, int kind, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t k = 0; k < cols; k++) {
            const float step = s[r * ngroups + k / g] / 127.0f;
            store(out, kind, r * cols + k, (float)q[r * cols + k] * step);
        }
    }
}
