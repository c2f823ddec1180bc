/* dsmoe's 6-bit weights ("q6", the lm_head of 4-bit runs) times int8-rounded activations.
 *
 * The format (quantized by dsmoe_quantize_q6 in quantize.c; quant/q6.py is its plain-torch
 * reference): each row is cut into blocks of DSMOE_ACT_BLOCK (64) values, one fp16 step per block,
 * step = fp16(absmax / DSMOE_Q6_MAX), and each value is q = clamp(round(w / step), -31, 31), stored
 * as the unsigned code u = q + 32 (1..63). A block is DSMOE_Q6_BLOCK_BYTES (48) bytes: 32 bytes of
 * low nibbles (byte j: u[j] low, u[j + 32] high) then 16 bytes of the top two bits (byte j: u[j] in
 * bits 0-1, u[j + 16] in 2-3, u[j + 32] in 4-5, u[j + 48] in 6-7). The steps are a separate
 * [n, k / 64] fp16 array. 6.25 bits a weight: lm_head at 16B reads 164 MB instead of int8's 210.
 *
 * The order unpacks with few instructions: one 32-byte load gives the low nibbles of all 64 codes
 * (shifted by 0 or 4 per half), one 16-byte load broadcast to the four 128-bit lanes and rotated
 * by a different count per lane puts each value's top bits at bits 4-5. The codes are unsigned, so
 * vpdpbusd (and AVX2's vpmaddubsw: 2 * 63 * 127 < 32767, no saturation) multiplies them by the
 * signed activations directly; the +32 comes back out by starting each 32-bit lane at -32 times the
 * sum of its four activations (computed once per activation row). Lane l of a block's integer sums
 * is then exactly sum_{j in 4l..4l+3} q[j] * x[j] on both instruction sets, and the fp32 steps are
 * the same (16 lanes, acc += lane * (xscale * step) per block, the two 8-lane halves added, then
 * summed), so both give the same bits.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "internal.h"

#define QBLOCK DSMOE_ACT_BLOCK
#define BLOCK_BYTES DSMOE_Q6_BLOCK_BYTES
#define CODE_OFFSET (DSMOE_Q6_MAX + 1)
#define LANES (QBLOCK / 4) /* 32-bit lanes of one block's dot product */
#define ROWS_PER_TASK 16

_Static_assert(QBLOCK == 64 && BLOCK_BYTES == 48, "the unpacking below is written for 64 values in 48 bytes");

#define TARGET_VNNI "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c"
#define TARGET_AVX2 "avx2,fma,f16c"

/* The 64 codes of one block, in order. */
__attribute__((target(TARGET_VNNI))) static inline __m512i codes_vnni(const uint8_t *p) {
    const __m256i v = _mm256_loadu_si256((const __m256i *)p);
    const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(v), v, 1);
    const __m512i low = _mm512_and_si512(_mm512_srlv_epi64(both, _mm512_setr_epi64(0, 0, 0, 0, 4, 4, 4, 4)),
                                         _mm512_set1_epi8(0x0f));
    const __m512i top = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(p + 32)));
    /* lane 0 takes bits 0-1 to 4-5 (rotate 4), lane 1 bits 2-3 (2), lane 2 keeps 4-5, lane 3 bits 6-7 (30) */
    const __m512i high = _mm512_rolv_epi32(top, _mm512_setr_epi32(4, 4, 4, 4, 2, 2, 2, 2, 0, 0, 0, 0, 30, 30, 30, 30));
    return _mm512_ternarylogic_epi32(low, high, _mm512_set1_epi8(0x30), 0xf8); /* low | (high & 0x30) */
}

/* The same codes as two halves: values 0-31 and 32-63. */
__attribute__((target(TARGET_AVX2))) static inline void codes_avx2(const uint8_t *p, __m256i *first, __m256i *second) {
    const __m256i v = _mm256_loadu_si256((const __m256i *)p);
    const __m256i top = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(p + 32)));
    const __m256i nibble = _mm256_set1_epi8(0x0f), bits45 = _mm256_set1_epi8(0x30);
    const __m256i high0 = _mm256_sllv_epi32(top, _mm256_setr_epi32(4, 4, 4, 4, 2, 2, 2, 2));
    const __m256i high1 = _mm256_srlv_epi32(top, _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2));
    *first = _mm256_or_si256(_mm256_and_si256(v, nibble), _mm256_and_si256(high0, bits45));
    *second = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v, 4), nibble), _mm256_and_si256(high1, bits45));
}

/* out[i * ld + n] for weight rows n0..n1 and m activation rows; offsets holds LANES per block. */
__attribute__((target(TARGET_VNNI))) static void rows_vnni(int64_t n0, int64_t n1, int64_t k, int64_t m,
                                                           const qacts *a, const int32_t *offsets, const uint8_t *w,
                                                           const uint16_t *steps, float *out, int64_t ld) {
    const int64_t blocks = k / QBLOCK;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *row = w + n * blocks * BLOCK_BYTES;
        const uint16_t *row_steps = steps + n * blocks;
        for (int64_t i = 0; i < m; i++) {
            __m512 acc = _mm512_setzero_ps();
            for (int64_t b = 0; b < blocks; b++) {
                const int64_t at = i * blocks + b;
                if (i == 0) prefetch_ahead(row + b * BLOCK_BYTES); /* as rows_avx2 */
                const __m512i x = _mm512_loadu_si512(a->q + at * QBLOCK);
                const __m512i d = _mm512_dpbusd_epi32(_mm512_loadu_si512(offsets + at * LANES),
                                                      codes_vnni(row + b * BLOCK_BYTES), x);
                const float step = a->scale[at] * _cvtsh_ss(row_steps[b]);
                acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(step), acc);
            }
            const __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc), 1));
            out[i * ld + n] = hsum256(_mm256_add_ps(_mm512_castps512_ps256(acc), high));
        }
    }
}

#define DOT_AVX2(offset, u, x) \
    _mm256_add_epi32((offset), _mm256_madd_epi16(_mm256_maddubs_epi16((u), (x)), _mm256_set1_epi16(1)))

__attribute__((target(TARGET_AVX2))) static void rows_avx2(int64_t n0, int64_t n1, int64_t k, int64_t m,
                                                           const qacts *a, const int32_t *offsets, const uint8_t *w,
                                                           const uint16_t *steps, float *out, int64_t ld) {
    const int64_t blocks = k / QBLOCK;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *row = w + n * blocks * BLOCK_BYTES;
        const uint16_t *row_steps = steps + n * blocks;
        for (int64_t i = 0; i < m; i++) {
            __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
            for (int64_t b = 0; b < blocks; b++) {
                const int64_t at = i * blocks + b;
                const int8_t *x = a->q + at * QBLOCK;
                const int32_t *off = offsets + at * LANES;
                __m256i u0, u1;
                if (i == 0) prefetch_ahead(row + b * BLOCK_BYTES); /* later rows find it in L1 */
                codes_avx2(row + b * BLOCK_BYTES, &u0, &u1);
                const __m256i d0 = DOT_AVX2(_mm256_loadu_si256((const __m256i *)off), u0,
                                            _mm256_loadu_si256((const __m256i *)x));
                const __m256i d1 = DOT_AVX2(_mm256_loadu_si256((const __m256i *)(off + 8)), u1,
                                            _mm256_loadu_si256((const __m256i *)(x + 32)));
                const __m256 step = _mm256_set1_ps(a->scale[at] * _cvtsh_ss(row_steps[b]));
                acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d0), step, acc0);
                acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d1), step, acc1);
            }
            out[i * ld + n] = hsum256(_mm256_add_ps(acc0, acc1));
        }
    }
}

int dsmoe_q6_gemv(int64_t m, int64_t n, int64_t k, const uint16_t *x, const uint8_t *w, const uint16_t *steps,
                  void *out, int out_f32) {
    const int isa = dsmoe_native_isa();
    __builtin_cpu_init();
    if (isa == DSMOE_ISA_NONE || !__builtin_cpu_supports("f16c") || k % QBLOCK || m < 1) return -1;
    qacts a;
    float *tmp = malloc((size_t)k * sizeof(float));
    float *acc = malloc((size_t)(m * n) * sizeof(float));
    int32_t *offsets = malloc((size_t)(m * k / 4) * sizeof(int32_t));
    if (!alloc_acts(&a, m, k) || !tmp || !acc || !offsets) {
        free_acts(&a), free(tmp), free(acc), free(offsets);
        return -2;
    }
    quantize_bf16_rows(x, m, k, &a, tmp);
    free(tmp);
    for (int64_t l = 0; l < m * k / 4; l++) {
        const int8_t *q = a.q + 4 * l;
        offsets[l] = -CODE_OFFSET * (q[0] + q[1] + q[2] + q[3]);
    }
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < (n + ROWS_PER_TASK - 1) / ROWS_PER_TASK; t++) {
        const int64_t n0 = t * ROWS_PER_TASK, n1 = n0 + ROWS_PER_TASK < n ? n0 + ROWS_PER_TASK : n;
        if (isa == DSMOE_ISA_VNNI)
            rows_vnni(n0, n1, k, m, &a, offsets, w, steps, acc, n);
        else
            rows_avx2(n0, n1, k, m, &a, offsets, w, steps, acc, n);
        store_rows(out, out_f32, acc, m, n, n0, n1);
    }
    free_acts(&a), free(acc), free(offsets);
    return 0;
}
