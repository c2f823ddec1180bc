/* bf16 weights times bf16 activations, summed in fp32: a float model's linears and a float
 * lm_head. PyTorch's CPU bf16 matmul ran at ~5 GMAC/s a thread at every shape on an AVX2 machine
 * (no AVX512-BF16 for oneDNN): 4-6x this kernel's time at 64 rows, 1.3-2.9x at one row, where
 * both are bound by memory for the large matrices (the 16B lm_head: 24.0 against 19.2 ms, 2
 * threads); docs/PERFORMANCE.md has the table.
 *
 *   out[i, j] = bf16(sum_t x[i, t] * w[j, t])
 *
 * Each product of two bf16 values is exact in fp32 (8-bit significands), so the sums differ from
 * any other fp32 order by rounding only. The activations are widened to fp32 once per call; the
 * weights as they are loaded, 16 at a time: a 32-bit lane holds two bf16 values, and a shift left
 * by 16 gives the even one as fp32, a mask of the high half the odd one (so the activations are
 * stored even values first, then odd, per 16), two ALU operations per 16 weights against the four
 * of widening 8 at a time. Each widened weight vector feeds up to ROWS activation rows: blocks of
 * ROWS x COLS dot products in AVX2 registers (12 accumulators, the activations read from L1 as
 * the FMAs' memory operands). AVX2 is the path on AVX512 machines too: on Zen 4 a zmm FMA costs
 * what two ymm ones do (not measured there). Weight rows (outputs) are split across the
 * OpenMP threads in contiguous runs; activation rows go in passes that fit a core's L2 share, so
 * each pass reads its activations from cache while the weights stream once per pass.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "internal.h"

#define K_STEP DSMOE_BF16_K_STEP
#define ROWS 4
#define COLS 3
#define PASS_BYTES (256 * 1024)

_Static_assert(K_STEP == 16, "one ymm of bf16 per step, widened to two of fp32");

/* out[i, j] for rows i0..i0+rows and columns j0..j0+cols, rows <= ROWS and cols <= COLS constant
 * at each call site so the accumulators stay in registers. */
__attribute__((target("avx2,fma"), always_inline)) static inline void block_bf16(const float *xf, const uint16_t *w,
                                                                                 int64_t n, int64_t k, int64_t i0,
                                                                                 const int rows, int64_t j0,
                                                                                 const int cols, uint16_t *out) {
    __m256 acc[ROWS][COLS];
#pragma GCC unroll 4
    for (int r = 0; r < rows; r++)
#pragma GCC unroll 3
        for (int c = 0; c < cols; c++) acc[r][c] = _mm256_setzero_ps();
    const __m256i high = _mm256_set1_epi32((int)0xffff0000u);
    for (int64_t t = 0; t < k; t += K_STEP) {
#pragma GCC unroll 3
        for (int c = 0; c < cols; c++) {
            if (rows == 1) prefetch_ahead(w + (j0 + c) * k + t); /* many rows: slower by 6% */
            const __m256i v = _mm256_loadu_si256((const __m256i *)(w + (j0 + c) * k + t));
            const __m256 even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
            const __m256 odd = _mm256_castsi256_ps(_mm256_and_si256(v, high));
#pragma GCC unroll 4
            for (int r = 0; r < rows; r++)
                acc[r][c] = _mm256_fmadd_ps(odd, _mm256_loadu_ps(xf + (i0 + r) * k + t + 8),
                                            _mm256_fmadd_ps(even, _mm256_loadu_ps(xf + (i0 + r) * k + t), acc[r][c]));
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < rows; r++)
#pragma GCC unroll 3
        for (int c = 0; c < cols; c++) out[(i0 + r) * n + j0 + c] = f32_to_bf16(hsum256(acc[r][c]));
}

/* block_bf16 for 1..ROWS rows, each count a constant case (cols is constant at both call sites). */
__attribute__((target("avx2,fma"), always_inline)) static inline void rows_bf16(const float *xf, const uint16_t *w,
                                                                                int64_t n, int64_t k, int64_t i0,
                                                                                int64_t rows, int64_t j,
                                                                                const int cols, uint16_t *out) {
    switch (rows) {
#define ROWS_CASE(r) \
    case r: block_bf16(xf, w, n, k, i0, r, j, cols, out); break;
        ROWS_CASE(1) ROWS_CASE(2) ROWS_CASE(3) ROWS_CASE(4)
#undef ROWS_CASE
    default: break;
    }
}

/* Columns j0..j1 of activation rows p..end: each block of weight rows (COLS x k, in L1) meets
 * every row of the pass (in L2) before the next block is read. */
__attribute__((target("avx2,fma"))) static void pass_bf16(const float *xf, const uint16_t *w, int64_t n, int64_t k,
                                                          int64_t p, int64_t end, int64_t j0, int64_t j1,
                                                          uint16_t *out) {
    int64_t j = j0;
    for (; j + COLS <= j1; j += COLS)
        for (int64_t i = p; i < end; i += ROWS) rows_bf16(xf, w, n, k, i, end - i < ROWS ? end - i : ROWS, j, COLS, out);
    for (; j < j1; j++)
        for (int64_t i = p; i < end; i += ROWS) rows_bf16(xf, w, n, k, i, end - i < ROWS ? end - i : ROWS, j, 1, out);
}

_Static_assert(ROWS == 4, "rows_bf16 names the row counts 1 to 4");

/* One activation row in fp32, each step of 16 as its 8 even-indexed values then its 8 odd ones:
 * the order in which block_bf16 widens the weights. */
__attribute__((target("avx2,fma"))) static void widen_row(const uint16_t *x, int64_t k, float *xf) {
    const __m256i high = _mm256_set1_epi32((int)0xffff0000u);
    for (int64_t t = 0; t < k; t += K_STEP) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(x + t));
        _mm256_storeu_si256((__m256i *)(xf + t), _mm256_slli_epi32(v, 16));
        _mm256_storeu_si256((__m256i *)(xf + t + 8), _mm256_and_si256(v, high));
    }
}

int dsmoe_bf16_matmul(int64_t m, int64_t n, int64_t k, const uint16_t *x, const uint16_t *w, uint16_t *out) {
    if (dsmoe_native_isa() == DSMOE_ISA_NONE || m < 1 || n < 1 || k < K_STEP || k % K_STEP) return -1;
    float *xf = malloc((size_t)m * (size_t)k * sizeof(float));
    if (!xf) return -2;
    int64_t pass = PASS_BYTES / (k * (int64_t)sizeof(float)) / ROWS * ROWS;
    if (pass < ROWS) pass = ROWS;
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t i = 0; i < m; i++) widen_row(x + i * k, k, xf + i * k);
        /* the implied barrier: every row is widened before any thread reads it */
        const int64_t threads = omp_get_num_threads(), id = omp_get_thread_num();
        const int64_t groups = (n + COLS - 1) / COLS;
        const int64_t j0 = groups * id / threads * COLS;
        int64_t j1 = groups * (id + 1) / threads * COLS;
        if (j1 > n) j1 = n;
        for (int64_t p = 0; p < m && j0 < j1; p += pass) {
            pass_bf16(xf, w, n, k, p, p + pass < m ? p + pass : m, j0, j1, out);
        }
    }
    free(xf);
    return 0;
}
