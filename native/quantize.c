/* Quantizing float weights while a checkpoint loads: bitsandbytes' NF4/FP4 blockwise absmax,
 * dsmoe's LLM.int8 rows and its 6-bit q6 blocks (the end of this file), byte for byte what the
 * PyTorch code computes, across the OpenMP team.
 *
 * The reference is the PyTorch arithmetic itself, so each step does the same fp32 operations:
 *   4-bit (bitsandbytes' default-backend quantize_4bit, which its CPU backend runs): a full
 *   block's absmax is max |x| and its values are clamp(x * (1 / max(absmax, 1e-38f)), -1, 1); the
 *   ragged last block stores max(max |x|, 1e-38f) and divides by it (x / am, not times 1 / am).
 *   The code of a scaled value s is codes[number of bounds b with b < s] (torch.bucketize, right
 *   False: a value exactly on a midpoint takes the lower entry); an odd count is padded with one
 *   0.0. Two codes to a byte, the first in the high nibble.
 *   int8 (quant/linear.py quantize_int8): SCB is max |row|, and a value is
 *   clamp(round_half_even(w * ((1 / max(SCB, FLT_MIN)) * 127)), -127, 127), where a NaN
 *   (0 * inf, in a row whose 127 / SCB overflows) converts to 0 as PyTorch's cast does.
 * Every product and quotient is one IEEE fp32 operation (nothing here is contracted into an FMA:
 * there is no addition to fuse), and the maxima do not depend on their order, so the threads may
 * split the work any way. Inputs are finite; NaN is outside the contract. */
#include <float.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu, bits;
    if (exponent == 0) {
        float magnitude = (float)mantissa * 0x1p-24f; /* zero or subnormal: exact in fp32 */
        return sign ? -magnitude : magnitude;
    }
    if (exponent == 31) bits = sign | 0x7f800000u | (mantissa << 13);
    else bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* The bitsandbytes clamp floor of a 4-bit absmax: 1e-38 as fp32 (a subnormal). */
#define ABSMAX_FLOOR 1e-38f
#define MAX_BLOCK DSMOE_MAX_QUANT_BLOCK
/* Below this many values one thread does the work: waking the team costs more (a load quantizes
 * hundreds of small matrices; on a busy machine a late thread costs a time slice). */
#define PARALLEL_MIN (1 << 18)

typedef struct {
    const float *bounds;   /* DSMOE_4BIT_CODES - 1 ascending midpoints */
    const uint8_t *codes;  /* the stored code of each bucket */
} codebook4;

/* clamp(v, -1, 1) written as the comparisons min/max instructions make. */
static inline float clamp_unit(float v) {
    v = v < -1.0f ? -1.0f : v;
    return v > 1.0f ? 1.0f : v;
}

static inline uint8_t code_of(float s, const codebook4 *book) {
    int q = 0;
    for (int i = 0; i < DSMOE_4BIT_CODES - 1; i++) q += book->bounds[i] < s;
    return book->codes[q];
}

/* 16 * groups scaled values into 8 * groups bytes, 16 at a time: the count of bounds below each
 * value from 15 compares, the code by a byte shuffle of the codes, two codes a byte by a
 * multiply-add (first * 16 + second). The scalar loop below gives the same bytes, slower. */
__attribute__((target("avx2"))) static void pack_codes_avx2(const float *s, int64_t groups, const codebook4 *book,
                                                           uint8_t *out) {
    __m256 bounds[DSMOE_4BIT_CODES - 1];
    for (int i = 0; i < DSMOE_4BIT_CODES - 1; i++) bounds[i] = _mm256_set1_ps(book->bounds[i]);
    const __m128i lut = _mm_loadu_si128((const __m128i *)book->codes);
    const __m128i first_high = _mm_set1_epi16(0x0110); /* bytes 16 (first of a pair), 1 (second) */
    for (int64_t g = 0; g < groups; g++) {
        const __m256 s0 = _mm256_loadu_ps(s + 16 * g), s1 = _mm256_loadu_ps(s + 16 * g + 8);
        __m256i c0 = _mm256_setzero_si256(), c1 = _mm256_setzero_si256();
        for (int i = 0; i < DSMOE_4BIT_CODES - 1; i++) {
            c0 = _mm256_sub_epi32(c0, _mm256_castps_si256(_mm256_cmp_ps(bounds[i], s0, _CMP_LT_OQ)));
            c1 = _mm256_sub_epi32(c1, _mm256_castps_si256(_mm256_cmp_ps(bounds[i], s1, _CMP_LT_OQ)));
        }
        const __m256i counts = _mm256_permute4x64_epi64(_mm256_packs_epi32(c0, c1), 0xD8); /* back in order */
        const __m128i index = _mm_packus_epi16(_mm256_castsi256_si128(counts), _mm256_extracti128_si256(counts, 1));
        const __m128i pairs = _mm_maddubs_epi16(_mm_shuffle_epi8(lut, index), first_high);
        _mm_storel_epi64((__m128i *)(out + 8 * g), _mm_packus_epi16(pairs, pairs));
    }
}

/* One block of len values (scaled into s, a scratch of len floats), packed into out from its
 * first value, which sits at an even position; an odd len is padded with 0.0. */
__attribute__((target_clones("avx2", "default")))
static void pack_block(float *s, int64_t len, float absmax, int ragged, const codebook4 *book, int avx2,
                       uint8_t *out) {
    if (ragged) {
        const float am = fmaxf(absmax, ABSMAX_FLOOR);
        for (int64_t j = 0; j < len; j++) s[j] = clamp_unit(s[j] / am);
    } else {
        const float r = 1.0f / fmaxf(absmax, ABSMAX_FLOOR);
        for (int64_t j = 0; j < len; j++) s[j] = clamp_unit(s[j] * r);
    }
    int64_t done = 0;
    if (avx2) {
        pack_codes_avx2(s, len / 16, book, out);
        done = len / 16 * 16;
    }
    uint8_t q[MAX_BLOCK];
    float bounds[DSMOE_4BIT_CODES - 1];
    memcpy(bounds, book->bounds, sizeof bounds);
    for (int64_t j = done; j < len; j++) {
        int c = 0;
        for (int i = 0; i < DSMOE_4BIT_CODES - 1; i++) c += bounds[i] < s[j];
        q[j] = (uint8_t)c;
    }
    for (int64_t j = done; j < len; j += 2) {
        uint8_t low = (j + 1 < len) ? book->codes[q[j + 1]] : code_of(0.0f, book);
        out[j / 2] = (uint8_t)(book->codes[q[j]] << 4 | low);
    }
}

__attribute__((target_clones("avx2", "default")))
static float load_block(const void *x, int dtype, int64_t start, int64_t len, float *s) {
    if (dtype == DSMOE_DTYPE_F32) {
        memcpy(s, (const float *)x + start, (size_t)len * sizeof(float));
    } else if (dtype == DSMOE_DTYPE_BF16) {
        const uint16_t *p = (const uint16_t *)x + start;
        for (int64_t j = 0; j < len; j++) s[j] = bf16_to_f32(p[j]);
    } else {
        const uint16_t *p = (const uint16_t *)x + start;
        for (int64_t j = 0; j < len; j++) s[j] = f16_to_f32(p[j]);
    }
    /* max |x|: for finite floats the order of |x|'s bits as integers is the order of the values,
     * and an integer maximum vectorizes where a float one (NaN rules) does not. */
    uint32_t top = 0;
    for (int64_t j = 0; j < len; j++) {
        uint32_t bits;
        memcpy(&bits, &s[j], sizeof bits);
        bits &= 0x7fffffffu;
        top = bits > top ? bits : top;
    }
    float m;
    memcpy(&m, &top, sizeof m);
    return m;
}

int dsmoe_quantize_4bit(const void *x, int dtype, int64_t n, int64_t blocksize, const float *bounds,
                        const uint8_t *codes, uint8_t *packed, float *absmax) {
    if (n < 0 || blocksize < 2 || blocksize % 2 || blocksize > MAX_BLOCK) return -1;
    if (dtype != DSMOE_DTYPE_F32 && dtype != DSMOE_DTYPE_BF16 && dtype != DSMOE_DTYPE_F16) return -1;
    for (int i = 0; i < DSMOE_4BIT_CODES; i++)
        if (codes[i] >= DSMOE_4BIT_CODES) return -1;
    const codebook4 book = {bounds, codes};
    __builtin_cpu_init();
    const int avx2 = __builtin_cpu_supports("avx2");
    const int64_t blocks = (n + blocksize - 1) / blocksize, full = n / blocksize;
#pragma omp parallel if (n >= PARALLEL_MIN)
    {
        float s[MAX_BLOCK];
#pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
            const int64_t start = b * blocksize, len = (start + blocksize <= n) ? blocksize : n - start;
            const float m = load_block(x, dtype, start, len, s);
            const int ragged = b >= full;
            absmax[b] = ragged ? fmaxf(m, ABSMAX_FLOOR) : m;
            pack_block(s, len, m, ragged, &book, avx2, packed + start / 2);
        }
    }
    return 0;
}

__attribute__((target_clones("avx2", "default")))
static void int8_row(const void *x, int dtype, int64_t row, int64_t cols, float *s, int8_t *q, float *scb) {
    const float m = load_block(x, dtype, row * cols, cols, s);
    const float r = (1.0f / fmaxf(m, FLT_MIN)) * 127.0f;
    int8_t *out = q + row * cols;
    for (int64_t j = 0; j < cols; j++) {
        float v = nearbyintf(s[j] * r);
        v = v < -127.0f ? -127.0f : v;
        v = v > 127.0f ? 127.0f : v;
        out[j] = (int8_t)(int32_t)(v == v ? v : 0.0f); /* a NaN (0 * inf) casts to 0 in PyTorch */
    }
    scb[row] = m;
}

int dsmoe_quantize_int8(const void *x, int dtype, int64_t rows, int64_t cols, int8_t *q, float *scb) {
    if (rows < 0 || cols < 1) return -1;
    if (dtype != DSMOE_DTYPE_F32 && dtype != DSMOE_DTYPE_BF16 && dtype != DSMOE_DTYPE_F16) return -1;
    int failed = 0;
#pragma omp parallel if (rows * cols >= PARALLEL_MIN)
    {
        float *s = thread_scratch(cols, &failed);
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++)
            if (s != NULL) int8_row(x, dtype, r, cols, s, q, scb);
        free(s);
    }
    return failed ? -2 : 0;
}

/* ---- dsmoe's 6-bit format (q6.c has the layout) ---------------------------------------------- */

/* An fp32 value to fp16, rounding to nearest even as PyTorch's .to(torch.float16) does, subnormals
 * included; 65520 and above become infinity. */
static uint16_t f32_to_f16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    const uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    u &= 0x7fffffffu;
    if (u >= 0x477ff000u) return sign | 0x7c00u;
    if (u < 0x38800000u) /* below 2^-14: a multiple of fp16's subnormal unit 2^-24 (exact scaling) */
        return sign | (uint16_t)nearbyintf(fabsf(f) * 0x1p24f);
    const uint32_t rebased = u - ((127u - 15u) << 23);
    return sign | (uint16_t)((rebased + 0xfffu + ((rebased >> 13) & 1u)) >> 13);
}

/* One block of DSMOE_ACT_BLOCK values: its fp16 step and 48 bytes; -1 when the step overflows. */
static int q6_block(const float *v, uint8_t *out, uint16_t *step_out) {
    enum { N = DSMOE_ACT_BLOCK, TOP = DSMOE_Q6_MAX };
    float amax = 0.0f;
    for (int j = 0; j < N; j++) amax = fmaxf(amax, fabsf(v[j]));
    const uint16_t h = f32_to_f16(amax / (float)TOP);
    if ((h & 0x7c00u) == 0x7c00u) return -1;
    const float step = f16_to_f32(h);
    uint8_t u[DSMOE_ACT_BLOCK];
    for (int j = 0; j < N; j++) {
        float q = step > 0.0f ? nearbyintf(v[j] / step) : 0.0f;
        q = q < -TOP ? -TOP : q;
        q = q > TOP ? TOP : q;
        u[j] = (uint8_t)((int)q + TOP + 1);
    }
    for (int j = 0; j < N / 2; j++) out[j] = (uint8_t)((u[j] & 15) | (u[j + N / 2] & 15) << 4);
    for (int j = 0; j < N / 4; j++)
        out[N / 2 + j] = (uint8_t)((u[j] >> 4) | (u[j + N / 4] >> 4) << 2 | (u[j + N / 2] >> 4) << 4 |
                                   (u[j + 3 * N / 4] >> 4) << 6);
    *step_out = h;
    return 0;
}

int dsmoe_quantize_q6(const void *x, int dtype, int64_t rows, int64_t cols, uint8_t *packed, uint16_t *steps) {
    if (rows < 0 || cols < 1 || cols % DSMOE_ACT_BLOCK) return -1;
    if (dtype != DSMOE_DTYPE_F32 && dtype != DSMOE_DTYPE_BF16 && dtype != DSMOE_DTYPE_F16) return -1;
    const int64_t blocks = cols / DSMOE_ACT_BLOCK;
    int failed = 0, overflow = 0;
#pragma omp parallel if (rows * cols >= PARALLEL_MIN)
    {
        float *s = thread_scratch(cols, &failed);
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            if (s == NULL) continue;
            load_block(x, dtype, r * cols, cols, s);
            for (int64_t b = 0; b < blocks; b++)
                if (q6_block(s + b * DSMOE_ACT_BLOCK, packed + (r * blocks + b) * DSMOE_Q6_BLOCK_BYTES,
                              steps + r * blocks + b)) {
#pragma omp atomic write
                    overflow = 1;
                }
        }
        free(s);
    }
    return failed ? -2 : overflow ? -1 : 0;
}
